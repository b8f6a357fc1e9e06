"""A cut session must look cut (issue 19): never a clean end of truncated data.

Every way we know to break a session — the device service resetting its socket, the engineer's
client resetting its socket, agent kill -9, proxy SIGTERM and kill -9, a stream reset — is
performed against real processes, and both ends are checked: the engineer's raw TCP client
(through ``tunnel forward``) reading to the end must get ECONNRESET, not a short file; the
device's service must see a reset, not a FIN; ``tunnel proxy-command`` must exit 4 with one line
on stderr. No traceback anywhere. Splice itself is checked in-process with real sockets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import threading
import time

import pytest
from fleet_harness import PY, wait_until

from tunnel.splice import SocketEnds, StreamEnds, splice
from tunnel.transport import StreamReset

CHUNK = 256 * 1024
FIRST = 1024 * 1024  # what the service sends before it holds the session open (or resets)


def reset_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class Service:
    """A device service: sends FIRST bytes, then holds (or resets, for ``reset_after``).

    Records how each connection ended from its side: "fin", "reset" or "open".
    """

    def __init__(self, reset_after: bool = False):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reset_after = reset_after
        self.ends: list[str] = []
        self.sent = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        try:
            conn.sendall(os.urandom(FIRST))
        except OSError:
            self.ends.append("reset")
            return
        self.sent.set()
        if self.reset_after:
            time.sleep(0.2)
            reset_close(conn)
            return
        try:
            while conn.recv(65536):
                pass
            self.ends.append("fin")
        except ConnectionResetError:
            self.ends.append("reset")
        except OSError as exc:
            self.ends.append(f"error {exc}")
        conn.close()

    def close(self) -> None:
        self.sock.close()


def read_to_end(sock: socket.socket, timeout: float = 40.0) -> tuple[int, str]:
    """Read until the end; return (bytes, "fin" | "reset" | "timeout")."""
    sock.settimeout(timeout)
    n = 0
    try:
        while data := sock.recv(65536):
            n += len(data)
    except ConnectionResetError:
        return n, "reset"
    except TimeoutError:
        return n, "timeout"
    return n, "fin"


def start_proxy(fleet, idle_timeout: float = 3.0) -> subprocess.Popen:
    log = fleet.root / "proxy.log"
    mark = log.stat().st_size if log.exists() else 0
    proc = fleet.start([PY, "-m", "tunnel.cli", "proxy", "--state", str(fleet.state.root),
                        "--listen", fleet.address, "--log-format", "json",
                        "--idle-timeout", str(idle_timeout)], log)
    wait_until(lambda: '"listening"' in log.read_text()[mark:], 15, 0.05, "proxy listening")
    return proc


@pytest.fixture(params=["quic", "tcp"])
def cut(request, fleet):
    """A proxy (idle timeout 3 s, so a silent agent is dropped fast), one agent with the
    holding service and the resetting service, an admin identity."""
    fleet.env["FLEET_TRANSPORT"] = request.param
    hold, resetting = Service(), Service(reset_after=True)
    config = fleet.enroll_device(
        "robot-1", {"customer": "acme"},
        {"hold": f"127.0.0.1:{hold.port}", "resets": f"127.0.0.1:{resetting.port}"},
        keepalive="1s", transport=request.param,
    )
    proxy = start_proxy(fleet)
    agent = fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    state = {"fleet": fleet, "ops": ops, "proxy": proxy, "agent": agent, "config": config,
             "hold": hold, "resets": resetting, "transport": request.param}
    yield state
    hold.close()
    resetting.close()


class Forward:
    def __init__(self, fleet, ops, service: str):
        self.proc = subprocess.Popen(
            [PY, "-m", "tunnel.cli", "forward", "robot-1", service, "--no-check", "--identity", str(ops)],
            stderr=subprocess.PIPE, text=True, env={**os.environ, **fleet.env},
        )
        line = self.proc.stderr.readline()
        assert line.startswith("forwarding "), line
        self.port = int(line.split()[1].rsplit(":", 1)[1])

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.stderr.read()


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "Exception in" not in text, text


def logs(state) -> str:
    fleet = state["fleet"]
    return (fleet.root / "proxy.log").read_text() + (state["config"].parent / "agent.log").read_text()


def open_download(state, fwd: Forward) -> socket.socket:
    """A session through ``tunnel forward`` to the holding service, FIRST bytes read."""
    sock = fwd.connect()
    got = 0
    sock.settimeout(20)
    while got < FIRST:
        data = sock.recv(65536)
        assert data, "the service ended early"
        got += len(data)
    return sock


def test_device_service_reset_reaches_the_engineer_as_a_reset(cut):
    fleet, ops = cut["fleet"], cut["ops"]
    fwd = Forward(fleet, ops, "resets")
    try:
        n, how = read_to_end(fwd.connect())
        assert how == "reset" and n <= FIRST, (n, how)
    finally:
        err = fwd.stop()
    assert "session cut" in err and "robot-1/resets" in err, err
    out = fleet.tunnel("proxy-command", "robot-1", "resets", identity=ops, input=None, timeout=60)
    assert out.returncode == 4, out
    lines = out.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "cut" in lines[0], lines
    no_traceback(err, out.stderr.decode(), logs(cut))
    ends = wait_until(lambda: [e for e in fleet.audit() if e["type"] == "session.end"], what="ends")
    assert len(ends) == 2 and all(e["result"] == "error" for e in ends), ends


def test_engineer_reset_reaches_the_device_service_as_a_reset(cut):
    fleet, ops, hold = cut["fleet"], cut["ops"], cut["hold"]
    fwd = Forward(fleet, ops, "hold")
    try:
        sock = open_download(cut, fwd)
        reset_close(sock)
        wait_until(lambda: hold.ends, 20, what="the service to see the end")
        assert hold.ends == ["reset"]
        # a clean close from the engineer is a clean FIN on the device side
        sock = open_download(cut, fwd)
        sock.shutdown(socket.SHUT_WR)
        wait_until(lambda: len(hold.ends) == 2, 20, what="the service to see the FIN")
        assert hold.ends[1] == "fin"
        sock.close()
    finally:
        err = fwd.stop()
    no_traceback(err, logs(cut))


def test_agent_kill_9_is_a_reset_for_the_engineer(cut):
    fleet, ops = cut["fleet"], cut["ops"]
    fwd = Forward(fleet, ops, "hold")
    try:
        sock = open_download(cut, fwd)
        cut["agent"].send_signal(signal.SIGKILL)
        n, how = read_to_end(sock)
        assert how == "reset", (n, how)
        cut["agent"].wait(5)
    finally:
        err = fwd.stop()
    assert "session cut" in err, err
    no_traceback(err, (fleet.root / "proxy.log").read_text())


def test_agent_kill_9_cuts_proxy_command_with_status_4(cut):
    fleet, ops = cut["fleet"], cut["ops"]
    proc = subprocess.Popen(
        [PY, "-m", "tunnel.cli", "proxy-command", "robot-1", "hold", "--identity", str(ops)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env={**os.environ, **fleet.env},
    )
    got = 0
    while got < FIRST:
        data = proc.stdout.read1(65536)
        assert data, proc.stderr.read()
        got += len(data)
    cut["agent"].send_signal(signal.SIGKILL)
    rest = proc.stdout.read()  # to the end: the status, not an EOF, says it was cut
    proc.wait(40)
    err = proc.stderr.read().decode()
    assert proc.returncode == 4 and rest == b"", (proc.returncode, err)
    assert len(err.strip().splitlines()) == 1 and "cut" in err, err
    no_traceback(err)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "kill-9"])
def test_proxy_stop_is_a_reset_at_both_ends(cut, sig):
    fleet, ops, hold = cut["fleet"], cut["ops"], cut["hold"]
    fwd = Forward(fleet, ops, "hold")
    try:
        sock = open_download(cut, fwd)
        cut["proxy"].send_signal(sig)
        n, how = read_to_end(sock)
        assert how == "reset", (n, how)
        wait_until(lambda: hold.ends, 20, what="the device service to see the end")
        assert hold.ends == ["reset"]
        fwd.proc.wait(20)
        assert fwd.proc.returncode == 3
    finally:
        err = fwd.stop()
    lines = err.strip().splitlines()
    assert any("session cut" in line for line in lines), err
    assert "connection to the proxy ended" in lines[-1], err
    no_traceback(err, logs(cut))


# --- splice in-process: real sockets, a stream end that fails ----------------------------------


class FailingStream:
    """A tunnel stream that delivers ``data`` and then fails as a reset stream does."""

    def __init__(self, data: bytes, fail: bool = True):
        self.data, self.fail, self.resets = data, fail, []
        self.hold = asyncio.Event()

    async def read(self, n: int) -> bytes:
        if self.data:
            out, self.data = self.data[:n], self.data[n:]
            return out
        if self.fail:
            raise StreamReset(1, "stream reset by peer", remote=True)
        await self.hold.wait()
        return b""

    async def write(self, data: bytes) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def reset(self, code: int = 0) -> None:
        self.resets.append(code)


async def _splice_to_socket(stream: FailingStream, cancel: bool = False) -> tuple[int, str, list]:
    got: dict = {}
    server_done = asyncio.Event()

    async def handle(reader, writer):
        task = asyncio.create_task(splice(StreamEnds(stream), SocketEnds(reader, writer)))
        if cancel:
            await asyncio.sleep(0.3)
            task.cancel()
        got["result"] = await asyncio.gather(task, return_exceptions=True)
        server_done.set()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sock = socket.create_connection(("127.0.0.1", port))
    sock.shutdown(socket.SHUT_WR)
    n, how = await asyncio.to_thread(read_to_end, sock, 10)
    await server_done.wait()
    server.close()
    sock.close()
    return n, how, stream.resets


def test_splice_turns_a_stream_reset_into_a_tcp_reset():
    n, how, _ = asyncio.run(_splice_to_socket(FailingStream(b"x" * 300_000)))
    assert how == "reset" and n <= 300_000


def test_splice_cancelled_midway_resets_both_ends():
    stream = FailingStream(b"x" * 1000, fail=False)
    n, how, resets = asyncio.run(_splice_to_socket(stream, cancel=True))
    assert how == "reset" and resets == [1]


def test_splice_clean_end_is_a_fin():
    stream = FailingStream(b"x" * 1000, fail=False)
    stream.hold.set()
    n, how, resets = asyncio.run(_splice_to_socket(stream))
    assert (n, how, resets) == (1000, "fin", [])


def test_proxy_command_stdin_thread_has_no_traceback_at_exit(cut):
    """ssh still writing when the session is cut: the stdin reader thread ends quietly."""
    fleet, ops = cut["fleet"], cut["ops"]
    proc = subprocess.Popen(
        [PY, "-m", "tunnel.cli", "proxy-command", "robot-1", "resets", "--identity", str(ops)],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, **fleet.env},
    )
    with pytest.raises(OSError):  # noqa: PT012 - keep writing until the process is gone
        while True:
            proc.stdin.write(b"y" * 65536)
            proc.stdin.flush()
    proc.wait(30)
    err = proc.stderr.read().decode()
    assert proc.returncode == 4, err
    no_traceback(err)
