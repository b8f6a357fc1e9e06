"""The stream and connection core both transports sit on (no aioquic, h2 or socket here).

Everything a fleet connection does with its streams is the same over QUIC and over TLS/TCP:
buffer what arrived until the application reads it, grant flow-control credit as it *reads*
(not as data arrives), wait for send room, carry FIN and resets both ways, queue the streams
the peer opens (held back until the server's ``authorize()`` let the peer in), measure PINGs,
send keepalives, close once and tell every waiter why. That logic is here, once.

What differs is the wire, reached through a small ``Session`` interface: QUIC's is aioquic's
``QuicConnection`` (``quic.py``), TLS/TCP's is h2 over a TLS record layer (``tcp.py``); tests
use an in-memory pair of sessions (``tests/transport/test_stream_core.py``). A transport's connection
class subclasses ``CoreConnection``, sets ``_session``, and calls the ``feed``/``on_*`` methods
as its wire reports events; the core calls the session back to send.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from .base import Connection, ErrorCode, PathChange, Stream, StreamReset, TransportError

log = logging.getLogger("tunnel.transport")


def wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


def wake_all(futs: set[asyncio.Future[None]]) -> None:
    """Wake every waiter of a condition several tasks may wait on at once (each looks again)."""
    for fut in futs:
        wake(fut)


class Session(Protocol):
    """What the core needs from the wire under it (one per connection).

    ``send_*`` only queue: the session decides when bytes leave (QUIC transmits once per loop
    iteration, TLS/TCP writes what h2 produced).
    """

    #: largest stream reset code the wire carries (QUIC: 62 bits, HTTP/2: 32 bits)
    max_reset_code: int

    def send_room(self, stream: CoreStream) -> int:
        """Bytes ``stream.write()`` may hand over now; 0 to wait for ``wake_writers``. May set
        ``stream._write_error`` (the wire forgot the stream) instead."""

    def send_data(self, stream_id: int, data: bytes) -> None: ...

    def send_fin(self, stream_id: int) -> None: ...

    def send_reset(self, stream_id: int, code: int, *, sending: bool, receiving: bool) -> None:
        """Abort the stream: ``sending`` (RESET_STREAM) and/or ``receiving`` (STOP_SENDING)."""

    def consumed(self, stream_id: int, n: int, total: int) -> None:
        """The application read ``n`` more bytes (``total`` so far): grant credit for them."""

    def discarded(self, stream_id: int, n: int) -> None:
        """``n`` received bytes were dropped unread (the stream was reset)."""

    def forget(self, stream_id: int) -> None:
        """The stream is over in both directions; the core forgot it."""

    def buffered(self, stream_id: int) -> tuple[int, int]:
        """``(received bytes the wire still holds, sent bytes not yet acknowledged)``."""

    def send_ping(self, uid: int) -> None:
        """A PING; its acknowledgement comes back as ``ping_acked(uid)`` (0: nobody waits)."""

    def close(self, code: int, reason: str, first: bool) -> None:
        """Close the connection (``first``: the core just decided so, with this code)."""


class CoreStream(Stream):
    """A bidirectional stream with the contract of ``base.Stream`` (both transports).

    Memory bound: the receive buffer holds at most the stream window (credit is granted only
    as ``read()`` consumes); ``write()`` hands over only what ``Session.send_room`` allows.
    """

    def __init__(self, conn: CoreConnection, stream_id: int) -> None:
        self.id = stream_id
        self.bytes_sent = 0
        self.bytes_received = 0
        self._conn = conn
        self._rbuf: deque[bytes] = deque()
        self._rbuf_len = 0
        self._eof = False
        self._read_error: TransportError | None = None
        self._write_error: TransportError | None = None
        self._fin_sent = False
        self._read_waiter: asyncio.Future[None] | None = None
        self._write_waiter: asyncio.Future[None] | None = None
        #: the last send_room() said wait (QUIC's high-water mark uses it as hysteresis)
        self._write_blocked = False

    def __repr__(self) -> str:
        name = type(self).__name__.lstrip("_")
        return f"<{name} {self.id} sent={self.bytes_sent} received={self.bytes_received}>"

    @property
    def receive_buffered(self) -> int:
        """Bytes received but not yet read (ours plus what the wire still holds)."""
        return self._rbuf_len + self._conn._session.buffered(self.id)[0]

    @property
    def send_buffered(self) -> int:
        """Bytes written but not yet acknowledged (QUIC) or handed to the kernel (TCP)."""
        return self._conn._session.buffered(self.id)[1]

    # -- reading

    async def read(self, max_bytes: int = 65536) -> bytes:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        while True:
            if self._read_error is not None:
                raise self._read_error
            if self._rbuf:
                return self._take(max_bytes)
            if self._eof:
                return b""
            if self._conn._error is not None:
                raise self._conn._error
            self._read_waiter = self._conn._loop.create_future()
            try:
                await self._read_waiter
            finally:
                self._read_waiter = None

    def _take(self, max_bytes: int) -> bytes:
        parts = []
        n = 0
        while self._rbuf and n < max_bytes:
            chunk = self._rbuf.popleft()
            if n + len(chunk) > max_bytes:
                cut = max_bytes - n
                self._rbuf.appendleft(chunk[cut:])
                chunk = chunk[:cut]
            parts.append(chunk)
            n += len(chunk)
        self._rbuf_len -= n
        self.bytes_received += n
        self._conn._session.consumed(self.id, n, self.bytes_received)
        self._conn._maybe_forget(self)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    # -- writing

    def _check_writable(self) -> None:
        if self._write_error is not None:
            raise self._write_error
        if self._conn._error is not None:
            raise self._conn._error
        if self._fin_sent:
            raise TransportError(ErrorCode.INTERNAL, "write after write_eof()", remote=False, kind="internal")

    async def write(self, data: bytes) -> None:
        view = memoryview(bytes(data))
        conn = self._conn
        session = conn._session
        while True:
            self._check_writable()
            room = session.send_room(self)
            if self._write_error is not None:
                continue  # raised by the check
            if room <= 0:
                self._write_blocked = True
                conn._blocked_writers.add(self)
                self._write_waiter = conn._loop.create_future()
                try:
                    await self._write_waiter
                finally:
                    self._write_waiter = None
                    conn._blocked_writers.discard(self)
                continue
            self._write_blocked = False
            if not view:
                return
            chunk, view = view[:room], view[room:]
            session.send_data(self.id, bytes(chunk))
            self.bytes_sent += len(chunk)
            if not view:
                return

    def write_eof(self) -> None:
        if self._fin_sent or self._write_error is not None or self._conn._error is not None:
            return
        self._fin_sent = True
        self._conn._session.send_fin(self.id)
        self._conn._maybe_forget(self)

    def reset(self, code: int = 0) -> None:
        """Abort both directions with ``code`` (it must fit the wire: 32 bits over TLS/TCP)."""
        conn = self._conn
        if not 0 <= code <= conn._session.max_reset_code:
            raise ValueError(
                f"reset code {code} does not fit {conn.transport_name} "
                f"(0..{conn._session.max_reset_code})"
            )
        err = StreamReset(code, "reset locally", remote=False)
        sending = self._write_error is None
        receiving = self._read_error is None and not self._eof
        if conn._error is None and (sending or receiving):
            conn._session.send_reset(self.id, code, sending=sending, receiving=receiving)
        self._write_error = self._write_error or err
        self._read_error = self._read_error or err
        self._drop_unread()
        wake(self._read_waiter)
        wake(self._write_waiter)
        conn._maybe_forget(self)

    # -- what the wire reports

    def feed(self, data: bytes) -> None:
        """Bytes arrived (in order)."""
        if self._read_error is not None or self._eof:
            self._conn._session.discarded(self.id, len(data))
        elif data:
            self._rbuf.append(data)
            self._rbuf_len += len(data)
        wake(self._read_waiter)

    def feed_eof(self) -> None:
        """The peer's FIN: ``read()`` returns b"" once the buffer is drained."""
        if self._read_error is None:
            self._eof = True
        wake(self._read_waiter)
        self._conn._maybe_forget(self)

    def on_peer_reset(self, code: int) -> None:
        """The peer aborted its sending side (RESET_STREAM): reads fail, unread data goes."""
        self._read_error = self._read_error or StreamReset(code, "stream reset by peer", remote=True)
        self._drop_unread()
        wake(self._read_waiter)
        self._conn._maybe_forget(self)

    def on_stop_sending(self, code: int) -> None:
        """The peer stopped reading (STOP_SENDING): writes fail."""
        self._write_error = self._write_error or StreamReset(code, "peer stopped reading", remote=True)
        wake(self._write_waiter)
        self._conn._maybe_forget(self)

    def _drop_unread(self) -> None:
        if self._rbuf_len:
            self._conn._session.discarded(self.id, self._rbuf_len)
        self._rbuf.clear()
        self._rbuf_len = 0

    def _done(self) -> bool:
        read_done = self._read_error is not None or (self._eof and not self._rbuf)
        write_done = self._write_error is not None or self._fin_sent
        return read_done and write_done


