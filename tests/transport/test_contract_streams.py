"""The stream contract, run on both transports (QUIC and TLS/TCP): streams both ways,
half-close, resets, close codes, backpressure, pings, keepalive, idle timeout, IPv6.

What only one transport does is in ``test_quic_only.py`` (migration) and ``test_tcp_only.py``
(pinning over the hello, interception wording, the reverse-stream pool).
"""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest
from transport_helpers import read_all, run

from tunnel.transport import StreamReset, TransportError


def test_streams_both_ways_and_half_close(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            server_conn = await h.connections.get()
            # proxy -> agent streams: more than TLS/TCP's idle reverse pool, so some wait for
            # replenishment there
            opened = [await server_conn.open_stream() for _ in range(12)]
            for i, s in enumerate(opened):
                await s.write(b"from proxy %d" % i)
                s.write_eof()
            for _ in opened:
                c = await client.accept_stream()
                if transport.name == "quic":
                    assert c.id % 4 == 1  # server-initiated bidirectional
                msg = await read_all(c)
                assert msg.startswith(b"from proxy ")
                # the other half is still open after the peer's FIN
                await c.write(b"reply 1 ")
                await c.write(b"reply " + msg[11:])
                c.write_eof()
            for i, s in enumerate(opened):
                assert await read_all(s) == b"reply 1 reply %d" % i
                assert await s.read() == b""  # EOF is sticky
                with pytest.raises(TransportError) as info:
                    await s.write(b"after eof")
                assert info.value.code == "internal"
            # agent -> proxy
            s = await client.open_stream()
            await s.write(b"hello")
            s.write_eof()
            peer = await server_conn.accept_stream()
            assert await read_all(peer) == b"hello"
            await peer.write(b"world")
            peer.write_eof()
            assert await read_all(s) == b"world"
            assert (s.bytes_sent, s.bytes_received) == (5, 5)
            client.close()

    run(main())


def test_streams_opened_at_once_by_many_tasks_all_open(pki, transport):
    # sessions to one device start together: on TLS/TCP more of them than the idle reverse
    # pool wait at once for the agent's next offers, and every one of them must be woken (a
    # single waiter slot lost all but the last, and a dial hung for its whole timeout)
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            server_conn = await h.connections.get()

            async def one(i):
                s = await server_conn.open_stream()
                await s.write(b"stream %d" % i)
                s.write_eof()
                return s

            opened = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(20))), 10)
            got = sorted([await read_all(await client.accept_stream()) for _ in opened])
            assert got == sorted(b"stream %d" % i for i in range(20))
            client.close()

    run(main())


@pytest.mark.parametrize("side", ["client", "server"])
def test_streams_written_out_of_order_all_arrive(pki, transport, side):
    # QUIC: a later stream's data may come first; the earlier stream is still new then
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            server_conn = await h.connections.get()
            opener, acceptor = (client, server_conn) if side == "client" else (server_conn, client)
            streams = [await opener.open_stream() for _ in range(4)]
            assert len({s.id for s in streams}) == 4
            for i in (3, 1, 0, 2):
                await streams[i].write(b"stream %d" % i)
                streams[i].write_eof()
                await asyncio.sleep(0.02)  # let each one arrive before the next is written
            got = sorted([await read_all(await acceptor.accept_stream()) for _ in streams])
            assert got == [b"stream %d" % i for i in range(4)]
            client.close()

    run(main())


@pytest.mark.parametrize("opener", ["client", "server"])
def test_reset_carried_both_ways(pki, transport, opener):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            server_conn = await h.connections.get()

            # the client resets: the server's read raises, its writes fail soon after
            s = await client.open_stream()
            await s.write(b"partial")
            peer = await server_conn.accept_stream()
            assert await peer.read() == b"partial"
            s.reset(7)
            with pytest.raises(StreamReset) as info:
                await peer.read()
            assert (info.value.wire_code, info.value.remote, info.value.code) == (7, True, "reset")
            with pytest.raises(StreamReset):
                for _ in range(100):
                    await peer.write(b"x" * 1000)
                    await asyncio.sleep(0.01)
            with pytest.raises(StreamReset) as info:
                await s.read()
            assert not info.value.remote

            # the other side resets a stream the client is reading
            if opener == "client":
                mine = await client.open_stream()
                await mine.write(b"req")
                theirs = await server_conn.accept_stream()
                assert await theirs.read() == b"req"
            else:
                theirs = await server_conn.open_stream()
                await theirs.write(b"req")
                mine = await client.accept_stream()
                assert await mine.read() == b"req"
            theirs.reset(9)
            with pytest.raises(StreamReset) as info:
                await mine.read()
            assert info.value.wire_code == 9
            assert await client.ping(2.0) > 0  # the connection is fine afterwards
            client.close()

    run(main())


