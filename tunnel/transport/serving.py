"""What both transports share: authorize before delivering streams, and reading a stream.

A peer's streams are held back until ``authorize(conn)`` (the proxy's admission) returned; a
refusal closes the connection with the caller's code and reason, and streams of a peer that
never got through are dropped, not delivered. Reads come from a per-stream buffer; consumed
bytes are reported back (``_consumed``) so each transport grants flow-control credit on
consumption. No aioquic or h2 here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

from .base import ErrorCode, Refused, TransportError

log = logging.getLogger("tunnel.transport")


def wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class AuthorizedServerConnection:
    """Mixin for a transport's server-side connection class (put it first in the bases).

    Expects ``_server`` (with ``_authorize``, ``_authorize_timeout``, ``_on_connection``,
    ``_connections``), ``_authorized``, ``_accept``, ``_pending``, ``_accept_waiter``,
    ``_streams``, ``_error`` and ``close``.
    """

    async def _authorize_and_run(self) -> None:
        server = self._server
        try:
            result = server._authorize(self)
            if inspect.isawaitable(result):
                async with asyncio.timeout(server._authorize_timeout):
                    await result
        except Refused as exc:
            log.info("refused %s: %s %s", self.remote_address, exc.wire_code, exc.reason)
            self.close(exc.wire_code, exc.reason)
            return
        except Exception:
            log.exception("authorize() failed for %s", self.remote_address)
            self.close(ErrorCode.AUTHORIZE_FAILED, "authorization failed")
            return
        if self._error is not None:
            return
        self._authorized = True
        self._accept.extend(self._pending)
        self._pending.clear()
        wake(self._accept_waiter)
        try:
            await server._on_connection(self)
        except TransportError as exc:
            log.debug("connection handler ended: %s", exc)
        except Exception:
            log.exception("on_connection handler failed for %s", self.remote_address)
            self.close(ErrorCode.INTERNAL, "internal error")

    def _fail(self, error: TransportError) -> None:
        super()._fail(error)
        if not self._authorized:
            # Never deliver streams of a peer that did not get through authorize().
            self._streams.clear()

    def _on_terminated(self) -> None:
        self._server._connections.discard(self)


class BufferedReads:
    """Mixin for a transport's stream: ``read()`` from ``_rbuf`` (a deque of chunks).

    Expects ``_rbuf``, ``_rbuf_len``, ``_eof``, ``_read_error``, ``_read_waiter``, ``_conn``
    (with ``_error`` and ``_loop``), ``bytes_received``, and ``_consumed(n)``, called after
    ``n`` bytes were taken, where the transport grants credit.
    """

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
        self._consumed(n)
        return parts[0] if len(parts) == 1 else b"".join(parts)
