"""What the per-user helper and its local clients say to each other over the Unix socket.

Sans-I/O and standard library only: ``tunnel/helper_client.py`` (ssh's ProxyCommand) imports
this module, and that client must start in a few milliseconds, so nothing here may pull in
asyncio, cryptography, aioquic or YAML.

A conversation, on one connection to ``socket_path(identity)``:

1. the client sends one request line (JSON, at most ``MAX_LINE`` bytes): ``protocol``,
   ``version`` (``code_version()`` of the client's installed code), ``identity`` (the stamp of
   the identity's certificate file, ``identity_stamp()``), ``op`` and the op's fields;
2. the helper answers at once with an *ack* line: ``{"ok": true, "pid": …}``, or ``ok: false``
   with a ``code`` the client acts on — ``version_mismatch`` (an older or newer helper: it
   retires and the client starts one of its own version), ``stale_identity`` (the certificate
   changed since the helper loaded it: likewise), ``bad_request``;
3. for ``dial``, ``cert``, ``request`` and ``forward`` a *result* line follows once the proxy
   answered (``ok``, or ``code`` and ``reason``, the proxy's own words);
4. after a dial's result, both directions carry frames: ``D`` data, ``E`` a clean end of that
   direction, ``X`` the session was cut (payload: why). A connection that ends without ``E``
   was cut too (a killed helper, a killed client): issue 19's rule — a cut never looks like a
   clean end. After a ``request``'s result the helper sends the reply body (JSON) as ``D``
   frames and ``E`` (a listing may be far longer than a line).
5. ``forward``: right after the ack the client sends one byte carrying its listening socket
   (``SCM_RIGHTS``); the result follows the preflight (``check``: ``yes``/``no``); then the
   helper accepts and splices each connection and sends *event* lines — ``{"say": LINE}`` for
   each connection refused or cut, and ``{"end": true, "code", "reason"}`` when the forward
   is over for it (its connection to the proxy ended, it was stopped). The client ending the
   conversation (Ctrl-C, exit) stops the forward: the helper stops listening and resets what
   is still open.

``proxy`` (on ``cert``, ``request``, ``forward``): the HOST:PORT the command would dial itself
(``--proxy``, ``$FLEET_PROXY``); a helper connected elsewhere acks ``other_proxy`` and the
command takes its direct path.

The ack comes before the proxy is asked anything, so a client can tell a stuck helper (no
ack within ``ACK_TIMEOUT``) from a slow proxy, and never hangs on the former.
"""

from __future__ import annotations

import os
import struct

from enroll.errors import FleetError

TYPE_CHECKING = False  # not typing's: importing typing costs the ProxyCommand client ~6 ms
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

try:  # the builtin module: hashlib would load OpenSSL (~4 ms) for one digest
    from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # pragma: no cover - Python 3.12+ (_sha2), or a build without it
    try:
        from _sha2 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]
    except ImportError:
        from hashlib import sha256  # type: ignore[assignment,unused-ignore]


PROTOCOL = 1
#: longest request or reply line, newline included
MAX_LINE = 64 * 1024
#: largest frame payload (a sender splits bigger writes)
MAX_FRAME = 256 * 1024
#: how long a client waits for the ack before it treats the helper as stuck
ACK_TIMEOUT = 3.0

DATA, END, CUT = b"D", b"E", b"X"
FRAME_HEAD = struct.Struct(">cI")

OPS = ("dial", "cert", "request", "forward", "status", "stop")
#: fields each op needs (all strings), beyond protocol/version/identity/op
REQUIRED = {"dial": ("device", "service"), "cert": ("device", "login"), "request": ("name",),
            "forward": ("device", "service"), "status": (), "stop": ()}
OPTIONAL = {"dial": ("login", "hold"), "cert": ("proxy",), "request": ("proxy",),
            "forward": ("proxy", "check", "hold"), "status": (), "stop": ()}
MAX_FIELD = 255
#: the proxy requests a ``request`` may name: the engineer's read-only questions
REQUESTS = ("ls", "whoami", "status")
CHECK_VALUES = ("yes", "no")
#: the byte a ``forward`` client sends its listening socket with
FD_BYTE = b"F"

#: ack codes that make the client replace the helper rather than report an error
REPLACE = ("version_mismatch", "stale_identity")
#: ack code of a helper connected to another proxy than the command's: the direct path
OTHER_PROXY = "other_proxy"


