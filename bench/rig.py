"""Loopback rigs shared by the bench cases: device services, fleet-tunnel, OpenSSH ``ssh -R``.

Everything listens on 127.0.0.1 only and is stopped by ``close()`` (use them as context
managers). Processes are real: ``tunnel proxy``, ``tunnel agent``, ``tunnel forward``, ``sshd``,
``ssh -N -R``.

* ``Services``: a TCP echo service and a bulk service (``D`` + length: the service sends that
  many bytes; ``U`` + length: the service reads that many bytes and answers ``ok``).
* ``TunnelRig``: a fleet state dir, one enrolled device whose agent exposes the given services,
  the proxy, an admin engineer identity, and ``forward(service)`` -> local port.
* ``SshRig``: a private sshd (own config, host key, authorized key) and ``reverse(port)`` ->
  the port on sshd's side that an ``ssh -N -R`` from the "device" forwards to ``port``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import ROOT, paths, tree_pids

paths()

CHUNK = memoryview(os.urandom(1 << 20))
PY = sys.executable
TUNNEL = [PY, "-m", "tunnel.cli"]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; reaps it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --- device services -------------------------------------------------------------------------


class Services:
    """Echo and bulk TCP services on 127.0.0.1 (threads in this process)."""

    def __init__(self):
        self._socks: list[socket.socket] = []
        self.echo_port = self._serve(self._echo)
        self.bulk_port = self._serve(self._bulk)

    def _serve(self, handler) -> int:
        sock = socket.create_server(("127.0.0.1", 0))
        self._socks.append(sock)

        def loop():
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return
                threading.Thread(target=self._guard, args=(handler, conn), daemon=True).start()

        threading.Thread(target=loop, daemon=True).start()
        return sock.getsockname()[1]

    @staticmethod
    def _guard(handler, conn) -> None:
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            handler(conn)

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        while data := conn.recv(65536):
            conn.sendall(data)

    @staticmethod
    def _bulk(conn: socket.socket) -> None:
        head = recv_exact(conn, 9)
        if head is None:
            return
        op, n = head[:1], struct.unpack("!Q", head[1:])[0]
        if op == b"D":
            left = n
            while left > 0:
                k = min(left, len(CHUNK))
                conn.sendall(CHUNK[:k])
                left -= k
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass
        elif op == b"U":
            left = n
            while left > 0 and (data := conn.recv(min(left, 1 << 20))):
                left -= len(data)
            conn.sendall(b"ok")

    def close(self) -> None:
        for s in self._socks:
            s.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        data = conn.recv(n - len(buf))
        if not data:
            return None
        buf += data
    return buf


def transfer(port: int, direction: str, nbytes: int, timeout: float = 120.0) -> float:
    """Move ``nbytes`` through 127.0.0.1:``port`` to the bulk service; return seconds taken.

    ``down``: the device service sends (device -> engineer); ``up``: the engineer sends.
    The clock starts before connect, so it includes the session setup (small next to the data).
    """
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if direction == "down":
            s.sendall(b"D" + struct.pack("!Q", nbytes))
            got = 0
            while data := s.recv(1 << 20):
                got += len(data)
            if got != nbytes:
                raise RuntimeError(f"received {got} of {nbytes} bytes")
        else:
            s.sendall(b"U" + struct.pack("!Q", nbytes))
            left = nbytes
            while left > 0:
                k = min(left, len(CHUNK))
                s.sendall(CHUNK[:k])
                left -= k
            if recv_exact(s, 2) != b"ok":
                raise RuntimeError("upload not acknowledged")
    return time.perf_counter() - t0


def echo_rtts(port: int, count: int, size: int = 64, timeout: float = 60.0) -> list[float]:
    """Round trips of ``size``-byte messages through 127.0.0.1:``port`` to the echo service (s)."""
    payload = os.urandom(size)
    out = []
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(3):  # warm-up: session setup, first packets
            s.sendall(payload)
            recv_exact(s, size)
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            t0 = time.perf_counter()
            s.sendall(payload)
            if recv_exact(s, size) is None:
                raise RuntimeError("echo connection closed")
            out.append(time.perf_counter() - t0)
    return out


# --- fleet-tunnel ----------------------------------------------------------------------------


class TunnelRig:
    """Proxy + one agent + an admin engineer on loopback (real processes)."""

    def __init__(self, services: dict[str, str], *, device: str = "bench-1", keepalive: str = "25s"):
        from fleet_harness import Fleet

        self.tmp = Path(tempfile.mkdtemp(prefix="bench-ft-"))
        self.device = device
        self.forwards: list[subprocess.Popen] = []
        self.fleet = Fleet(self.tmp)
        try:
            self.config = self.fleet.enroll_device(device, {"customer": "bench"}, services,
                                                   keepalive=keepalive)
            self.proxy = self.fleet.start_proxy()
            self.agent = self.fleet.start_agent(self.config)
            self.ops = self.fleet.user("ops", ["admin"])
            self.fleet.wait_online(self.ops, device, timeout=30)
        except BaseException:
            self.close()
            raise

    def forward(self, service: str) -> tuple[int, subprocess.Popen]:
        """Start ``tunnel forward DEVICE SERVICE``; return (local port, process)."""
        proc = subprocess.Popen([*TUNNEL, "forward", self.device, service, "--identity", str(self.ops)],
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        self.forwards.append(proc)
        line = proc.stderr.readline()
        if not line.startswith("forwarding "):
            raise RuntimeError(f"tunnel forward failed: {line}{proc.stderr.read() if proc.poll() is not None else ''}")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining
        return int(line.split()[1].rsplit(":", 1)[1]), proc

    def proxy_command_argv(self) -> list[str]:
        """``tunnel proxy-command`` as an OpenSSH ProxyCommand (``%h %p`` left for ssh)."""
        return [*TUNNEL, "proxy-command", "%h", "%p", "--identity", str(self.ops)]

    def close(self) -> None:
        for p in self.forwards:
            stop_process(p)
        self.fleet.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- OpenSSH ---------------------------------------------------------------------------------


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SshRig:
    """A private sshd on 127.0.0.1 (own config, host key, one authorized client key)."""

    def __init__(self):
        from lab import plan

        self.tmp = Path(tempfile.mkdtemp(prefix="bench-ssh-"))
        self.procs: list[subprocess.Popen] = []
        self.port = free_tcp_port()
        host_key = self.tmp / "ssh_host_ed25519_key"
        self.client_key = self.tmp / "client_ed25519"
        try:
            for path in (host_key, self.client_key):
                subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                               check=True, capture_output=True)
            authorized = self.tmp / "authorized_keys"
            authorized.write_text(Path(f"{self.client_key}.pub").read_text())
            config = self.tmp / "sshd_config"
            config.write_text(plan.sshd_config(
                port=self.port, host_keys=[host_key], pid_file=str(self.tmp / "sshd.pid"),
                authorized_keys=str(authorized), extra="AllowTcpForwarding yes\nGatewayPorts no\n",
            ))
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
            self.log = self.tmp / "sshd.log"
            with open(self.log, "wb") as logf:
                self.sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(config)],
                                             stdout=logf, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
            self.procs.append(self.sshd)
            wait_for(lambda: "Server listening on" in self.log.read_text(errors="replace")
                     or self.sshd.poll() is not None, 10, "sshd listening")
            if self.sshd.poll() is not None:
                raise RuntimeError(f"sshd did not start: {self.log.read_text(errors='replace')}")
        except BaseException:
            self.close()
            raise

    def common_opts(self) -> list[str]:
        return ["-i", str(self.client_key), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=10"]

    def reverse(self, target_port: int) -> tuple[int, subprocess.Popen]:
        """``ssh -N -R P:127.0.0.1:target_port`` to this sshd; return (P, the ssh client)."""
        rport = free_tcp_port()
        proc = subprocess.Popen(
            ["ssh", *self.common_opts(), "-o", "ExitOnForwardFailure=yes", "-N",
             "-R", f"127.0.0.1:{rport}:127.0.0.1:{target_port}", "-p", str(self.port), "root@127.0.0.1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.procs.append(proc)

        def listening():
            if proc.poll() is not None:
                raise RuntimeError(f"ssh -R exited: {proc.stderr.read().decode(errors='replace')}")
            return f":{rport:04X} 00000000:0000 0A" in Path("/proc/net/tcp").read_text()

        wait_for(listening, 15, "ssh -R listening")
        return rport, proc

    def session_pids(self) -> list[int]:
        """sshd's per-connection processes (not the listener)."""
        return [p for p in tree_pids(self.sshd.pid) if p != self.sshd.pid]

    def close(self) -> None:
        for p in reversed(self.procs):
            stop_process(p)
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
