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
import socket
import struct
from dataclasses import dataclass

from tunnel.transport import Stream, TransportError

CHUNK = 64 * 1024


class Ends:
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


class StdioEnds(Ends):
    """This process's stdin/stdout, whatever they are (pipe, socket, file, terminal).

    A daemon thread reads stdin, so a blocked read never keeps the process from exiting.
    A pipe has no reset: ``abort`` leaves stdout open, and the caller exits non-zero with one
    line on stderr before the process exit closes it — a reader never gets a clean end first.
    """

    def __init__(self):
        import os
        import threading

        self._os = os
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        threading.Thread(target=self._read_stdin, daemon=True).start()

    def _read_stdin(self) -> None:
        while True:
            try:
                data = self._os.read(0, CHUNK)
            except OSError:
                data = b""
            try:
                asyncio.run_coroutine_threadsafe(self._queue.put(data), self._loop).result()
            except (RuntimeError, asyncio.CancelledError, concurrent.futures.CancelledError):
                return  # the loop is closed or shutting down (its tasks cancelled): session over
            if not data:
                return

    async def recv(self) -> bytes:
        return await self._queue.get()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = await asyncio.to_thread(self._os.write, 1, view)
            view = view[written:]

    def eof(self) -> None:
        with contextlib.suppress(OSError):
            self._os.close(1)

    def abort(self) -> None:
        pass  # see the class docstring: the exit status says it, not a clean EOF


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
