"""Mutual TLS, pinning / interception errors and authorization over loopback TLS/TCP (h2)."""

from __future__ import annotations

import asyncio

import pytest
from test_tcp_helpers import running_tcp_server, tcp_dial
from transport_helpers import ALPN, ENROLL_ALPN, SERVER_NAME, read_all, run

from tunnel.transport import Refused, TLSIdentity, TransportError, tcp
from tunnel.transport.policy import spki_pin

CERT_REQUIRED = 0x100 + 116
BAD_CERT = 0x100 + 42
UNSUPPORTED_CERT = 0x100 + 43
CERT_EXPIRED = 0x100 + 45
UNKNOWN_CA = 0x100 + 48


def test_mtls_success_both_ways(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, pki.device)
            assert client.peer_certificate == pki.server.cert_chain[0]
            assert client.alpn == ALPN and client.peer_ca == pki.ca
            server_conn = await h.connections.get()
            assert server_conn.peer_certificate == pki.device.cert_chain[0]
            assert server_conn.alpn == ALPN
            assert h.authorized == [server_conn]
            assert server_conn.remote_address == client.local_address
            assert client.remote_address == server_conn.local_address

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
            assert await client.wait_closed() is None
            err = await server_conn.wait_closed()
            assert err.remote and err.application and err.wire_code == 0

    run(main())


@pytest.mark.parametrize(
    ("who", "codes", "words"),
    [
        (None, {CERT_REQUIRED}, "client certificate is required"),
        ("foreign_device", {UNKNOWN_CA, BAD_CERT}, "rejected our client certificate"),
        ("expired_device", {CERT_EXPIRED}, "expired"),
        ("server_eku_as_client", {UNSUPPORTED_CERT, BAD_CERT}, "certificate"),
    ],
)
def test_bad_client_refused_and_nothing_delivered(pki, who, codes, words):
    async def main():
        async with running_tcp_server(pki) as h:
            identity = getattr(pki, who) if who else None
            with pytest.raises(TransportError) as info:
                await tcp_dial(h, identity, ca=pki.ca)
            err = info.value
            assert err.wire_code in codes, err
            assert err.remote and not err.application
            assert words in err.reason
            await asyncio.sleep(0.05)
            assert h.authorized == []
            assert h.connections.empty()

    run(main())


def test_anonymous_alpn_without_certificate(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            client = await tcp_dial(h, None, ca=pki.ca, alpn=ENROLL_ALPN)
            server_conn = await h.connections.get()
            assert server_conn.peer_certificate is None
            assert server_conn.alpn == ENROLL_ALPN
            s = await client.open_stream()
            await s.write(b"csr")
            s.write_eof()
            peer = await server_conn.accept_stream()
            assert await read_all(peer) == b"csr"
            client.close()

    run(main())


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


def test_right_ca_wrong_name_is_not_called_interception(pki):
    async def main():
        async with running_tcp_server(pki) as h:
            with pytest.raises(TransportError) as info:
                await tcp_dial(h, pki.device, server_name="other.test")
            err = info.value
            assert err.wire_code == BAD_CERT and "server certificate" in err.reason
            assert "intercepting" not in err.reason and err.code == "tls"

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


def test_authorize_refused_code_and_reason_and_no_stream(pki):
    async def main():
        delivered = []

        async def authorize(conn):
            assert conn.peer_certificate == pki.device.cert_chain[0]
            await asyncio.sleep(0.2)  # let the client's stream arrive first
            raise Refused(4001, "device revoked")

        async def on_connection(conn):
            delivered.append(conn)

        async with running_tcp_server(pki, authorize=authorize, on_connection=on_connection) as h:
            client = await tcp_dial(h, pki.device)
            s = await client.open_stream()
            await s.write(b"early data that must never be delivered")
            err = await client.wait_closed()
            assert (err.wire_code, err.reason, err.application, err.remote) == (
                4001, "device revoked", True, True,
            )
            with pytest.raises(TransportError):
                await s.read()
            with pytest.raises(TransportError) as info:
                await client.accept_stream()
            assert info.value.wire_code == 4001 and info.value.code == "refused"
            assert delivered == []

    run(main())


def test_streams_before_authorization_are_held_then_delivered(pki):
    async def main():
        release = asyncio.Event()
        got = []

        async def authorize(conn):
            await release.wait()

        async def on_connection(conn):
            got.append(await read_all(await conn.accept_stream()))

        async with running_tcp_server(pki, authorize=authorize, on_connection=on_connection) as h:
            client = await tcp_dial(h, pki.device)
            s = await client.open_stream()
            await s.write(b"x" * 5000)
            s.write_eof()
            await asyncio.sleep(0.2)
            [conn] = h.server.connections
            assert got == [] and not conn._accept and len(conn._pending) == 1
            release.set()
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [b"x" * 5000]
            client.close()

    run(main())


def test_authorize_crash_closes_with_authorize_failed(pki):
    async def main():
        def authorize(conn):
            raise RuntimeError("registry down")

        async with running_tcp_server(pki, authorize=authorize) as h:
            client = await tcp_dial(h, pki.device)
            err = await client.wait_closed()
            assert err.wire_code == 3 and err.reason == "authorization failed"

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
