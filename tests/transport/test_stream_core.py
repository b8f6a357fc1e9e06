"""The shared stream/connection core, in memory: two CoreConnections wired by a pair of
sessions (no sockets, no aioquic, no h2). What both transports rely on is checked here once."""

from __future__ import annotations

import asyncio

import pytest

from tunnel.transport import Connection, StreamReset, TransportError
from tunnel.transport.core import CoreConnection, CoreStream

WINDOW = 1000


class MemorySession:
    """One side of an in-memory wire: what is sent arrives at the peer on the next loop turn,
    with per-stream credit granted as the peer's application reads (like both transports)."""

    max_reset_code = 0xFFFFFFFF

    def __init__(self, conn: MemoryConnection) -> None:
        self.conn = conn
        self.peer: MemorySession | None = None
        self.sent: dict[int, int] = {}
        self.credit: dict[int, int] = {}  # stream -> highest offset the peer allows
        self.forgotten: list[int] = []
        self.closes: list[tuple[int, str, bool]] = []
        self.seen: set[int] = set()

    def _later(self, fn, *args) -> None:
        asyncio.get_running_loop().call_soon(fn, *args)

    def _at_peer(self, sid: int) -> CoreStream | None:
        conn = self.peer.conn
        stream = conn._streams.get(sid)
        if stream is None and sid not in self.peer.seen:
            self.peer.seen.add(sid)
            stream = CoreStream(conn, sid)
            conn._deliver(stream)
        return stream

    def _deliver(self, sid: int, what: str, arg=None) -> None:
        stream = self._at_peer(sid)
        if stream is None:
            return
        if what == "data":
            stream.feed(arg)
        elif what == "fin":
            stream.feed_eof()
        elif what == "reset":
            stream.on_peer_reset(arg)
        elif what == "stop":
            stream.on_stop_sending(arg)

    def send_room(self, stream: CoreStream) -> int:
        return self.credit.get(stream.id, WINDOW) - self.sent.get(stream.id, 0)

    def send_data(self, sid: int, data: bytes) -> None:
        self.sent[sid] = self.sent.get(sid, 0) + len(data)
        self.seen.add(sid)
        self._later(self._deliver, sid, "data", data)

    def send_fin(self, sid: int) -> None:
        self.seen.add(sid)
        self._later(self._deliver, sid, "fin")

    def send_reset(self, sid: int, code: int, *, sending: bool, receiving: bool) -> None:
        if sending:
            self._later(self._deliver, sid, "reset", code)
        if receiving:
            self._later(self._deliver, sid, "stop", code)

    def consumed(self, sid: int, n: int, total: int) -> None:
        def grant():
            self.peer.credit[sid] = total + WINDOW
            self.peer.conn._wake_writers()

        self._later(grant)

    def discarded(self, sid: int, n: int) -> None:
        pass

    def forget(self, sid: int) -> None:
        self.forgotten.append(sid)

    def buffered(self, sid: int) -> tuple[int, int]:
        return 0, 0

    def send_ping(self, uid: int) -> None:
        self._later(self.conn._ping_acked, uid)  # the peer's core never sees PINGs

    def close(self, code: int, reason: str, first: bool) -> None:
        self.closes.append((code, reason, first))
        if first:
            peer = self.peer.conn
            self._later(peer._fail, TransportError(code, reason, application=True, remote=True))
            self._later(peer._terminate)
        self._later(self.conn._terminate)


class MemoryConnection(CoreConnection):
    transport_name = "memory"

    def __init__(self, *, is_client: bool) -> None:
        super().__init__(is_client=is_client)
        self._session = MemorySession(self)
        self._next_id = 0 if is_client else 1

    @property
    def remote_address(self):
        return ("memory", 0)

    @property
    def local_address(self):
        return ("memory", 0)

    @property
    def rtt(self):
        return self._ping_rtt

    @property
    def idle_timeout(self) -> float:
        return 60.0

    async def open_stream(self) -> CoreStream:
        self._check_open()
        sid, self._next_id = self._next_id, self._next_id + 2
        return self._add_stream(CoreStream(self, sid))

    async def migrate(self, local_addr) -> None:
        raise TransportError(0, "cannot migrate", kind="internal")


def pair(*, authorized: bool = True) -> tuple[MemoryConnection, MemoryConnection]:
    client, server = MemoryConnection(is_client=True), MemoryConnection(is_client=False)
    client._session.peer, server._session.peer = server._session, client._session
    if authorized:
        server._let_in()
    return client, server


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def read_all(stream) -> bytes:
    out = bytearray()
    while chunk := await stream.read():
        out += chunk
    return bytes(out)


def test_a_memory_connection_is_a_complete_connection():
    async def main():
        client, _ = pair()
        assert isinstance(client, Connection)
        assert not client.is_closed and client.rtt is None and client.idle_timeout == 60.0
        assert client.last_received > 0 and client.on_send_error is None

    run(main())


def test_data_and_half_close_both_ways_and_streams_are_forgotten():
    async def main():
        client, server = pair()
        s = await client.open_stream()
        await s.write(b"hello")
        s.write_eof()
        peer = await server.accept_stream()
        assert await read_all(peer) == b"hello"
        await peer.write(b"world")
        peer.write_eof()
        assert await read_all(s) == b"world"
        assert client._streams == {} and server._streams == {}
        assert client._session.forgotten == [0] and server._session.forgotten == [0]
        with pytest.raises(TransportError) as info:
            await s.write(b"more")
        assert info.value.code == "internal"

    run(main())


