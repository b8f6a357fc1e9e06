"""happy_eyeballs: fake dialers for the timing logic, plus real loopback QUIC vs TLS/TCP."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from transport_helpers import ALPN, SERVER_NAME, run, running_server, running_tcp_server

from tunnel.transport import TransportError, connect, happy_eyeballs, tcp
from tunnel.transport.race import error_rank


class FakeConn:
    def __init__(self, name):
        self.name = name
        self.closed = False

    def close(self, code=0, reason=""):
        self.closed = True


def dialer(name, delay, *, fail=None, log=None):
    state = {"started": None, "cancelled": False, "conn": None}

    async def dial():
        state["started"] = time.monotonic()
        try:
            await asyncio.sleep(delay)
        except asyncio.CancelledError:
            state["cancelled"] = True
            raise
        if fail is not None:
            raise fail
        state["conn"] = FakeConn(name)
        return state["conn"]

    return dial, state


def test_first_wins_within_head_start_second_never_started():
    async def main():
        d1, s1 = dialer("quic", 0.01)
        d2, s2 = dialer("tcp", 0.0)
        conn, label = await happy_eyeballs(d1, d2, head_start=0.5)
        assert (conn.name, label) == ("quic", "quic") and s2["started"] is None

    run(main())


def test_second_starts_after_head_start_and_wins_first_cancelled():
    async def main():
        d1, s1 = dialer("quic", 5.0)
        d2, s2 = dialer("tcp", 0.01)
        t0 = time.monotonic()
        conn, label = await happy_eyeballs(d1, d2, head_start=0.1)
        assert label == "tcp" and conn.name == "tcp"
        assert s2["started"] - t0 >= 0.09
        await asyncio.sleep(0)
        assert s1["cancelled"]

    run(main())


def test_first_failing_early_starts_second_at_once():
    async def main():
        d1, _ = dialer("quic", 0.0, fail=TransportError(0, "udp unreachable", application=False))
        d2, s2 = dialer("tcp", 0.0)
        t0 = time.monotonic()
        conn, label = await happy_eyeballs(d1, d2, head_start=5.0)
        assert label == "tcp" and s2["started"] - t0 < 1.0

    run(main())


def test_first_still_wins_if_it_completes_before_second():
    async def main():
        d1, _ = dialer("quic", 0.15)
        d2, s2 = dialer("tcp", 5.0)
        conn, label = await happy_eyeballs(d1, d2, head_start=0.05)
        assert label == "quic"
        await asyncio.sleep(0)
        assert s2["cancelled"]

    run(main())


def test_loser_that_connects_anyway_is_closed():
    async def main():
        d1, s1 = dialer("quic", 0.0)
        d2, s2 = dialer("tcp", 0.0)

        async def slow_first():
            await asyncio.sleep(0.1)
            return await d1()

        # both finish in the same wait round: first wins, second is closed
        async def second():
            await asyncio.sleep(0.1)
            return await d2()

        conn, label = await happy_eyeballs(slow_first, second, head_start=0.0)
        if label == "quic":
            assert s2["conn"] is None or s2["conn"].closed
        else:
            assert s1["conn"] is None or s1["conn"].closed

    run(main())


@pytest.mark.parametrize(
    ("e1", "e2", "expect"),
    [
        (TransportError(0, "handshake with x timed out", application=False, kind="timeout"),
         TransportError(4001, "device revoked", application=True, remote=True), "device revoked"),
        (TransportError(0x12A, "the network is intercepting TLS: presented issuer CN=X; exempt h "
                        "from inspection", application=False, kind="intercepted"),
         TransportError(0, "TLS handshake with x timed out", application=False, kind="timeout"),
         "intercepting"),
        (TransportError(0, "a timed out", application=False, kind="timeout"),
         TransportError(0, "b timed out", application=False, kind="timeout"), "a timed out"),
    ],
)
def test_both_fail_most_informative_error_wins(e1, e2, expect):
    async def main():
        d1, _ = dialer("quic", 0.0, fail=e1)
        d2, _ = dialer("tcp", 0.01, fail=e2)
        with pytest.raises(TransportError) as info:
            await happy_eyeballs(d1, d2, head_start=0.05)
        assert expect in info.value.reason
        assert any("attempt failed too" in n for n in info.value.__notes__)

    run(main())


def test_error_rank_order():
    refusal = TransportError(2, "no", application=True, remote=True)
    tls = TransportError(0x100 + 48, "unknown ca", application=False, remote=True)
    lost = TransportError(0, "connection lost", application=False, remote=True)
    timeout = TransportError(0, "handshake with h timed out", application=False, kind="timeout")
    assert (refusal.code, tls.code, lost.code) == ("refused", "tls", "closed")
    assert error_rank(refusal) > error_rank(tls) > error_rank(lost) > error_rank(timeout)
    # the kind decides, never the text: a timeout worded like a refusal still ranks lowest
    worded = TransportError(0, "refused: intercepting TLS", application=False, kind="timeout")
    assert error_rank(worded) == error_rank(timeout)
    assert error_rank(ValueError("x")) == 0


def _dialers(pki, quic_port, tcp_port):
    def quic():
        return connect("127.0.0.1", quic_port, identity=pki.device, server_name=SERVER_NAME,
                       alpn=ALPN, keepalive=None, handshake_timeout=3.0)

    def over_tcp():
        return tcp.connect("127.0.0.1", tcp_port, identity=pki.device, server_name=SERVER_NAME,
                           alpn=ALPN, keepalive=None, handshake_timeout=3.0)

    return quic, over_tcp


def test_real_udp_blackholed_tcp_wins_quickly(pki):
    async def main():
        # a bound UDP socket that never answers: QUIC's handshake hangs as on a UDP-blocking net
        hole = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        hole.bind(("127.0.0.1", 0))
        try:
            async with running_tcp_server(pki) as h:
                quic, over_tcp = _dialers(pki, hole.getsockname()[1], h.server.address[1])
                t0 = time.monotonic()
                conn, label = await happy_eyeballs(quic, over_tcp, head_start=0.1)
                elapsed = time.monotonic() - t0
                assert label == "tcp" and elapsed < 2.0
                server_conn = await h.connections.get()
                s = await conn.open_stream()
                await s.write(b"over tcp")
                s.write_eof()
                assert await (await server_conn.accept_stream()).read() == b"over tcp"
                conn.close()
        finally:
            hole.close()

    run(main())


def test_real_both_present_quic_wins(pki):
    async def main():
        async with running_server(pki) as hq, running_tcp_server(pki) as ht:
            quic, over_tcp = _dialers(pki, hq.server.address[1], ht.server.address[1])
            conn, label = await happy_eyeballs(quic, over_tcp, head_start=1.0)
            assert label == "quic"
            await hq.connections.get()
            assert ht.connections.empty()
            conn.close()

    run(main())


# -- the engineer's order: TLS/TCP first, QUIC the fallback (tunnel.client.preferred_transports)


@pytest.mark.parametrize("setting, order", [
    (None, ("tcp", "quic")), ("auto", ("tcp", "quic")), ("quic", ("quic",)), ("tcp", ("tcp",)),
])
def test_engineer_order_is_tcp_first_unless_forced(monkeypatch, setting, order):
    from tunnel.client import preferred_transports

    if setting is None:
        monkeypatch.delenv("FLEET_TRANSPORT", raising=False)
    else:
        monkeypatch.setenv("FLEET_TRANSPORT", setting)
    assert preferred_transports() == order


def test_engineer_order_bad_setting_says_what_to_use(monkeypatch):
    from tunnel.client import ClientError, preferred_transports

    monkeypatch.setenv("FLEET_TRANSPORT", "udp")
    with pytest.raises(ClientError, match="use auto, quic or tcp"):
        preferred_transports()


def _engineer_race(pki, quic_port, tcp_port, head_start):
    from tunnel.client import preferred_transports

    quic, over_tcp = _dialers(pki, quic_port, tcp_port)
    dial = {"quic": quic, "tcp": over_tcp}
    first, second = preferred_transports()
    return happy_eyeballs(dial[first], dial[second], head_start=head_start, labels=(first, second))


def test_real_engineer_order_both_present_tcp_wins(pki, monkeypatch):
    monkeypatch.delenv("FLEET_TRANSPORT", raising=False)

    async def main():
        async with running_server(pki) as hq, running_tcp_server(pki) as ht:
            conn, label = await _engineer_race(pki, hq.server.address[1], ht.server.address[1], 1.0)
            assert label == "tcp" and conn.transport_name == "tcp"
            await ht.connections.get()
            assert hq.connections.empty()  # QUIC never started: TCP won within its head start
            conn.close()

    run(main())


def test_real_engineer_order_tcp_refused_quic_starts_at_once(pki, monkeypatch):
    """A proxy without its TCP listener: the refused TCP attempt hands over to QUIC at once
    (the head start here is longer than the test's hard timeout)."""
    monkeypatch.delenv("FLEET_TRANSPORT", raising=False)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()  # nothing listens there: connect() is refused

    async def main():
        async with running_server(pki) as hq:
            conn, label = await _engineer_race(pki, hq.server.address[1], closed_port, 60.0)
            assert label == "quic" and conn.transport_name == "quic"
            await hq.connections.get()
            conn.close()

    run(main())
