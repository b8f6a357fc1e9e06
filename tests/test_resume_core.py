"""The resumable-stream decisions without sockets (``tunnel/resume.py``): frames in any split,
bad frames refused with a code, the replay buffer's offsets and bounds, when acks go out, the
hold time on an injected clock, and the resume secret."""

from __future__ import annotations

import random
import struct

import pytest

from enroll.errors import EXIT_CUT, FleetError
from tunnel.resume import (
    ABORT,
    ACK,
    ACK_BYTES,
    ACK_INTERVAL,
    ATTACHED,
    CHUNK_OVERHEAD,
    CODES,
    DATA,
    END,
    EXPIRED,
    FROM,
    HELD,
    MAX_FRAME,
    MAX_REASON,
    WRITE_ABORT,
    WRITE_ACK,
    WRITE_DATA,
    WRITE_END,
    WRITE_FIN,
    WRITE_FROM,
    WRITE_STOP,
    AckPolicy,
    EndState,
    Frame,
    FrameReader,
    Hold,
    ReplayBuffer,
    ResumeError,
    SessionCut,
    encode_abort,
    encode_ack,
    encode_data,
    encode_data_frames,
    encode_end,
    encode_from,
    hold_expired_reason,
    new_secret,
    secret_digest,
    secret_matches,
)


def _decode(stream: bytes, cuts: list[int]) -> list[object]:
    """Feed ``stream`` cut at ``cuts``; DATA pieces joined back so splits do not matter."""
    reader = FrameReader()
    out: list[object] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        for event in reader.feed(stream[last:cut]):
            if isinstance(event, bytes) and out and isinstance(out[-1], bytes):
                out[-1] += event
            elif isinstance(event, bytes):
                out.append(bytes(event))
            else:
                out.append(event)
        last = cut
    assert reader.idle
    return out


FRAMES = [
    (encode_data(b"hello"), b"hello"),
    (encode_ack(2**40 + 3), Frame(ACK, 2**40 + 3)),
    (encode_data(b""), None),  # an empty DATA frame carries nothing
    (encode_data(bytes(range(256)) * 300), bytes(range(256)) * 300),
    (encode_abort("sshd reset the connection ✗"), Frame(ABORT, "sshd reset the connection ✗")),
    (encode_end(), Frame(END)),
]


def test_frames_decode_the_same_whatever_the_split():
    stream = b"".join(frame for frame, _ in FRAMES)
    # expected: adjacent DATA joined (offsets are implicit, frame boundaries carry nothing)
    expected: list[object] = []
    for _, event in FRAMES:
        if event is None:
            continue
        if isinstance(event, bytes) and expected and isinstance(expected[-1], bytes):
            expected[-1] += event
        else:
            expected.append(event)
    rng = random.Random(17)
    splits = [[], list(range(1, len(stream))), [1, 2, 3, 4, 5, 6]]  # whole, byte by byte, header cut
    splits += [sorted(rng.sample(range(1, len(stream)), rng.randint(1, 40))) for _ in range(200)]
    for cuts in splits:
        assert _decode(stream, cuts) == expected, cuts


def test_a_batch_of_data_frames_is_the_frames_one_after_another():
    chunks = [b"a" * 10, memoryview(b"xbcd")[1:], b"", b"z" * 70_000]
    assert encode_data_frames(chunks) == b"".join(encode_data(c) for c in chunks)
    assert _decode(encode_data_frames(chunks), [3, 17, 40]) == [b"a" * 10 + b"bcd" + b"z" * 70_000]


def test_data_is_handed_on_before_its_frame_is_complete():
    reader = FrameReader()
    frame = encode_data(b"x" * 1000)
    assert reader.feed(frame[:105]) == [b"x" * 100]
    assert not reader.idle
    assert reader.feed(frame[105:]) == [b"x" * 900]
    assert reader.idle


