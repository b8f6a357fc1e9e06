"""The fleet protocol inside HTTP/2, as data and pure functions (no sockets, no asyncio).

What the TLS/TCP transport (``tcp.py``) puts on the wire besides stream bytes: the settings,
the request paths of the hello / client streams / reverse pool, the close carried in GOAWAY,
the TLS alert codes it closes with, and the control-frame budget that meters what a peer
sends before h2 parses it. See ``tcp.py``'s docstring for the protocol itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated

from .base import TransportError
from .policy import CRYPTO_ERROR_BASE

#: Idle server-openable streams the client keeps ready (sent to the client in the hello).
REVERSE_POOL = 8
#: HTTP/2 MAX_CONCURRENT_STREAMS each side allows (client-opened + pool, both directions).
MAX_CONCURRENT_STREAMS = 512
#: HTTP/2 MAX_FRAME_SIZE we accept: fewer, larger DATA frames (fewer Python calls per MB).
MAX_FRAME_SIZE = 64 * 1024
#: Largest reset / close code HTTP/2 can carry in RST_STREAM.
MAX_H2_CODE = 0xFFFFFFFF

HELLO_PATH = "/fleet/hello"
STREAM_PATH = "/fleet/stream"
REVERSE_PATH = "/fleet/reverse"

#: TLS alerts the TLS/TCP transport closes with (as QUIC's CRYPTO_ERROR: 0x100 + alert)
ALERT_BAD_CERTIFICATE = 42
ALERT_CERTIFICATE_EXPIRED = 45
ALERT_CERTIFICATE_REQUIRED = 116
ALERT_NO_APPLICATION_PROTOCOL = 120


def crypto(alert: int) -> int:
    """The close code of a TLS alert, as QUIC carries it (CRYPTO_ERROR 0x100 + alert)."""
    return CRYPTO_ERROR_BASE + alert


# ------------------------------------------------------------------ control-frame budget

#: What an HTTP/2 client sends first (RFC 9113 3.4); the server's meter skips it.
CLIENT_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME_HEADER = 9
_DATA_FRAME = 0x0


@dataclass(frozen=True)
class FrameBudget:
    """Control frames a peer may send: ``rate`` per second on average, ``burst`` at once."""

    rate: float
    burst: float


#: Before authorization and for peers without a certificate (enrollment, login): one request
#: needs about 25 control frames (SETTINGS and its ACK, the hello, the reverse pool, one
#: stream, a few WINDOW_UPDATEs, GOAWAY).
ANONYMOUS_BUDGET = FrameBudget(rate=20, burst=200)
#: Authenticated agents and engineers: a WINDOW_UPDATE per 512 KiB we send per stream and for
#: the connection, a few frames per session opened, a PING a second. Far above that, far
#: below what stalls the event loop (h2 handles about 50,000 small frames a second).
AUTHENTICATED_BUDGET = FrameBudget(rate=1000, burst=4000)


class ControlFrameMeter:
    """Counts the control frames in what a peer sends, before h2 parses them (sans-I/O).

    HTTP/2 lets a peer make us work without sending data: SETTINGS and PING must be answered,
    WINDOW_UPDATE, RST_STREAM, PRIORITY and HEADERS/CONTINUATION each cost a parse and state
    changes, and an empty DATA frame costs as much as a full one. Every frame except a DATA
    frame with payload takes one token from a bucket of ``budget.burst`` refilled at
    ``budget.rate`` per second; :meth:`feed` says False as soon as a frame finds the bucket
    empty, and the caller closes the connection (ENHANCE_YOUR_CALM) without handing the bytes
    to h2. Only the 9-byte frame headers are read; payloads are skipped, also across chunks.
    """

    def __init__(self, budget: FrameBudget, now: float, *, server_side: bool = True):
        self.budget = budget
        self.tokens = float(budget.burst)
        self.last = now
        self.frames = 0  # control frames counted so far
        self._skip = len(CLIENT_PREFACE) if server_side else 0  # bytes to pass over
        self._header = b""  # a frame header split across chunks

    def feed(self, data: bytes, now: float, budget: FrameBudget | None = None) -> bool:
        if budget is not None and budget != self.budget:
            # Let in (authorized): the larger burst is there at once, the spent frames stay spent.
            self.tokens += max(0.0, budget.burst - self.budget.burst)
            self.budget = budget
        self.tokens = min(self.budget.burst, self.tokens + (now - self.last) * self.budget.rate)
        self.last = now
        view = memoryview(data)
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = _FRAME_HEADER - len(self._header)
            header: bytes | memoryview  # a copy when split across reads, else a view
            if need < _FRAME_HEADER or end - pos < _FRAME_HEADER:
                self._header += bytes(view[pos:pos + need])
                pos += min(need, end - pos)
                if len(self._header) < _FRAME_HEADER:
                    break
                header, self._header = self._header, b""
            else:
                header = view[pos:pos + _FRAME_HEADER]
                pos += _FRAME_HEADER
            length = int.from_bytes(header[0:3], "big")
            self._skip = length
            if header[3] == _DATA_FRAME and length:
                continue
            self.frames += 1
            if self.tokens < 1:
                return False
            self.tokens -= 1
        return True


def close_payload(code: int, reason: str, application: bool) -> bytes:
    """GOAWAY's additional data: the close as the peer's TransportError will carry it."""
    return json.dumps(
        {"code": int(code), "reason": reason[:1000], "application": bool(application)}
    ).encode()


def parse_goaway(event: ConnectionTerminated) -> TransportError:
    """The TransportError a GOAWAY carries (a foreign one: an HTTP/2 error of kind protocol)."""
    try:
        msg = json.loads(event.additional_data or b"")
        return TransportError(
            int(msg["code"]), str(msg["reason"]), application=bool(msg["application"]),
            remote=True,
        )
    except (ValueError, KeyError, TypeError):
        code = int(event.error_code or 0)
        try:
            name = ErrorCodes(code).name
        except ValueError:
            name = f"error {code:#x}"
        return TransportError(code, f"HTTP/2 GOAWAY {name}", application=False, remote=True,
                              kind="protocol" if code else "closed")
