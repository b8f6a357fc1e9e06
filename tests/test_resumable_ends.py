"""ResumableEnds over real loopback transport streams (QUIC and TLS/TCP, in-process, no root):
byte-exact transfers through cuts at random points (a stream reset by either side, the whole
connection closed), END as the only clean end, ABORT, the hold time, the window as a memory
bound, and a resume at a wrong offset that changes nothing. Then the same ends over an in-memory
stream pair (a stale count in a header, a peer breaking the framing or its window), which also
measures the framing's own CPU cost: ``python tests/test_resumable_ends.py [MB]`` (no test
asserts a timing)."""

from __future__ import annotations

import asyncio
import hashlib
import random
import types
from collections import deque

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from transport.transport_helpers import SERVER_NAME, Transport, make_ca, make_leaf, run

from tunnel.resumable import READ_SIZE, PeerAborted, ResumableEnds
from tunnel.resume import (
    MAX_FRAME,
    ResumeError,
    SessionCut,
    encode_data,
    encode_from,
    new_secret,
    secret_digest,
    secret_matches,
)
from tunnel.splice import Ends, splice
from tunnel.transport import Stream, StreamReset, TransportError


@pytest.fixture(params=["quic", "tcp"])
def transport(request) -> Transport:
    return Transport(request.param)


