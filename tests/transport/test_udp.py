"""UDP I/O of the QUIC transport: send grouping (pure), GSO on and off, batched reads, buffers."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest
from fleet_harness import missing_peer
from transport_helpers import ALPN, SERVER_NAME, read_all, run, running_server

from tunnel.transport import connect, udp
from tunnel.transport.udp import DatagramEndpoint, Send, buffer_advice, plan_sends

A = ("127.0.0.1", 1)
B = ("127.0.0.1", 2)


def _d(size: int, tag: int = 0) -> bytes:
    return bytes([tag % 256]) * size


# ------------------------------------------------------------------------------ pure


def test_plan_without_gso_is_one_send_per_datagram():
    dgrams = [(_d(1200), A), (_d(1200), A), (_d(50), B)]
    assert plan_sends(dgrams, gso=False) == [Send(A, (d,)) for d, _ in dgrams[:2]] + [
        Send(B, (dgrams[2][0],))
    ]


def test_plan_groups_equal_sizes_to_one_address_with_a_short_last_one():
    big, small = _d(1200), _d(300)
    plan = plan_sends([(big, A)] * 3 + [(small, A), (big, A)], gso=True)
    assert plan == [Send(A, (big, big, big, small), 1200), Send(A, (big,))]


def test_plan_breaks_on_address_change_larger_datagram_and_limits():
    big, bigger = _d(1200), _d(1400)
    plan = plan_sends([(big, A), (big, B), (big, B), (bigger, B)], gso=True)
    assert plan == [Send(A, (big,)), Send(B, (big, big), 1200), Send(B, (bigger,))]
    many = plan_sends([(big, A)] * 70, gso=True, max_segments=64, max_bytes=10**6)
    assert [len(s.payloads) for s in many] == [64, 6]
    by_bytes = plan_sends([(big, A)] * 70, gso=True, max_bytes=12000)
    assert all(len(s.payloads) * 1200 <= 12000 for s in by_bytes)
    assert sum(len(s.payloads) for s in by_bytes) == 70


def test_plan_keeps_order_and_every_datagram():
    sizes = [1200, 1200, 90, 1200, 1452, 1452, 1452, 1200, 1200, 1200, 7]
    dgrams = [(_d(n, i), A if i % 5 else B) for i, n in enumerate(sizes)]
    flat = [(p, s.addr) for s in plan_sends(dgrams, gso=True) for p in s.payloads]
    assert flat == dgrams


def test_buffer_advice_names_the_sysctl_only_when_capped():
    assert buffer_advice("receive", 4 << 20, 8 << 20) is None
    msg = buffer_advice("receive", 4 << 20, 425984)
    assert "net.core.rmem_max" in msg and "212992" in msg
    assert "net.core.wmem_max" in buffer_advice("send", 4 << 20, 425984)


# ------------------------------------------------------------------------- sockets


def _mixed_batch(addr):
    sizes = [1200] * 10 + [500] + [1200] * 3 + [1452] * 5 + [100] + [1200] * 70 + [1]
    return [(bytes([i % 256]) * n, addr) for i, n in enumerate(sizes)]


async def _receive(sock: socket.socket, count: int) -> list[bytes]:
    loop = asyncio.get_running_loop()
    got = []
    while len(got) < count:
        got.append(await loop.sock_recv(sock, 65536))
    return got


@pytest.mark.parametrize("gso", [True, False], ids=["gso", "plain"])
def test_mixed_batch_arrives_intact_and_in_order(gso):
    if gso and not udp.gso_supported():
        missing_peer("this kernel has no UDP_SEGMENT (GSO)")

    async def main():
        loop = asyncio.get_running_loop()
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        udp.tune_buffers(rx)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        ep = DatagramEndpoint(loop, tx, lambda d, a: None, lambda: None, gso=gso)
        try:
            batch = _mixed_batch(rx.getsockname())
            ep.send(batch)
            got = await _receive(rx, len(batch))
            assert got == [d for d, _ in batch]
            assert ep.datagrams_sent == len(batch) and ep.dropped_sends == 0
            if gso:
                assert ep.gso and ep.send_calls < len(batch) // 4
            else:
                assert ep.send_calls == len(batch)
        finally:
            ep.close()
            rx.close()

    run(main())


def test_gso_refused_by_the_route_falls_back_to_plain_sends(monkeypatch):
    async def main():
        loop = asyncio.get_running_loop()
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        rx.setblocking(False)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        ep = DatagramEndpoint(loop, tx, lambda d, a: None, lambda: None, gso=True)

        class NoGSO:
            """The socket as on a device that cannot segment (sendmsg with GSO -> EIO)."""

            def __getattr__(self, name):
                return getattr(tx, name)

            def sendmsg(self, *a, **kw):
                raise OSError(5, "Input/output error")

        ep._sock = NoGSO()
        try:
            batch = _mixed_batch(rx.getsockname())
            ep.send(batch)
            assert not ep.gso  # learned once, for this socket
            assert await _receive(rx, len(batch)) == [d for d, _ in batch]
        finally:
            ep._sock = tx
            ep.close()
            rx.close()

    run(main())


def test_datagrams_queued_before_the_loop_runs_are_all_read_in_batches():
    async def main():
        loop = asyncio.get_running_loop()
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        udp.tune_buffers(rx)
        seen: list[bytes] = []
        ends: list[int] = []
        ep = DatagramEndpoint(loop, rx, lambda d, a: seen.append(d),
                              lambda: ends.append(len(seen)))
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            count = 300
            for i in range(count):  # all queued in the kernel before the loop gets to run
                tx.sendto(i.to_bytes(2, "big") * 600, rx.getsockname())
            while len(seen) < count:
                await asyncio.sleep(0.01)
            assert [int.from_bytes(d[:2], "big") for d in seen] == list(range(count))
            assert ep.datagrams_received == count
            # bounded batches: several per readiness, never more than READ_BATCH
            assert len(ends) == ep.batches < count
            sizes = [b - a for a, b in zip([0, *ends], ends, strict=False)]
            assert max(sizes) == udp.READ_BATCH
        finally:
            ep.close()
            tx.close()

    run(main())


def test_quic_session_fed_in_batches_delivers_every_byte(pki):
    """A burst queued while the server did not read is handled in batches, intact."""

    async def main():
        async with running_server(pki) as h:
            client = await connect("127.0.0.1", h.server.address[1], identity=pki.device,
                                   server_name=SERVER_NAME, alpn=ALPN, keepalive=None)
            server_conn = await h.connections.get()
            endpoint = h.server._transport
            payload = bytes(range(256)) * 2048  # 512 KiB
            s = await client.open_stream()
            endpoint.pause_reading()
            await s.write(payload[:200_000])  # below the send window: queued, not blocked
            await asyncio.sleep(0.05)
            before = endpoint.datagrams_received, endpoint.batches
            endpoint.resume_reading()
            await s.write(payload[200_000:])
            s.write_eof()
            got = await read_all(await server_conn.accept_stream())
            assert got == payload
            received = endpoint.datagrams_received - before[0]
            batches = endpoint.batches - before[1]
            assert received > 100 and batches < received
            client.close()

    run(main(), timeout=30.0)


class _CappedSocket:
    """A socket as seen without root on a default kernel: FORCE refused, SO_*BUF capped."""

    def setsockopt(self, level, opt, value):
        if opt in (udp._SO_RCVBUFFORCE, udp._SO_SNDBUFFORCE):
            raise PermissionError(1, "Operation not permitted")

    def getsockopt(self, level, opt):
        return 425984  # 2 x 212992


def test_capped_buffer_logs_the_sysctl_once(monkeypatch, caplog):
    monkeypatch.setattr(udp, "_advised", set())
    caplog.set_level(logging.WARNING, logger="tunnel.transport.udp")
    for _ in range(3):
        assert udp.tune_buffers(_CappedSocket()) == (425984, 425984)
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("sysctl -w net.core.rmem_max=4194304" in m for m in msgs) == 1
    assert sum("sysctl -w net.core.wmem_max=4194304" in m for m in msgs) == 1


def test_as_root_the_buffers_are_forced_to_4_mb():
    import os

    if os.geteuid() != 0:
        missing_peer("SO_RCVBUFFORCE needs root (CI runs as root)")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        rcv, snd = udp.tune_buffers(s)
    assert rcv >= udp.SOCKET_BUFFER and snd >= udp.SOCKET_BUFFER


def test_split_segments_and_gro_cmsg():
    data = b"a" * 1200 + b"b" * 1200 + b"c" * 7
    assert udp.split_segments(data, 1200) == [b"a" * 1200, b"b" * 1200, b"c" * 7]
    assert udp.split_segments(b"x" * 50, 1200) == [b"x" * 50]
    assert udp.split_segments(b"x" * 50, 0) == [b"x" * 50]
    import struct

    assert udp.gro_segment([(udp.SOL_UDP, udp.UDP_GRO, struct.pack("=i", 1452))]) == 1452
    assert udp.gro_segment([(socket.SOL_SOCKET, 1, b"\0" * 4)]) == 0


@pytest.mark.parametrize("gro", [True, False], ids=["gro", "plain"])
def test_gso_sender_to_endpoint_reader_every_datagram_intact(gro):
    """GSO runs may arrive as one coalesced read (GRO): they are cut up again, in order."""
    if not udp.gso_supported():
        missing_peer("this kernel has no UDP_SEGMENT (GSO)")

    async def main():
        loop = asyncio.get_running_loop()
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        rx.bind(("127.0.0.1", 0))
        udp.tune_buffers(rx)
        seen: list[bytes] = []
        reader = DatagramEndpoint(loop, rx, lambda d, a: seen.append(d), lambda: None, gro=gro)
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tx.bind(("127.0.0.1", 0))
        sender = DatagramEndpoint(loop, tx, lambda d, a: None, lambda: None, gso=True)
        try:
            batch = _mixed_batch(rx.getsockname())
            sender.send(batch)
            while len(seen) < len(batch):
                await asyncio.sleep(0.01)
            assert seen == [d for d, _ in batch]
            assert reader.datagrams_received == len(batch)
        finally:
            sender.close()
            reader.close()

    run(main())
