"""The server side both transports share: authorize a peer before delivering its streams.

A peer's streams are held back (``CoreConnection._pending``) until ``authorize(conn)`` (the
proxy's admission) returned; a refusal closes the connection with the caller's code and
reason, and streams of a peer that never got through are dropped, not delivered. No aioquic or
h2 here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any, Protocol

from .base import Authorize, ErrorCode, OnConnection, Refused, TransportError

if TYPE_CHECKING:
    from .core import CoreConnection

    _Base = CoreConnection
else:
    _Base = object

log = logging.getLogger("tunnel.transport")


class ServingServer(Protocol):
    """What the mixin uses of a transport's server (``_QuicServer``, ``_TcpServer``)."""

    _authorize: Authorize
    _authorize_timeout: float
    _on_connection: OnConnection
    _connections: set[Any]


class AuthorizedServerConnection(_Base):
    """Mixin for a transport's server-side connection class (put it first in the bases).

    The connection is a ``core.CoreConnection`` (its base for the type checker only: at run
    time the mixin stands before it in the bases) with a ``_server``.
    """

    _server: ServingServer

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
        except TimeoutError:
            # a loaded proxy (policy snapshot still loading): the peer retries; not a bug, so
            # one line and no traceback
            log.warning("authorizing %s took over %.0f s: closed, the peer will retry",
                        self.remote_address, server._authorize_timeout)
            self.close(ErrorCode.AUTHORIZE_FAILED, "authorization took too long: try again")
            return
        except Exception:
            log.exception("authorize() failed for %s", self.remote_address)
            self.close(ErrorCode.AUTHORIZE_FAILED, "authorization failed")
            return
        if self._error is not None:
            return
        self._let_in()
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
        super()._on_terminated()
        self._server._connections.discard(self)