@pytest.fixture(scope="module")
def pki() -> types.SimpleNamespace:
    """A throwaway fleet CA, the proxy's certificate and one device's: all a loopback pair needs."""
    import ipaddress

    from tunnel.transport import TLSIdentity

    ca = make_ca("resumable test CA")
    sans = [x509.DNSName(SERVER_NAME), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = make_leaf(ca, "proxy", eku=[ExtendedKeyUsageOID.SERVER_AUTH], sans=sans)
    device = make_leaf(ca, "device/d1", eku=[ExtendedKeyUsageOID.CLIENT_AUTH],
                       sans=[x509.UniformResourceIdentifier("spiffe://fleet.test/device/d1")])
    return types.SimpleNamespace(
        server=TLSIdentity(cert_chain=[server[0]], key=server[1], ca=ca[0]),
        device=TLSIdentity(cert_chain=[device[0]], key=device[1], ca=ca[0]),
    )


class Link:
    """One client/server connection pair that can hand out stream pairs and be replaced."""

    def __init__(self, transport, h, pki) -> None:
        self.transport, self.h, self.pki = transport, h, pki
        self.client = self.server = None

    async def connect(self) -> None:
        self.client = await self.transport.dial(self.h, self.pki.device)
        self.server = await self.h.connections.get()

    async def attach_both(self, a: ResumableEnds, b: ResumableEnds) -> tuple[int, int]:
        """A new stream pair carrying a and b, as the headers would: each end gets the other's
        ``received``; b's side passes on what it read after the 1-byte "header" as ``first``."""
        a_received, b_received = a.received, b.received
        sa = await self.client.open_stream()
        await sa.write(b"H")
        replayed_a = await a.attach(sa, b"", b_received)  # a may start writing frames at once
        sb = await self.server.accept_stream()
        got = await sb.read(65536)
        assert got[:1] == b"H"
        replayed_b = await b.attach(sb, got[1:], a_received)
        self.streams = (sa, sb)
        return replayed_a, replayed_b

    async def close(self) -> None:
        if self.client is not None:
            self.client.close()


async def send_all(ends: Ends, data: bytes, rng: random.Random, progress: list[int] | None = None) -> None:
    pos = 0
    while pos < len(data):
        n = rng.choice((1, 7, 1000, 65536, rng.randint(1, 200_000)))
        await ends.send(data[pos:pos + n])
        pos += n
        if progress is not None:
            progress[0] = pos
    ends.eof()


async def recv_all(ends: Ends) -> bytes:
    out = bytearray()
    while chunk := await ends.recv():
        out += chunk
    return bytes(out)


async def both_lost(a: ResumableEnds, b: ResumableEnds) -> tuple[str, str]:
    return tuple(await asyncio.wait_for(asyncio.gather(a.lost(), b.lost()), 10))


def test_byte_exact_both_ways_and_end_is_a_clean_eof(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s1"), ResumableEnds("s1")
            assert await link.attach_both(a, b) == (0, 0)
            rng = random.Random(1)
            up, down = rng.randbytes(3_000_000), rng.randbytes(2_000_000)
            results = await asyncio.gather(
                send_all(a, up, rng), send_all(b, down, rng), recv_all(b), recv_all(a))
            assert results[2] == up and results[3] == down
            await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
            assert a.done and b.done and (a.sent, a.received) == (len(up), len(down))
            assert await a.recv() == b""  # EOF is sticky
            sa, sb = link.streams
            await asyncio.gather(a.close(), b.close())
            # a clean end closes the stream with FINs after the frames, both ways
            assert await sb.read() == b"" and await sa.read() == b""
            await link.close()

    run(main(), timeout=60)


async def resume_forever(link: Link, a: ResumableEnds, b: ResumableEnds, log: list[str]) -> None:
    """What the dialing code does: when either end lost its stream, both re-attach on a new
    one (a new connection if the old one is gone). Runs until cancelled."""
    while True:
        done, pending = await asyncio.wait(
            [asyncio.ensure_future(a.lost()), asyncio.ensure_future(b.lost())],
            return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        log.extend(task.result() for task in done)
        a.detach("the other end lost its stream")
        b.detach("the other end lost its stream")
        if link.client.is_closed:
            await link.connect()
        await link.attach_both(a, b)


@pytest.mark.parametrize("seed", range(6))
def test_cuts_at_random_points_lose_and_repeat_nothing(pki, transport, seed):
    async def main():
        rng = random.Random(seed)
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            buffer = rng.choice((64 * 1024, 300_000, 4 * 1024 * 1024))
            a, b = ResumableEnds("s", buffer=buffer), ResumableEnds("s", buffer=buffer)
            await link.attach_both(a, b)
            losses: list[str] = []
            resumer = asyncio.create_task(resume_forever(link, a, b, losses))
            up, down = rng.randbytes(1_500_000), rng.randbytes(1_200_000)
            sent_up, sent_down = [0], [0]
            transfer = asyncio.gather(
                send_all(a, up, random.Random(seed + 100), sent_up),
                send_all(b, down, random.Random(seed + 200), sent_down),
                recv_all(b), recv_all(a))
            cuts = 0
            peak_held = 0
            cut_streams = None
            while not transfer.done() and cuts < 4:
                # cut once a random amount of either direction was handed to its end (at once
                # if that much already went: a cut right after a re-attach)
                target = rng.randint(1, 1_200_000)
                while not transfer.done() and (
                        max(sent_up[0], sent_down[0]) < target or link.streams is cut_streams):
                    peak_held = max(peak_held, a.counters["held"], b.counters["held"])
                    await asyncio.sleep(0.002)
                if transfer.done():
                    break
                how = rng.choice(("reset_a", "reset_b", "close"))
                sa, sb = cut_streams = link.streams
                if how == "reset_a":
                    sa.reset(7)
                elif how == "reset_b":
                    sb.reset(7)
                else:
                    await link.close()
                cuts += 1
            got_up, got_down = (await asyncio.wait_for(transfer, 60))[2:]
            assert hashlib.sha256(got_up).digest() == hashlib.sha256(up).digest()
            assert hashlib.sha256(got_down).digest() == hashlib.sha256(down).digest()
            assert cuts >= 1 and len(losses) >= cuts
            # memory: never more held than the window plus one chunk
            assert peak_held <= buffer + 200_000
            await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
            resumer.cancel()
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main(), timeout=120)


def test_a_cut_after_the_end_was_sent_still_ends_cleanly_once_resumed(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            await a.send(b"last words")
            a.eof()
            link.streams[1].reset(1)  # before b's application took anything
            await both_lost(a, b)
            await link.attach_both(a, b)
            assert await recv_all(b) == b"last words"
            b.eof()
            assert await recv_all(a) == b""
            await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main())


def test_abort_reaches_the_peer_as_a_reset_with_the_reason(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            await a.send(b"partial")
            a.abort()
            got = b""
            with pytest.raises(PeerAborted) as info:  # ABORT goes first: it does not wait for
                while True:                           # data still queued (a raw reset did not)
                    got += await b.recv()
            assert b"partial".startswith(got)
            assert str(info.value) == "the other end aborted the session: its local connection was cut"
            assert info.value.code == "reset"
            with pytest.raises(PeerAborted):
                await b.send(b"x")
            assert b.done
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main())


def test_abort_while_detached_goes_out_on_the_next_attach(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            link.streams[0].reset(3)
            await both_lost(a, b)
            a.abort("sshd reset the connection")
            assert await a.lost()  # aborted here, but the ABORT still needs a stream
            await link.attach_both(a, b)
            with pytest.raises(PeerAborted, match="sshd reset the connection"):
                await asyncio.wait_for(b.recv(), 10)
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main())


def test_splice_resets_the_local_side_when_the_other_end_aborts(pki, transport):
    async def main():
        accepted: asyncio.Queue = asyncio.Queue()

        async def on_client(reader, writer):
            await accepted.put((reader, writer))

        local = await asyncio.start_server(on_client, "127.0.0.1", 0)
        port = local.sockets[0].getsockname()[1]
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            from tunnel.splice import SocketEnds

            served = SocketEnds(*await accepted.get())
            spliced = asyncio.create_task(splice(served, b))
            await a.send(b"to the service")
            assert await reader.readexactly(14) == b"to the service"
            a.abort()
            result = await asyncio.wait_for(spliced, 10)
            assert result.error and "aborted" in result.error
            with pytest.raises(ConnectionResetError):  # a RST, never a clean FIN
                while await reader.read(65536):
                    pass
            writer.close()
            await asyncio.gather(a.close(), b.close())
            await link.close()
        local.close()

    run(main())


def test_hold_expiry_cuts_the_session(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s", hold=0.3), ResumableEnds("s", hold=60)
            await link.attach_both(a, b)
            await link.close()  # the connection is gone, nobody re-attaches
            await both_lost(a, b)
            with pytest.raises(SessionCut) as info:
                await asyncio.wait_for(a.recv(), 10)
            assert info.value.reason == "the tunnel was away for 0.3 s (hold time)"
            assert info.value.exit_status == 4
            with pytest.raises(SessionCut):
                await a.send(b"x")
            with pytest.raises(ResumeError) as refused:
                a.check_offset(0)
            assert refused.value.code == "resume_expired"
            await link.connect()
            with pytest.raises(SessionCut):
                await link.attach_both(a, b)
            assert b.held_for is not None and not b.done  # the other end still holds
            await asyncio.gather(a.close(), b.close())

    run(main())


def test_the_session_is_cut_by_splice_with_session_cut(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)

            class Local(Ends):
                aborted = False

                async def recv(self) -> bytes:
                    await asyncio.sleep(3600)
                    return b""

                async def send(self, data: bytes) -> None:
                    pass

                def eof(self) -> None:
                    raise AssertionError("a cut must never become a FIN")

                def abort(self) -> None:
                    self.aborted = True

            local = Local()
            spliced = asyncio.create_task(splice(local, a))
            await link.close()
            await both_lost(a, b)
            a.give_up("device d1 was locked")
            with pytest.raises(SessionCut, match="device d1 was locked"):
                await asyncio.wait_for(spliced, 10)
            assert local.aborted
            await asyncio.gather(a.close(), b.close())

    run(main())


def test_a_full_window_blocks_the_sender_until_acks(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            window = 256 * 1024
            a, b = ResumableEnds("s", buffer=window), ResumableEnds("s", buffer=window)
            await link.attach_both(a, b)
            data = random.Random(5).randbytes(4 * window)
            sender = asyncio.create_task(send_all(a, data, random.Random(6)))
            for _ in range(50):  # let it run as far as it can: b's application takes nothing
                await asyncio.sleep(0.02)
            assert not sender.done()
            counters = a.counters
            assert counters["held"] <= window + 200_000  # bounded: nothing overflows
            assert counters["acked"] == 0
            assert b.counters["inbox"] <= window + 200_000
            got = await asyncio.wait_for(recv_all(b), 30)  # taking lets acks flow again
            assert got == data
            await asyncio.wait_for(sender, 10)
            b.eof()
            assert await recv_all(a) == b""
            await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
            assert a.counters["held"] == 0
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main(), timeout=60)


def test_a_small_transfer_is_acknowledged_by_the_timer(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            await a.send(b"ten bytes!")
            assert await b.recv() == b"ten bytes!"
            for _ in range(1000):  # the 0.2 s ack timer; a loaded machine may take longer
                if a.counters["acked"] == 10:
                    break
                await asyncio.sleep(0.02)
            assert a.counters["acked"] == 10 and a.counters["held"] == 0
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main())


def test_a_resume_at_a_wrong_offset_is_refused_and_changes_nothing(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            await a.send(b"0123456789" * 1000)
            first = await b.recv()
            link.streams[0].reset(2)
            await both_lost(a, b)
            await a.send(b"more while away")
            before = dict(a.counters)
            # a peer claiming more than was ever sent, or less than it already acknowledged
            bad = [a.sent + 1, 10**12]
            if before["acked"] > 0:
                bad.append(before["acked"] - 1)
            for offset in bad:
                with pytest.raises(ResumeError) as info:
                    a.check_offset(offset)
                assert info.value.code == "resume_offset"
                with pytest.raises(ResumeError) as info:
                    await a.attach(Untouchable(), b"", offset)
                assert info.value.code == "resume_offset"
                assert a.counters == before and not a.attached and not a.done
            await link.attach_both(a, b)  # the right offsets: all arrives, once
            a.eof()
            rest = await recv_all(b)
            assert first + rest == b"0123456789" * 1000 + b"more while away"
            b.eof()
            await recv_all(a)
            await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main())


class Untouchable(Stream):
    """A stream a refused attach must not touch (not even to reset it)."""

    id, bytes_sent, bytes_received = 0, 0, 0

    async def read(self, max_bytes: int = 65536) -> bytes:
        raise AssertionError("read")

    async def write(self, data: bytes) -> None:
        raise AssertionError("write")

    def write_eof(self) -> None:
        raise AssertionError("write_eof")

    def reset(self, code: int = 0) -> None:
        raise AssertionError("reset")


def test_attaching_over_a_live_stream_drops_it_and_detach_starts_the_hold(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            await a.send(b"x" * 100_000)
            b.detach("the other end re-attached")
            a.detach()
            assert await b.lost() == "the other end re-attached"
            assert b.held_for is not None
            await link.attach_both(a, b)
            a.eof()
            assert await recv_all(b) == b"x" * 100_000
            b.eof()
            await recv_all(a)
            await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
            await asyncio.gather(a.close(), b.close())
            await link.close()

    run(main())


def test_close_leaves_no_task_behind(pki, transport):
    async def main():
        async with transport.server(pki) as h:
            link = Link(transport, h, pki)
            await link.connect()
            before = set(asyncio.all_tasks())
            a, b = ResumableEnds("s"), ResumableEnds("s")
            await link.attach_both(a, b)
            await a.send(b"y" * 1000)
            await asyncio.gather(a.close(), b.close())
            left = {t for t in asyncio.all_tasks() - before if "resume" in t.get_name()}
            assert not left
            with pytest.raises(SessionCut):
                await a.recv()
            await link.close()

    run(main())


def test_a_forged_or_replayed_secret_is_refused():
    secret = new_secret()
    digest = secret_digest(secret)  # what the agent keeps of session 1
    assert secret_matches(secret, digest)
    other_session = new_secret()
    assert not secret_matches(other_session, digest)  # another session's secret, replayed
    assert not secret_matches(secret[:-2] + "AA" if not secret.endswith("AA") else secret[:-2] + "BB", digest)


# -- an in-memory stream pair: the framing alone, without a transport under it ---------------


class _Pipe:
    """One direction of an in-memory stream: chunks kept as written, bounded like a window."""

    def __init__(self, limit: int) -> None:
        self.chunks: deque[bytes] = deque()
        self.size, self.limit = 0, limit
        self.eof = False
        self.error: Exception | None = None
        self.readable, self.writable = asyncio.Event(), asyncio.Event()


class MemoryStream(Stream):
    """A ``Stream`` over two in-memory pipes, with the real one's behaviour where the ends can
    see it: reads up to ``max_bytes``, b"" at FIN, writes wait above the high-water mark, a
    write after ``write_eof`` is an error, ``reset`` fails both directions at both ends."""

    def __init__(self, inbound: _Pipe, outbound: _Pipe) -> None:
        self.id, self.bytes_sent, self.bytes_received = 0, 0, 0
        self._in, self._out = inbound, outbound

    async def read(self, max_bytes: int = 65536) -> bytes:
        pipe = self._in
        while True:
            if pipe.error is not None:
                raise pipe.error
            if pipe.chunks:
                chunk = pipe.chunks.popleft()
                if len(chunk) > max_bytes:
                    pipe.chunks.appendleft(chunk[max_bytes:])
                    chunk = chunk[:max_bytes]
                pipe.size -= len(chunk)
                self.bytes_received += len(chunk)
                pipe.writable.set()
                return chunk
            if pipe.eof:
                return b""
            pipe.readable.clear()
            await pipe.readable.wait()

    async def write(self, data: bytes) -> None:
        pipe = self._out
        while True:
            if pipe.error is not None:
                raise pipe.error
            if pipe.eof:
                raise TransportError(0, "write after write_eof()", remote=False, kind="internal")
            if pipe.size < pipe.limit:
                break
            pipe.writable.clear()
            await pipe.writable.wait()
        pipe.chunks.append(data)
        pipe.size += len(data)
        self.bytes_sent += len(data)
        pipe.readable.set()

    def write_eof(self) -> None:
        self._out.eof = True
        self._out.readable.set()

    def reset(self, code: int = 0) -> None:
        for pipe in (self._in, self._out):
            if pipe.error is None:
                pipe.error = StreamReset(code, "reset", remote=True)
            pipe.readable.set()
            pipe.writable.set()


def memory_pair(limit: int = 1024 * 1024) -> tuple[MemoryStream, MemoryStream]:
    ab, ba = _Pipe(limit), _Pipe(limit)
    return MemoryStream(ba, ab), MemoryStream(ab, ba)


def test_over_an_in_memory_pair_too_with_a_cut():
    async def main():
        a, b = ResumableEnds("m", buffer=512 * 1024), ResumableEnds("m", buffer=512 * 1024)
        sa, sb = memory_pair()
        await a.attach(sa, b"", 0)
        await b.attach(sb, b"", 0)
        data = random.Random(9).randbytes(3_000_000)
        sending = asyncio.create_task(send_all(a, data, random.Random(10)))
        got = bytearray(await b.recv())
        while len(got) < 1_000_000:
            got += await b.recv()
        sb.reset(9)
        await both_lost(a, b)
        sa, sb = memory_pair()
        a_received, b_received = a.received, b.received
        await a.attach(sa, b"", b_received)
        await b.attach(sb, b"", a_received)
        got += await recv_all(b)
        assert bytes(got) == data
        await sending
        b.eof()
        assert await recv_all(a) == b""
        await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
        await asyncio.gather(a.close(), b.close())

    run(main())


@pytest.mark.parametrize("garbage, what", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "unknown frame type"),  # a raw stream where frames were agreed
    (bytes([2, 0, 0, 0, 8]) + (10**9).to_bytes(8, "big"), "acknowledgement of 1000000000 bytes"),
    (bytes([5, 0, 0, 0, 8]) + bytes(8) + bytes([3, 0, 0, 0, 0, 1, 0, 0, 0, 1]) + b"x", "DATA after END"),
    (bytes([1, 0, 0, 0, 1]) + b"x", "DATA before FROM"),
    (bytes([5, 0, 0, 0, 8]) + (7).to_bytes(8, "big"), "resumes at byte 7, this end has 0"),
])
def test_a_peer_breaking_the_framing_cuts_the_session(garbage, what):
    async def main():
        a = ResumableEnds("m")
        sa, sb = memory_pair()
        await a.attach(sa, b"", 0)
        await a.send(b"hello")
        await sb.write(garbage)
        with pytest.raises(SessionCut) as info:
            await asyncio.wait_for(a.recv(), 10)
        assert "resumable framing" in info.value.reason and what in info.value.reason
        assert not a.attached and a.done
        with pytest.raises(TransportError):  # the stream was reset, not ended
            while await sb.read():
                pass
        await a.close()

    run(main())


def test_a_stale_count_in_a_header_still_delivers_every_byte_once():
    # the race FROM closes: an end tells the peer its count, then its old stream (not yet
    # noticed as lost) delivers more; the peer replays from the told count
    async def main():
        a, b = ResumableEnds("m"), ResumableEnds("m")
        sa, sb = memory_pair(limit=64 * 1024)  # a small window: delivery goes in steps
        await a.attach(sa, b"", 0)
        await b.attach(sb, b"", 0)
        data = random.Random(12).randbytes(1_500_000)
        for at in range(0, 1_000_000, 50_000):
            await a.send(data[at:at + 50_000])
        while b.received == 0:
            await asyncio.sleep(0)
        told = b.received  # the header b's side sends now
        while b.received == told:  # b's old stream goes on delivering
            await asyncio.sleep(0)
        assert told < b.received < 1_000_000
        sa2, sb2 = memory_pair()
        await a.attach(sa2, b"", told)  # a replays from what b said
        await b.attach(sb2, b"", a.received)  # (b drops the old stream here)
        await a.send(data[1_000_000:])
        a.eof()
        assert await recv_all(b) == data
        b.eof()
        assert await recv_all(a) == b""
        await asyncio.wait_for(asyncio.gather(a.finished(), b.finished()), 10)
        await asyncio.gather(a.close(), b.close())

    run(main())


def test_held_for_follows_the_injected_clock():
    async def main():
        now = [100.0]
        a = ResumableEnds("m", clock=lambda: now[0])
        assert a.held_for is None  # not attached yet: nothing is held
        sa, sb = memory_pair()
        await a.attach(sa, b"", 0)
        assert a.held_for is None
        sb.reset(1)
        assert await a.lost() == "stream reset by peer: code 1: reset"
        now[0] = 142.5
        assert a.held_for == 42.5 and not a.done
        sa, sb = memory_pair()
        await a.attach(sa, b"", 0)
        assert a.held_for is None
        await a.close()

    run(main())


def test_a_peer_beyond_its_window_is_not_read_past_ours():
    async def main():
        window = 256 * 1024
        a = ResumableEnds("m", buffer=window)
        sa, sb = memory_pair(limit=64 * 1024)
        await a.attach(sa, b"", 0)
        frame = encode_data(bytes(60_000))
        await sb.write(encode_from(0))
        flood = asyncio.create_task(_write_forever(sb, frame))
        for _ in range(50):
            await asyncio.sleep(0.01)
        assert not flood.done()  # blocked: the stream's own flow control holds the rest
        assert window + MAX_FRAME < a.counters["inbox"] <= window + MAX_FRAME + READ_SIZE
        assert len(await a.recv()) == 60_000  # taking makes room again
        flood.cancel()
        await a.close()

    run(main())


async def _write_forever(stream: Stream, frame: bytes) -> None:
    while True:
        await stream.write(frame)


async def _cpu_per_mb(total: int, framed: bool) -> float:
    """CPU milliseconds per MB to move ``total`` bytes one way in 64 KiB chunks over an
    in-memory pair: through two ResumableEnds (framed) or two raw StreamEnds."""
    import time

    from tunnel.splice import StreamEnds

    sa, sb = memory_pair()
    if framed:
        a, b = ResumableEnds("bench"), ResumableEnds("bench")
        await a.attach(sa, b"", 0)
        await b.attach(sb, b"", 0)
        sender, receiver = a, b
    else:
        sender, receiver = StreamEnds(sa), StreamEnds(sb)
    chunk = bytes(64 * 1024)

    async def send() -> None:
        for _ in range(total // len(chunk)):
            await sender.send(chunk)
        sender.eof()

    async def receive() -> int:
        n = 0
        while data := await receiver.recv():
            n += len(data)
        return n

    start = time.process_time()
    _, n = await asyncio.gather(send(), receive())
    cpu = time.process_time() - start
    assert n == total
    if framed:
        await asyncio.gather(a.close(), b.close())
    return cpu * 1000 / (total / 1e6)


if __name__ == "__main__":
    # python tests/test_resumable_ends.py [MB]: the framing's CPU cost per MB (report it; the
    # tests above assert no timing)
    import sys

    megabytes = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    for framed in (False, True, False, True):
        ms = asyncio.run(_cpu_per_mb(megabytes * 1024 * 1024, framed))
        print(f"{'framed (ResumableEnds)' if framed else 'raw (StreamEnds)':24} {ms:.3f} CPU-ms/MB")
