"""A finished QUIC stream is released, and a read on a dead connection raises (issue 19).

A finished stream is released whichever side sent its FIN first (item 4).

The proxy sends its FIN to the agent before the agent's FIN comes back; such a stream used to
stay in the connection's table (and its credit counter) forever: ~1 KB per session of proxy
memory on a long-lived agent connection.
"""

from __future__ import annotations

import asyncio

import pytest
from transport_helpers import (
    ALPN,
    SERVER_NAME,
    read_all,
    run,
    running_server,
    running_tcp_server,
    tcp_dial,
)

from tunnel.transport import TransportError, connect


def test_streams_are_released_when_our_fin_went_first(pki):
    async def main():
        async with running_server(pki) as h:
            host, port = h.server.address[:2]
            client = await connect(host, port, identity=pki.device, server_name=SERVER_NAME,
                                   alpn=ALPN, keepalive=None)
            server_conn = await h.connections.get()
            for i in range(40):
                s = await server_conn.open_stream()  # as the proxy opens one to the agent
                await s.write(b"open %d" % i)
                s.write_eof()  # our FIN first
                c = await client.accept_stream()
                assert await read_all(c) == b"open %d" % i
                await c.write(b"reply")
                assert await s.read() == b"reply"
                c.write_eof()  # the peer's FIN comes alone, after everything was read
                assert await s.read() == b""
            assert server_conn._streams == {} and server_conn._quic._fleet_consumed == {}
            assert client._streams == {}
            client.close()

    run(main())


@pytest.mark.parametrize("transport", ["quic", "tcp"])
@pytest.mark.parametrize("how", ["peer-close", "local-close"])
def test_read_on_a_dead_connection_raises_never_returns_eof(pki, transport, how):
    """Issue 19: only a real FIN is an end of stream; a dead connection is an error."""

    async def main():
        server_cm = running_server(pki) if transport == "quic" else running_tcp_server(pki)
        async with server_cm as h:
            if transport == "quic":
                host, port = h.server.address[:2]
                client = await connect(host, port, identity=pki.device, server_name=SERVER_NAME,
                                       alpn=ALPN, keepalive=None)
            else:
                client = await tcp_dial(h, pki.device)
            server_conn = await h.connections.get()
            s = await server_conn.open_stream()
            await s.write(b"part of a download")
            c = await client.accept_stream()
            assert await c.read() == b"part of a download"
            if how == "peer-close":
                server_conn.close(0, "bye")
            else:  # what the idle timeout or the engineer's dead-proxy watch do
                client.close(1, "the proxy did not answer")
            with pytest.raises(TransportError):
                async with asyncio.timeout(5):
                    await c.read()
            with pytest.raises(TransportError):
                await c.read()  # and again: never a late b""
            client.close()

    run(main())
