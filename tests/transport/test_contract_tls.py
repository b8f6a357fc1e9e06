"""The admission contract, run on both transports: mutual TLS against the pinned fleet CA,
anonymous ALPNs, the server's ``authorize()`` (refusal, crash, streams held until it passed).

TLS/TCP-only behaviour (CA pin checked over the hello, the interception wording, an endpoint
that is not a fleet proxy) is in ``test_tcp_only.py``.
"""

from __future__ import annotations

import asyncio

import pytest
from transport_helpers import ALPN, ENROLL_ALPN, read_all, run

from tunnel.transport import Refused, TransportError

CERT_REQUIRED = 0x100 + 116
BAD_CERT = 0x100 + 42
UNSUPPORTED_CERT = 0x100 + 43
CERT_EXPIRED = 0x100 + 45
UNKNOWN_CA = 0x100 + 48


def test_mtls_success_both_ways(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, pki.device)
            assert client.peer_certificate == pki.server.cert_chain[0]
            assert client.alpn == ALPN and client.transport_name == transport.name
            server_conn = await h.connections.get()
            assert server_conn.peer_certificate == pki.device.cert_chain[0]
            assert server_conn.alpn == ALPN
            assert h.authorized == [server_conn]
            assert server_conn.remote_address[1] == client.local_address[1]
            if transport.name == "tcp":  # a QUIC client socket is bound to 0.0.0.0
                assert server_conn.remote_address == client.local_address
                assert client.peer_ca == pki.ca
                assert client.remote_address == server_conn.local_address

            s = await client.open_stream()
            await s.write(b"hello")
            s.write_eof()
            peer = await server_conn.accept_stream()
            assert await read_all(peer) == b"hello"
            client.close()
            assert await client.wait_closed() is None
            err = await server_conn.wait_closed()
            assert err.remote and err.application and err.wire_code == 0

    run(main())


# OpenSSL (TLS/TCP) judges some certificates during the handshake with its own alert
@pytest.mark.parametrize(
    ("who", "codes", "words"),
    [
        (None, {"quic": {CERT_REQUIRED}, "tcp": {CERT_REQUIRED}}, "client certificate is required"),
        ("foreign_device", {"quic": {BAD_CERT}, "tcp": {UNKNOWN_CA, BAD_CERT}},
         {"quic": "not accepted by the pinned fleet CA", "tcp": "rejected our client certificate"}),
        ("expired_device", {"quic": {CERT_EXPIRED}, "tcp": {CERT_EXPIRED}}, "expired"),
        ("server_eku_as_client", {"quic": {BAD_CERT}, "tcp": {UNSUPPORTED_CERT, BAD_CERT}},
         {"quic": "clientAuth", "tcp": "certificate"}),
    ],
)
def test_bad_client_refused_and_nothing_delivered(pki, transport, who, codes, words):
    async def main():
        async with transport.server(pki) as h:
            identity = getattr(pki, who) if who else None
            with pytest.raises(TransportError) as info:
                await transport.dial(h, identity, ca=pki.ca)
            err = info.value
            assert err.wire_code in codes[transport.name], err
            assert err.remote and not err.application and err.code == "tls"
            assert (words if isinstance(words, str) else words[transport.name]) in err.reason
            await asyncio.sleep(0.05)
            assert h.authorized == []
            assert h.connections.empty()

    run(main())


def test_anonymous_alpn_without_certificate(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            client = await transport.dial(h, None, ca=pki.ca, alpn=ENROLL_ALPN)
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


def test_anonymous_alpn_still_rejects_a_bad_certificate(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            with pytest.raises(TransportError) as info:
                await transport.dial(h, pki.foreign_device, ca=pki.ca, alpn=ENROLL_ALPN)
            assert info.value.wire_code in {BAD_CERT, UNKNOWN_CA}
            assert info.value.code == "tls"
            assert h.authorized == []

    run(main())


@pytest.mark.parametrize("case", ["foreign_ca", "wrong_name"])
def test_client_rejects_untrusted_server(pki, transport, case):
    async def main():
        identity = pki.foreign_server if case == "foreign_ca" else pki.server
        name = "proxy.test" if case == "foreign_ca" else "other.test"

        async def never(conn):
            raise AssertionError("must not be reached")

        async with transport.server(pki, identity=identity, authorize=never,
                                    on_connection=never) as h:
            with pytest.raises(TransportError) as info:
                await transport.dial(h, pki.device, server_name=name)
            err = info.value
            assert err.wire_code == BAD_CERT and not err.remote, err
            assert err.exit_status == 3
            if case == "foreign_ca":
                assert "not accepted by the pinned fleet CA" in err.reason
                if transport.name == "quic":
                    assert "server certificate" in err.reason
                # TLS/TCP also names the interception (see test_tcp_only.py)
                assert err.code == ("intercepted" if transport.name == "tcp" else "tls")
            else:
                assert "server certificate" in err.reason and "intercepting" not in err.reason
                assert err.code == "tls"

    run(main())


def test_authorize_refused_code_and_reason_and_no_stream(pki, transport):
    async def main():
        delivered = []

        async def authorize(conn):
            assert conn.peer_certificate == pki.device.cert_chain[0]
            await asyncio.sleep(0.2)  # let the client's stream arrive first
            raise Refused(4001, "device revoked")

        async def on_connection(conn):
            delivered.append(conn)

        async with transport.server(pki, authorize=authorize, on_connection=on_connection) as h:
            client = await transport.dial(h, pki.device)
            s = await client.open_stream()
            await s.write(b"early data that must never be delivered")
            err = await client.wait_closed()
            assert isinstance(err, TransportError)
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


def test_streams_before_authorization_are_held_then_delivered(pki, transport):
    async def main():
        release = asyncio.Event()
        got = []

        async def authorize(conn):
            await release.wait()

        async def on_connection(conn):
            got.append(await read_all(await conn.accept_stream()))

        async with transport.server(pki, authorize=authorize, on_connection=on_connection) as h:
            client = await transport.dial(h, pki.device)
            s = await client.open_stream()
            await s.write(b"x" * 5000)
            s.write_eof()
            [conn] = h.server.connections
            for _ in range(200):
                if conn._pending:
                    break
                await asyncio.sleep(0.01)
            assert got == [] and not conn._accept and len(conn._pending) == 1
            release.set()
            for _ in range(200):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [b"x" * 5000]
            client.close()

    run(main())


def test_authorize_crash_closes_with_authorize_failed(pki, transport):
    async def main():
        def authorize(conn):
            raise RuntimeError("registry down")

        async with transport.server(pki, authorize=authorize) as h:
            client = await transport.dial(h, pki.device)
            err = await client.wait_closed()
            assert (err.wire_code, err.reason, err.code) == (3, "authorization failed", "refused")

    run(main())
