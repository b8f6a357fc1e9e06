"""A connection that lives long must not run out of streams (issue 17's open helper bug).

QUIC and HTTP/2 give a connection a fixed number of streams and free one only when both of its
directions have ended. A dial the proxy refuses ends with the proxy's reply and FIN; the
engineer's end left its own direction open, so every refusal kept one slot for the life of the
connection: after 128 of them (QUIC; 504 on TLS/TCP, whose limit is 512) every later dial on
that connection hung without an answer.

That is what made ssh through the per-user helper miss the 3-minute outage in the lab: the
helper re-attached its session after a proxy kill -9 on a new connection (QUIC: TLS/TCP was
refused while the proxy was down), and through the next outage its session asked to resume
every 2 s, each ask refused ``device_offline``; past 128 the resume dial hung, and the session
never came back although the device did. A fresh helper (TLS/TCP, 512) lasted the 3 minutes,
a 10-minute hold would not have.

Here, on loopback with real processes: refused dials on one connection of each transport, the
device's own refusals on the agent's connection, and the lab's sequence through the helper —
a forward served by the helper across a proxy kill -9, then as many refusals on the helper's new
connection as a long outage makes, then an outage of the device — byte-exact throughout.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from fleet_harness import PY, wait_until
from test_resume_sessions import _forward, _sessions, _start_proxy, _stop, resumable_fleet  # noqa: F401 (a fixture)

from tunnel import helper_client
from tunnel import helper_protocol as hp
from tunnel.client import Client, Refusal, UserIdentity

REPO = Path(__file__).resolve().parents[1]

#: refusals that outlast each transport's stream limit (QUIC 128, HTTP/2 512), with a margin
PAST_LIMIT = {"quic": 160, "tcp": 540}


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_refused_dials_give_their_streams_back(fleet, echo, monkeypatch, transport):
    """More refused dials on one connection than it has streams: each is refused with its code
    (none hangs), and the connection still opens a session afterwards."""
    monkeypatch.setenv("FLEET_TRANSPORT", transport)
    fleet.enroll_device("robot-off", {"customer": "acme"}, {"echo": "127.0.0.1:9"})
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"})
    fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")

    async def run() -> tuple[str, set[str], bytes]:
        client = await Client.connect(UserIdentity.load(ops))
        codes = set()
        for _ in range(PAST_LIMIT[transport]):
            with pytest.raises(Refusal) as refused:
                await client.dial("robot-off", "echo")  # a hung one fails after 20 s ("no answer")
            codes.add(refused.value.code)
        stream, rest = await client.dial("robot-1", "echo")
        await stream.write(b"still streams left")
        stream.write_eof()
        echoed = rest
        while data := await stream.read(65536):
            echoed += data
        name = client.conn.transport_name
        client.close()
        return name, codes, echoed

    name, codes, echoed = asyncio.run(run())
    assert name == transport
    assert codes == {"device_offline"}
    assert echoed == b"still streams left"


def test_the_devices_refusals_give_the_agents_streams_back(fleet):
    """The same limit on the agent's connection: a device that refuses more opens than that
    connection has streams (its service down, sshd restarting under Ansible's retries) keeps
    answering each with its own refusal, never the proxy's ``device_unreachable`` timeout."""
    closed = socket.create_server(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()  # nothing listens there: the agent's connect is refused
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"down": f"127.0.0.1:{port}"})
    fleet.start_proxy()
    fleet.start_agent(config)  # QUIC first: 128 streams from the proxy to it
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")

    async def run() -> set[str]:
        client = await Client.connect(UserIdentity.load(ops))
        codes = set()
        for _ in range(PAST_LIMIT["quic"]):
            with pytest.raises(Refusal) as refused:
                await client.dial("robot-1", "down")
            codes.add(refused.value.code)
        client.close()
        return codes

    assert asyncio.run(run()) == {"connection_refused"}


# --- the lab's sequence, on loopback, through the helper ---------------------------------------


