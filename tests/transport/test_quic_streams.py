"""Streams, half-close, resets, close codes, backpressure, migration, keepalive, idle timeout."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from transport_helpers import ALPN, SERVER_NAME, read_all, run, running_server

from tunnel.transport import PathChange, StreamReset, TransportError, connect


async def _connect(h, pki, **kw):
    host, port = h.server.address[:2]
    kw.setdefault("keepalive", None)
    return await connect(
        host, port, identity=pki.device, server_name=SERVER_NAME, alpn=ALPN, **kw
    )


def test_server_initiated_stream_and_half_close_both_ways(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, pki)
            server_conn = await h.connections.get()
            # proxy -> agent stream
            s = await server_conn.open_stream()
            await s.write(b"ping from proxy")
            s.write_eof()
            c = await client.accept_stream()
            assert c.id % 4 == 1  # server-initiated bidirectional
            assert await read_all(c) == b"ping from proxy"
            # the other half is still open after the peer's FIN
            await c.write(b"reply 1 ")
            await c.write(b"reply 2")
            c.write_eof()
            assert await read_all(s) == b"reply 1 reply 2"
            assert await s.read() == b""  # EOF is sticky
            with pytest.raises(TransportError):
                await s.write(b"after eof")
            client.close()

    run(main())


def test_reset_carried_both_ways(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, pki)
            server_conn = await h.connections.get()

            # client resets: server read raises, server write sees STOP_SENDING
            s = await client.open_stream()
            await s.write(b"partial")
            peer = await server_conn.accept_stream()
            assert await peer.read() == b"partial"
            s.reset(7)
            with pytest.raises(StreamReset) as info:
                await peer.read()
            assert info.value.wire_code == 7 and info.value.remote
            with pytest.raises(StreamReset):
                for _ in range(100):
                    await peer.write(b"x" * 1000)
                    await asyncio.sleep(0.01)
            with pytest.raises(StreamReset) as info:
                await s.read()
            assert not info.value.remote

            # server resets a stream the client is reading
            s2 = await client.open_stream()
            await s2.write(b"req")
            peer2 = await server_conn.accept_stream()
            peer2.reset(9)
            with pytest.raises(StreamReset) as info:
                await s2.read()
            assert info.value.wire_code == 9
            client.close()

    run(main())


def test_connection_close_code_and_reason_reach_peer(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, pki)
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
            assert (err.wire_code, err.reason, err.application) == (42, "maintenance", True)
            assert await server_conn.wait_closed() is None
            with pytest.raises(TransportError):
                await client.open_stream()

    run(main())


def test_backpressure_bounds_memory_per_stream(pki):
    """32 MiB pushed at a slow reader: receive buffer <= window, send buffer <= high-water."""
    window = 256 * 1024
    high_water = 256 * 1024
    total = 32 * 1024 * 1024

    async def main():
        stats = {"recv_max": 0, "send_max": 0, "credit_max": 0}
        done = asyncio.Event()

        async def on_connection(conn):
            stream = await conn.accept_stream()
            got = 0
            digest = hashlib.sha256()
            slow_until = time.monotonic() + 1.0
            while True:
                qs = conn._quic._streams.get(stream.id)
                if qs is not None:
                    stats["credit_max"] = max(
                        stats["credit_max"], qs.max_stream_data_local - stream.bytes_received
                    )
                stats["recv_max"] = max(stats["recv_max"], stream.receive_buffered)
                chunk = await stream.read(16384 if time.monotonic() < slow_until else 1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
                if time.monotonic() < slow_until:
                    await asyncio.sleep(0.01)  # ~1.6 MB/s consumer at first
            stats["got"] = got
            stats["digest"] = digest.hexdigest()
            done.set()
            await conn.wait_closed()

        async with running_server(
            pki, on_connection=on_connection, stream_window=window
        ) as h:
            client = await _connect(h, pki, send_high_water=high_water)
            s = await client.open_stream()
            block = os.urandom(1 << 20)
            sent = hashlib.sha256()
            t0 = time.monotonic()
            for _ in range(total // len(block)):
                await s.write(block)
                sent.update(block)
                stats["send_max"] = max(stats["send_max"], s.send_buffered)
            s.write_eof()
            await done.wait()
            elapsed = time.monotonic() - t0
            client.close()
        print(f"\nbackpressure: {total / elapsed / 1e6:.1f} MB/s overall, stats={stats}")
        assert stats["got"] == total and stats["digest"] == sent.hexdigest()
        assert 0 < stats["recv_max"] <= window
        assert stats["credit_max"] <= window
        assert 0 < stats["send_max"] <= high_water
        # the connection-level window grows on arrival, but the total never exceeds the sum
        # of the stream windows (one stream here)

    run(main(), timeout=40)


def test_migration_mid_transfer_byte_exact(pki):
    size = 3 * 1024 * 1024

    async def main():
        changes: list[PathChange] = []

        async def on_connection(conn):
            conn.on_path_change = changes.append
            stream = await conn.accept_stream()
            while True:  # echo
                chunk = await stream.read()
                if not chunk:
                    break
                await stream.write(chunk)
            stream.write_eof()
            await conn.wait_closed()

        async with running_server(pki, on_connection=on_connection) as h:
            client = await _connect(h, pki, local_addr=("127.0.0.1", 0))
            assert client.local_address[0] == "127.0.0.1"
            s = await client.open_stream()
            payload = os.urandom(size)
            received = bytearray()
            marks: dict[str, float] = {}

            async def reader():
                while True:
                    chunk = await s.read()
                    if not chunk:
                        return
                    if "migrated" in marks and "resumed" not in marks:
                        marks["resumed"] = time.monotonic()
                    received.extend(chunk)

            rtask = asyncio.ensure_future(reader())
            for i in range(0, size, 64 * 1024):
                await s.write(payload[i : i + 64 * 1024])
                if i == size // 3:
                    await client.migrate(("127.0.0.2", 0))
                    marks["migrated"] = time.monotonic()
            s.write_eof()
            await rtask
            assert bytes(received) == payload
            assert client.local_address[0] == "127.0.0.2"
            assert [c.new[0] for c in client.path_changes] == ["127.0.0.2"]
            assert changes and changes[-1].new[0] == "127.0.0.2"
            assert changes[-1].old[0] == "127.0.0.1"
            [conn] = h.server.connections
            assert conn.remote_address == client.local_address
            assert conn._quic.fleet_peer_moves >= 1  # in-flight declared lost on the move
            assert conn._quic.fleet_initial_rtt() == 0.333
            print(f"\nmigration: data resumed {1000 * (marks['resumed'] - marks['migrated']):.1f}"
                  " ms after migrate()")
            client.close()

    run(main())


def test_migration_on_idle_stream_then_continues(pki):
    async def main():
        async def on_connection(conn):
            stream = await conn.accept_stream()
            while chunk := await stream.read():
                await stream.write(chunk.upper())
            stream.write_eof()
            await conn.wait_closed()

        async with running_server(pki, on_connection=on_connection) as h:
            client = await _connect(h, pki, local_addr=("127.0.0.1", 0))
            s = await client.open_stream()
            await s.write(b"before")
            assert await s.read() == b"BEFORE"
            await asyncio.sleep(0.2)  # idle
            spare = client._quic.fleet_spare_peer_cids()
            old_cid = client._quic.fleet_peer_cid()
            await client.migrate(("127.0.0.2", 0))
            assert client._quic.fleet_peer_cid() != old_cid and spare > 0
            t0 = time.monotonic()
            await s.write(b"after")
            assert await s.read() == b"AFTER"
            print(f"\nidle migration: first echo {1000 * (time.monotonic() - t0):.1f} ms")
            await client.migrate(("127.0.0.1", 0))  # and back
            await s.write(b"again")
            assert await s.read() == b"AGAIN"
            client.close()

    run(main())


def test_ipv6_loopback(pki):
    async def main():
        async with running_server(pki, host="::1") as h:
            client = await _connect(h, pki, local_addr=("::1", 0))
            server_conn = await h.connections.get()
            assert server_conn.remote_address[0] == "::1"
            s = await client.open_stream()
            await s.write(b"v6")
            s.write_eof()
            peer = await server_conn.accept_stream()
            assert await read_all(peer) == b"v6"
            with pytest.raises(ValueError):
                await client.migrate(("127.0.0.2", 0))  # family must stay IPv6
            await client.migrate(("::1", 0))
            await peer.write(b"still here")
            assert await s.read() == b"still here"
            client.close()

    run(main())


def test_keepalive_holds_connection_and_ping_measures_rtt(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, pki, keepalive=0.2, idle_timeout=1.0)
            await asyncio.sleep(1.6)  # longer than the idle timeout
            assert not client.is_closed
            rtt = await client.ping(timeout=1.0)
            print(f"\nping RTT on loopback: {rtt * 1000:.2f} ms")
            assert 0 < rtt < 0.5
            client.close()

    run(main())


def test_ping_times_out_on_dead_path(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, pki)
            h.server._transport.pause_reading()  # the proxy goes silent
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await client.ping(timeout=0.3)
            assert time.monotonic() - t0 < 0.6
            h.server._transport.resume_reading()
            assert await client.ping(timeout=2.0) < 2.0
            client.close()

    run(main())


def test_idle_timeout_closes_and_wait_closed_returns(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, pki, idle_timeout=0.5)
            t0 = time.monotonic()
            err = await asyncio.wait_for(client.wait_closed(), 5)
            assert isinstance(err, TransportError)
            assert "Idle timeout" in err.reason and not err.remote and err.code == "timeout"
            assert 0.4 < time.monotonic() - t0 < 2.0
            with pytest.raises(TransportError):
                await client.ping(timeout=0.1)

    run(main())
