"""A finished QUIC stream is released, whichever side sent its FIN first (issue 19, item 4).

The proxy sends its FIN to the agent before the agent's FIN comes back; such a stream used to
stay in the connection's table (and its credit counter) forever: ~1 KB per session of proxy
memory on a long-lived agent connection.
"""

from __future__ import annotations

from transport_helpers import ALPN, SERVER_NAME, read_all, run, running_server

from tunnel.transport import connect


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