class Echoed:
    """One local connection through a forward to the echo service, driven step by step: what
    goes in must come back, in order; the digests of all of it are compared at the end."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(60)  # a step that hangs fails here, not the whole run
        self.sent, self.back = hashlib.sha256(), hashlib.sha256()
        self.count = 0

    def send(self, size: int) -> None:
        data = hashlib.sha256(self.count.to_bytes(8, "big")).digest() * (size // 32)
        self.count += 1
        self.sock.sendall(data)
        self.sent.update(data)
        self._pending = getattr(self, "_pending", 0) + len(data)

    def collect(self) -> None:
        """Read back everything sent so far (raises on a timeout or a reset)."""
        while self._pending:
            data = self.sock.recv(min(self._pending, 65536))
            assert data, "the forward ended the connection before everything came back"
            self.back.update(data)
            self._pending -= len(data)

    def step(self, size: int = 256 * 1024) -> None:
        self.send(size)
        self.collect()

    def finish(self) -> str:
        self.sock.shutdown(socket.SHUT_WR)
        rest = self.sock.recv(65536)
        self.sock.close()
        return "fin" if rest == b"" else f"unexpected bytes: {rest[:40]!r}"


def _helper_transport(fleet, ops) -> str | None:
    out = subprocess.run([PY, "-m", "tunnel.cli", "helper", "status", "--format", "json", "--identity", str(ops)],
                         capture_output=True, text=True, timeout=30, env={**os.environ, **fleet.env})
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout).get("transport")


def _refused_through_the_helper(ops, count: int) -> set[str]:
    """``count`` dials through the helper that the proxy refuses (an offline device), each on the
    helper's warm connection, as a held session's resume attempts through an outage are."""
    path = hp.socket_path(str(ops))
    codes = set()
    for _ in range(count):
        sock, lines, _ack = helper_client.ask(str(ops), path, "dial",
                                              {"device": "robot-off", "service": "echo", "login": None})
        try:
            result = lines.line(30.0)
        finally:
            sock.close()
        assert not result.get("ok"), result
        codes.add(result.get("code"))
        if result.get("code") != "device_offline":
            break  # a hung dial ("no answer from the proxy", after 20 s) says it already
    return codes


@pytest.mark.resumable
def test_helper_session_resumes_again_after_a_proxy_kill9_and_many_refusals(resumable_fleet, monkeypatch):  # noqa: F811
    """The lab's failing sequence without its 3 minutes: a forward served by the helper carries a
    connection across a proxy kill -9 (the helper re-attaches it on a new connection); that new
    connection then takes more refused dials than it has streams; then the device drops out
    (its agent stopped until the proxy gives it up) and comes back. The same session resumes
    again and every byte comes back once, in order."""
    fleet, proxy, agent, ops = (resumable_fleet[k] for k in ("fleet", "proxy", "agent", "ops"))
    run_dir = fleet.root / "run"
    run_dir.mkdir(mode=0o700)
    fleet.env.update(XDG_RUNTIME_DIR=str(run_dir), PYTHONPATH=str(REPO))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(run_dir))  # for helper_client.ask in this process
    fleet.enroll_device("robot-off", {"customer": "acme"}, {"echo": "127.0.0.1:9"})
    fwd, port = _forward(fleet, ops)  # FLEET_HELPER is on: the helper serves the forward
    stopped = False
    try:
        conn = Echoed(port)
        conn.step()
        proxy.send_signal(signal.SIGKILL)
        proxy.wait(10)
        proxy_log = fleet.root / "proxy.log"
        _start_proxy(fleet)
        conn.step()  # back through the helper's new connection
        transport = _helper_transport(fleet, ops)
        assert transport in PAST_LIMIT, transport
        assert _refused_through_the_helper(ops, PAST_LIMIT[transport]) == {"device_offline"}
        conn.step()
        mark = proxy_log.stat().st_size
        agent.send_signal(signal.SIGSTOP)  # the device goes silent: the proxy gives it up
        stopped = True
        wait_until(lambda: "agent stopped answering" in proxy_log.read_text()[mark:], 30, 0.1,
                   "the proxy to give the silent agent up")
        conn.send(256 * 1024)  # held in the replay buffer while the device is away
        agent.send_signal(signal.SIGCONT)
        stopped = False
        conn.collect()
        conn.step()
        assert conn.finish() == "fin"
        assert conn.back.hexdigest() == conn.sent.hexdigest()
        wait_until(lambda: _sessions(fleet)[-1]["type"] == "session.end", 30, what="the session's end")
    finally:
        if stopped:
            agent.send_signal(signal.SIGCONT)
        err = _stop(fwd)
    assert err.count("resumed after") >= 2, err
    events = [e for e in _sessions(fleet) if e.get("device") == "robot-1"]
    sessions = {e["fields"]["session"] for e in events}
    assert len(sessions) == 1, events  # the one session, resumed twice
    kinds = [e["type"] for e in events]
    assert kinds.count("session.resume") >= 2 and kinds[-1] == "session.end", kinds
    assert events[-1]["result"] == "ok", events[-1]
