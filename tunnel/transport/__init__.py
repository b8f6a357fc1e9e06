"""Transport layer of fleet-tunnel: connections carrying many bidirectional streams.

``base`` declares the transport-neutral interface; ``quic`` implements it on aioquic (the only
module importing aioquic); ``policy`` holds the pure decision logic.
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
    "serve",
]
