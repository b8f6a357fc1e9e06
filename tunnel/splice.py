"""Copy bytes both ways between two endpoints until both directions are done.

Endpoints are a local TCP socket or pipe (asyncio streams) or a tunnel stream. Half-close is
carried across (EOF on one side → FIN on the other, the other direction keeps flowing).
Backpressure comes from awaiting each write: a slow consumer stops us reading from the fast
producer.

A cut must look cut. Only a real end of stream from one side (a TCP FIN, a stream FIN) becomes
an end of stream on the other; anything else — a reset, a lost connection, a failed write, the
splice being cancelled because its process or connection is going away — aborts *both* ends: a
tunnel stream gets RESET_STREAM/RST_STREAM and a TCP socket a real RST (``SO_LINGER 0``; a plain
``transport.abort()`` sends FIN when nothing is unread, which a reader that stops at end of
stream takes for complete data).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import socket
import stat
import struct
import threading
from dataclasses import dataclass
from typing import Protocol

from tunnel.transport import Stream, TransportError

CHUNK = 64 * 1024


class Ends(Protocol):
    """One side of a splice: async ``recv``/``send``, ``eof`` (half-close) and ``abort``."""

    async def recv(self) -> bytes: ...
    async def send(self, data: bytes) -> None: ...
    def eof(self) -> None: ...
    def abort(self) -> None: ...


class StreamEnds(Ends):
    def __init__(self, stream: Stream, first: bytes = b""):
        self.stream, self._first = stream, first

    async def recv(self) -> bytes:
        if self._first:
            data, self._first = self._first, b""
            return data
        return await self.stream.read(CHUNK)

    async def send(self, data: bytes) -> None:
        await self.stream.write(data)

    def eof(self) -> None:
        with contextlib.suppress(TransportError):
            self.stream.write_eof()

    def abort(self) -> None:
        with contextlib.suppress(TransportError):
            self.stream.reset(1)


class SocketEnds(Ends):
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    async def recv(self) -> bytes:
        return await self.reader.read(CHUNK)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def eof(self) -> None:
        with contextlib.suppress(OSError, RuntimeError):
            if self.writer.can_write_eof():
                self.writer.write_eof()
            else:
                self.writer.close()

    def abort(self) -> None:
        """Drop the connection with a TCP RST, never a FIN, so the peer sees it was cut."""
        reset_on_close(self.writer)
        self.writer.transport.abort()


def reset_on_close(writer: asyncio.StreamWriter, reset: bool = True) -> None:
    """Make the socket under ``writer`` send RST instead of FIN when it is closed (or, with
    ``reset=False``, a FIN again)."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # already closed: nothing left to reset
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", int(reset), 0))


