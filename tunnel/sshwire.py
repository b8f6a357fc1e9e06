"""Just enough of the SSH transport (RFC 4253) to hand a refusal to the ssh client.

Under connection sharing (``ControlMaster``/``ControlPersist``) OpenSSH sends a ProxyCommand's
stderr to /dev/null, so ``tunnel proxy-command``'s one-line reason would be lost and the engineer
would read only ``kex_exchange_identification: Connection closed by remote host``. But ssh
itself still prints what the *server* says when it disconnects, before any key exchange:
an identification line followed by an unencrypted SSH_MSG_DISCONNECT packet makes it print
``Received disconnect from UNKNOWN port 65535:11: <description>``. So a refused
``proxy-command`` speaks as the "server" on stdout exactly once, before any session exists.

Sans-I/O: bytes in, bytes out. ``tunnel ssh`` uses :func:`refusal_from_stderr` to turn ssh's
line back into the tunnel's own.
"""

from __future__ import annotations

import os
import re
import struct

from enroll.errors import FleetError

IDENTIFICATION = b"SSH-2.0-fleet-tunnel\r\n"
MSG_DISCONNECT = 1
#: RFC 4253 §11.1 reason codes we use: refused (exit 1) and proxy unreachable (exit 3);
#: ``tunnel ssh`` reads the code back from ssh's line to choose its exit status
SERVICE_NOT_AVAILABLE = 7
BY_APPLICATION = 11
EXIT_FOR_REASON = {SERVICE_NOT_AVAILABLE: 3}
#: every refusal description starts with this, so a filter can tell ours from a device's own
PREFIX = "fleet-tunnel: "
#: longest description sent: OpenSSH prints at most 400 characters of it (packet.c, "%.400s")
MAX_DESCRIPTION = 400
BLOCK = 8  # no cipher yet: packets are padded to a multiple of 8 (RFC 4253 §6)


def _string(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def one_line(text: str) -> str:
    """Printable, single-line, bounded: the description is shown on the engineer's terminal."""
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text[:MAX_DESCRIPTION]


def packet(payload: bytes, padding: bytes | None = None) -> bytes:
    """An unencrypted binary packet: uint32 length, byte padding length, payload, padding.

    Padding is at least 4 bytes and makes the whole packet (length field included) a multiple
    of 8. ``padding`` is for tests; by default it is random, as RFC 4253 asks.
    """
    pad = BLOCK - (5 + len(payload)) % BLOCK
    if pad < 4:
        pad += BLOCK
    padding = os.urandom(pad) if padding is None else padding[:pad].ljust(pad, b"\0")
    return struct.pack(">IB", 1 + len(payload) + pad, pad) + payload + padding


def disconnect(description: str, reason: int = BY_APPLICATION) -> bytes:
    """The SSH_MSG_DISCONNECT packet carrying ``description`` (UTF-8, one line)."""
    text = one_line(description).encode()[:MAX_DESCRIPTION].decode(errors="ignore")
    payload = bytes([MSG_DISCONNECT]) + struct.pack(">I", reason) + _string(text.encode()) + _string(b"")
    return packet(payload)


def refusal(reason: str, code: int = BY_APPLICATION) -> bytes:
    """What ``tunnel proxy-command`` writes on stdout when it is refused: ident + disconnect."""
    return IDENTIFICATION + disconnect(PREFIX + reason, code)


class DecodeError(FleetError, ValueError, code="ssh_decode"):
    pass


def decode_packet(data: bytes) -> tuple[bytes, bytes]:
    """(payload, rest) of one unencrypted packet; raises DecodeError if it is malformed."""
    if len(data) < 5:
        raise DecodeError("short packet")
    length, pad = struct.unpack(">IB", data[:5])
    if (4 + length) % BLOCK or pad < 4 or pad >= length or len(data) < 4 + length:
        raise DecodeError(f"bad packet framing: length={length} padding={pad}")
    return data[5: 4 + length - pad], data[4 + length:]


def decode_disconnect(payload: bytes) -> tuple[int, str, str]:
    """(reason code, description, language) of an SSH_MSG_DISCONNECT payload."""
    if not payload or payload[0] != MSG_DISCONNECT or len(payload) < 9:
        raise DecodeError("not a disconnect message")
    (reason,) = struct.unpack(">I", payload[1:5])
    fields, at = [], 5
    for _ in range(2):
        if len(payload) < at + 4:
            raise DecodeError("truncated string")
        (n,) = struct.unpack(">I", payload[at: at + 4])
        if len(payload) < at + 4 + n:
            raise DecodeError("truncated string")
        fields.append(payload[at + 4: at + 4 + n].decode())
        at += 4 + n
    return reason, fields[0], fields[1]


# --- reading ssh's stderr back ----------------------------------------------------------------

#: what OpenSSH prints for our disconnect (packet.c: "Received disconnect from %s port %d:%u: %.400s");
#: the host is UNKNOWN behind a ProxyCommand (no socket peer).
_RECEIVED = re.compile(rb"^Received disconnect from \S+ port \d+:(?P<code>\d+): "
                       + re.escape(PREFIX.encode()) + rb"(?P<reason>.*?)\r?\n$")
_DISCONNECTED = re.compile(rb"^Disconnected from \S+ port \d+\r?\n$")
#: our own one line, from ssh_config's ``Match exec ... tunnel ssh-cert`` or a ProxyCommand
#: whose stderr ssh did not discard
_OURS = re.compile(rb"^tunnel: error: (?P<reason>.*?)\r?\n$")
#: lines that may turn out to be one of the above, so a partial one waits for its end
_STARTS = (b"Received disconnect from ", b"Disconnected from ", b"tunnel: error: ")


class StderrFilter:
    """ssh's stderr, with our refusal shown as the tunnel's one line (``tunnel ssh``).

    ``feed`` takes bytes as they arrive and returns what to write now: every line passes
    through unchanged and at once, except that ssh's report of our disconnect
    (``Received disconnect from UNKNOWN port 65535:11: fleet-tunnel: REASON`` and the
    ``Disconnected from …`` after it) becomes ``tunnel: error: REASON`` — printed once, also
    when ``tunnel ssh-cert`` already said the same. A partial line is held back only while it
    could still be one of those; anything else (a prompt) goes out at once. After a refusal,
    ``exit_status`` is 1 (refused) or 3 (proxy unreachable), else None (keep ssh's status).
    """

    def __init__(self) -> None:
        self.pending = b""
        self.said: set[bytes] = set()
        self.exit_status: int | None = None

    def feed(self, data: bytes) -> bytes:
        self.pending += data
        out = []
        while (end := self.pending.find(b"\n")) >= 0:
            line, self.pending = self.pending[: end + 1], self.pending[end + 1:]
            out.append(self._line(line))
        if self.pending and not any(s.startswith(self.pending) or self.pending.startswith(s) for s in _STARTS):
            out.append(self.pending)
            self.pending = b""
        return b"".join(out)

    def finish(self) -> bytes:
        """The end of ssh's stderr: what is still held back goes out as it was."""
        rest, self.pending = self.pending, b""
        return rest

    def _line(self, line: bytes) -> bytes:
        if match := _RECEIVED.match(line):
            code, reason = int(match.group("code")), match.group("reason")
            self.exit_status = EXIT_FOR_REASON.get(code, 1)
            if reason in self.said:
                return b""
            self.said.add(reason)
            return b"tunnel: error: " + reason + b"\n"
        if self.exit_status is not None and _DISCONNECTED.match(line):
            return b""
        if match := _OURS.match(line):
            if match.group("reason") in self.said:
                return b""
            self.said.add(match.group("reason"))
        return line
