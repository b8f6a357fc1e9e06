"""Transport-neutral interface types (no aioquic import here).

A transport (QUIC today, TCP/TLS later) exposes *connections* that carry many bidirectional
*streams*. Everything the rest of fleet-tunnel needs is declared here so that a second transport
can implement the same surface.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from enroll.errors import EXIT_REFUSED, EXIT_UNAVAILABLE, FleetError

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
Address = tuple[Any, ...]


@dataclass(frozen=True)
class TLSIdentity:
    """Our own certificate chain + key, and the pinned fleet CA that peers must chain to.

    ``cert_chain[0]`` is the leaf; further entries are intermediates (sent to the peer).
    ``ca`` is the only trust root: no system store is ever consulted.
    """

    cert_chain: list[x509.Certificate]
    key: PrivateKey
    ca: x509.Certificate


class ErrorCode(enum.IntEnum):
    """Application error codes carried in CONNECTION_CLOSE / RESET_STREAM by fleet-tunnel.

    Callers may use any other integer; these are the ones the transport itself emits.
    """

    NO_ERROR = 0
    INTERNAL = 1
    REFUSED = 2  # authorize() raised Refused without a specific code
    AUTHORIZE_FAILED = 3  # authorize() crashed
    SHUTDOWN = 4  # server shutting down
    STREAM_ABORTED = 5  # stream dropped because its connection was refused/closed


#: The kinds of transport failure (``TransportError.code``): stable names callers decide by,
#: never by message text. A dial failure, a connection that ended and a stream reset each have
#: exactly one.
KINDS = {
    "timeout": "nothing (or not enough) came back in time: handshake, hello or idle timeout",
    "tls": "the TLS handshake or a certificate check failed (either side)",
    "intercepted": "a certificate not of the fleet's PKI was presented: TLS interception",
    "refused": "the peer's application closed the connection (a refusal, a cut, a shutdown)",
    "unreachable": "the peer could not be reached (no route, connection refused)",
    "protocol": "the peer broke the wire protocol (HTTP/2 or QUIC error, not a fleet proxy)",
    "closed": "the connection ended otherwise: closed locally, or lost without a reason",
    "reset": "the stream was reset (by the peer or locally)",
    "internal": "the transport was used wrongly (write after write_eof, not authorized yet...)",
}


def default_kind(wire_code: int, *, application: bool, remote: bool) -> str:
    """The kind a close implies when its raiser did not name one (pure).

    An application close by the peer is its application's decision (``refused``); a close
    with a QUIC CRYPTO_ERROR code (0x100 + TLS alert, also used over TLS/TCP) is ``tls``;
    anything else is ``closed``.
    """
    if application and remote:
        return "refused"
    if not application and 0x100 <= wire_code <= 0x1FF:
        return "tls"
    return "closed"


class TransportError(FleetError):
    """The connection (or an operation on it) failed.

    ``code`` is the kind of failure (one of ``KINDS``: what callers decide by). ``wire_code``
    and ``reason`` are the values from the CONNECTION_CLOSE (or GOAWAY) that ended the
    connection. ``application`` is True for an application close (the peer's caller chose
    ``wire_code``), False for a transport/TLS level close (``wire_code`` is a QUIC transport
    error code, e.g. 0x100 + TLS alert). ``remote`` is True when the peer closed us.
    ``exit_status`` is 3 (unavailable): a command that meets it could not use the proxy.
    """

    exit_status = EXIT_UNAVAILABLE

    def __init__(
        self, wire_code: int = 0, reason: str = "", *, application: bool = True,
        remote: bool = False, kind: str | None = None,
    ) -> None:
        self.wire_code = int(wire_code)
        self.reason = reason
        self.application = application
        self.remote = remote
        if kind is None:
            kind = default_kind(self.wire_code, application=application, remote=remote)
        assert kind in KINDS, kind
        self.code = kind
        super().__init__(wire_code, reason)

    def __str__(self) -> str:
        who = "peer" if self.remote else "local"
        kind = "application" if self.application else "transport"
        return f"{kind} close by {who}: code {self.wire_code:#x}: {self.reason}"


class StreamReset(TransportError):
    """The stream was reset (RESET_STREAM / STOP_SENDING by the peer, or reset() locally).

    Its kind is always ``reset``; ``wire_code`` is the reset's application code.
    """

    def __init__(
        self, wire_code: int = 0, reason: str = "", *, application: bool = True,
        remote: bool = False,
    ) -> None:
        super().__init__(wire_code, reason, application=application, remote=remote, kind="reset")

    def __str__(self) -> str:
        who = "peer" if self.remote else "local"
        return f"stream reset by {who}: code {self.wire_code}: {self.reason}"


class Refused(FleetError):  # noqa: N818 - the name is the contract with callers of serve()
    """Raise from ``authorize(conn)`` to refuse a peer; the peer sees
    ``TransportError(wire_code, reason)`` of kind ``refused``."""

    code = "refused"
    exit_status = EXIT_REFUSED

    def __init__(self, wire_code: int = ErrorCode.REFUSED, reason: str = "refused") -> None:
        self.wire_code = int(wire_code)
        self.reason = reason
        super().__init__(wire_code, reason)


@dataclass(frozen=True)
class PathChange:
    """The peer address of a connection changed (migration or NAT rebinding)."""

    old: Address
    new: Address


class Stream(abc.ABC):
    """One bidirectional, flow-controlled byte stream."""

    id: int
    bytes_sent: int
    bytes_received: int

    @abc.abstractmethod
    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to ``max_bytes``; b"" at FIN. Raises StreamReset / TransportError."""

    @abc.abstractmethod
    async def write(self, data: bytes) -> None:
        """Queue ``data``; waits while the send buffer is above its high-water mark."""

    @abc.abstractmethod
    def write_eof(self) -> None:
        """Half-close: send FIN after the queued data."""

    @abc.abstractmethod
    def reset(self, code: int = 0) -> None:
        """Abort both directions of the stream with ``code``."""


