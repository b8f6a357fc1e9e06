"""A connection that fails while the proxy authorizes it leaves no trace in ``Proxy.peers`` (issue 19).

Measured in the soak (``FLEET_MEMORY_TRACE``, 25 minutes, 30 agents): QUIC connections in state
TERMINATED and finished HTTP/2 connections piled up in the proxy (about one every two minutes,
each with its crypto contexts, packet spaces and buffers: +33 frozensets, +10 CryptoContexts per
connection), held by ``Proxy.peers``. ``_authorize`` registered the peer once admitted, but a
connection closed meanwhile (the losing side of an agent's QUIC/TCP race, an agent killed during
its handshake) is never handed to ``_on_connection``, whose ``finally`` is what removes it.

Here authorization is held until the client has closed its connection: the peer must not stay
registered, over either transport. The second test covers the next find of the same soak: an
ended agent connection still referenced after it was replaced.
"""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest
from fleet_harness import until

from tunnel.agent import load_identity
from tunnel.agent_config import load
from tunnel.protocol import ALPN_AGENT
from tunnel.proxy import Proxy
from tunnel.transport import dial


def _agent_dialer(fleet, transport):
    """Enroll robot-1; return a coroutine function that dials the proxy as its agent would."""
    agent_config = load(fleet.enroll_device("robot-1", {"customer": "acme"}, {}, transport=transport))
    endpoint = agent_config.proxies[0]

    async def dial_agent():
        return await asyncio.wait_for(
            dial(endpoint.host, endpoint.port, transports=(transport,), identity=load_identity(agent_config),
                 server_name=endpoint.server_name, alpn=ALPN_AGENT, keepalive=None), 30)

    return dial_agent


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_a_connection_closed_during_authorization_is_not_kept(fleet, transport):
    dial_agent = _agent_dialer(fleet, transport)

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
            conn = await dial_agent()
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


@pytest.mark.parametrize("transport", ["quic", "tcp"])
def test_a_replaced_agent_connection_is_released(fleet, transport):
    """The soak's next find (issue 19): the serve task of a device's new connection kept the link
    it replaced, and with it that ended connection's whole state, for as long as the new one
    lived: one per reconnected device (agent restarts, TCP → QUIC upgrades). The registry
    writer's thread, idle, held its last batch too (here: the first connection's disconnect audit)."""
    dial_agent = _agent_dialer(fleet, transport)

    async def run() -> None:
        proxy = Proxy(fleet.state)
        proxy.trim_every = None
        await proxy.start(host=fleet.proxy_host, port=fleet.proxy_port)
        conns = []
        try:
            conns.append(await dial_agent())
            await until(lambda: "robot-1" in proxy.agents, "the first connection to be the device's link")
            first = weakref.ref(proxy.agents["robot-1"].conn)  # no strong reference in this test
            conns.append(await dial_agent())  # the device connects again while its first connection is still up
            await until(lambda: len(proxy.peers) == 2, "the second connection to be served")
            conns[0].close(0, "agent restarted")
            await until(lambda: first() not in proxy.peers, "the proxy to end the first connection")

            def released() -> bool:
                gc.collect()
                return first() is None

            # polled: the registry writer's thread lets go of its batch a moment after settling it
            await until(released, "the ended connection to be released (still referenced)", timeout=10)
            assert len(proxy.peers) == 1 and not conns[1].is_closed
        finally:
            for conn in conns:
                conn.close(0, "done")
            await proxy.stop()

    asyncio.run(run())