class ProtocolError(FleetError, ValueError):
    """A malformed line or frame; ``code`` goes back to the peer."""

    def __init__(self, message: str, code: str = "bad_request"):
        super().__init__(message)
        self.code = code


# --- where the socket lives ---------------------------------------------------------------


def runtime_dir(identity_dir: str, environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_RUNTIME_DIR/fleet-tunnel`` (a per-user tmpfs, gone at logout), else the identity
    directory itself (private to the engineer already)."""
    base = environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "fleet-tunnel") if base else identity_dir


def identity_key(identity_dir: str) -> str:
    """A short name for one identity directory: a second identity gets its own helper."""
    return str(sha256(os.path.realpath(identity_dir).encode()).hexdigest()[:16])


def socket_path(identity_dir: str, environ: Mapping[str, str] = os.environ) -> str:
    return os.path.join(runtime_dir(identity_dir, environ), f"helper-{identity_key(identity_dir)}.sock")


#: a Unix socket path must fit in sockaddr_un.sun_path (108 bytes with its NUL)
MAX_SOCKET_PATH = 107


# --- versions and identity stamps ---------------------------------------------------------


def code_version(package_dir: str | None = None) -> str:
    """The protocol number and a digest of the installed ``tunnel`` code (names, sizes, mtimes).

    An upgrade (or an edit of an editable install) changes it, so a helper started by older
    code is told apart from one of ours without importing package metadata (slow) in the
    client. Both sides compute it from the files on disk at their start.
    """
    package_dir = package_dir or os.path.dirname(os.path.abspath(__file__))
    digest = sha256()
    for sub in ("", "transport"):
        directory = os.path.join(package_dir, sub)
        try:
            entries = sorted(e for e in os.listdir(directory) if e.endswith(".py"))
        except OSError:
            continue
        for name in entries:
            try:
                st = os.stat(os.path.join(directory, name))
            except OSError:
                continue
            digest.update(f"{sub}/{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{PROTOCOL}.{digest.hexdigest()[:12]}"


def identity_stamp(identity_dir: str) -> str:
    """Which certificate the identity holds now: inode, size and mtime of ``user.crt``.

    ``tunnel login`` writes a new file (a new stamp); ``tunnel logout`` removes it ("none").
    """
    try:
        st = os.stat(os.path.join(identity_dir, "user.crt"))
    except OSError:
        return "none"
    return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"


# --- lines --------------------------------------------------------------------------------
#
# JSON through the ``_json`` accelerator module directly: the ``json`` package imports ``re``,
# which costs the ProxyCommand client ~5 ms (more on a loaded machine) of every ssh. What the
# client sends and reads is flat (strings, numbers, booleans, null); anything else the helper
# writes goes through ``json`` (loaded there anyway).

_scan: Any
_quote: Any
try:
    import _json

    class _Context:
        """What ``_json.make_scanner`` reads off ``json.JSONDecoder``: strict JSON, no hooks."""

        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int

        @staticmethod
        def parse_constant(name: str) -> None:
            raise ValueError(f"{name} is not JSON")

    _scan = _json.make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed, as json does
    _quote = _json.encode_basestring_ascii
except (ImportError, AttributeError):  # pragma: no cover - a Python without the accelerator
    _scan = _quote = None


def _dumps(message: dict[str, Any]) -> str:
    if _quote is not None and all(isinstance(k, str) for k in message):
        parts = []
        for key, value in message.items():
            if value is None or isinstance(value, bool):
                text = {None: "null", True: "true", False: "false"}[value]
            elif isinstance(value, str):
                text = _quote(value)
            elif isinstance(value, int):
                text = str(int(value))
            else:
                break  # nested or float: the json package
            parts.append(f"{_quote(key)}:{text}")
        else:
            return "{" + ",".join(parts) + "}"
    import json

    return json.dumps(message, separators=(",", ":"))


def _loads(text: str) -> object:
    if _scan is None:  # pragma: no cover
        import json

        return json.loads(text)
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError("not JSON") from None
    if end != len(text):
        raise ValueError("trailing data after the JSON value")
    return value


def encode_line(message: dict[str, Any]) -> bytes:
    line = _dumps(message).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes is over {MAX_LINE}")
    return line


def decode_line(line: bytes) -> dict[str, Any]:
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line of {len(line)} bytes is over {MAX_LINE}")
    if not line.endswith(b"\n"):
        raise ProtocolError("the line ended early (no newline)")
    try:
        message = _loads(line[:-1].decode())
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise ProtocolError("the line is not JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("the line is not a JSON object")
    return message


def request(op: str, version: str, identity: str, **fields: Any) -> bytes:
    message: dict[str, Any] = {"protocol": PROTOCOL, "version": version, "identity": identity, "op": op}
    message.update({k: v for k, v in fields.items() if v is not None})
    return encode_line(message)


def hold_seconds(text: str) -> float | None:
    """The resume hold a client asks for (its ``$FLEET_RESUME_HOLD``: the command's own setting
    wins over the helper's environment); None if it is not a number of seconds >= 0."""
    try:
        hold = float(text)
    except (TypeError, ValueError):
        return None
    return hold if 0 <= hold < float("inf") else None


def _field_ok(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= MAX_FIELD and value.isprintable()


def parse_request(line: bytes, version: str, identity: str) -> dict[str, Any]:
    """The request, checked; raises ProtocolError whose ``code`` is the ack to send.

    Checked in this order: well-formed, same protocol and code version (else
    ``version_mismatch``), the op and its fields, then the identity stamp (else
    ``stale_identity``): a malformed line never makes the helper retire.
    """
    message = decode_line(line)
    if message.get("protocol") != PROTOCOL or message.get("version") != version:
        raise ProtocolError(f"client version {message.get('version')!r}, helper version {version!r}",
                            "version_mismatch")
    op = message.get("op")
    if op not in OPS:
        raise ProtocolError(f"unknown op {op!r}")
    for name in REQUIRED[op]:
        if not _field_ok(message.get(name)):
            raise ProtocolError(f"{op}: field {name!r} missing or not a short printable string")
    for name in OPTIONAL[op]:
        if name in message and not _field_ok(message[name]):
            raise ProtocolError(f"{op}: field {name!r} is not a short printable string")
    if op == "request" and message["name"] not in REQUESTS:
        raise ProtocolError(f"request: {message['name']!r} is not one of {', '.join(REQUESTS)}")
    if op == "forward" and message.get("check", "yes") not in CHECK_VALUES:
        raise ProtocolError("forward: check must be yes or no")
    if "hold" in message and hold_seconds(message["hold"]) is None:
        raise ProtocolError(f"{op}: hold must be seconds, 0 or more")
    known = {"protocol", "version", "identity", "op", *REQUIRED[op], *OPTIONAL[op]}
    if extra := sorted(set(message) - known):
        raise ProtocolError(f"{op}: unknown fields {extra}")
    if message.get("identity") != identity:
        raise ProtocolError("the identity's certificate changed since this helper started",
                            "stale_identity")
    return message


# --- frames -------------------------------------------------------------------------------


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    if kind not in (DATA, END, CUT):
        raise ProtocolError(f"unknown frame kind {kind!r}")
    if len(payload) > MAX_FRAME:
        raise ProtocolError(f"frame payload of {len(payload)} bytes is over {MAX_FRAME}")
    return FRAME_HEAD.pack(kind, len(payload)) + payload


def data_frames(data: bytes) -> bytes:
    """``data`` as DATA frames of at most ``MAX_FRAME`` bytes each."""
    return b"".join(frame(DATA, data[i:i + MAX_FRAME]) for i in range(0, len(data), MAX_FRAME))


def check_head(head: bytes) -> tuple[bytes, int]:
    kind, length = FRAME_HEAD.unpack(head)
    if kind not in (DATA, END, CUT):
        raise ProtocolError(f"unknown frame kind {kind!r}")
    if length > MAX_FRAME:
        raise ProtocolError(f"frame payload of {length} bytes is over {MAX_FRAME}")
    if kind == END and length:
        raise ProtocolError("an end frame carries no payload")
    return kind, length


class FrameDecoder:
    """Bytes in, ``(kind, payload)`` frames out; raises ProtocolError on a malformed frame."""

    def __init__(self) -> None:
        self.buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[bytes, bytes]]:
        self.buffer += data
        frames = []
        while len(self.buffer) >= FRAME_HEAD.size:
            kind, length = check_head(bytes(self.buffer[:FRAME_HEAD.size]))
            end = FRAME_HEAD.size + length
            if len(self.buffer) < end:
                break
            frames.append((kind, bytes(self.buffer[FRAME_HEAD.size:end])))
            del self.buffer[:end]
        return frames

    @property
    def partial(self) -> bool:
        """A frame was begun and not finished (the peer went away mid-frame)."""
        return bool(self.buffer)