class Connection(abc.ABC):
    """One connection to a peer carrying many streams: everything callers may use of it.

    Both transports implement all of it on ``core.CoreConnection``; where TLS/TCP cannot do
    what QUIC does (migrate, report send errors), the member says so and stays harmless.
    """

    #: which transport carries it: "quic" or "tcp" (shown by ``tunnel status``, audited)
    transport_name: str = "?"
    #: the peer's verified leaf certificate (None on an anonymous ALPN without one)
    peer_certificate: x509.Certificate | None
    #: the ALPN both sides agreed on
    alpn: str
    #: Called as ``on_path_change(PathChange)`` whenever the peer address changes (QUIC only).
    on_path_change: Callable[[PathChange], None] | None
    #: Called as ``on_send_error(exc)`` when the socket reports a failed send (QUIC only: a
    #: TCP socket reports it as the connection's loss).
    on_send_error: Callable[[Exception], None] | None
    #: loop.time() of the last bytes received from the peer (liveness of the path)
    last_received: float
    #: counters for status and metrics: failed sends, migrations, the last path changes
    send_errors: int
    migrations: int
    path_changes: list[PathChange]

    @property
    @abc.abstractmethod
    def remote_address(self) -> Address: ...

    @property
    @abc.abstractmethod
    def local_address(self) -> Address: ...

    @property
    @abc.abstractmethod
    def is_closed(self) -> bool:
        """The connection is over (or closing): nothing new can be sent on it."""

    @property
    @abc.abstractmethod
    def rtt(self) -> float | None:
        """Round-trip time in seconds (QUIC: smoothed estimate; TCP: last ``ping()``)."""

    @property
    @abc.abstractmethod
    def idle_timeout(self) -> float:
        """Nothing heard for this long ends the connection (the smaller of both sides')."""

    @abc.abstractmethod
    def send_ping(self) -> None:
        """Send one PING now without waiting for its acknowledgement (a liveness probe)."""

    @abc.abstractmethod
    async def open_stream(self) -> Stream: ...

    @abc.abstractmethod
    async def accept_stream(self) -> Stream: ...

    @abc.abstractmethod
    def close(self, code: int = 0, reason: str = "") -> None: ...

    @abc.abstractmethod
    async def wait_closed(self) -> TransportError | None: ...

    @abc.abstractmethod
    async def wait_close_sent(self, timeout: float = 1.0) -> bool:
        """After ``close()``: wait (at most ``timeout`` s) until the close has left this host."""

    @abc.abstractmethod
    async def ping(self, timeout: float) -> float: ...

    @abc.abstractmethod
    async def migrate(self, local_addr: tuple[str, int] | None) -> None: ...


class Server(abc.ABC):
    @property
    @abc.abstractmethod
    def address(self) -> Address: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    @abc.abstractmethod
    async def wait_closed(self) -> None: ...


Authorize = Callable[[Connection], Awaitable[None] | None]
OnConnection = Callable[[Connection], Awaitable[None]]
