"""Transport layer of fleet-tunnel: connections carrying many bidirectional streams.

``base`` declares the transport-neutral interface and the errors (each with a kind);
``core`` holds the stream/connection logic both transports share, reaching the wire through a
small session interface; ``quic`` implements it on aioquic (``aioquic_compat`` holds every use
of aioquic's private members; ``quic_demux`` the server's shared socket); ``tcp`` as TLS over TCP
with HTTP/2 framing (``tls_records``: the TLS record layer; ``h2session``: the fleet protocol
over h2, sans-I/O) for networks that block UDP; ``race.happy_eyeballs`` picks whichever
connects first; ``policy`` holds the pure decision logic.

``connect``/``serve`` are the QUIC ones (as before); ``tcp_connect``/``tcp_serve`` take the same
arguments and are imported on first use (``tcp`` pulls in h2, which a device on QUIC never needs).
"""

from .base import (
    Connection,
    ErrorCode,
    PathChange,
    Refused,
    Server,
    Stream,
    StreamReset,
    TLSIdentity,
    TransportError,
)
from .policy import DEFAULT_SEND_HIGH_WATER, DEFAULT_STREAM_WINDOW, CertificateRejected
from .quic import connect, serve
from .race import dial, happy_eyeballs

_LAZY = {"tcp_connect": "connect", "tcp_serve": "serve"}


def __getattr__(name: str):
    # The TLS/TCP fallback (and h2 under it) loads on first use: an agent on a network where
    # QUIC works never pays for it (memory of an idle agent, start-up time of a command).
    if name in _LAZY:
        from . import tcp

        return getattr(tcp, _LAZY[name])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_SEND_HIGH_WATER",
    "DEFAULT_STREAM_WINDOW",
    "CertificateRejected",
    "Connection",
    "ErrorCode",
    "PathChange",
    "Refused",
    "Server",
    "Stream",
    "StreamReset",
    "TLSIdentity",
    "TransportError",
    "connect",
    "dial",
    "happy_eyeballs",
    "serve",
    "tcp_connect",
    "tcp_serve",
]