def test_connection_close_code_and_reason_reach_peer(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            server_conn = await h.connections.get()
            waiting = asyncio.ensure_future(client.accept_stream())
            await asyncio.sleep(0.01)
            server_conn.close(42, "maintenance")
            with pytest.raises(TransportError) as info:
                await waiting
            assert (info.value.wire_code, info.value.reason, info.value.remote) == (
                42, "maintenance", True,
            )
            err = await client.wait_closed()
            assert (err.wire_code, err.reason, err.application, err.code) == (
                42, "maintenance", True, "refused",
            )
            assert await server_conn.wait_closed() is None
            with pytest.raises(TransportError):
                await client.open_stream()

    run(main())


def test_backpressure_bounds_memory_per_stream(pki, transport):
    """16 MiB pushed at a reader that is slow at first: unread bytes stay within the stream
    window (credit only as the reader reads), the sender's within its high-water mark."""
    window = 256 * 1024
    high_water = 256 * 1024
    total = 16 * 1024 * 1024

    async def main():
        stats = {"recv_max": 0, "send_max": 0, "credit_max": 0}
        done = asyncio.Event()

        async def on_connection(conn):
            stream = await conn.accept_stream()
            got = 0
            digest = hashlib.sha256()
            reads = 0
            while True:
                if transport.name == "quic":  # the credit advertised, not just the buffer
                    advertised = conn._quic.fleet_stream_credit(stream.id)
                    if advertised is not None:
                        stats["credit_max"] = max(
                            stats["credit_max"], advertised - stream.bytes_received
                        )
                stats["recv_max"] = max(stats["recv_max"], stream.receive_buffered)
                slow = reads < 100  # a slow consumer at first: the window fills
                chunk = await stream.read(16384 if slow else 1 << 20)
                reads += 1
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
                if slow:
                    await asyncio.sleep(0.01)
            stats["got"] = got
            stats["digest"] = digest.hexdigest()
            done.set()
            await conn.wait_closed()

        async with transport.server(pki, on_connection=on_connection, stream_window=window) as h:
            client = await transport.dial(h, pki.device, send_high_water=high_water)
            s = await client.open_stream()
            block = os.urandom(1 << 20)
            sent = hashlib.sha256()
            for _ in range(total // len(block)):
                await s.write(block)
                sent.update(block)
                stats["send_max"] = max(stats["send_max"], s.send_buffered)
            s.write_eof()
            await done.wait()
            client.close()
        assert stats["got"] == total and stats["digest"] == sent.hexdigest()
        assert 0 < stats["recv_max"] <= window
        assert stats["credit_max"] <= window
        assert stats["send_max"] <= high_water + transport.send_slack
        if transport.name == "quic":
            assert stats["send_max"] > 0

    run(main(), timeout=60)


def test_keepalive_holds_connection_and_ping_measures_rtt(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device, keepalive=0.2, idle_timeout=1.0)
            server_conn = await h.connections.get()
            assert client.idle_timeout == 1.0 and server_conn.idle_timeout == 1.0  # min of both
            await asyncio.sleep(1.6)  # longer than the idle timeout
            assert not client.is_closed and not server_conn.is_closed
            rtt = await client.ping(timeout=5.0)
            assert rtt > 0 and client.rtt is not None and client.rtt > 0
            assert client.last_received > 0
            assert await server_conn.ping(timeout=5.0) > 0
            client.send_ping()  # a probe nobody waits for
            client.close()

    run(main())


def test_ping_times_out_when_peer_goes_silent(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            server_conn = await h.connections.get()
            transport.silence(h, server_conn)
            with pytest.raises(TimeoutError, match="no PING acknowledgement"):
                await client.ping(timeout=0.3)
            transport.unsilence(h, server_conn)
            assert await client.ping(timeout=5.0) > 0
            client.close()

    run(main())


def test_idle_timeout_closes_and_wait_closed_returns(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device, idle_timeout=0.5)
            server_conn = await h.connections.get()
            transport.silence(h, server_conn)  # nothing answers the client any more
            err = await asyncio.wait_for(client.wait_closed(), 10)
            assert isinstance(err, TransportError)
            assert "Idle timeout" in err.reason and not err.remote
            assert (err.code, err.exit_status) == ("timeout", 3)
            assert client.is_closed
            with pytest.raises(TransportError):
                await client.ping(timeout=0.1)

    run(main())


def test_ipv6_loopback(pki, transport):
    async def main():
        async with transport.server(pki, host="::1") as h:
            client = await transport.dial(h, pki.device, local_addr=("::1", 0))
            server_conn = await h.connections.get()
            assert server_conn.remote_address[0] == "::1"
            s = await server_conn.open_stream()
            await s.write(b"v6")
            s.write_eof()
            assert await read_all(await client.accept_stream()) == b"v6"
            c = await client.open_stream()
            await c.write(b"v6 back")
            c.write_eof()
            assert await read_all(await server_conn.accept_stream()) == b"v6 back"
            client.close()

    run(main())