@pytest.mark.parametrize("raw, what", [
    (struct.pack("!BI", 9, 0), "unknown frame type 9"),
    (struct.pack("!BI", 0, 0), "unknown frame type 0"),
    (struct.pack("!BI", DATA, MAX_FRAME + 1), "DATA frame of"),
    (struct.pack("!BI", ACK, 4) + b"\0" * 4, "ACK frame of 4 bytes"),
    (struct.pack("!BI", END, 1) + b"x", "END frame with 1 bytes"),
    (struct.pack("!BI", ABORT, 2) + b"\xff\xfe", "not UTF-8"),
    (struct.pack("!BI", ABORT, MAX_REASON + 1), "ABORT frame of"),  # refused before it arrives
    (struct.pack("!BI", ACK, 2**31), "ACK frame of"),
    (b"SSH-2.0-OpenSSH_9.6\r\n", "unknown frame type 83"),  # a raw stream read as frames
])
def test_bad_frames_are_refused_with_a_code(raw, what):
    reader = FrameReader()
    with pytest.raises(ResumeError) as info:
        reader.feed(raw)
    assert info.value.code == "resume_frame" and what in str(info.value)
    assert isinstance(info.value, FleetError) and info.value.exit_status == EXIT_CUT
    with pytest.raises(ResumeError):  # broken for good: nothing after it is believed
        reader.feed(encode_end())


def test_a_bad_frame_after_good_ones_in_one_read_still_raises():
    with pytest.raises(ResumeError):
        FrameReader().feed(encode_data(b"ok") + encode_end() + struct.pack("!BI", 7, 0))


