"""Stream headers: the first bytes of every stream (QUIC or HTTP/2), as a sans-I/O codec.

Every stream starts with one header saying what it is for; after the header the stream carries
raw bytes (an SSH session, a PostgreSQL connection…). A header is::

    version  u8     = 1
    kind     u8     which message (see KINDS)
    length   u16be  payload length, at most MAX_PAYLOAD
    payload  JSON   an object whose fields are checked against the kind's schema

:class:`HeaderReader` takes bytes as they arrive and yields one message plus whatever bytes
followed it, so the caller can start splicing without losing data. Every malformed input raises
:class:`HeaderError` with a stable ``code`` the peer and the audit log can report.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from enroll.errors import FleetError

VERSION = 1
MAX_PAYLOAD = 4096
_PREFIX = struct.Struct("!BBH")

# kind -> (name, {field: (type, required)})
KINDS: dict[int, tuple[str, dict[str, tuple[type, bool]]]] = {
    # engineer -> proxy: reach SERVICE on DEVICE
    # (resumable sessions, issue 17: ``resume_secret`` on a first dial asks for a resumable
    # session; ``resume`` names the session to re-attach, with this end's byte counts and how
    # long it has been away)
    1: ("dial", {"device": (str, True), "service": (str, True), "login": (str, False),
                 "resume_secret": (str, False), "resume": (str, False), "received": (int, False),
                 "sent": (int, False), "away": (float, False)}),
    # proxy -> agent: a session for a local service, on behalf of an identity (or, with
    # ``resume``, a re-attach of the held session of that id)
    2: ("open", {"service": (str, True), "session": (str, True), "identity": (str, True),
                 "login": (str, False), "resume_secret": (str, False), "resume": (str, False),
                 "received": (int, False)}),
    # any -> any: answer to dial/open/request: ok, or a refusal with code and reason;
    # ``resumable`` says the stream is framed (tunnel.resumable), ``received``/``sent`` are the
    # answering end's byte counts on a re-attach
    3: ("reply", {"ok": (bool, True), "code": (str, False), "reason": (str, False),
                  "session": (str, False), "body_length": (int, False),
                  "resumable": (bool, False), "received": (int, False), "sent": (int, False)}),
    # engineer/agent/enroller -> proxy: a control request (ls, status, renew, enroll, …)
    4: ("request", {"op": (str, True), "args": (dict, False)}),
}
KIND_BY_NAME = {name: kind for kind, (name, _) in KINDS.items()}

#: resume secrets are 32 random bytes in urlsafe base64 without padding (tunnel.resume.new_secret)
RESUME_SECRET_LENGTH = 43
_URLSAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
#: value checks beyond the type: byte counts are u64, an outage a finite non-negative time
_RANGES: dict[str, Any] = {
    "received": lambda v: 0 <= v < 2**64,
    "sent": lambda v: 0 <= v < 2**64,
    "away": lambda v: 0.0 <= v < float("inf"),
    "resume_secret": lambda v: len(v) == RESUME_SECRET_LENGTH and _URLSAFE.issuperset(v),
    "resume": lambda v: 0 < len(v) <= 64,
}


class HeaderError(FleetError, ValueError):
    """A header that cannot be accepted. ``code`` is stable, the message is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Message:
    kind: str
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def _check(kind: str, fields: dict[str, Any]) -> dict[str, Any]:
    schema = KINDS[KIND_BY_NAME[kind]][1]
    for name, (typ, required) in schema.items():
        if name not in fields or fields[name] is None:
            if required:
                raise HeaderError("bad_header", f"{kind} header is missing {name!r}")
            continue
        if type(fields[name]) is not typ:
            raise HeaderError("bad_header", f"{kind} header field {name!r} must be {typ.__name__}")
        if name in _RANGES and not _RANGES[name](fields[name]):
            raise HeaderError("bad_header", f"{kind} header field {name!r} is out of range")
    unknown = set(fields) - set(schema)
    if unknown:
        raise HeaderError("bad_header", f"{kind} header has unknown field {sorted(unknown)[0]!r}")
    return {k: v for k, v in fields.items() if v is not None}


def encode(kind: str, **fields: Any) -> bytes:
    if kind not in KIND_BY_NAME:
        raise ValueError(f"unknown header kind {kind!r}")
    payload = json.dumps(_check(kind, fields), separators=(",", ":")).encode()
    if len(payload) > MAX_PAYLOAD:
        raise HeaderError("header_too_large", f"header of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return _PREFIX.pack(VERSION, KIND_BY_NAME[kind], len(payload)) + payload


def reply_ok(**fields: Any) -> bytes:
    return encode("reply", ok=True, **fields)


def reply_refused(code: str, reason: str, **fields: Any) -> bytes:
    return encode("reply", ok=False, code=code, reason=reason, **fields)


def decode_payload(kind_id: int, payload: bytes) -> Message:
    if kind_id not in KINDS:
        raise HeaderError("bad_header", f"unknown header kind {kind_id}")
    try:
        fields = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("bad_header", "header payload is not UTF-8 JSON") from None
    if not isinstance(fields, dict):
        raise HeaderError("bad_header", "header payload must be a JSON object")
    name = KINDS[kind_id][0]
    return Message(name, _check(name, fields))


class HeaderReader:
    """Accumulates bytes until one complete header has arrived. One reader per stream."""

    def __init__(self, max_payload: int = MAX_PAYLOAD):
        self._buf = bytearray()
        self._max = max_payload

    def feed(self, data: bytes) -> tuple[Message, bytes] | None:
        """Add bytes; return (message, bytes after it) once complete, else None."""
        self._buf += data
        if len(self._buf) >= 1 and self._buf[0] != VERSION:
            raise HeaderError(
                "unsupported_version",
                f"stream header version {self._buf[0]} is not supported (this side speaks {VERSION})",
            )
        if len(self._buf) < _PREFIX.size:
            return None
        _, kind_id, length = _PREFIX.unpack_from(self._buf)
        if length > self._max:
            raise HeaderError("header_too_large", f"header of {length} bytes exceeds {self._max}")
        end = _PREFIX.size + length
        if len(self._buf) < end:
            return None
        message = decode_payload(kind_id, bytes(self._buf[_PREFIX.size : end]))
        rest = bytes(self._buf[end:])
        self._buf.clear()
        return message, rest

    def eof(self) -> None:
        """The stream ended: an incomplete header is an error."""
        if self._buf:
            raise HeaderError("truncated_header", f"stream ended inside a header ({len(self._buf)} bytes)")
        raise HeaderError("no_header", "stream ended before any header")
