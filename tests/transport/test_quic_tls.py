"""Mutual TLS, anonymous ALPN and authorization over loopback QUIC."""

from __future__ import annotations

import asyncio

import pytest
from transport_helpers import ALPN, ENROLL_ALPN, SERVER_NAME, read_all, run, running_server

from tunnel.transport import Refused, TransportError, connect

CERT_REQUIRED = 0x100 + 116
BAD_CERT = 0x100 + 42
CERT_EXPIRED = 0x100 + 45


async def _connect(h, identity, **kw):
    host, port = h.server.address[:2]
    kw.setdefault("server_name", SERVER_NAME)
    kw.setdefault("alpn", ALPN)
    kw.setdefault("keepalive", None)
    return await connect(host, port, identity=identity, **kw)


def test_mtls_success_both_ways(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, pki.device)
            assert client.peer_certificate == pki.server.cert_chain[0]
            assert client.alpn == ALPN
            server_conn = await h.connections.get()
            assert server_conn.peer_certificate == pki.device.cert_chain[0]
            assert server_conn.alpn == ALPN
            assert h.authorized == [server_conn]
            assert server_conn.remote_address[1] == client.local_address[1]

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

    run(main())


@pytest.mark.parametrize(
    ("who", "code", "words"),
    [
        (None, CERT_REQUIRED, "client certificate is required"),
        ("foreign_device", BAD_CERT, "not accepted by the pinned fleet CA"),
        ("expired_device", CERT_EXPIRED, "expired"),
        ("server_eku_as_client", BAD_CERT, "clientAuth"),
    ],
)
def test_bad_client_refused_and_nothing_delivered(pki, who, code, words):
    async def main():
        async with running_server(pki) as h:
            identity = getattr(pki, who) if who else None
            with pytest.raises(TransportError) as info:
                await _connect(h, identity, ca=pki.ca)
            err = info.value
            assert err.wire_code == code, err
            assert err.remote and not err.application
            assert words in err.reason
            await asyncio.sleep(0.05)
            assert h.authorized == []
            assert h.connections.empty()

    run(main())


def test_anonymous_alpn_without_certificate(pki):
    async def main():
        async with running_server(pki) as h:
            client = await _connect(h, None, ca=pki.ca, alpn=ENROLL_ALPN)
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


def test_anonymous_alpn_still_rejects_a_bad_certificate(pki):
    async def main():
        async with running_server(pki) as h:
            with pytest.raises(TransportError) as info:
                await _connect(h, pki.foreign_device, ca=pki.ca, alpn=ENROLL_ALPN)
            assert info.value.wire_code == BAD_CERT
            assert h.authorized == []

    run(main())


@pytest.mark.parametrize(
    ("server_name", "words"),
    [(SERVER_NAME, "not accepted by the pinned fleet CA"), ("other.test", "")],
)
def test_client_rejects_untrusted_server(pki, server_name, words):
    async def main():
        # server presents a cert from a foreign CA, or the right CA but the wrong name
        identity = pki.foreign_server if words else pki.server
        from tunnel.transport import serve

        async def never(conn):
            raise AssertionError("must not be reached")

        server = await serve(
            "127.0.0.1", 0, identity=identity, alpns=[ALPN], authorize=never, on_connection=never
        )
        try:
            host, port = server.address[:2]
            with pytest.raises(TransportError) as info:
                await connect(
                    host, port, identity=pki.device, server_name=server_name, alpn=ALPN,
                    keepalive=None,
                )
            err = info.value
            assert err.wire_code == BAD_CERT and not err.remote, err
            assert err.code == "tls" and err.exit_status == 3
            assert "server certificate" in err.reason
            assert words in err.reason
        finally:
            server.close()
            await server.wait_closed()

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

        async with running_server(pki, authorize=authorize, on_connection=on_connection) as h:
            client = await _connect(h, pki.device)
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


def test_streams_before_authorization_are_held_then_delivered(pki):
    async def main():
        release = asyncio.Event()
        got = []

        async def authorize(conn):
            await release.wait()

        async def on_connection(conn):
            s = await conn.accept_stream()
            got.append(await read_all(s))

        async with running_server(pki, authorize=authorize, on_connection=on_connection) as h:
            client = await _connect(h, pki.device)
            s = await client.open_stream()
            await s.write(b"x" * 5000)
            s.write_eof()
            await asyncio.sleep(0.2)
            assert got == []
            [conn] = h.server.connections
            assert conn._accept == deque_empty() and len(conn._pending) == 1
            release.set()
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0.01)
            assert got == [b"x" * 5000]
            client.close()

    def deque_empty():
        from collections import deque

        return deque()

    run(main())


def test_authorize_crash_closes_with_authorize_failed(pki):
    async def main():
        def authorize(conn):
            raise RuntimeError("registry down")

        async with running_server(pki, authorize=authorize) as h:
            client = await _connect(h, pki.device)
            err = await client.wait_closed()
            assert err.wire_code == 3 and err.reason == "authorization failed"

    run(main())
