"""The tunnel under bad input, a slow consumer, and certificate renewal (loopback processes)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fleet_harness import Fleet, wait_until

from enroll import admin, certs
from tunnel import wire
from tunnel.client import UserIdentity
from tunnel.protocol import ALPN_AGENT, ALPN_USER, read_header
from tunnel.transport import TLSIdentity, TransportError, connect, dial


def _rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class SlowReader:
    """A device service that consumes at ~``rate`` bytes/s."""

    def __init__(self, rate: int):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.rate = rate
        self.consumed = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        chunk = self.rate // 20
        with conn, contextlib.suppress(OSError):  # the test ends by cutting the session: a reset
            while data := conn.recv(chunk):
                self.consumed += len(data)
                time.sleep(len(data) / self.rate)


def test_memory_stays_bounded_under_a_slow_consumer(fleet):
    """Push up to 200 MB at a service reading 1 MB/s: the tunnel holds only its windows."""
    reader = SlowReader(1_000_000)
    config = fleet.enroll_device("sink-1", {"customer": "acme"}, {"sink": f"127.0.0.1:{reader.port}"})
    proxy = fleet.start_proxy()
    agent = fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "sink-1")
    forward = subprocess.Popen([sys.executable, "-m", "tunnel.cli", "forward", "sink-1", "sink", "--no-check",
                                "--identity", str(ops)], stderr=subprocess.PIPE, text=True)
    try:
        port = int(forward.stderr.readline().split()[1].rsplit(":", 1)[1])
        base = {p.pid: _rss_kb(p.pid) for p in (proxy, agent, forward)}
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        s.settimeout(0.05)
        block, pushed, peak = os.urandom(64 * 1024), 0, dict(base)
        deadline = time.monotonic() + 12
        while time.monotonic() < deadline and pushed < 200_000_000:
            with contextlib.suppress(TimeoutError):
                pushed += s.send(block)
            for pid in peak:
                peak[pid] = max(peak[pid], _rss_kb(pid))
        s.close()
        in_flight = pushed - reader.consumed
        growth_mb = {pid: (peak[pid] - base[pid]) / 1024 for pid in base}
        print(f"pushed {pushed / 1e6:.1f} MB, consumed {reader.consumed / 1e6:.1f} MB, "
              f"in flight {in_flight / 1e6:.1f} MB, RSS growth MB {growth_mb}")
        # What may be in flight is bounded by buffers, not by what was pushed: per QUIC hop a
        # 1 MiB receive window + 1 MiB send high-water mark; per TCP hop (the local client's, the
        # engineer's TLS/TCP hop to the proxy, the agent's to the service) the kernel's
        # autotuned send and receive buffers, capped by tcp_wmem/tcp_rmem.
        assert reader.consumed > 5_000_000
        budget = 3 * (_sysctl_max("tcp_wmem") + _sysctl_max("tcp_rmem")) + 4 * 2**20
        assert in_flight < budget, (in_flight, budget)
        assert all(g < 40 for g in growth_mb.values()), growth_mb
    finally:
        forward.terminate()
        forward.wait(10)


def _sysctl_max(name: str) -> int:
    """The largest buffer TCP autotuning may grow to (the third field of net.ipv4.NAME)."""
    return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])


def _user_tls(identity_dir) -> TLSIdentity:
    return UserIdentity.load(identity_dir).tls()


async def _raw_stream_exchange(fleet, ops, payload: bytes, transport: str) -> bytes:
    conn = await dial("127.0.0.1", fleet.proxy_port, transports=(transport,), identity=_user_tls(ops),
                      server_name="proxy.test", alpn=ALPN_USER, keepalive=None)
    try:
        stream = await conn.open_stream()
        await stream.write(payload)
        stream.write_eof()
        data = b""
        while chunk := await stream.read():
            data += chunk
        return data
    finally:
        conn.close()


BAD_HEADERS = {
    "malformed": b"\x01\x01\x00\x05hello",
    "truncated": wire.encode("dial", device="robot-1", service="ssh")[:6],
    "oversized": b"\x01\x01\xff\xff" + b"x" * 100,
    "unknown-version": b"\x09\x01\x00\x02{}",
    "random": os.urandom(64),
    "wrong-kind": wire.encode("open", service="ssh", session="s", identity="user:x"),
    "empty": b"",
}


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_bad_stream_headers_are_refused_audited_and_harmless(fleet, transport):
    fleet.start_proxy()
    ops = fleet.user("ops", ["admin"])
    for name, payload in BAD_HEADERS.items():
        reply = asyncio.run(_raw_stream_exchange(fleet, ops, payload, transport))
        message, _ = wire.HeaderReader().feed(reply)
        assert message["ok"] is False, name
        assert message["code"] in {"bad_header", "truncated_header", "header_too_large",
                                   "unsupported_version", "no_header"}, (name, message)
    denied = [e for e in fleet.audit() if e["type"] == "access.denied" and e["fields"].get("stage") == "header"]
    assert len(denied) == len(BAD_HEADERS)
    # still serving
    assert fleet.tunnel("ls", identity=ops).returncode == 0


def test_agents_may_not_dial_and_unauthenticated_peers_get_no_stream(fleet, tmp_path):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {})
    fleet.start_proxy()
    d = config.parent
    ident = TLSIdentity([certs.load_cert((d / "device.crt").read_bytes())],
                        certs.load_key((d / "device.key").read_bytes()),
                        certs.load_cert((d / "ca.crt").read_bytes()))

    async def agent_dials():
        conn = await connect("127.0.0.1", fleet.proxy_port, identity=ident, server_name="proxy.test",
                             alpn=ALPN_AGENT, keepalive=None)
        try:
            stream = await conn.open_stream()
            await stream.write(wire.encode("dial", device="robot-1", service="ssh"))
            stream.write_eof()
            reply, _ = await read_header(stream)
            return reply
        finally:
            conn.close()

    reply = asyncio.run(agent_dials())
    assert reply["ok"] is False and "agents may only send requests" in reply["reason"]

    async def no_certificate():
        await connect("127.0.0.1", fleet.proxy_port, identity=None, ca=fleet.state.ca_cert,
                      server_name="proxy.test", alpn=ALPN_USER, keepalive=None, handshake_timeout=5)

    with pytest.raises(TransportError):
        asyncio.run(no_certificate())


def test_certificate_renewal_carries_current_labels(tmp_path):
    # 60 s of life after a 5-minute backdate (clock skew): two thirds are gone at once.
    fleet = Fleet(tmp_path, device_lifetime="60s")
    try:
        config = fleet.enroll_device("robot-1", {"customer": "acme"}, {})
        old = certs.load_cert((config.parent / "device.crt").read_bytes())
        with fleet.state.registry() as reg:
            admin.relabel(reg, "robot-1", {"customer": "globex"}, [])
        fleet.start_proxy()
        fleet.start_agent(config)

        def renewed():
            cert = certs.load_cert((config.parent / "device.crt").read_bytes())
            return cert if cert.serial_number != old.serial_number else None

        new = wait_until(renewed, 15, 0.1, "renewed certificate")
        assert certs.identity_of(new).labels["customer"] == "globex"
        issued = [e for e in fleet.audit() if e["type"] == "cert.issue" and e["fields"].get("renewal")]
        assert issued and issued[0]["device"] == "robot-1"
    finally:
        fleet.close()
