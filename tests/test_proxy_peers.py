"""A connection that fails while the proxy authorizes it leaves no trace in ``Proxy.peers`` (issue 19).

Measured in the soak (``FLEET_MEMORY_TRACE``, 25 minutes, 30 agents): QUIC connections in state
TERMINATED and finished HTTP/2 connections piled up in the proxy (about one every two minutes,
each with its crypto contexts, packet spaces and buffers: +33 frozensets, +10 CryptoContexts per
connection), held by ``Proxy.peers``. ``_authorize`` registered the peer once admitted, but a
connection closed meanwhile (the losing side of an agent's QUIC/TCP race, an agent killed during
its handshake) is never handed to ``_on_connection``, whose ``finally`` is what removes it.

Here authorization is held until the client has closed its connection: the peer must not stay
registered, over either transport.
"""

from __future__ import annotations

import asyncio

import pytest
from fleet_harness import until

from tunnel.agent import load_identity
from tunnel.agent_config import load
from tunnel.protocol import ALPN_AGENT
from tunnel.proxy import Proxy
from tunnel.transport import dial


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_a_connection_closed_during_authorization_is_not_kept(fleet, transport):
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {}, transport=transport)
    agent_config = load(config)
    endpoint = agent_config.proxies[0]

    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = None
        authorizing, release, authorized = asyncio.Event(), asyncio.Event(), asyncio.Event()
        seen = []
        refresh, authorize = proxy.policy.refresh, proxy._authorize

        async def held_refresh():
            authorizing.set()
            await release.wait()
            return await refresh()

        async def watched_authorize(conn):
            seen.append(conn)
            try:
                return await authorize(conn)
            finally:
                authorized.set()

        proxy.policy.refresh = held_refresh
        proxy._authorize = watched_authorize  # before start(): the servers take it from here
        await proxy.start(host=fleet.proxy_host, port=fleet.proxy_port)  # in-process: not "slow"
        conn = None
        try:
            conn = await asyncio.wait_for(
                dial(endpoint.host, endpoint.port, transports=(transport,), identity=load_identity(agent_config),
                     server_name=endpoint.server_name, alpn=ALPN_AGENT, keepalive=None), 30)
            await asyncio.wait_for(authorizing.wait(), 30)
            conn.close(0, "attempt abandoned")  # as an agent closes the losing side of its race
            await until(lambda: seen and seen[0].is_closed, "the proxy to see the connection closed")
            release.set()
            await asyncio.wait_for(authorized.wait(), 30)
            await asyncio.sleep(0)  # _authorize_and_run returns right after authorize()
            assert seen[0] not in proxy.peers, "a connection closed during authorization stays in Proxy.peers"
            assert proxy.peers == {}
        finally:
            release.set()
            if conn is not None:
                conn.close(0, "done")
            await proxy.stop()

    asyncio.run(run())