def test_credit_is_granted_on_consumption_and_bounds_the_receive_buffer():
    async def main():
        client, server = pair()
        s = await client.open_stream()
        payload = bytes(range(256)) * 40  # 10 KiB through a 1000-byte window
        writer = asyncio.ensure_future(s.write(payload))
        await asyncio.sleep(0)
        peer = await server.accept_stream()
        got = bytearray()
        high = 0
        while len(got) < len(payload):
            for _ in range(3):
                await asyncio.sleep(0)
            high = max(high, peer.receive_buffered)
            got += await peer.read(300)
        await writer
        assert bytes(got) == payload
        assert 0 < high <= WINDOW  # never more than the window waits unread

    run(main())


def test_a_writer_waits_while_the_reader_does_not_read():
    async def main():
        client, server = pair()
        s = await client.open_stream()
        writer = asyncio.ensure_future(s.write(b"x" * (WINDOW + 1)))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not writer.done() and s.bytes_sent == WINDOW
        peer = await server.accept_stream()
        assert len(await peer.read(WINDOW)) == WINDOW
        await asyncio.wait_for(writer, 1)
        assert s.bytes_sent == WINDOW + 1

    run(main())


def test_reset_reaches_the_peer_with_its_code_and_drops_unread_data():
    async def main():
        client, server = pair()
        s = await client.open_stream()
        await s.write(b"unread")
        peer = await server.accept_stream()
        await asyncio.sleep(0)
        s.reset(7)
        with pytest.raises(StreamReset) as info:
            await s.read()
        assert not info.value.remote
        for _ in range(3):
            await asyncio.sleep(0)
        with pytest.raises(StreamReset) as info:
            await peer.read()
        assert (info.value.wire_code, info.value.remote, info.value.code) == (7, True, "reset")
        with pytest.raises(StreamReset):
            await peer.write(b"x")  # the reset also stopped our sending side
        assert peer.receive_buffered == 0

    run(main())


def test_reset_code_must_fit_the_wire():
    async def main():
        client, _ = pair()
        s = await client.open_stream()
        with pytest.raises(ValueError, match="does not fit"):
            s.reset(1 << 32)

    run(main())


def test_streams_are_held_until_authorized_and_dropped_if_refused():
    async def main():
        client, server = pair(authorized=False)
        s = await client.open_stream()
        await s.write(b"early")
        accept = asyncio.ensure_future(server.accept_stream())
        for _ in range(3):
            await asyncio.sleep(0)
        assert not accept.done() and len(server._pending) == 1
        with pytest.raises(TransportError) as info:
            await server.open_stream()
        assert info.value.code == "internal"
        server._let_in()
        peer = await asyncio.wait_for(accept, 1)
        assert await peer.read() == b"early"

        # a peer that never gets in: its held streams are never delivered
        client2, server2 = pair(authorized=False)
        await (await client2.open_stream()).write(b"x")
        await asyncio.sleep(0)
        server2.close(2, "refused")
        assert server2._pending == []
        with pytest.raises(TransportError):
            await server2.accept_stream()

    run(main())


def test_ping_measures_a_round_trip_and_times_out_when_unanswered():
    async def main():
        client, _ = pair()
        rtt = await client.ping(1.0)
        assert rtt >= 0 and client.rtt == rtt
        client._session.send_ping = lambda uid: None  # the path went silent
        with pytest.raises(TimeoutError, match="no PING acknowledgement"):
            await client.ping(0.05)
        assert client._pings == {}

    run(main())


def test_close_tells_every_waiter_and_the_peer_once():
    async def main():
        client, server = pair()
        s = await client.open_stream()
        await s.write(b"x")
        peer = await server.accept_stream()
        reader = asyncio.ensure_future(s.read())
        acceptor = asyncio.ensure_future(client.accept_stream())
        await asyncio.sleep(0)
        server.close(4001, "device revoked")
        server.close(4001, "again")  # a second close sends nothing new
        assert [first for *_, first in server._session.closes] == [True, False]
        assert await server.wait_closed() is None  # we closed it
        err = await asyncio.wait_for(client.wait_closed(), 1)
        assert (err.wire_code, err.reason, err.remote, err.code) == (
            4001, "device revoked", True, "refused"
        )
        for task in (reader, acceptor):
            with pytest.raises(TransportError):
                await task
        with pytest.raises(TransportError):
            await client.ping(1.0)
        assert client.is_closed and peer._conn.is_closed

    run(main())


def test_keepalive_pings_until_the_connection_ends():
    async def main():
        client, _ = pair()
        pings = []
        send = client._session.send_ping
        client._session.send_ping = lambda uid: (pings.append(uid), send(uid))
        client.start_keepalive(0.01)
        await asyncio.sleep(0.1)
        assert pings and set(pings) == {0}
        client.close()
        await asyncio.sleep(0)
        assert client._keepalive_task.cancelled() or client._keepalive_task.done()

    run(main())
