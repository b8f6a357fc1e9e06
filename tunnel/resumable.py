"""A splice end that survives its tunnel stream: the asyncio adapter of ``tunnel/resume.py``.

:class:`ResumableEnds` is a ``tunnel.splice.Ends``: ``splice(local, ResumableEnds(...))`` runs
unchanged. Underneath, the bytes go as frames over whichever transport stream is attached now.
When that stream is lost (it ends or resets without END/ABORT), ``recv()`` and ``send()`` do not
fail: they wait (``send()`` keeps filling the replay buffer until the window is full), ``lost()``
returns the reason, and the caller dials again and calls ``attach()`` with a new stream, which
replays exactly the bytes the peer lacks. After the hold time without a stream, or when the
caller gives up (``give_up()``: a resume refused), ``recv()``/``send()`` raise ``SessionCut`` so
splice resets the local side: a cut never looks like a clean end.

Per attached stream two tasks run: a reader (frames in: DATA to the inbox, ACK trims the replay
buffer, END/ABORT) and the one writer (DATA from the replay buffer, ACK, END, ABORT; one writer
so frames never interleave, and so a reader never waits on a write: both ends' readers always
drain their streams, so a blocked writer is only ever waiting for its peer's reader).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable

from tunnel.resume import (
    ABORT,
    ACK,
    ACK_BYTES,
    DEFAULT_BUFFER,
    DEFAULT_HOLD,
    END,
    MAX_FRAME,
    AckPolicy,
    Frame,
    FrameReader,
    Hold,
    ReplayBuffer,
    ResumeError,
    SessionCut,
    encode_abort,
    encode_ack,
    encode_data,
    encode_end,
    hold_expired_reason,
)
from tunnel.splice import Ends, describe
from tunnel.transport import Stream, StreamReset, TransportError

#: bytes asked of the stream per read: several frames at once when they are queued
READ_SIZE = 256 * 1024
#: the reset code of a stream this end dropped because it replaced or gave up the session
RESET_DROPPED = 1
#: seconds ``close()`` lets the writer deliver a last END/ABORT before the stream is dropped
CLOSE_GRACE = 2.0


class PeerAborted(StreamReset):
    """The other end sent ABORT: its local side broke, so splice resets ours too.

    A ``StreamReset`` (code ``reset``), because that is what the other end's local side did:
    splice reports it in ``SpliceResult.error`` as it does a raw stream's reset.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(RESET_DROPPED, reason, remote=True)

    def __str__(self) -> str:
        return f"the other end aborted the session: {self.reason}"