def test_an_abort_reason_is_cut_on_a_character_boundary():
    frame = encode_abort("é" * MAX_REASON)
    (event,) = FrameReader().feed(frame)
    assert isinstance(event, Frame) and event.value == "é" * (MAX_REASON // 2)


# -- the replay buffer ----------------------------------------------------------------------


def _contents(buffer: ReplayBuffer, offset: int) -> bytes:
    return b"".join(bytes(c) for c in buffer.since(offset))


def test_replay_buffer_keeps_chunks_trims_on_ack_and_replays_from_any_offset():
    buffer = ReplayBuffer(limit=100)
    sent = b""
    for chunk in (b"abc", b"defgh", b"i", b"jklmnop"):
        buffer.append(chunk)
        sent += chunk
    assert (buffer.start, buffer.end, buffer.held) == (0, 16, 16)
    for offset in range(0, 17):
        assert _contents(buffer, offset) == sent[offset:]
    assert buffer.ack(4) == 4  # into the second chunk
    assert (buffer.start, buffer.held) == (4, 12)
    for offset in range(4, 17):
        assert _contents(buffer, offset) == sent[offset:]
    assert buffer.ack(3) == 0 and buffer.ack(4) == 0  # late acks change nothing
    assert buffer.ack(9) == 5 and _contents(buffer, 9) == sent[9:]
    assert buffer.ack(16) == 7 and buffer.held == 0 and buffer.since(16) == []


def test_replay_from_the_end_of_the_last_chunk_copies_nothing():
    buffer = ReplayBuffer()
    chunk = b"z" * 65536
    buffer.append(b"a" * 10)
    buffer.append(chunk)
    (only,) = buffer.since(10)
    assert only is chunk


@pytest.mark.parametrize("acked, sent, offset, ok", [
    (0, 10, 0, True), (0, 10, 10, True), (0, 10, 11, False),
    (4, 10, 3, False), (4, 10, 4, True), (10, 10, 10, True), (10, 10, 9, False),
    (0, 0, 0, True), (0, 0, 1, False),
])
def test_an_offset_outside_the_buffer_is_resume_offset(acked, sent, offset, ok):
    buffer = ReplayBuffer()
    buffer.append(b"x" * sent)
    buffer.ack(acked)
    before = (buffer.start, buffer.end)
    if ok:
        buffer.check(offset)
        assert _contents(buffer, offset) == b"x" * (sent - offset)
    else:
        for call in (buffer.check, buffer.since):
            with pytest.raises(ResumeError) as info:
                call(offset)
            assert info.value.code == "resume_offset"
    assert (buffer.start, buffer.end) == before  # nothing changed either way


def test_an_ack_beyond_what_was_sent_is_a_broken_peer():
    buffer = ReplayBuffer()
    buffer.append(b"12345")
    with pytest.raises(ResumeError) as info:
        buffer.ack(6)
    assert info.value.code == "resume_frame"
    assert (buffer.start, buffer.end) == (0, 5)


def test_the_buffer_is_the_send_window():
    o = CHUNK_OVERHEAD  # what each held chunk costs besides its bytes
    buffer = ReplayBuffer(limit=10 + 2 * o)
    assert buffer.room(64 + 10 * o)  # an empty buffer takes one chunk of any size, alone
    buffer.append(b"x" * 6)
    assert buffer.room(4) and not buffer.room(5)  # two chunks held: 6 + 4 bytes + 2 overheads
    buffer.append(b"y" * 4)
    assert not buffer.room(1)
    buffer.ack(6)  # the first chunk goes, and its overhead with it
    assert buffer.room(6) and not buffer.room(7)
    with pytest.raises(ValueError):
        ReplayBuffer(limit=0)


def test_tiny_chunks_cost_their_overhead_so_memory_stays_near_the_window():
    """A local service (or a peer) writing one byte at a time must not make the buffer hold
    ~40 times its window in memory: each chunk is charged CHUNK_OVERHEAD."""
    buffer = ReplayBuffer(limit=64 * 1024)
    while buffer.room(1):
        buffer.append(b"x")
    assert buffer.held * (1 + CHUNK_OVERHEAD) <= 64 * 1024 + 1 + CHUNK_OVERHEAD


def test_random_appends_acks_and_replays_agree_with_a_plain_bytes_model():
    rng = random.Random(4)
    for _ in range(50):
        buffer, model, start = ReplayBuffer(limit=1 << 20), b"", 0
        for _ in range(200):
            if rng.random() < 0.5:
                chunk = rng.randbytes(rng.randint(0, 300))
                buffer.append(chunk)
                model += chunk
            else:
                start = rng.randint(start, len(model))
                buffer.ack(start)
            offset = rng.randint(start, len(model))
            assert _contents(buffer, offset) == model[offset:]
            assert (buffer.start, buffer.end) == (start, len(model))


# -- acknowledgements -----------------------------------------------------------------------


def test_acks_go_every_256_kib_taken():
    acks = AckPolicy()
    assert not acks.took(ACK_BYTES - 1, now=0.0)
    assert acks.took(1, now=0.0)
    assert acks.sent() == ACK_BYTES
    assert acks.deadline() is None and not acks.due(100.0)


def test_acks_go_0_2_s_after_the_first_unacknowledged_byte():
    acks = AckPolicy()
    assert acks.deadline() is None
    assert not acks.took(10, now=5.0)
    assert not acks.took(10, now=5.1)  # the deadline does not move with later bytes
    assert acks.deadline() == pytest.approx(5.0 + ACK_INTERVAL)
    assert not acks.due(5.0 + ACK_INTERVAL - 0.01)
    assert acks.due(5.0 + ACK_INTERVAL)
    assert acks.sent() == 20
    assert not acks.took(0, now=9.0) and acks.deadline() is None


def test_the_end_is_acknowledged_at_once_one_past_the_bytes():
    acks = AckPolicy()
    acks.took(7, now=0.0)
    assert acks.took_end()
    assert acks.due(0.0) and acks.sent() == 8
    assert not acks.due(100.0)


def test_a_new_stream_gets_the_count_again_at_once():
    acks = AckPolicy()
    acks.again()
    assert not acks.due(0.0)  # nothing taken: nothing to say
    acks.took(5, now=0.0)
    acks.took_end()
    assert acks.sent() == 6
    acks.again()  # the ACK of the END may have died with the old stream
    assert acks.due(0.0) and acks.sent() == 6 and not acks.due(0.0)


# -- hold time ------------------------------------------------------------------------------


@pytest.mark.parametrize("lost_at, now, state, held", [
    (None, 50.0, ATTACHED, None),
    (10.0, 10.0, HELD, 0.0),
    (10.0, 609.9, HELD, 599.9),
    (10.0, 610.0, EXPIRED, 600.0),
    (10.0, 5000.0, EXPIRED, 4990.0),
])
def test_hold_states_on_an_injected_clock(lost_at, now, state, held):
    hold = Hold(600.0)
    if lost_at is not None:
        hold.lost(lost_at)
        hold.lost(lost_at + 1)  # a second loss report keeps the first time
    assert hold.state(now) == state
    assert hold.held_for(now) == (None if held is None else pytest.approx(held))
    hold.attached()
    assert hold.state(now) == ATTACHED and hold.expires_at() is None


def test_a_zero_hold_expires_at_once_and_a_negative_one_is_refused():
    hold = Hold(0)
    hold.lost(3.0)
    assert hold.state(3.0) == EXPIRED
    with pytest.raises(ValueError):
        Hold(-1)


@pytest.mark.parametrize("hold, text", [(600, "10 min"), (90, "90 s"), (7200, "2 h"), (0.5, "0.5 s")])
def test_the_hold_expired_reason_reads_well(hold, text):
    assert hold_expired_reason(hold) == f"the tunnel was away for {text} (hold time)"


def test_errors_have_codes_and_the_cut_status():
    assert set(CODES) >= {"resume_unknown", "resume_secret", "resume_identity", "resume_offset",
                          "resume_expired"}
    for code in CODES:
        assert ResumeError(code, "x").code == code
    cut = SessionCut("the tunnel was away for 10 min (hold time)")
    assert (cut.code, cut.exit_status, str(cut)) == ("cut", EXIT_CUT, cut.reason)


# -- secrets --------------------------------------------------------------------------------


def test_secrets_are_fresh_43_char_urlsafe_and_kept_as_a_digest():
    made = {new_secret() for _ in range(100)}
    assert len(made) == 100
    for secret in made:
        assert len(secret) == 43 and set(secret) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        digest = secret_digest(secret)
        assert len(digest) == 32 and secret.encode() not in digest
        assert secret_matches(secret, digest)


def test_a_forged_or_other_sessions_secret_does_not_match():
    secret, other = new_secret(), new_secret()
    digest = secret_digest(secret)
    flipped = ("A" if secret[0] != "A" else "B") + secret[1:]
    for forged in (other, flipped, secret[:-1], secret + "A", "", None, 42, b"x" * 43,
                   secret.upper() if secret.upper() != secret else secret.lower(),
                   "!" * 43, digest.hex()):
        assert not secret_matches(forged, digest), forged
    assert not secret_matches(secret, secret_digest(other))


# -- one end's state: what the writer does next, and two ends simulated without sockets -----


def test_next_write_in_order_of_priority():
    state = EndState(buffer=1000)
    state.attach(0)
    assert state.next_write(0.0) == WRITE_FROM  # every stream starts with the offset
    state.from_written = True
    state.on_from(0)
    assert state.next_write(0.0) is None  # nothing to say
    state.replay.append(b"abc")
    assert state.next_write(0.0) == WRITE_DATA
    state.written = 3
    state.eof = True
    assert state.next_write(0.0) == WRITE_END
    state.end_written = True
    assert state.next_write(0.0) is None
    state.on_data(5)
    state.took(5, now=1.0)
    assert state.next_write(1.0) is None and state.next_write(1.0 + ACK_INTERVAL) == WRITE_ACK
    state.replay.append(b"more")  # (after eof only in this table) an ACK goes before DATA
    assert state.next_write(2.0) == WRITE_ACK
    state.acks.sent()
    assert state.next_write(2.0) == WRITE_DATA
    state.abort = "sshd reset"
    assert state.next_write(2.0) == WRITE_ABORT  # before anything else
    state.abort_written = True
    assert state.next_write(2.0) == WRITE_STOP


def test_a_finished_end_says_its_last_ack_then_fin():
    state = EndState()
    state.attach(0)
    state.replay.append(b"hi")
    state.written, state.eof, state.end_written, state.from_written = 2, True, True, True
    state.on_ack(3)  # 2 bytes and the END
    assert state.end_acked and state.replay.held == 0
    state.on_end()
    assert not state.finished_cleanly() and state.needs_stream()
    state.took_end()
    assert state.finished_cleanly() and not state.needs_stream()
    assert state.next_write(0.0) == WRITE_ACK  # the peer must learn we took its END
    assert state.acks.sent() == 1
    assert state.next_write(0.0) == WRITE_FIN
    assert not state.on_fin(between_frames=False)  # a FIN inside a frame is no clean close
    assert state.on_fin(between_frames=True) and state.settled


@pytest.mark.parametrize("setup, needs", [
    (lambda s: None, True),
    (lambda s: setattr(s, "cut", "locked"), False),
    (lambda s: s.on_abort(""), False),
    (lambda s: setattr(s, "abort", "reset"), True),  # the ABORT still has to go out
    (lambda s: (setattr(s, "abort", "reset"), setattr(s, "abort_written", True)), False),
    (lambda s: setattr(s, "closed", True), False),
])
def test_a_lost_stream_is_held_only_when_a_new_one_would_do_something(setup, needs):
    state = EndState(hold=30)
    state.attach(0)
    setup(state)
    assert state.lost(now=5.0) is needs
    assert state.hold.state(5.0) == (HELD if needs else ATTACHED)
    assert state.hold_ran_out(35.0) is needs


def test_from_drops_what_this_end_has_and_refuses_a_gap():
    state = EndState()
    state.attach(0)
    with pytest.raises(ResumeError) as info:
        state.on_data(3)  # every stream starts with FROM
    assert info.value.code == "resume_frame"
    state.on_from(0)
    assert state.on_data(10) == 0 and state.received == 10
    state.lost(1.0)
    state.on_data(5)  # the old stream delivered more after this end told the peer 10
    state.attach(0)
    state.on_from(10)  # the peer replays from the 10 it was told
    assert state.on_data(3) == 3 and state.on_data(4) == 2  # 5 dropped, then new bytes
    assert state.received == 17
    state.on_end()
    assert state.on_data(0) == 0
    state.attach(0)
    state.on_from(12)
    assert state.on_data(5) == 5  # a replay of bytes before the END: dropped, not an error
    with pytest.raises(ResumeError, match="DATA after END"):
        state.on_data(1)
    gap = EndState()
    gap.attach(0)
    with pytest.raises(ResumeError) as info:
        gap.on_from(1)
    assert info.value.code == "resume_offset" and "would be lost" in str(info.value)


def test_a_cut_session_refuses_an_attach_as_expired():
    state = EndState()
    assert state.give_up("the tunnel was away for 10 min (hold time)")
    assert not state.give_up("again")  # the first reason stays
    with pytest.raises(ResumeError) as info:
        state.attach(0)
    assert info.value.code == "resume_expired" and "hold time" in str(info.value)
    assert state.next_write(0.0) == WRITE_STOP and state.over()


def test_a_peer_abort_gets_a_reason_even_empty():
    state = EndState()
    state.on_abort("")
    assert state.peer_abort == "no reason given" and state.over()


def test_an_end_ack_without_our_end_is_a_broken_peer():
    state = EndState()
    state.replay.append(b"12")
    with pytest.raises(ResumeError):
        state.on_ack(3)  # one past the bytes means END taken: but no END was sent


class _SimEnd:
    """One end in the pure simulation: its state, the application's data, the wire it writes."""

    def __init__(self, data: bytes, buffer: int) -> None:
        self.state = EndState(buffer=buffer, hold=1e9)
        self.data, self.pos = data, 0
        self.inbox: list[bytes] = []
        self.got = bytearray()
        self.wire = bytearray()  # written, not yet delivered
        self.reader = FrameReader()
        self.fin = False

    def app_send(self, rng: random.Random) -> None:
        if self.pos < len(self.data):
            n = rng.randint(1, 700)
            if self.state.replay.room(n):
                self.state.replay.append(self.data[self.pos:self.pos + n])
                self.pos += n
        elif not self.state.eof:
            self.state.eof = True

    def app_take(self, now: float) -> None:
        if self.inbox:
            chunk = self.inbox.pop(0)
            self.got += chunk
            self.state.took(len(chunk), now)
        elif self.state.peer_end:
            self.state.took_end()

    def write(self, now: float) -> None:
        state = self.state
        if not state.attached or self.fin:
            return
        action = state.next_write(now)
        if action == WRITE_FROM:
            self.wire += encode_from(state.written)
            state.from_written = True
        elif action == WRITE_DATA:
            for chunk in state.replay.since(state.written):
                self.wire += encode_data(chunk)
                state.written += len(chunk)
        elif action == WRITE_ACK:
            self.wire += encode_ack(state.acks.sent())
        elif action == WRITE_END:
            self.wire += encode_end()
            state.end_written = True
        elif action == WRITE_FIN:
            self.fin = True

    def deliver(self, peer: _SimEnd, size: int) -> None:
        chunk, self.wire[:size] = bytes(self.wire[:size]), b""
        for event in peer.reader.feed(chunk):
            if isinstance(event, bytes):
                drop = peer.state.on_data(len(event))
                if drop < len(event):
                    peer.inbox.append(event[drop:])
            elif event.kind == FROM:
                peer.state.on_from(event.value)
            elif event.kind == ACK:
                peer.state.on_ack(event.value)
            elif event.kind == END:
                peer.state.on_end()


@pytest.mark.parametrize("seed", range(40))
def test_two_ends_through_random_cuts_deliver_every_byte_once(seed):
    rng = random.Random(seed)
    buffer = rng.choice((700, 2000, 10_000))
    a = _SimEnd(rng.randbytes(rng.randint(0, 30_000)), buffer)
    b = _SimEnd(rng.randbytes(rng.randint(0, 30_000)), buffer)
    a.state.attach(0)
    b.state.attach(0)
    now, cuts = 0.0, 0
    for _ in range(100_000):
        if a.state.finished_cleanly() and b.state.finished_cleanly():
            break
        now += 0.01
        end, peer = (a, b) if rng.random() < 0.5 else (b, a)
        step = rng.random()
        if step < 0.25:
            end.app_send(rng)
        elif step < 0.5:
            end.app_take(now)
        elif step < 0.75:
            end.write(now)
        elif step < 0.995:
            end.deliver(peer, rng.randint(1, 3000))
        else:  # the stream is lost with whatever was in flight
            cuts += 1
            for one in (a, b):
                one.state.lost(now)
            a_received, b_received = a.state.received, b.state.received  # the headers
            if rng.random() < 0.5:  # the old streams still deliver after the headers were read
                for one, other in ((a, b), (b, a)):
                    if one.wire:
                        one.deliver(other, rng.randint(1, len(one.wire)))
            for one in (a, b):
                one.wire.clear()
                one.reader = FrameReader()
                one.fin = False
            assert a.state.attach(b_received) == a.state.sent - b_received
            assert b.state.attach(a_received) == b.state.sent - a_received
        for one in (a, b):  # the window bounds what is held, whatever happens
            assert one.state.replay.held <= buffer + 700
    assert a.state.finished_cleanly() and b.state.finished_cleanly(), (seed, cuts)
    assert bytes(b.got) == a.data and bytes(a.got) == b.data