def _fd_kind(fd: int) -> tuple[str, tuple[int, int] | None]:
    """``("fifo" | "socket" | "other", (st_dev, st_ino))`` of an open fd (``"other"`` if closed)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return "other", None
    kind = "fifo" if stat.S_ISFIFO(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "other"
    return kind, (st.st_dev, st.st_ino)


class StdioEnds(Ends):
    """This process's stdin/stdout, whatever they are (pipe, socket, file, terminal).

    Pipes and sockets go through the event loop, without a thread hop per chunk (OpenSSH gives a
    ProxyCommand two pipes): stdin by ``connect_read_pipe``, stdout by ``connect_write_pipe``, or,
    when stdin and stdout are the same stream socket (inetd style, ``socat``), one socket
    transport for both. Anything else (a terminal, a regular file, ``/dev/null``) is read by a
    daemon thread and written with ``to_thread``: non-blocking mode on a terminal would change
    it for every process sharing it, and a file is never "not ready". Two cases also keep the
    thread for stdout: stdout shared with stderr (non-blocking would apply to stderr's lines
    too) and a stdout socket apart from stdin (the write-pipe transport takes any readable
    event on it for a closed reader).

    The event-loop ends are opened on first use (``recv``/``send``), so the constructor stays
    synchronous. A pipe has no reset: ``abort`` leaves stdout open, and the caller exits
    non-zero with one line on stderr before the process exit closes it — a reader never gets a
    clean end first. On a socket ``abort`` arms a reset (``SO_LINGER 0``), so the process exit
    that closes the last descriptor sends RST, never FIN.
    """

    def __init__(self, stdin: int = 0, stdout: int = 1):
        self._loop = asyncio.get_running_loop()
        self._in, self._out = stdin, stdout
        in_kind, in_id = _fd_kind(stdin)
        out_kind, out_id = _fd_kind(stdout)
        _, err_id = _fd_kind(2)
        if in_kind == out_kind == "socket" and in_id == out_id and _is_stream_socket(stdin):
            self.mode = ("socket", "socket")
        else:
            self.mode = (
                "pipe" if in_kind in ("fifo", "socket") else "thread",
                "pipe" if out_kind == "fifo" and out_id != err_id else "thread",
            )
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._opening: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[bytes] | None = None
        if self.mode[0] == "thread":
            self._queue = asyncio.Queue(maxsize=4)
            threading.Thread(target=self._read_stdin, daemon=True).start()

    async def _open(self) -> None:
        loop = self._loop
        if self.mode[0] == "socket":
            sock = socket.socket(fileno=os.dup(self._in))
            self._reader, self._writer = await asyncio.open_connection(sock=sock, limit=CHUNK)
            self._writer.transport.set_write_buffer_limits(high=0)  # as for a pipe, below
            return
        if self.mode[0] == "pipe":
            # the transports own the files (and close the fds when they end)
            reader = self._reader = asyncio.StreamReader(limit=CHUNK)
            stdin = open(self._in, "rb", buffering=0)  # noqa: SIM115
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
        if self.mode[1] == "pipe":
            stdout = open(self._out, "wb", buffering=0)  # noqa: SIM115
            transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdout)
            self._writer = asyncio.StreamWriter(transport, protocol, None, loop)
            # Every send waits until the kernel took all of it: this process exits right after the
            # session, and bytes still in a transport's buffer at exit would be lost while the
            # reader sees a clean end (issue 19). write_eof() then never has anything to flush.
            transport.set_write_buffer_limits(high=0)

    async def _ready(self) -> None:
        if self._opening is None:
            self._opening = self._loop.create_task(self._open())
        await asyncio.shield(self._opening)  # both pumps wait on one opening

    def _read_stdin(self) -> None:
        queue = self._queue
        assert queue is not None  # the reading thread runs only with the queue
        while True:
            try:
                data = os.read(self._in, CHUNK)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(queue.put(data), self._loop).result()
            except (RuntimeError, asyncio.CancelledError, concurrent.futures.CancelledError):
                return  # the loop is closed or shutting down (its tasks cancelled): session over
            if not data:
                return

    async def recv(self) -> bytes:
        if self._queue is not None:
            return await self._queue.get()
        await self._ready()
        assert self._reader is not None  # _open() made it
        return await self._reader.read(CHUNK)

    async def send(self, data: bytes) -> None:
        if self.mode[1] == "thread":
            view = memoryview(data)
            while view:
                written = await asyncio.to_thread(os.write, self._out, view)
                view = view[written:]
            return
        await self._ready()
        assert self._writer is not None  # _open() made it
        self._writer.write(data)
        await self._writer.drain()

    def eof(self) -> None:
        """End of stream for stdout's reader: FIN on a socket, the pipe's write end closed."""
        with contextlib.suppress(OSError, RuntimeError):
            if self._writer is not None:
                self._writer.write_eof()  # after what is still buffered
            elif self.mode[1] == "socket":  # never opened: nothing buffered
                with socket.socket(fileno=os.dup(self._out)) as sock:
                    sock.shutdown(socket.SHUT_WR)
            else:
                os.close(self._out)

    def abort(self) -> None:
        """See the class docstring: on a pipe the exit status says it, on a socket a reset."""
        if self.mode[1] != "socket":
            return
        with contextlib.suppress(OSError), socket.socket(fileno=os.dup(self._out)) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if self._writer is not None:
            self._writer.transport.abort()


def _is_stream_socket(fd: int) -> bool:
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError:
        return False
    try:
        return probe.type == socket.SOCK_STREAM
    finally:
        probe.close()


@dataclass
class SpliceResult:
    a_to_b: int = 0
    b_to_a: int = 0
    #: why the session was cut (both ends were aborted); None when both directions ended cleanly
    error: str | None = None


def describe(exc: BaseException) -> str:
    """One line for an exception that cut a session (``ConnectionResetError`` has no text)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


async def splice(a: Ends, b: Ends) -> SpliceResult:
    """Pump a→b and b→a concurrently; return byte counts and the first error, if any.

    On an error, or if this coroutine is cancelled before both directions ended cleanly, both
    ends are aborted (see the module docstring) before it returns or re-raises.
    """
    result = SpliceResult()

    async def pump(src: Ends, dst: Ends, attr: str) -> None:
        while True:
            data = await src.recv()
            if not data:
                dst.eof()
                return
            await dst.send(data)
            setattr(result, attr, getattr(result, attr) + len(data))

    tasks = [
        asyncio.create_task(pump(a, b, "a_to_b")),
        asyncio.create_task(pump(b, a, "b_to_a")),
    ]
    clean = False
    try:
        for done in asyncio.as_completed(tasks):
            try:
                await done
            except (TransportError, OSError, ConnectionError) as exc:
                result.error = result.error or describe(exc)
                break
        else:
            clean = True
    finally:
        if not clean:
            for end in (a, b):
                with contextlib.suppress(Exception):
                    end.abort()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result
