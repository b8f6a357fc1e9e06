"""``tunnel forward`` stops taking connections as soon as it has given up on the proxy (issue 19).

The 09:41 soak saw 18 "unexpected" forward failures ~20 s after a proxy kill -9: forward's
watch had declared the silent proxy dead (no PING answer for 10 s) and closed the connection,
but forward waited for the transport to finish closing — QUIC's closing period is 3 PTO, and
the PTO of a loaded path with megabytes queued is seconds — and meanwhile kept accepting local
connections only to reset each one ("refused: the connection to the proxy ended"). Forward now
returns (exit 3, one line) the moment the connection is over for it, so its caller (a
supervisor, the soak) reconnects at once.

Here the proxy is a real process frozen with SIGSTOP (silent, as after kill -9 or a dead path),
and the transport's closing period is made endless: forward must still return, say why, reset
the open session, and no longer listen.
"""

from __future__ import annotations

import asyncio
import signal

import pytest

from tunnel.client import Client, ClientError, UserIdentity, forward


def test_forward_returns_once_the_watch_gives_up_on_a_silent_proxy(fleet, echo, monkeypatch):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 keepalive="1s")
    proxy = fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    monkeypatch.setenv("FLEET_TRANSPORT", "quic")

    real_watch, real_connect = Client.watch, Client.connect.__func__
    monkeypatch.setattr(Client, "watch", lambda self: real_watch(self, interval=0.2, dead_after=1.0))

    async def connect(cls, identity, timeout=10.0):
        client = await real_connect(cls, identity, timeout)

        async def closing_forever():  # the closing period of a loaded path, made endless
            await asyncio.Event().wait()

        client.conn.wait_closed = closing_forever
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
        writer.write(b"x" * 1000)
        assert await reader.readexactly(1000) == b"x" * 1000  # a live session: the watch runs
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
        with pytest.raises(ConnectionRefusedError):  # nothing listens any more
            await asyncio.open_connection(host, port)

    asyncio.run(run())
