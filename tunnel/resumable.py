"""A splice end that survives its tunnel stream: the asyncio adapter of ``tunnel/resume.py``.

:class:`ResumableEnds` is a ``tunnel.splice.Ends``: ``splice(local, ResumableEnds(...))`` runs
unchanged. Underneath, the bytes go as frames over whichever transport stream is attached now.
When that stream is lost (it ends or resets without END/ABORT), ``recv()`` and ``send()`` do not
fail: they wait (``send()`` keeps filling the replay buffer until the window is full), ``lost()``
returns the reason, and the caller dials again and calls ``attach()`` with a new stream, which
replays exactly the bytes the peer lacks. After the hold time without a stream, or when the
caller gives up (``give_up()``: a resume refused), ``recv()``/``send()`` raise ``SessionCut`` so
splice resets the local side: a cut never looks like a clean end.

The decisions are :class:`tunnel.resume.EndState`'s (pure); this class does the I/O and the
waiting. Per attached stream two tasks run: a reader (frames in: DATA to the inbox, ACK trims the replay
buffer, END/ABORT) and the one writer (DATA from the replay buffer, ACK, END, ABORT; one writer
so frames never interleave, and so a reader never waits on a write). An ACK counts what the
application took, so the inbox never holds more than the peer's window: the reader keeps
reading (ACKs included) while the local side is slow, and a blocked writer only ever waits for
the peer's reader. Memory per session: the replay buffer (the window) plus the inbox (the
peer's window); a peer past its window (a larger one configured, or a broken peer) makes the
reader stop, and the stream's own flow control holds it.

``send()`` returns once its bytes are in the replay buffer (the writer sends them): it blocks
only on a full window, so backpressure on the local socket is the window, attached or not.
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
    CHUNK_OVERHEAD,
    DEFAULT_BUFFER,
    DEFAULT_HOLD,
    END,
    FROM,
    MAX_FRAME,
    WRITE_ABORT,
    WRITE_ACK,
    WRITE_DATA,
    WRITE_END,
    WRITE_FIN,
    WRITE_FROM,
    WRITE_STOP,
    EndState,
    FrameReader,
    ResumeError,
    SessionCut,
    encode_abort,
    encode_ack,
    encode_data_frames,
    encode_end,
    encode_from,
    hold_expired_reason,
)
from tunnel.splice import Ends, describe
from tunnel.transport import Stream, StreamReset, TransportError

#: bytes asked of the stream per read: several frames at once when they are queued
READ_SIZE = 256 * 1024
#: bytes of DATA gathered into one stream write when several chunks are waiting
WRITE_BATCH = 256 * 1024
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
        self._state = EndState(buffer, hold)
        # what came in and the application has not taken yet
        self._inbox: deque[bytes] = deque()
        self._inbox_bytes = 0
        # the stream attached now, and its reader and writer tasks
        self._stream: Stream | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._loss_reason = "not attached yet"
        # wake-ups: one task waits on each but _change (lost() and finished())
        self._recv_wake = asyncio.Event()
        self._send_wake = asyncio.Event()
        self._write_wake = asyncio.Event()
        self._read_wake = asyncio.Event()
        self._change = asyncio.Event()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._hold_timer: asyncio.TimerHandle | None = None

    # -- what the headers carry

    @property
    def received(self) -> int:
        """Application bytes this end has received (delivered or waiting in its inbox)."""
        return self._state.received

    @property
    def sent(self) -> int:
        """Application bytes this end has sent (written, or buffered to be written)."""
        return self._state.sent

    @property
    def held_for(self) -> float | None:
        """Seconds since the stream was lost; None while attached (and before the first attach)."""
        return self._state.hold.held_for(self._clock())

    @property
    def attached(self) -> bool:
        return self._stream is not None

    @property
    def done(self) -> bool:
        """The session is over here: ended cleanly both ways, aborted, or cut."""
        return self._state.over()

    @property
    def counters(self) -> dict[str, int]:
        """Numbers for status, tests and the memory bound: bytes held and queued."""
        state = self._state
        return {"sent": state.sent, "received": state.received, "acked": state.replay.start,
                "held": state.replay.held, "inbox": self._inbox_bytes, "written": state.written}

    # -- the seam with the dialing code

    def check_offset(self, peer_received: int) -> None:
        """Raise ``ResumeError("resume_offset")`` unless a replay can start at ``peer_received``
        (the buffer's start .. the bytes sent), ``ResumeError("resume_expired")`` if the session
        was given up; changes nothing. For the agent's reply, which must refuse before
        ``attach()``."""
        self._state.check_attach(peer_received)

    async def attach(self, stream: Stream, first: bytes, peer_received: int) -> int:
        """Carry the session over ``stream`` from now on; returns the bytes replayed.

        ``first`` is what was read of the stream after its header; ``peer_received`` the
        other end's ``received``. An offset outside the replay buffer raises
        ``ResumeError("resume_offset")`` and changes nothing (the current stream, if any, stays);
        a session given up raises its ``SessionCut``. A stream still attached is dropped (reset)
        for the new one.
        """
        state = self._state
        if state.cut is not None:
            raise SessionCut(state.cut)
        state.replay.check(peer_received)
        self._drop_stream()
        replayed = state.attach(peer_received)
        self._stream = stream
        if self._hold_timer is not None:
            self._hold_timer.cancel()
            self._hold_timer = None
        self._tasks = [
            self._loop.create_task(self._read_loop(stream, first), name=f"resume-read {self.session}"),
            self._loop.create_task(self._write_loop(stream), name=f"resume-write {self.session}"),
        ]
        self._wake_all()
        return replayed

    async def lost(self) -> str:
        """Return, with the reason, once no stream is attached and the session needs one (at
        once if so now). Awaited again after each ``attach()``.

        Never returns for a session that needs no stream any more (finished, cut, aborted by
        the other end, or aborted here with the ABORT written): the caller cancels its wait then.
        """
        while self._stream is not None or not self._state.needs_stream():
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
        while not self._state.settled:
            if not self._state.finished_cleanly():
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
        if not self._state.give_up(reason):
            return
        self._log.info("session %s cut: %s", self.session, reason)
        self._drop_stream()
        self._wake_all()

    async def close(self) -> None:
        """Stop everything; a last END/ABORT still being written gets CLOSE_GRACE seconds."""
        state = self._state
        if state.closed:
            return
        writer = self._tasks[1] if len(self._tasks) == 2 else None
        if writer is not None and not writer.done() and (state.abort is not None or state.eof):
            await asyncio.wait({writer}, timeout=CLOSE_GRACE)  # neither cancels nor raises
        if not state.over():
            self.give_up("the session was closed")
        state.closed = True
        state.settled = state.settled or state.finished_cleanly()
        for timer in (self._ack_timer, self._hold_timer):
            if timer is not None:
                timer.cancel()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._stream is not None and not state.finished_cleanly():
            with contextlib.suppress(TransportError, ValueError):
                self._stream.reset(RESET_DROPPED)
        self._stream = None
        self._wake_all()

    # -- tunnel.splice.Ends

    async def recv(self) -> bytes:
        state = self._state
        while True:
            if self._inbox:
                data = self._inbox.popleft()
                self._inbox_bytes -= len(data) + CHUNK_OVERHEAD
                self._read_wake.set()
                if state.took(len(data), self._clock()):
                    self._write_wake.set()
                elif self._ack_timer is None:
                    self._arm_ack_timer()
                return data
            self._raise_if_over(own_abort=False)
            if state.peer_end:
                if not state.peer_end_taken:
                    state.took_end()
                    self._write_wake.set()
                    self._change.set()
                return b""
            self._recv_wake.clear()
            await self._recv_wake.wait()

    async def send(self, data: bytes) -> None:
        state = self._state
        if state.eof:
            raise TransportError(0, "send after eof()", remote=False, kind="internal")
        view = memoryview(data)
        while view:
            piece = view[:MAX_FRAME]
            view = view[MAX_FRAME:]
            while True:
                self._raise_if_over()
                if state.replay.room(len(piece)):
                    break
                self._send_wake.clear()
                await self._send_wake.wait()
            # the buffer keeps what it is given: only an immutable bytes object is kept as is
            whole = type(data) is bytes and len(piece) == len(data)
            state.replay.append(data if whole else bytes(piece))
            self._write_wake.set()

    def eof(self) -> None:
        """This direction ended cleanly: END goes after the bytes sent (on every stream until
        acknowledged)."""
        if not self._state.eof:
            self._state.eof = True
            self._write_wake.set()

    def abort(self, reason: str = "its local connection was cut") -> None:
        """Our local side broke: ABORT(reason) goes to the peer now, or on the next attach.

        It goes before data still queued (as a raw stream's reset discarded it): the peer's
        ``recv()`` raises ``PeerAborted``. ``splice`` calls it without a reason."""
        if not self._state.over():
            self._state.abort = reason
            self._wake_all()

    # -- inside

    def _raise_if_over(self, own_abort: bool = True) -> None:
        state = self._state
        if state.peer_abort is not None:
            raise PeerAborted(state.peer_abort)
        if state.cut is not None:
            raise SessionCut(state.cut)
        if own_abort and state.abort is not None:
            raise TransportError(0, "the session was aborted here", remote=False, kind="reset")

    def _wake_all(self) -> None:
        for event in (self._recv_wake, self._send_wake, self._write_wake, self._read_wake, self._change):
            event.set()

    def _arm_ack_timer(self) -> None:
        deadline = self._state.acks.deadline()
        if deadline is None:
            return

        def fire() -> None:
            self._ack_timer = None
            self._write_wake.set()

        self._ack_timer = self._loop.call_later(max(0.0, deadline - self._clock()), fire)

    def _drop_stream(self) -> None:
        """Forget the current stream (reset it) and stop its tasks; no loss is reported."""
        stream, self._stream = self._stream, None
        self._state.attached = False
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
        self._drop_stream()
        now = self._clock()
        if self._state.lost(now):
            self._loss_reason = reason
            self._log.info("session %s: stream lost (%s); holding it", self.session, reason)
            expires = self._state.hold.expires_at()
            assert expires is not None
            if self._hold_timer is not None:
                self._hold_timer.cancel()
            self._hold_timer = self._loop.call_later(max(0.0, expires - now), self._hold_ran_out)
        self._wake_all()

    def _hold_ran_out(self) -> None:
        self._hold_timer = None
        if self._state.hold_ran_out(self._clock()):
            self.give_up(hold_expired_reason(self._state.hold.hold))

    async def _read_loop(self, stream: Stream, first: bytes) -> None:
        state = self._state
        reader = FrameReader()
        data = first
        try:
            while True:
                if data:
                    for event in reader.feed(data):
                        if isinstance(event, bytes):
                            drop = state.on_data(len(event))
                            if drop:
                                event = event[drop:]
                            if event:
                                self._inbox.append(event)
                                self._inbox_bytes += len(event) + CHUNK_OVERHEAD
                                self._recv_wake.set()
                        elif event.kind == FROM:
                            assert isinstance(event.value, int)
                            state.on_from(event.value)
                        elif event.kind == ACK:
                            assert isinstance(event.value, int)
                            state.on_ack(event.value)
                            self._send_wake.set()
                            if state.end_acked:
                                self._write_wake.set()
                                self._change.set()
                        elif event.kind == END:
                            state.on_end()
                            self._recv_wake.set()
                        elif event.kind == ABORT:
                            assert isinstance(event.value, str)
                            state.on_abort(event.value)
                            self._log.info("session %s: the other end aborted: %s", self.session,
                                           state.peer_abort)
                            self._wake_all()
                            return
                while self._inbox_bytes > state.inbox_limit:  # a peer beyond its window
                    self._read_wake.clear()
                    await self._read_wake.wait()
                data = await stream.read(READ_SIZE)
                if not data:
                    if state.on_fin(reader.idle):
                        self._change.set()
                        return
                    self._stream_lost(stream, "the stream ended without END")
                    return
        except ResumeError as exc:
            self.give_up(f"the stream broke the resumable framing: {exc}")
        except (TransportError, OSError) as exc:
            self._stream_lost(stream, describe(exc))

    async def _write_loop(self, stream: Stream) -> None:
        state = self._state
        try:
            while True:
                action = state.next_write(self._clock())
                if action == WRITE_DATA:
                    batch: list[bytes | memoryview] = []
                    begin, size = state.written, 0
                    for chunk in state.replay.since(begin):
                        batch.append(chunk)
                        size += len(chunk)
                        if size >= WRITE_BATCH:
                            break
                    await stream.write(encode_data_frames(batch))
                    # an ACK meanwhile may have moved it on already (see EndState.on_ack)
                    state.written = max(state.written, begin + size)
                elif action == WRITE_FROM:
                    await stream.write(encode_from(state.written))
                    state.from_written = True
                elif action == WRITE_ACK:
                    await stream.write(encode_ack(state.acks.sent()))
                elif action == WRITE_END:
                    await stream.write(encode_end())
                    state.end_written = True
                elif action == WRITE_ABORT:
                    assert state.abort is not None
                    await stream.write(encode_abort(state.abort))
                    state.abort_written = True
                    stream.write_eof()
                    self._change.set()
                    return
                elif action == WRITE_FIN:
                    stream.write_eof()
                    self._change.set()
                    return
                elif action == WRITE_STOP:
                    return
                else:
                    if state.acks.deadline() is not None and self._ack_timer is None:
                        self._arm_ack_timer()
                    self._write_wake.clear()
                    await self._write_wake.wait()
        except (TransportError, OSError) as exc:
            self._stream_lost(stream, describe(exc))