class ResumableEnds(Ends):
    """One end of a resumable session (see the module docstring).

    ``session`` names it in log lines; ``hold`` is how long it waits for a new stream after a
    loss; ``buffer`` the replay buffer and send window in bytes; ``clock`` the time source of
    the hold and ack decisions (seconds, monotonic).
    """

    def __init__(
        self, session: str, *, hold: float = DEFAULT_HOLD, buffer: int = DEFAULT_BUFFER,
        clock: Callable[[], float] = time.monotonic, log: logging.Logger | None = None,
    ) -> None:
        self.session = session
        self._clock = clock
        self._log = log or logging.getLogger("tunnel.resumable")
        self._loop = asyncio.get_running_loop()
        self._buffer = ReplayBuffer(buffer)
        # a quarter of the window at most between acks, so a small window never waits for the
        # ack timer (the peer's window is not known: the same size as ours is assumed)
        self._acks = AckPolicy(every=min(ACK_BYTES, max(1, buffer // 4)))
        self._hold = Hold(hold)
        # receiving: what came in and the application has not taken yet
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        self._inbox_limit = buffer
        self._received = 0
        self._peer_end = False  # END arrived
        self._peer_end_taken = False  # recv() returned b"" for it
        self._peer_abort: str | None = None
        # sending
        self._eof = False  # eof() called: END goes after the last byte
        self._end_acked = False
        self._abort: str | None = None  # abort() called: ABORT goes to the next stream
        self._abort_sent = False
        # the stream attached now
        self._stream: Stream | None = None
        self._written = 0  # offset written to the current stream
        self._tasks: list[asyncio.Task[None]] = []
        self._loss_reason = "not attached yet"
        self._cut: SessionCut | None = None
        self._closed = False
        # finished cleanly AND the peer is known to have all it needs (its FIN came), or the
        # stream was lost after this end finished (delivering the last ACK is then best effort)
        self._settled = False
        # wake-ups: a change any waiter may care about (one task waits on each)
        self._recv_wake = asyncio.Event()
        self._send_wake = asyncio.Event()
        self._write_wake = asyncio.Event()
        self._read_wake = asyncio.Event()
        self._change = asyncio.Event()  # attach/loss/finish/cut: lost() and finished() wait on it
        self._ack_timer: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None

    # -- what the headers carry

    @property
    def received(self) -> int:
        """Application bytes this end has received (delivered or waiting in its inbox)."""
        return self._received

    @property
    def sent(self) -> int:
        """Application bytes this end has sent (written, or buffered to be written)."""
        return self._buffer.end

    @property
    def held_for(self) -> float | None:
        """Seconds since the stream was lost; None while attached (and before the first attach)."""
        return self._hold.held_for(self._clock())

    @property
    def attached(self) -> bool:
        return self._stream is not None

    @property
    def done(self) -> bool:
        """The session is over here: ended cleanly both ways, aborted, or cut."""
        return self._finished_cleanly() or self._cut is not None or self._abort is not None \
            or self._peer_abort is not None

    @property
    def counters(self) -> dict[str, int]:
        """Numbers for status, tests and the memory bound: bytes held and queued."""
        return {"sent": self.sent, "received": self._received, "acked": self._buffer.start,
                "held": self._buffer.held, "inbox": self._inbox_bytes, "written": self._written}

    # -- the seam with the dialing code

    def check_offset(self, peer_received: int) -> None:
        """Raise ``ResumeError("resume_offset")`` unless a replay can start at ``peer_received``
        (the buffer's start .. the bytes sent); changes nothing. For the agent's reply, which
        must refuse before ``attach()``."""
        if self._cut is not None:
            raise ResumeError("resume_expired", f"the session is over: {self._cut.reason}")
        self._buffer.check(peer_received)

    async def attach(self, stream: Stream, first: bytes, peer_received: int) -> int:
        """Carry the session over ``stream`` from now on; returns the bytes replayed.

        ``first`` is what was read of the stream after its header; ``peer_received`` the
        other end's ``received``. An offset outside the replay buffer raises
        ``ResumeError("resume_offset")`` and changes nothing (the current stream, if any, stays).
        A stream still attached is dropped (reset) for the new one.
        """
        if self._cut is not None:
            raise self._cut
        if self._closed:
            raise SessionCut("the session is closed")
        self._buffer.check(peer_received)
        if peer_received > self._buffer.start:
            self._buffer.ack(peer_received)  # the peer has them (inbox or taken): never again
        self._drop_stream()
        self._stream = stream
        self._written = peer_received
        self._abort_sent = False
        self._acks.again()
        self._hold.attached()
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._tasks = [
            self._loop.create_task(self._read_loop(stream, first), name=f"resume-read {self.session}"),
            self._loop.create_task(self._write_loop(stream), name=f"resume-write {self.session}"),
        ]
        self._wake_all()
        return self._buffer.end - peer_received

    async def lost(self) -> str:
        """Return, with the reason, once no stream is attached and the session needs one (at
        once if so now). Awaited again after each ``attach()``.

        Never returns for a session that needs no stream any more (finished, cut, aborted by
        the other end, or aborted here with the ABORT written): the caller cancels its wait then.
        """
        while self._stream is not None or not self._needs_stream():
            self._change.clear()
            await self._change.wait()
        return self._loss_reason

    async def finished(self) -> None:
        """Wait until both directions ended cleanly (our END acknowledged, the peer's taken) and
        the peer's FIN said it has all it needs too (or the stream was lost after that point:
        then nothing is missing here, and the peer's last ACK is best effort).

        Raises ``SessionCut`` if the session is cut meanwhile, ``PeerAborted`` if the other end
        aborted. Losses before that are waited out like any other (the caller re-attaches).
        """
        while not self._settled:
            if not self._finished_cleanly():
                self._raise_if_over()
            self._change.clear()
            await self._change.wait()

    def detach(self, reason: str = "replaced by a new stream") -> None:
        """Drop the current stream as lost (the hold starts), e.g. when the other end re-attaches
        before this end noticed the loss. Read ``received`` for a header only while detached:
        an attached stream may still be delivering."""
        stream = self._stream
        if stream is not None:
            self._stream_lost(stream, reason)

    def give_up(self, reason: str) -> None:
        """End the session as cut: ``recv()``/``send()`` raise ``SessionCut(reason)`` from now on."""
        if self._cut is not None or self._finished_cleanly():
            return
        self._cut = SessionCut(reason)
        self._log.info("session %s cut: %s", self.session, reason)
        self._drop_stream()
        self._wake_all()

    async def close(self) -> None:
        """Stop everything; a last END/ABORT still being written gets CLOSE_GRACE seconds."""
        if self._closed:
            return
        writer = self._tasks[1] if len(self._tasks) == 2 else None
        if writer is not None and not writer.done() and (self._abort is not None or self._eof):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writer), CLOSE_GRACE)
        self._closed = True
        self._settled = self._settled or self._finished_cleanly()
        if not self.done:
            self.give_up("the session was closed")
        for timer in (self._ack_timer, self._hold_timer):
            if timer is not None:
                timer.cancel()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._stream is not None and not self._finished_cleanly():
            with contextlib.suppress(TransportError, ValueError):
                self._stream.reset(RESET_DROPPED)
        self._stream = None
        self._wake_all()

    # -- tunnel.splice.Ends

    async def recv(self) -> bytes:
        while True:
            if self._inbox:
                data = self._inbox.popleft()
                self._inbox_bytes -= len(data)
                self._read_wake.set()
                if self._acks.took(len(data), self._clock()):
                    self._write_wake.set()
                elif self._ack_timer is None:
                    self._arm_ack_timer()
                return data
            if self._peer_abort is not None:
                raise PeerAborted(self._peer_abort)
            if self._cut is not None:
                raise self._cut
            if self._peer_end:
                if not self._peer_end_taken:
                    self._peer_end_taken = True
                    self._acks.took_end()
                    self._write_wake.set()
                    self._changed()
                return b""
            self._recv_wake.clear()
            await self._recv_wake.wait()

    async def send(self, data: bytes) -> None:
        if self._eof:
            raise TransportError(0, "send after eof()", remote=False, kind="internal")
        view = memoryview(data)
        while view:
            piece = view[:MAX_FRAME]
            view = view[MAX_FRAME:]
            while True:
                self._raise_if_over()
                if self._buffer.room(len(piece)):
                    break
                self._send_wake.clear()
                await self._send_wake.wait()
            # the buffer keeps what it is given: only an immutable bytes object is kept as is
            whole = type(data) is bytes and len(piece) == len(data)
            self._buffer.append(data if whole else bytes(piece))
            self._write_wake.set()

    def eof(self) -> None:
        """This direction ended cleanly: END goes after the bytes sent (on every stream until
        acknowledged)."""
        if not self._eof:
            self._eof = True
            self._write_wake.set()

    def abort(self) -> None:
        """Our local side broke: ABORT goes to the peer now, or on the next attach."""
        if self._abort is None and not self.done:
            self._abort = "the other end's local connection was cut"
            self._write_wake.set()
            self._wake_all()

    # -- inside

    def _finished_cleanly(self) -> bool:
        return self._end_acked and self._peer_end_taken

    def _needs_stream(self) -> bool:
        return (self._cut is None and self._peer_abort is None and not self._closed
                and not self._finished_cleanly() and (self._abort is None or not self._abort_sent))

    def _raise_if_over(self) -> None:
        if self._peer_abort is not None:
            raise PeerAborted(self._peer_abort)
        if self._cut is not None:
            raise self._cut
        if self._abort is not None:
            raise TransportError(0, "the session was aborted here", remote=False, kind="reset")

    def _changed(self) -> None:
        self._change.set()

    def _wake_all(self) -> None:
        for event in (self._recv_wake, self._send_wake, self._write_wake, self._read_wake, self._change):
            event.set()

    def _arm_ack_timer(self) -> None:
        deadline = self._acks.deadline()
        if deadline is None:
            return

        def fire() -> None:
            self._ack_timer = None
            self._write_wake.set()

        self._ack_timer = self._loop.call_later(max(0.0, deadline - self._clock()), fire)

    def _drop_stream(self) -> None:
        """Forget the current stream (reset it) and stop its tasks; no loss is reported."""
        stream, self._stream = self._stream, None
        tasks, self._tasks = self._tasks, []
        current = asyncio.current_task()
        for task in tasks:
            if task is not current:
                task.cancel()
        if stream is not None:
            with contextlib.suppress(TransportError, ValueError):
                stream.reset(RESET_DROPPED)

    def _stream_lost(self, stream: Stream, reason: str) -> None:
        """``stream`` ended or broke without END/ABORT: hold the session and tell ``lost()``."""
        if stream is not self._stream:
            return  # an old stream's task finishing late
        if not self._needs_stream():
            self._drop_stream()
            self._settled = self._settled or self._finished_cleanly()
            self._wake_all()
            return
        self._loss_reason = reason
        self._log.info("session %s: stream lost (%s); holding it", self.session, reason)
        self._drop_stream()
        now = self._clock()
        self._hold.lost(now)
        expires = self._hold.expires_at()
        assert expires is not None
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        self._hold_timer = self._loop.call_later(max(0.0, expires - now), self._hold_ran_out)
        self._wake_all()

    def _hold_ran_out(self) -> None:
        self._hold_timer = None
        if self._stream is None and self._hold.state(self._clock()) != "attached":
            self.give_up(hold_expired_reason(self._hold.hold))

    async def _read_loop(self, stream: Stream, first: bytes) -> None:
        reader = FrameReader()
        data = first
        try:
            while True:
                if data:
                    for event in reader.feed(data):
                        if isinstance(event, bytes):
                            self._on_data(event)
                        else:
                            self._on_frame(event)
                    if self._peer_abort is not None:
                        return
                while self._inbox_bytes >= self._inbox_limit:  # a peer beyond its window
                    self._read_wake.clear()
                    await self._read_wake.wait()
                data = await stream.read(READ_SIZE)
                if not data:
                    if self._finished_cleanly() and reader.idle:
                        self._settled = True
                        self._changed()
                        return
                    self._stream_lost(stream, "the stream ended without END")
                    return
        except ResumeError as exc:
            self.give_up(f"the stream broke the resumable framing: {exc}")
        except (TransportError, OSError) as exc:
            self._stream_lost(stream, describe(exc))

    def _on_data(self, data: bytes) -> None:
        if self._peer_end:
            raise ResumeError("resume_frame", "DATA after END")
        self._inbox.append(data)
        self._inbox_bytes += len(data)
        self._received += len(data)
        self._recv_wake.set()

    def _on_frame(self, frame: Frame) -> None:
        if frame.kind == ACK:
            assert isinstance(frame.value, int)
            count = frame.value
            if self._eof and count == self._buffer.end + 1:
                self._end_acked = True
                count -= 1
            self._buffer.ack(count)
            self._send_wake.set()
            if self._end_acked:
                self._write_wake.set()
                self._changed()
        elif frame.kind == END:
            self._peer_end = True  # a repeated END (replayed after a loss) changes nothing
            self._recv_wake.set()
        elif frame.kind == ABORT:
            assert isinstance(frame.value, str)
            self._peer_abort = frame.value or "no reason given"
            self._log.info("session %s: the other end aborted: %s", self.session, self._peer_abort)
            self._wake_all()

    async def _write_loop(self, stream: Stream) -> None:
        end_written = False
        try:
            while True:
                if self._abort is not None:
                    if not self._abort_sent:
                        await stream.write(encode_abort(self._abort))
                        self._abort_sent = True
                        stream.write_eof()
                    return
                if self._peer_abort is not None or self._cut is not None:
                    return
                if self._acks.due(self._clock()):
                    await stream.write(encode_ack(self._acks.sent()))
                    continue
                if self._written < self._buffer.end:
                    for chunk in self._buffer.since(self._written):
                        await stream.write(encode_data(chunk))
                        self._written += len(chunk)
                    continue
                if self._eof and not end_written and not self._end_acked:
                    await stream.write(encode_end())
                    end_written = True
                    continue
                if self._finished_cleanly() and self._acks.reported == self._acks.taken:
                    stream.write_eof()
                    self._changed()
                    return
                if self._acks.deadline() is not None and self._ack_timer is None:
                    self._arm_ack_timer()
                self._write_wake.clear()
                await self._write_wake.wait()
        except (TransportError, OSError) as exc:
            self._stream_lost(stream, describe(exc))
