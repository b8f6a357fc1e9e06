"""Resumable streams, the decisions (sans-I/O): frames, the replay buffer, acks, hold time, secrets.

A resumable session outlives the tunnel stream that carries it (issue 17). After the stream
header, when both ends said ``resumable: true``, the stream carries frames instead of raw bytes::

    type    u8      DATA 1, ACK 2, END 3, ABORT 4, FROM 5
    length  u32be   payload length
    payload         DATA: application bytes (offsets are implicit: both ends count them)
                    ACK: u64be, cumulative application bytes the receiver's application took
                         (plus one once it took the END: the sender then knows END arrived)
                    END: empty; the clean end of this direction, the ONLY thing that becomes a
                         FIN on the local socket
                    ABORT: UTF-8 reason; the other end's local side broke (a reset locally)
                    FROM: u64be, the offset of the next DATA byte: the first frame on every
                         stream (again when an ACK moved the sender on), so the receiver drops
                         what it already has (bytes its old stream delivered after it told the
                         peer its count) and refuses a gap

A stream that ends or resets without END/ABORT is a *loss*: each end holds its session (the local
sockets stay open) and waits for a new stream; on re-attach each end resends what the other lacks
from its :class:`ReplayBuffer`, the bytes it sent that were not yet acknowledged, which is also
its send window (a full buffer stops the end reading its local socket, so memory stays bounded).

Why ACK counts what the application *took* (not what arrived): the receiving end then never
holds more than the sender's window, so its reader can always keep reading the stream (acks
included) without a buffer of its own that could grow; see ``tunnel/resumable.py``.

Everything here is pure: :class:`FrameReader` takes bytes in any split, :class:`AckPolicy` and
:class:`Hold` take the time as an argument, :class:`EndState` makes one end's decisions (what
to write next, whether a lost stream is held). ``tunnel/resumable.py`` is the asyncio adapter.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
from collections import deque
from dataclasses import dataclass

from enroll.errors import EXIT_CUT, FleetError

#: seconds a session is held while its stream is away (``resume_hold``); 0 disables resuming
DEFAULT_HOLD = 600.0
#: bytes of sent-but-unacknowledged data kept per direction (``resume_buffer``): the send window
DEFAULT_BUFFER = 4 * 1024 * 1024
#: the receiver acknowledges at least every ACK_BYTES taken, or ACK_INTERVAL seconds after the
#: first unacknowledged byte was taken, whichever comes first
ACK_BYTES = 256 * 1024
ACK_INTERVAL = 0.2
#: largest payload a frame may carry: DATA is written one frame per chunk (64 KiB from a
#: socket), a longer frame means the peer is not speaking this protocol
MAX_FRAME = 1024 * 1024
#: longest ABORT reason, in bytes of UTF-8
MAX_REASON = 1024

DATA, ACK, END, ABORT, FROM = 1, 2, 3, 4, 5
FRAME_NAMES = {DATA: "DATA", ACK: "ACK", END: "END", ABORT: "ABORT", FROM: "FROM"}
_HEADER = struct.Struct("!BI")
HEADER_SIZE = _HEADER.size
_U64 = struct.Struct("!Q")

#: the refusal codes of a resume (``ResumeError.code``), and what each means
CODES = {
    "resume_unknown": "no such session is held here (never existed, ended, or already replaced)",
    "resume_secret": "the resume secret does not match the session's",
    "resume_identity": "the session belongs to another identity",
    "resume_offset": "the offset asked for is outside the replay buffer: bytes would be lost",
    "resume_expired": "the session's hold time ran out",
    "resume_frame": "the stream broke the resumable framing (not a frame, or out of order)",
}


class ResumeError(FleetError):
    """A resume that cannot go on, or a stream that broke the framing; ``code`` is one of CODES.

    ``exit_status`` is the cut status: a session that could not resume was cut.
    """

    exit_status = EXIT_CUT

    def __init__(self, code: str, message: str) -> None:
        assert code in CODES, code
        super().__init__(message)
        self.code = code


class SessionCut(FleetError, code="cut", exit_status=EXIT_CUT):
    """The session ended without a clean end: hold time over, resume refused, framing broken.

    ``reason`` is one line for people (``the tunnel was away for 10 min (hold time)``); the
    local side is reset, never given a FIN, and the command exits with ``EXIT_CUT``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# -- secrets --------------------------------------------------------------------------------


