"""Helpers for the TLS/TCP transport tests (no tests here): a loopback TCP server harness."""

from __future__ import annotations

import contextlib

from transport_helpers import ALPN, ENROLL_ALPN, SERVER_NAME, Harness

from tunnel.transport import tcp


@contextlib.asynccontextmanager
async def running_tcp_server(
    pki, *, host="127.0.0.1", identity=None, authorize=None, on_connection=None,
    anonymous_alpns=(ENROLL_ALPN,), **kw,
):
    h = Harness()

    async def default_authorize(conn):
        h.authorized.append(conn)

    async def default_on_connection(conn):
        await h.connections.put(conn)
        await conn.wait_closed()

    h.server = await tcp.serve(
        host, 0, identity=identity or pki.server, alpns=[ALPN, ENROLL_ALPN],
        anonymous_alpns=list(anonymous_alpns), authorize=authorize or default_authorize,
        on_connection=on_connection or default_on_connection, **kw,
    )
    try:
        yield h
    finally:
        h.server.close()
        await h.server.wait_closed()


async def tcp_dial(h, identity, **kw):
    host, port = h.server.address[:2]
    kw.setdefault("server_name", SERVER_NAME)
    kw.setdefault("alpn", ALPN)
    kw.setdefault("keepalive", None)
    return await tcp.connect(host, port, identity=identity, **kw)
