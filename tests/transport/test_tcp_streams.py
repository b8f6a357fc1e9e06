"""Streams over TLS/TCP (h2): both directions, half-close, reset, backpressure, ping, idle."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from test_tcp_helpers import running_tcp_server, tcp_dial
from transport_helpers import read_all, run, running_server

from tunnel.transport import DEFAULT_STREAM_WINDOW, StreamReset, TransportError
from tunnel.transport import connect as quic_connect


def test_server_opened_streams_and_half_close_both_ways(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device)
            server_conn = await h.connections.get()
            # proxy -> agent streams: more than the idle pool, so some wait for replenishment
            opened = [await server_conn.open_stream() for _ in range(12)]
            for i, s in enumerate(opened):
                await s.write(b"from proxy %d" % i)
                s.write_eof()
            for _ in opened:
                c = await client.accept_stream()
                msg = await read_all(c)
                assert msg.startswith(b"from proxy ")
                # the other half is still open after the peer's FIN
                await c.write(b"reply 1 ")
                await c.write(b"reply " + msg[11:])
                c.write_eof()
            for i, s in enumerate(opened):
                assert await read_all(s) == b"reply 1 reply %d" % i
                assert await s.read() == b""  # EOF is sticky
                with pytest.raises(TransportError):
                    await s.write(b"after eof")
            client.close()

    run(main())


def test_reset_carried_both_ways(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device)
            server_conn = await h.connections.get()

            s = await client.open_stream()
            await s.write(b"partial")
            peer = await server_conn.accept_stream()
            assert await peer.read() == b"partial"
            s.reset(7)
            with pytest.raises(StreamReset) as info:
                await peer.read()
            assert info.value.wire_code == 7 and info.value.remote
            with pytest.raises(StreamReset):
                await peer.write(b"x" * 1000)
            with pytest.raises(StreamReset) as info:
                await s.read()
            assert not info.value.remote

            # server resets a server-opened stream the client is reading
            s2 = await server_conn.open_stream()
            await s2.write(b"req")
            c2 = await client.accept_stream()
            assert await c2.read() == b"req"
            s2.reset(9)
            with pytest.raises(StreamReset) as info:
                await c2.read()
            assert info.value.wire_code == 9
            # the connection is fine afterwards
            assert await client.ping(2.0) > 0
            client.close()

    run(main())


def test_connection_close_code_and_reason_reach_peer(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device)
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
    """16 MiB pushed at a reader that is slow at first: unread bytes stay within the window,
    the sender's buffered bytes within the high-water mark (+ one frame)."""
    window = 256 * 1024
    high_water = 256 * 1024
    total = 16 * 1024 * 1024

    async def main():
        stats = {"recv_max": 0, "send_max": 0}
        done = asyncio.Event()

        async def on_connection(conn):
            stream = await conn.accept_stream()
            digest = hashlib.sha256()
            got = 0
            slow_until = time.monotonic() + 1.0
            while True:
                stats["recv_max"] = max(stats["recv_max"], stream.receive_buffered)
                slow = time.monotonic() < slow_until
                chunk = await stream.read(16384 if slow else 1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
                if slow:
                    await asyncio.sleep(0.01)
            stats["got"], stats["digest"] = got, digest.hexdigest()
            done.set()
            await conn.wait_closed()

        async with running_tcp_server(pki, on_connection=on_connection, stream_window=window) as h:
            client = await tcp_dial(h, pki.device, send_high_water=high_water)
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
        assert stats["send_max"] <= high_water + 64 * 1024 + 1024

    run(main(), timeout=40)


def test_throughput_one_stream_tcp_vs_quic(pki):
    """Not a benchmark gate: prints MB/s of one stream on loopback for both transports."""
    async def sink(conn):
        stream = await conn.accept_stream()
        n = 0
        while chunk := await stream.read(1 << 20):
            n += len(chunk)
        await stream.write(str(n).encode())
        stream.write_eof()
        await conn.wait_closed()

    async def push(client, size):
        s = await client.open_stream()
        block = b"\xa5" * (1 << 20)
        t0 = time.perf_counter()
        for _ in range(size // len(block)):
            await s.write(block)
        s.write_eof()
        assert int(await read_all(s)) == size
        rate = size / (time.perf_counter() - t0) / 1e6
        client.close()
        return rate

    async def main():
        async with running_tcp_server(pki, on_connection=sink) as h:
            tcp_rate = await push(await tcp_dial(h, pki.device), 32 << 20)
        async with running_server(pki, on_connection=sink) as h:
            host, port = h.server.address[:2]
            quic_rate = await push(await quic_connect(
                host, port, identity=pki.device, server_name="proxy.test", alpn="fleet/1",
                keepalive=None,
            ), 8 << 20)
        print(f"\none stream on loopback: TLS/TCP+h2 {tcp_rate:.0f} MB/s, QUIC {quic_rate:.0f} MB/s"
              f" (window {DEFAULT_STREAM_WINDOW >> 10} KiB)")
        assert tcp_rate > 0 and quic_rate > 0

    run(main(), timeout=60)


def test_keepalive_holds_connection_and_ping_measures_rtt(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device, keepalive=0.2, idle_timeout=1.0)
            server_conn = await h.connections.get()
            assert client.idle_timeout == 1.0 and server_conn.idle_timeout == 1.0  # min of both
            await asyncio.sleep(1.6)  # longer than the idle timeout
            assert not client.is_closed and not server_conn.is_closed
            rtt = await client.ping(timeout=1.0)
            assert 0 < rtt < 0.5 and client.rtt == rtt
            assert 0 < await server_conn.ping(timeout=1.0) < 0.5
            client.close()

    run(main())


def test_ping_times_out_when_peer_goes_silent(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device)
            server_conn = await h.connections.get()
            server_conn._protocol.tcp.pause_reading()  # the proxy goes silent
            with pytest.raises(TimeoutError):
                await client.ping(timeout=0.3)
            server_conn._protocol.tcp.resume_reading()
            assert await client.ping(timeout=2.0) < 2.0
            client.close()

    run(main())


def test_idle_timeout_closes_and_wait_closed_returns(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device, idle_timeout=0.5)
            server_conn = await h.connections.get()
            server_conn._protocol.tcp.pause_reading()  # nothing answers the client any more
            t0 = time.monotonic()
            err = await asyncio.wait_for(client.wait_closed(), 5)
            assert isinstance(err, TransportError)
            assert "Idle timeout" in err.reason and not err.remote and err.code == "timeout"
            assert 0.3 < time.monotonic() - t0 < 3.0
            with pytest.raises(TransportError):
                await client.ping(timeout=0.1)

    run(main())


def test_migrate_is_refused_and_path_change_never_fires(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device)
            fired = []
            client.on_path_change = fired.append
            with pytest.raises(TransportError, match="cannot migrate; reconnect"):
                await client.migrate(("127.0.0.1", 0))
            assert fired == [] and await client.ping(2.0) > 0
            client.close()

    run(main())


def test_ipv6_loopback(pki):
    async def main():
        async with running_tcp_server(pki, host="::1") as h:
            client = await tcp_dial(h, pki.device, local_addr=("::1", 0))
            server_conn = await h.connections.get()
            assert server_conn.remote_address[0] == "::1"
            s = await server_conn.open_stream()
            await s.write(b"v6")
            s.write_eof()
            assert await read_all(await client.accept_stream()) == b"v6"
            client.close()

    run(main())