class CoreConnection(Connection):
    """Streams, accept queue, authorization hold, pings, keepalive and close of one connection.

    Subclasses set ``_session`` and add the transport's addresses, handshake and migration.
    ``_on_fail(error)`` and ``_on_terminated()`` are their hooks.
    """

    _session: Session

    def __init__(self, *, is_client: bool) -> None:
        self._loop = asyncio.get_running_loop()
        self._is_client = is_client
        self.peer_certificate: Any = None
        self.alpn = ""
        self.on_path_change: Callable[[PathChange], None] | None = None
        self._streams: dict[int, CoreStream] = {}
        self._accept: deque[CoreStream] = deque()
        self._accept_waiter: asyncio.Future[None] | None = None
        self._pending: list[CoreStream] = []  # server: peer streams before authorization
        self._authorized = is_client
        self._blocked_writers: set[CoreStream] = set()
        self._error: TransportError | None = None
        self._closed_locally = False
        self._terminated = asyncio.Event()
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._ping_seq = 0
        self._ping_rtt: float | None = None
        self._keepalive_task: asyncio.Task[None] | None = None
        #: loop.time() of the last bytes received from the peer (liveness of the path)
        self.last_received = self._loop.time()
        #: called as ``on_send_error(exc)`` when the socket reports a failed send
        self.on_send_error: Callable[[Exception], None] | None = None
        self.send_errors = 0
        self.migrations = 0
        self.path_changes: list[PathChange] = []
        #: streams the peer opened (delivered or held), for tests and metrics
        self.peer_streams = 0

    @property
    def is_closed(self) -> bool:
        return self._error is not None

    # -- streams

    def _check_open(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._authorized:
            raise TransportError(ErrorCode.INTERNAL, "connection not authorized yet", remote=False, kind="internal")

    def _add_stream(self, stream: CoreStream) -> CoreStream:
        self._streams[stream.id] = stream
        return stream

    def _deliver(self, stream: CoreStream) -> None:
        """A stream the peer opened: to ``accept_stream()``, or held until authorized."""
        self.peer_streams += 1
        self._streams[stream.id] = stream
        if self._authorized:
            self._accept.append(stream)
            wake(self._accept_waiter)
        else:
            self._pending.append(stream)

    def _let_in(self) -> None:
        """``authorize()`` passed: deliver the streams held until now."""
        self._authorized = True
        self._accept.extend(self._pending)
        self._pending.clear()
        wake(self._accept_waiter)

    async def accept_stream(self) -> Stream:
        while True:
            if self._accept:
                return self._accept.popleft()
            if self._error is not None:
                raise self._error
            self._accept_waiter = self._loop.create_future()
            try:
                await self._accept_waiter
            finally:
                self._accept_waiter = None

    def _maybe_forget(self, stream: CoreStream) -> None:
        if stream._done() and self._streams.pop(stream.id, None) is not None:
            self._session.forget(stream.id)

    def _wake_writers(self, ready: Callable[[CoreStream], bool] | None = None) -> None:
        """Let blocked writers look at their send room again (all, or those ``ready``)."""
        for stream in list(self._blocked_writers):
            if ready is None or stream._write_error is not None or ready(stream):
                wake(stream._write_waiter)

    # -- pings and keepalive

    def send_ping(self) -> None:
        """Send one PING now without waiting for its acknowledgement (a liveness probe)."""
        if self._error is None:
            self._session.send_ping(0)

    async def ping(self, timeout: float) -> float:
        """Round-trip time of a PING. Raises TimeoutError if no acknowledgement arrives within
        ``timeout`` seconds, or the TransportError that closed the connection."""
        if self._error is not None:
            raise self._error
        self._ping_seq += 1
        uid = self._ping_seq
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pings[uid] = fut
        start = self._loop.time()
        self._session.send_ping(uid)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            raise TimeoutError(f"no PING acknowledgement within {timeout:g}s") from None
        finally:
            self._pings.pop(uid, None)
        self._ping_rtt = self._loop.time() - start
        return self._ping_rtt

    def _ping_acked(self, uid: int) -> None:
        wake(self._pings.get(uid))

    def start_keepalive(self, interval: float) -> None:
        self._keepalive_task = self._loop.create_task(self._keepalive(interval))

    async def _keepalive(self, interval: float) -> None:
        while self._error is None:
            await asyncio.sleep(interval)
            if self._error is not None:
                return
            self._session.send_ping(0)  # uid 0: nobody waits for it

    def _on_send_error(self, exc: Exception) -> None:
        self.send_errors += 1
        cb = self.on_send_error
        if cb is not None:
            try:
                cb(exc)
            except Exception:
                log.exception("on_send_error callback failed")

    def _report_path(self, change: PathChange) -> None:
        self.path_changes.append(change)
        del self.path_changes[:-16]
        cb = self.on_path_change
        if cb is not None:
            try:
                cb(change)
            except Exception:
                log.exception("on_path_change callback failed")

    # -- close

    def close(self, code: int = 0, reason: str = "") -> None:
        first = self._error is None
        if first:
            self._closed_locally = True
            self._fail(TransportError(code, reason or "closed locally", remote=False))
        self._session.close(code, reason, first)

    async def wait_closed(self) -> TransportError | None:
        """Wait until the connection is over. None if we closed it, else why it ended."""
        await self._terminated.wait()
        return None if self._closed_locally else self._error

    async def wait_close_sent(self, timeout: float = 1.0) -> bool:
        """After :meth:`close`: wait (at most ``timeout`` s) until the close has left this host,
        so a process may exit without the peer waiting out its idle timeout. Never waits out a
        QUIC closing period. False: not sent within ``timeout``."""
        if self._close_sent():
            return True
        try:
            await asyncio.wait_for(self._terminated.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _close_sent(self) -> bool:
        """Transport hook: has our close left already? (by default: once the socket is gone)"""
        return self._terminated.is_set()

    def _fail(self, error: TransportError) -> None:
        """The connection is over (``error`` says why): every waiter hears it, once."""
        if self._error is not None:
            return
        self._error = error
        for fut in self._pings.values():
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: the pinger raises the connection's error itself
        wake(self._accept_waiter)
        for stream in list(self._streams.values()):
            wake(stream._read_waiter)
            wake(stream._write_waiter)
        if self._keepalive_task is not None:
            self._keepalive_task.cancel()
        self._pending.clear()
        self._on_fail(error)

    def _terminate(self) -> None:
        if self._error is None:
            self._fail(TransportError(0, "connection terminated", remote=False))
        if self._terminated.is_set():
            return
        self._terminated.set()
        self._on_terminated()

    def _on_fail(self, error: TransportError) -> None:
        """Transport hook: fail what only this transport waits on (handshake, hello...)."""

    def _on_terminated(self) -> None:
        """Transport hook: release what only this transport holds (timers, socket)."""
