"""The engineer's hop by default: TLS/TCP first (issue 14), with the device on QUIC.

Real proxy, agent and ``tunnel forward`` code, no ``FLEET_TRANSPORT`` set: the engineer's
connection must be TLS/TCP, carry a session to the device (which stays on QUIC), and still
notice a proxy that went silent (frozen with SIGSTOP, as after kill -9 or a dead path) through
its keepalive pings, as the QUIC hop does in ``tests/test_forward_proxy_lost.py``.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from tunnel.client import Client, ClientError, UserIdentity, forward


def test_forward_goes_over_tls_tcp_and_notices_a_silent_proxy(fleet, echo, monkeypatch):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 keepalive="1s")
    proxy = fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    monkeypatch.delenv("FLEET_TRANSPORT", raising=False)

    real_watch, real_connect = Client.watch, Client.connect.__func__
    monkeypatch.setattr(Client, "watch", lambda self: real_watch(self, interval=0.2, dead_after=1.0))
    used: list[str] = []

    async def connect(cls, identity, timeout=10.0):
        client = await real_connect(cls, identity, timeout)
        used.append(client.conn.transport_name)
        return client

    monkeypatch.setattr(Client, "connect", classmethod(connect))

    async def run() -> None:
        bound: list = []
        task = asyncio.create_task(forward(UserIdentity.load(ops), "robot-1", "echo", "127.0.0.1", 0,
                                           ready=bound.append, check=False))
        while not bound:
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        host, port = bound[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        payload = bytes(range(256)) * 4096  # 1 MiB: several HTTP/2 frames and window updates
        writer.write(payload)
        assert await reader.readexactly(len(payload)) == payload
        assert used and set(used) == {"tcp"}, used
        proxy.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(ClientError) as info:
                await asyncio.wait_for(task, 60)
        finally:
            proxy.send_signal(signal.SIGCONT)
        assert info.value.code == "unreachable"
        assert "did not answer" in str(info.value)
        with pytest.raises(ConnectionResetError):  # the open session was cut: a reset, not a FIN
            await reader.read()
        writer.close()

    asyncio.run(run())
    connects = [e for e in fleet.audit() if e["type"] == "device.connect"]
    assert connects and connects[-1]["fields"]["transport"] == "quic"  # the device stays on QUIC
