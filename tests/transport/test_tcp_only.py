"""What only the TLS/TCP transport does: the CA pin checked over the fleet hello, the
interception wording, refusing what is not a fleet proxy, no migration. The stream and
admission contracts are in ``test_contract_*.py``, run on both transports."""

from __future__ import annotations

import asyncio
import time

import pytest
from transport_helpers import (
    ALPN,
    ENROLL_ALPN,
    SERVER_NAME,
    read_all,
    run,
    running_server,
    running_tcp_server,
    tcp_dial,
)

from tunnel.transport import DEFAULT_STREAM_WINDOW, TLSIdentity, TransportError, tcp
from tunnel.transport import connect as quic_connect
from tunnel.transport.policy import spki_pin

BAD_CERT = 0x100 + 42


def test_server_certificate_from_foreign_ca_says_interception(pki):
    async def main():
        async with running_tcp_server(pki, identity=pki.foreign_server) as h:
            with pytest.raises(TransportError) as info:
                await tcp_dial(h, pki.device)
            err = info.value
            assert err.wire_code == BAD_CERT and not err.remote and not err.application
            assert (err.code, err.exit_status) == ("intercepted", 3)
            assert err.reason.startswith(
                "the network is intercepting TLS: presented issuer CN=foreign CA; "
                "exempt proxy.test (127.0.0.1:"
            ), err.reason
            assert "not accepted by the pinned fleet CA" in err.reason
            assert h.connections.empty()

    run(main())


def test_ca_pin_enrollment_path(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, None, ca_pin=spki_pin(pki.ca), alpn=ENROLL_ALPN)
            assert client.peer_ca == pki.ca
            server_conn = await h.connections.get()
            s = await client.open_stream()
            await s.write(b"token")
            s.write_eof()
            assert await read_all(await server_conn.accept_stream()) == b"token"
            client.close()

    run(main())


@pytest.mark.parametrize("case", ["foreign_proxy", "real_ca_in_hello_but_foreign_leaf"])
def test_wrong_pin_refused_before_any_application_stream(pki, case):
    async def main():
        if case == "foreign_proxy":
            identity = pki.foreign_server  # hello carries the foreign CA: pin mismatch
        else:  # a middlebox relaying the real proxy's hello but presenting its own leaf
            identity = TLSIdentity(pki.foreign_server.cert_chain, pki.foreign_server.key, pki.ca)
        server_conns = []

        async def authorize(conn):
            server_conns.append(conn)

        async with running_tcp_server(pki, identity=identity, authorize=authorize) as h:
            with pytest.raises(TransportError) as info:
                await tcp_dial(h, None, ca_pin=spki_pin(pki.ca), alpn=ENROLL_ALPN)
            err = info.value
            assert err.wire_code == BAD_CERT and not err.remote
            assert "the network is intercepting TLS: presented issuer CN=foreign CA" in err.reason
            await asyncio.sleep(0.1)
            assert [c.peer_streams for c in server_conns] == [0]  # only the hello
            assert h.connections.qsize() <= 1

    run(main())


def test_unreachable_and_not_a_fleet_server(pki):
    async def main():
        # a plain TCP listener that never speaks TLS: handshake timeout, clearly worded
        async def silent(reader, writer):
            await asyncio.sleep(5)
            writer.close()

        srv = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        with pytest.raises(TransportError) as info:
            await tcp.connect("127.0.0.1", port, identity=pki.device, server_name=SERVER_NAME,
                              alpn=ALPN, handshake_timeout=0.5, keepalive=None)
        assert "timed out" in info.value.reason and info.value.code == "timeout"
        srv.close()
        # nothing listening
        with pytest.raises(TransportError) as info:
            await tcp.connect("127.0.0.1", port, identity=pki.device, server_name=SERVER_NAME,
                              alpn=ALPN, keepalive=None)
        assert "cannot reach" in info.value.reason and info.value.code == "unreachable"

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


def test_a_peer_that_says_goaway_and_never_closes_is_dropped_after_the_grace(pki):
    # an agent going back to QUIC ends its TLS/TCP link with a GOAWAY; if its close of the
    # socket never arrives, the proxy's end must still terminate (its serve task held the
    # connection, its HTTP/2 state and buffers for good: found in a soak)
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device)
            server_conn = await h.connections.get()
            client._send_goaway(0, "going away", application=True)
            client._protocol.stop_reading()  # and then silent: nothing read, nothing closed
            await asyncio.wait_for(server_conn.wait_closed(), tcp.CLOSE_GRACE + 5)
            client._transport.abort()

    run(main())
