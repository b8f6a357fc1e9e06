"""Transport layer of fleet-tunnel: connections carrying many bidirectional streams.

``base`` declares the transport-neutral interface; ``quic`` implements it on aioquic (the only
module importing aioquic); ``tcp`` implements it as TLS over TCP with HTTP/2 framing (h2) for
networks that block UDP; ``race.happy_eyeballs`` picks whichever connects first; ``policy``
holds the pure decision logic.

``connect``/``serve`` are the QUIC ones (as before); ``tcp_connect``/``tcp_serve`` take the same
arguments.
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
from .tcp import connect as tcp_connect
from .tcp import serve as tcp_serve

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
