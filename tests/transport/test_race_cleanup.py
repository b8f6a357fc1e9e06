"""The losing QUIC attempt of a race is closed, and never becomes a connection at the server.

The bug this guards against: on a network that blocks UDP, TLS/TCP wins the race and the QUIC
attempt was cancelled only at the asyncio level; its connection kept retransmitting Initials.
When UDP came back a few seconds later the handshake completed and the proxy took this unused
connection as the device's, so new sessions went to a connection nobody read.
"""

from __future__ import annotations

import asyncio

from transport_helpers import ALPN, SERVER_NAME, run, running_server, running_tcp_server

from tunnel.transport import connect, happy_eyeballs, tcp


class _Gate(asyncio.DatagramProtocol):
    """A UDP relay to the QUIC server that drops everything until ``opened``: UDP blocked."""

    def __init__(self, upstream_addr) -> None:
        self.upstream_addr = upstream_addr
        self.opened = False
        self.client_addr = None
        self.from_client_while_open = 0
        self.transport: asyncio.DatagramTransport | None = None
        self.upstream: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        if not self.opened:
            return
        self.client_addr = addr
        self.from_client_while_open += 1
        assert self.upstream is not None
        self.upstream.sendto(data, self.upstream_addr)

    def from_server(self, data) -> None:
        if self.opened and self.client_addr is not None:
            assert self.transport is not None
            self.transport.sendto(data, self.client_addr)


class _Back(asyncio.DatagramProtocol):
    def __init__(self, gate: _Gate) -> None:
        self.gate = gate

    def datagram_received(self, data, addr) -> None:
        self.gate.from_server(data)


def test_udp_back_after_tcp_won_losing_quic_attempt_never_reaches_server(pki):
    async def main():
        loop = asyncio.get_running_loop()
        async with running_server(pki) as hq, running_tcp_server(pki) as ht:
            gate = _Gate(hq.server.address[:2])
            front, _ = await loop.create_datagram_endpoint(
                lambda: gate, local_addr=("127.0.0.1", 0))
            back, _ = await loop.create_datagram_endpoint(
                lambda: _Back(gate), local_addr=("127.0.0.1", 0))
            gate.upstream = back
            try:
                def quic():
                    return connect("127.0.0.1", front.get_extra_info("sockname")[1],
                                   identity=pki.device, server_name=SERVER_NAME, alpn=ALPN,
                                   keepalive=None, handshake_timeout=10.0)

                def over_tcp():
                    return tcp.connect("127.0.0.1", ht.server.address[1], identity=pki.device,
                                       server_name=SERVER_NAME, alpn=ALPN, keepalive=None,
                                       handshake_timeout=3.0)

                conn, label = await happy_eyeballs(quic, over_tcp, head_start=0.1)
                assert label == "tcp"
                await ht.connections.get()
                # UDP comes back. The abandoned attempt's Initial would be retransmitted at
                # its PTOs (about 1 s, 3 s, 7 s after it started) and complete the handshake.
                gate.opened = True
                await asyncio.sleep(4.0)
                assert gate.from_client_while_open == 0  # the attempt is gone: nothing sent
                assert hq.authorized == [] and hq.connections.empty()
                assert hq.server.connections == []  # not even half-open
                # the connection in use is untouched
                s = await conn.open_stream()
                await s.write(b"still here")
                s.write_eof()
                conn.close()
            finally:
                front.close()
                back.close()

    run(main(), timeout=30.0)


def test_cancelled_quic_dial_closes_its_socket(pki):
    async def main():
        async with running_server(pki) as hq:
            hq.server._transport.pause_reading()  # the server is silent: the dial hangs
            task = asyncio.ensure_future(connect(
                "127.0.0.1", hq.server.address[1], identity=pki.device,
                server_name=SERVER_NAME, alpn=ALPN, keepalive=None, handshake_timeout=10.0))
            await asyncio.sleep(0.2)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert task.cancelled()
            hq.server._transport.resume_reading()
            await asyncio.sleep(1.5)  # past the first PTO of the abandoned attempt
            assert hq.authorized == [] and hq.connections.empty()

    run(main(), timeout=30.0)