def new_secret() -> str:
    """A fresh resume secret: 32 random bytes as 43 characters of unpadded urlsafe base64."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


def secret_digest(secret: str) -> bytes:
    """What an end keeps of a secret it did not make: its SHA-256 (never the secret itself)."""
    return hashlib.sha256(secret.encode("utf-8")).digest()


def secret_matches(secret: object, digest: bytes) -> bool:
    """True when ``secret`` hashes to ``digest``; a constant-time compare of the two digests.

    Anything that is not a well-formed secret (wrong type, length or alphabet) is False, so a
    caller can pass a header field as it came.
    """
    if not isinstance(secret, str) or len(secret) != 43:
        return False
    try:
        raw = base64.urlsafe_b64decode(secret + "=")
    except ValueError:
        return False
    if len(raw) != 32:
        return False
    return hmac.compare_digest(secret_digest(secret), digest)


# -- frames ---------------------------------------------------------------------------------


def encode_data(payload: bytes | memoryview) -> bytes:
    """One DATA frame: the header and the payload in one buffer (one stream write)."""
    return b"".join((_HEADER.pack(DATA, len(payload)), payload))


def encode_data_frames(chunks: list[bytes | memoryview]) -> bytes:
    """Several DATA frames, one per chunk, in one buffer: one stream write for a batch (a
    transport's per-write cost is paid once, and its frames stay full)."""
    parts: list[bytes | memoryview] = []
    for chunk in chunks:
        parts.append(_HEADER.pack(DATA, len(chunk)))
        parts.append(chunk)
    return b"".join(parts)


def encode_ack(count: int) -> bytes:
    return _HEADER.pack(ACK, 8) + _U64.pack(count)


def encode_from(offset: int) -> bytes:
    return _HEADER.pack(FROM, 8) + _U64.pack(offset)


def encode_end() -> bytes:
    return _HEADER.pack(END, 0)


def encode_abort(reason: str) -> bytes:
    """An ABORT frame; the reason is cut to MAX_REASON bytes (on a character boundary)."""
    text = reason.encode("utf-8")[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return _HEADER.pack(ABORT, len(text)) + text


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded frame other than DATA: ``kind`` is ACK, END, ABORT or FROM; ``value`` the count,
    reason or offset."""

    kind: int
    value: int | str | None = None


#: what :meth:`FrameReader.feed` yields: application bytes (a piece of a DATA frame) or a Frame
Event = bytes | Frame


class FrameReader:
    """Frames out of a byte stream cut anywhere; DATA is handed on as it arrives.

    A DATA frame's payload is yielded in pieces as soon as they are here (no reassembly copy:
    offsets are implicit, so a piece is as good as the whole frame). Control frames are yielded
    whole. A malformed frame raises ``ResumeError("resume_frame")`` and the reader is unusable.
    """

    def __init__(self) -> None:
        self._partial = b""  # bytes of a header or control payload not complete yet
        self._data_left = 0  # bytes of the current DATA frame's payload still to come
        self._broken: ResumeError | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        if self._broken is not None:
            raise self._broken
        try:
            return self._feed(chunk)
        except ResumeError as exc:
            self._broken = exc
            raise

    def _feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        pos, size = 0, len(chunk)
        if self._data_left:
            take = min(self._data_left, size)
            events.append(chunk if take == size else chunk[:take])
            self._data_left -= take
            pos = take
        if self._partial:
            chunk = self._partial + chunk[pos:]
            pos, size = 0, len(chunk)
            self._partial = b""
        while pos < size:
            if size - pos < HEADER_SIZE:
                self._partial = chunk[pos:]
                break
            kind, length = _HEADER.unpack_from(chunk, pos)
            if kind == DATA:
                if length > MAX_FRAME:
                    raise ResumeError("resume_frame", f"a DATA frame of {length} bytes (at most {MAX_FRAME})")
                start = pos + HEADER_SIZE
                end = min(start + length, size)
                if end > start:
                    events.append(chunk[start:end])
                self._data_left = length - (end - start)
                pos = end
                continue
            if kind not in FRAME_NAMES:
                raise ResumeError("resume_frame", f"an unknown frame type {kind}")
            if size - pos - HEADER_SIZE < length:
                if length > MAX_REASON:  # no control frame is this long: do not wait for it
                    raise ResumeError("resume_frame", f"a {FRAME_NAMES[kind]} frame of {length} bytes")
                self._partial = chunk[pos:]
                break
            payload = chunk[pos + HEADER_SIZE:pos + HEADER_SIZE + length]
            events.append(_control(kind, payload))
            pos += HEADER_SIZE + length
        return events

    @property
    def idle(self) -> bool:
        """True between frames (nothing half-read): where a stream may end cleanly."""
        return not self._partial and not self._data_left


def _control(kind: int, payload: bytes) -> Frame:
    name = FRAME_NAMES[kind]
    if kind in (ACK, FROM):
        if len(payload) != 8:
            raise ResumeError("resume_frame", f"an {name} frame of {len(payload)} bytes (8)")
        return Frame(kind, _U64.unpack(payload)[0])
    if kind == END:
        if payload:
            raise ResumeError("resume_frame", f"an END frame with {len(payload)} bytes of payload")
        return Frame(END)
    if len(payload) > MAX_REASON:
        raise ResumeError("resume_frame", f"an {name} reason of {len(payload)} bytes (at most {MAX_REASON})")
    try:
        return Frame(ABORT, payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise ResumeError("resume_frame", "an ABORT reason that is not UTF-8") from None


# -- the replay buffer ----------------------------------------------------------------------


#: what one held chunk costs beyond its bytes (the bytes object, its deque slot): charged
#: against the window so that a peer or a local service writing tiny pieces cannot make the
#: memory a session holds many times its window (1-byte chunks cost ~40x their bytes)
CHUNK_OVERHEAD = 64


class ReplayBuffer:
    """Sent application bytes the peer has not acknowledged: offsets ``start`` .. ``end``.

    Chunks are kept as they were sent (no copy, no joining); an ACK drops whole chunks and
    remembers how far into the first one it reached. ``limit`` is the send window: ``room()``
    says whether a chunk may be added now (each held chunk counts ``CHUNK_OVERHEAD`` extra).
    """

    def __init__(self, limit: int = DEFAULT_BUFFER) -> None:
        if limit <= 0:
            raise ValueError("the replay buffer needs a positive size")
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._skip = 0  # bytes of the first chunk already acknowledged
        self.start = 0  # offset of the first byte held
        self.end = 0  # offset after the last byte held: the bytes sent so far

    @property
    def held(self) -> int:
        return self.end - self.start

    def room(self, size: int) -> bool:
        """May a chunk of ``size`` bytes go in now? Always when empty (a chunk larger than the
        window is still sent, alone), else only within the limit: memory stays bounded."""
        return self.held == 0 or self.held + size + CHUNK_OVERHEAD * (len(self._chunks) + 1) <= self.limit

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self.end += len(data)

    def ack(self, offset: int) -> int:
        """Forget bytes before ``offset`` (the peer has them); returns how many were dropped.

        An offset at or below ``start`` changes nothing (acks may arrive late); one beyond
        ``end`` is a peer acknowledging bytes never sent: ``resume_frame``.
        """
        if offset > self.end:
            raise ResumeError("resume_frame", f"an acknowledgement of {offset} bytes, only {self.end} were sent")
        dropped = offset - self.start
        if dropped <= 0:
            return 0
        left = dropped
        chunks = self._chunks
        while left:
            first = len(chunks[0]) - self._skip
            if first <= left:
                chunks.popleft()
                self._skip = 0
                left -= first
            else:
                self._skip += left
                left = 0
        self.start = offset
        return dropped

    def check(self, offset: int) -> None:
        """Raise ``resume_offset`` unless ``start <= offset <= end`` (a replay can start there)."""
        if not self.start <= offset <= self.end:
            raise ResumeError(
                "resume_offset",
                f"the other end has {offset} bytes; this end holds {self.start}..{self.end}"
                " (bytes would be lost or repeated)",
            )

    def since(self, offset: int) -> list[bytes | memoryview]:
        """The held bytes from ``offset`` to ``end``, as the chunks they were sent in (the first
        one cut with a memoryview, no copy). Raises ``resume_offset`` outside the buffer."""
        self.check(offset)
        out: list[bytes | memoryview] = []
        pos = self.end
        for chunk in reversed(self._chunks):  # the usual offsets are near the end
            if pos <= offset:
                break
            begin = pos - len(chunk)
            out.append(chunk if begin >= offset else memoryview(chunk)[offset - begin:])
            pos = begin
        out.reverse()
        return out


# -- acknowledgements -----------------------------------------------------------------------


class AckPolicy:
    """When the receiving end acknowledges: ACK_BYTES taken, or ACK_INTERVAL after the first
    unacknowledged byte was taken; and at once when the END was taken (so the sender knows)."""

    def __init__(self, every: int = ACK_BYTES, interval: float = ACK_INTERVAL) -> None:
        self.every, self.interval = every, interval
        self.taken = 0  # the count an ACK would carry now
        self.reported = 0  # the count the last ACK carried
        self._since: float | None = None  # when the first unreported byte was taken
        self._urgent = False  # the END was taken and not reported yet

    def took(self, size: int, now: float) -> bool:
        """The application took ``size`` bytes; True when an ACK is due now (by bytes)."""
        if size <= 0:
            return False
        if self._since is None:
            self._since = now
        self.taken += size
        return self.taken - self.reported >= self.every

    def took_end(self) -> bool:
        """The application took the END: acknowledge it (the count goes one past the bytes)."""
        self.taken += 1
        self._urgent = True
        return True

    def again(self) -> None:
        """A new stream: the count goes out once more at once (the END's ack, in particular,
        is carried by no header), whether or not it was reported on the stream that was lost."""
        self._urgent = self.taken > 0

    def deadline(self) -> float | None:
        """The time an ACK is due by the clock, None when nothing is unreported."""
        if self.taken == self.reported or self._since is None:
            return None
        return self._since + self.interval

    def due(self, now: float) -> bool:
        deadline = self.deadline()
        return self._urgent or self.taken > self.reported and (
            self.taken - self.reported >= self.every or (deadline is not None and now >= deadline)
        )

    def sent(self) -> int:
        """An ACK is going out now: the count it carries."""
        self.reported = self.taken
        self._since = None
        self._urgent = False
        return self.reported


# -- hold time ------------------------------------------------------------------------------


ATTACHED, HELD, EXPIRED = "attached", "held", "expired"


class Hold:
    """Whether a session is attached, held since T, or past its hold time (clock injected)."""

    def __init__(self, hold: float = DEFAULT_HOLD) -> None:
        if hold < 0:
            raise ValueError("the hold time cannot be negative")
        self.hold = hold
        self.lost_at: float | None = None

    def lost(self, now: float) -> None:
        if self.lost_at is None:
            self.lost_at = now

    def attached(self) -> None:
        self.lost_at = None

    def held_for(self, now: float) -> float | None:
        return None if self.lost_at is None else max(0.0, now - self.lost_at)

    def expires_at(self) -> float | None:
        return None if self.lost_at is None else self.lost_at + self.hold

    def state(self, now: float) -> str:
        if self.lost_at is None:
            return ATTACHED
        return EXPIRED if now - self.lost_at >= self.hold else HELD


def describe_hold(seconds: float) -> str:
    """``10 min``, ``90 s``, ``2 h``: a hold time for the one-line end-of-session message."""
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)} min"
    return f"{seconds:g} s"


def hold_expired_reason(hold: float) -> str:
    return f"the tunnel was away for {describe_hold(hold)} (hold time)"


# -- one end ------------------------------------------------------------------------------------

#: what an end's writer does next (:meth:`EndState.next_write`); None: wait for a change
WRITE_ABORT = "abort"  # ABORT(reason), then FIN, then stop
WRITE_FROM = "from"  # FROM(written): the first frame on a stream
WRITE_ACK = "ack"  # ACK(acks.sent())
WRITE_DATA = "data"  # DATA frames of replay.since(written), one per chunk
WRITE_END = "end"  # END after the last byte
WRITE_FIN = "fin"  # both ways ended cleanly and all said: FIN, then stop
WRITE_STOP = "stop"  # nothing more goes on this stream (aborted, or cut)


class EndState:
    """Everything one end of a resumable session decides, without I/O or a clock of its own.

    Counters: ``sent`` (= ``replay.end``), ``received``, the peer's acknowledgement
    (``replay.start``), what went to the current stream (``written``). Flags of the two
    directions: our ``eof``/``end_acked``/``abort``, the peer's ``peer_end``/``peer_end_taken``
    /``peer_abort``; ``cut`` (why the session was given up). The adapter
    (``tunnel/resumable.py``) feeds it frames and calls, and does what :meth:`next_write` says.
    """

    def __init__(self, buffer: int = DEFAULT_BUFFER, hold: float = DEFAULT_HOLD) -> None:
        self.replay = ReplayBuffer(buffer)
        # a quarter of the window at most between acks, so a small window never waits for the
        # ack timer (the peer's window is not known: the same size as ours is assumed)
        self.acks = AckPolicy(every=min(ACK_BYTES, max(1, buffer // 4)))
        self.hold = Hold(hold)
        # a peer within its window (the same size as ours) never fills this, so the reader
        # never stops and its ACKs always get through; past it (a peer with a larger window,
        # or a broken one) the reader stops and the stream's flow control holds the peer
        self.inbox_limit = buffer + MAX_FRAME
        self.received = 0
        self.peer_end = False  # END arrived
        self.peer_end_taken = False  # the application took it (recv() returned b"")
        self.peer_abort: str | None = None
        self.eof = False  # END goes after the last byte
        self.end_acked = False
        self.abort: str | None = None  # ABORT goes to the next stream
        self.cut: str | None = None
        self.closed = False
        # finished cleanly AND the peer has all it needs (its FIN came), or the stream was lost
        # after this end finished (the peer's last ACK is then best effort)
        self.settled = False
        self.attached = False
        # of the stream attached now
        self.written = 0
        self.end_written = False
        self.abort_written = False
        self.from_written = False
        self.from_read = False  # the peer's FROM came on this stream
        self.skip = 0  # bytes of DATA still to drop: this end had them already

    @property
    def sent(self) -> int:
        return self.replay.end

    def finished_cleanly(self) -> bool:
        """Our END acknowledged and the peer's END taken: nothing is missing at this end."""
        return self.end_acked and self.peer_end_taken

    def over(self) -> bool:
        """The session is over for the application: finished, cut, or aborted by either end."""
        return (self.finished_cleanly() or self.cut is not None or self.abort is not None
                or self.peer_abort is not None)

    def needs_stream(self) -> bool:
        """Would a new stream do anything? Not once finished, cut, closed, aborted by the peer,
        or aborted here with the ABORT written."""
        return (self.cut is None and self.peer_abort is None and not self.closed
                and not self.finished_cleanly() and (self.abort is None or not self.abort_written))

    # -- streams come and go

    def check_attach(self, peer_received: int) -> None:
        """Raise unless a new stream could start with the peer at ``peer_received``: the session
        was given up (``resume_expired``), or the offset is outside the buffer (``resume_offset``)."""
        if self.cut is not None:
            raise ResumeError("resume_expired", f"the session is over: {self.cut}")
        self.replay.check(peer_received)

    def attach(self, peer_received: int) -> int:
        """A new stream, the peer having ``peer_received`` bytes: returns the bytes to replay."""
        self.check_attach(peer_received)
        self.replay.ack(peer_received)  # the peer has them (inbox or taken): never again
        self.attached = True
        self.written = peer_received
        self.end_written = self.abort_written = self.from_written = self.from_read = False
        self.skip = 0
        self.acks.again()
        self.hold.attached()
        return self.replay.end - peer_received

    def lost(self, now: float) -> bool:
        """The stream is gone; True when the session is held (it needs another), False when it
        needed none any more (and then, if it had finished, it is settled)."""
        self.attached = False
        if not self.needs_stream():
            self.settled = self.settled or self.finished_cleanly()
            return False
        self.hold.lost(now)
        return True

    def hold_ran_out(self, now: float) -> bool:
        return not self.attached and self.hold.state(now) == EXPIRED

    def give_up(self, reason: str) -> bool:
        """Cut the session (True), unless it is cut already or finished cleanly (False)."""
        if self.cut is not None or self.finished_cleanly():
            return False
        self.cut = reason
        return True

    # -- frames in

    def on_from(self, offset: int) -> None:
        """The peer's DATA on this stream starts at ``offset``: drop what this end has already
        (exactly once however late the old stream delivered); a gap is ``resume_offset``."""
        if offset > self.received:
            raise ResumeError("resume_offset", f"the other end resumes at byte {offset}, this end"
                              f" has {self.received}: bytes would be lost")
        self.from_read = True
        self.skip = self.received - offset

    def on_data(self, size: int) -> int:
        """``size`` bytes of DATA came; returns how many leading ones to drop (already here)."""
        if not self.from_read:
            raise ResumeError("resume_frame", "DATA before FROM")
        drop = min(self.skip, size)
        self.skip -= drop
        if drop < size and self.peer_end:
            raise ResumeError("resume_frame", "DATA after END")
        self.received += size - drop
        return drop

    def on_ack(self, count: int) -> None:
        """The peer took ``count`` bytes (one more once it took our END)."""
        if self.eof and count == self.replay.end + 1:
            self.end_acked = True
            count -= 1
        self.replay.ack(count)
        if self.written < self.replay.start:
            # the peer had more than its header said (its old stream delivered late): what it
            # acknowledged is not sent again; a new FROM tells it where DATA goes on from
            self.written = self.replay.start
            self.from_written = False

    def on_end(self) -> None:
        self.peer_end = True  # a repeated END (replayed after a loss) changes nothing

    def on_abort(self, reason: str) -> None:
        self.peer_abort = reason or "no reason given"

    def on_fin(self, between_frames: bool) -> bool:
        """The stream ended: True when that was the clean close after the session finished,
        False when it is a loss (hold and re-attach)."""
        if self.finished_cleanly() and between_frames:
            self.settled = True
            return True
        return False

    # -- the application

    def took(self, size: int, now: float) -> bool:
        """The application took ``size`` bytes; True when an ACK is due now."""
        return self.acks.took(size, now)

    def took_end(self) -> None:
        if not self.peer_end_taken:
            self.peer_end_taken = True
            self.acks.took_end()

    # -- frames out

    def next_write(self, now: float) -> str | None:
        """What the writer of the attached stream does next (one of WRITE_*), None: wait."""
        if self.abort is not None:
            return WRITE_STOP if self.abort_written else WRITE_ABORT
        if self.peer_abort is not None or self.cut is not None:
            return WRITE_STOP
        if not self.from_written:
            return WRITE_FROM
        if self.acks.due(now):
            return WRITE_ACK
        if self.written < self.replay.end:
            return WRITE_DATA
        if self.eof and not self.end_written and not self.end_acked:
            return WRITE_END
        if self.finished_cleanly() and self.acks.reported == self.acks.taken:
            return WRITE_FIN
        return None
