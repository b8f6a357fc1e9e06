"""Handshake admission at the QUIC server: overload degrades (Initials dropped early, connected
peers first, stale handshakes dropped), it never collapses."""

from __future__ import annotations

import asyncio
import socket

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from transport_helpers import ALPN, SERVER_NAME, run, running_server

from tunnel.transport import connect
from tunnel.transport.quic import (
    MAX_HALF_OPEN,
    MAX_NEW_PER_BATCH,
    admit_initial,
    stale_handshakes,
)

# ------------------------------------------------------------------------------ pure


def test_admit_initial_bounds_half_open_and_new_per_batch():
    assert admit_initial(0, 0)
    assert admit_initial(MAX_HALF_OPEN - 1, MAX_NEW_PER_BATCH - 1)
    assert not admit_initial(MAX_HALF_OPEN, 0)
    assert not admit_initial(0, MAX_NEW_PER_BATCH)
    assert admit_initial(2, 0, max_half_open=3, max_new_per_batch=1)
    assert not admit_initial(3, 0, max_half_open=3, max_new_per_batch=1)
    assert not admit_initial(0, 1, max_half_open=3, max_new_per_batch=1)


def test_stale_handshakes_are_those_past_the_timeout():
    started = {"a": 0.0, "b": 5.0, "c": 9.9}
    assert stale_handshakes(started, 10.0, 5.0) == ["a", "b"]
    assert stale_handshakes(started, 4.0, 5.0) == []
    assert stale_handshakes({}, 100.0) == []


# ------------------------------------------------------------------------------ attacks


def _raw_initial(port: int) -> list[bytes]:
    """A real client Initial (what a peer that never finishes its handshake sends first)."""
    config = QuicConfiguration(is_client=True, alpn_protocols=[ALPN], server_name=SERVER_NAME)
    quic = QuicConnection(configuration=config)
    quic.connect(("127.0.0.1", port), now=0.0)
    return [d for d, _ in quic.datagrams_to_send(now=0.0)]


def _half_open_flood(port: int, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        for d in _raw_initial(port):
            s.sendto(d, ("127.0.0.1", port))
        socks.append(s)
    return socks


async def _until(cond, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


def test_half_open_flood_is_capped_then_expires_and_real_agents_still_get_in(pki):
    """Peers that send an Initial and go silent: capped, dropped after the handshake timeout."""

    async def main():
        async with running_server(pki) as h:
            port = h.server.address[1]
            demux = h.server._demux
            demux.max_half_open = 3
            demux.handshake_timeout = 1.0
            socks = _half_open_flood(port, 5)
            try:
                await _until(lambda: len(demux._half_open) == 3 and demux.initials_dropped >= 2)
                assert len(h.server.connections) == 3  # no state at all for the dropped ones
                # the cap is reached: a real agent's first Initial is dropped, its retransmission
                # gets in once the stale handshakes expired
                client = await connect("127.0.0.1", port, identity=pki.device,
                                       server_name=SERVER_NAME, alpn=ALPN, keepalive=None,
                                       handshake_timeout=10.0)
                assert demux.handshakes_timed_out == 3
                assert await client.ping(5.0) >= 0
                assert len(demux._half_open) == 0 and len(h.server.connections) == 1
                assert len(h.authorized) == 1  # the flood reached no application code
                client.close()
            finally:
                for s in socks:
                    s.close()

    run(main(), timeout=40.0)


def test_handshake_storm_keeps_connected_peers_answered_and_all_get_in(pki):
    """A burst of new agents larger than a batch admits: the connected peer's pings are
    answered while the storm is dropped down to ``max_new_per_batch`` per batch, and every
    stormer gets in through its own retransmissions (degrade, not collapse)."""

    async def main():
        async with running_server(pki) as h:
            port = h.server.address[1]
            demux = h.server._demux
            demux.max_new_per_batch = 2
            endpoint = h.server._transport
            old = await connect("127.0.0.1", port, identity=pki.device, server_name=SERVER_NAME,
                                alpn=ALPN, keepalive=None)
            # every Initial of the storm waits in the socket and arrives in one batch
            endpoint.pause_reading()
            dials = [asyncio.create_task(connect(
                "127.0.0.1", port, identity=pki.device, server_name=SERVER_NAME, alpn=ALPN,
                keepalive=None, handshake_timeout=20.0)) for _ in range(12)]
            await asyncio.sleep(0.2)
            ping = asyncio.create_task(old.ping(10.0))
            await asyncio.sleep(0.05)
            endpoint.resume_reading()
            assert await ping >= 0
            conns = await asyncio.gather(*dials)
            assert demux.initials_dropped >= 8  # 12 in one batch, 2 started
            assert len(h.authorized) == 13
            assert await old.ping(5.0) >= 0
            for c in conns + [old]:
                c.close()

    run(main(), timeout=60.0)


def test_a_closed_connection_leaves_exactly_its_own_ids(pki):
    """Each connection knows its IDs: termination removes those and nothing else (no scan)."""

    async def main():
        async with running_server(pki) as h:
            port = h.server.address[1]
            demux = h.server._demux
            a = await connect("127.0.0.1", port, identity=pki.device, server_name=SERVER_NAME,
                              alpn=ALPN, keepalive=None)
            b = await connect("127.0.0.1", port, identity=pki.device, server_name=SERVER_NAME,
                              alpn=ALPN, keepalive=None)
            await _until(lambda: len(set(demux._protocols.values())) == 2)
            for proto in set(demux._protocols.values()):
                assert proto.cids == {c for c, p in demux._protocols.items() if p is proto}
            a.close()
            await _until(lambda: len(set(demux._protocols.values())) == 1)
            (left,) = set(demux._protocols.values())
            assert left.cids == set(demux._protocols) and len(left.cids) >= 2
            assert await b.ping(5.0) >= 0
            b.close()

    run(main(), timeout=30.0)
