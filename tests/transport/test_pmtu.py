"""Datagram size search: the pure prober (table-driven), and two real aioquic connections in
memory through ``aioquic_compat.PathMtu`` over a link that may drop datagrams over 1,200 bytes.

The in-memory link is the attack the issue names: a path that silently drops large datagrams
(an MTU black hole). A transfer over it must finish, at 1,200 bytes, with the probes lost and
nothing else; on a clean link both directions go to 1,452; a black hole that appears mid-way
drops the size back and the transfer still finishes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ssl

import pytest
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tunnel.transport import aioquic_compat as compat
from tunnel.transport import udp
from tunnel.transport.pmtu import (
    BASE_SIZE,
    PROBE_SIZE,
    Probe,
    Prober,
    SizeChange,
    State,
)

# ------------------------------------------------------------------------------ the prober

#: one step of a table: (input, arguments, expected output, expected state, expected size)
Step = tuple[str, tuple, object, State, int]


def _run(prober: Prober, steps: list[Step]) -> None:
    for i, (name, args, want, state, size) in enumerate(steps):
        got = getattr(prober, name)(*args)
        assert got == want, f"step {i} {name}{args}: {got!r} != {want!r}"
        assert prober.state is state, f"step {i} {name}{args}: state {prober.state}"
        assert prober.size == size, f"step {i} {name}{args}: size {prober.size}"


RAISE = SizeChange(PROBE_SIZE, "probe acknowledged")
BLACK_HOLE = SizeChange(BASE_SIZE, "black hole: full-size packets lost")
NEW_PATH = SizeChange(BASE_SIZE, "path changed")
S, R, M, W = State.SEARCHING, State.RAISED, State.SMALL, State.WAITING
B, P = BASE_SIZE, PROBE_SIZE

TABLES: dict[str, list[Step]] = {
    "nothing is probed before the handshake is confirmed": [
        ("poll", (0.0,), None, W, B),
        ("poll", (1000.0,), None, W, B),
        ("handshake_confirmed", (5.0,), None, S, B),
        ("poll", (5.0,), Probe(1, P), S, B),
        ("poll", (5.1,), None, S, B),  # one probe in flight at a time
    ],
    "an acknowledged probe raises the size": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("poll", (0.0,), Probe(1, P), S, B),
        ("probe_acked", (1, 0.05), RAISE, R, P),
        ("poll", (700.0,), None, R, P),  # raised: nothing more to probe
    ],
    "lost probes are retried, then the path is small for 10 minutes": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("poll", (0.0,), Probe(1, P), S, B),
        ("probe_lost", (1, 0.3), None, S, B),
        ("poll", (0.3,), Probe(2, P), S, B),
        ("probe_lost", (2, 0.9), None, S, B),
        ("poll", (0.9,), Probe(3, P), S, B),
        ("probe_lost", (3, 2.1), None, M, B),
        ("poll", (2.1,), None, M, B),
        ("poll", (601.0,), None, M, B),
        ("poll", (602.1,), Probe(4, P), S, B),  # re-probed after REPROBE_AFTER
        ("probe_acked", (4, 602.2), RAISE, R, P),
    ],
    "a stale probe's answer is ignored": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("poll", (0.0,), Probe(1, P), S, B),
        ("path_changed", (0.1,), None, S, B),  # already at the base size: no change
        ("probe_acked", (1, 0.2), None, S, B),  # sent on the old path: says nothing
        ("poll", (0.2,), Probe(2, P), S, B),
        ("probe_lost", (1, 0.3), None, S, B),
        ("probe_acked", (2, 0.3), RAISE, R, P),
    ],
    "a black hole drops the size at once; a second one keeps it small for long": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("poll", (0.0,), Probe(1, P), S, B),
        ("probe_acked", (1, 1.0), RAISE, R, P),
        ("large_acked", (1.5,), None, R, P),
        ("large_lost", (2.0, 3.0), None, R, P),
        ("large_lost", (2.1, 3.1), None, R, P),
        ("large_lost", (2.2, 3.2), BLACK_HOLE, M, B),
        ("poll", (10.0,), None, M, B),
        ("poll", (33.2,), Probe(2, P), S, B),  # the first black hole is rechecked soon
        ("probe_acked", (2, 33.3), RAISE, R, P),
        ("large_lost", (40.0, 41.0), None, R, P),
        ("large_lost", (40.1, 41.1), None, R, P),
        ("large_lost", (40.2, 41.2), BLACK_HOLE, M, B),
        ("poll", (72.0,), None, M, B),  # the second: only after REPROBE_AFTER
        ("poll", (641.2,), Probe(3, P), S, B),
    ],
    "congestion losses are not a black hole: later full-size packets got through": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("poll", (0.0,), Probe(1, P), S, B),
        ("probe_acked", (1, 1.0), RAISE, R, P),
        ("large_acked", (2.5,), None, R, P),  # acknowledged before the losses are declared
        ("large_lost", (2.0, 2.6), None, R, P),
        ("large_lost", (2.1, 2.6), None, R, P),
        ("large_lost", (2.2, 2.6), None, R, P),
        ("large_lost", (2.3, 2.6), None, R, P),
    ],
    "an acknowledged full-size packet resets the count": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("poll", (0.0,), Probe(1, P), S, B),
        ("probe_acked", (1, 1.0), RAISE, R, P),
        ("large_lost", (2.0, 3.0), None, R, P),
        ("large_lost", (2.1, 3.0), None, R, P),
        ("large_acked", (2.2,), None, R, P),
        ("large_lost", (2.3, 3.5), None, R, P),
        ("large_lost", (2.4, 3.5), None, R, P),
        ("large_lost", (2.5, 3.5), BLACK_HOLE, M, B),
    ],
    "a new path starts over at the base size and probes at once": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("poll", (0.0,), Probe(1, P), S, B),
        ("probe_acked", (1, 1.0), RAISE, R, P),
        ("path_changed", (5.0,), NEW_PATH, S, B),
        ("poll", (5.0,), Probe(2, P), S, B),
        ("probe_lost", (2, 5.5), None, S, B),
        ("poll", (5.5,), Probe(3, P), S, B),
    ],
    "a path change before the handshake changes nothing": [
        ("path_changed", (1.0,), None, W, B),
        ("poll", (1.0,), None, W, B),
    ],
    "losses are ignored unless the size is raised": [
        ("handshake_confirmed", (0.0,), None, S, B),
        ("large_lost", (0.1, 0.2), None, S, B),
        ("large_lost", (0.1, 0.2), None, S, B),
        ("large_lost", (0.1, 0.2), None, S, B),
    ],
}


@pytest.mark.parametrize("name", list(TABLES))
def test_prober(name):
    _run(Prober(), TABLES[name])


def test_a_prober_without_a_larger_size_never_probes():
    prober = Prober(target=BASE_SIZE)
    prober.handshake_confirmed(0.0)
    assert prober.poll(0.0) is None and prober.poll(10_000.0) is None
    with pytest.raises(ValueError, match="below the base size"):
        Prober(target=1000)


# --------------------------------------------------------------- GSO with the size in use


def test_gso_segments_follow_the_datagram_size():
    """A send batch cuts a GSO run wherever the size changes (a probe, a size change), so a
    segment is always the size of the datagrams it carries."""
    a = ("198.18.0.1", 443)
    datagrams = [(b"x" * 1200, a)] * 3 + [(b"p" * 1452, a)] + [(b"y" * 1452, a)] * 2 + [
        (b"z" * 300, a)
    ]
    plan = udp.plan_sends(datagrams, gso=True)
    assert [(s.segment, [len(p) for p in s.payloads]) for s in plan] == [
        (1200, [1200, 1200, 1200]),
        (1452, [1452, 1452, 1452, 300]),
    ]
    assert udp.MAX_DATAGRAM >= udp.GSO_MAX_BYTES  # a GRO read of a GSO send fits the buffer


# ------------------------------------------------------------------ in memory, real aioquic


def _self_signed():
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pmtu.test")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("pmtu.test")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


class Link:
    """Two aioquic connections and the path between them, on a simulated clock.

    ``limit``: datagrams longer than this vanish silently, both ways (the black hole).
    """

    CLIENT, SERVER = ("10.0.0.1", 50000), ("10.0.0.2", 443)
    DELAY = 0.01  # one way

    def __init__(self, limit: int | None = None) -> None:
        cert, key = _self_signed()
        common = dict(alpn_protocols=["pmtu"], idle_timeout=600.0)
        ccfg = QuicConfiguration(is_client=True, server_name="pmtu.test", **common)
        ccfg.verify_mode = ssl.CERT_NONE
        self.scfg = QuicConfiguration(is_client=False, certificate=cert, private_key=key, **common)
        self.now = 1000.0
        self.limit = limit
        self.client = QuicConnection(configuration=ccfg)
        self.client.connect(self.SERVER, now=self.now)
        self.server: QuicConnection | None = None
        self.client_mtu = compat.PathMtu(self.client)
        self.server_mtu: compat.PathMtu | None = None
        self.changes: list[tuple[str, int, str]] = []
        self.client_mtu.on_change = lambda size, why: self.changes.append(("client", size, why))
        #: (arrival time, destination, datagram) in flight
        self.wire: list[tuple[float, str, bytes]] = []
        self.sizes_sent: dict[str, set[int]] = {"client": set(), "server": set()}
        self.dropped: dict[str, int] = {"client": 0, "server": 0}
        self.received = bytearray()
        self.finished = False
        #: the client's address as the server sees it (a NAT may change it)
        self.client_addr = self.CLIENT

    def _send(self, side: str, datagrams) -> None:
        for data, _addr in datagrams:
            self.sizes_sent[side].add(len(data))
            if self.limit is not None and len(data) > self.limit:
                self.dropped[side] += 1
                continue
            self.wire.append((self.now + self.DELAY, "server" if side == "client" else "client",
                              data))

    def _deliver(self) -> None:
        due = [w for w in self.wire if w[0] <= self.now]
        self.wire = [w for w in self.wire if w[0] > self.now]
        for _, dest, data in due:
            if dest == "server":
                if self.server is None:
                    self.server = QuicConnection(
                        configuration=self.scfg,
                        original_destination_connection_id=self.client.original_destination_connection_id,
                    )
                    self.server_mtu = compat.PathMtu(self.server)
                    self.server_mtu.on_change = lambda size, why: self.changes.append(
                        ("server", size, why))
                self.server.receive_datagram(data, self.client_addr, now=self.now)
            else:
                self.client.receive_datagram(data, self.SERVER, now=self.now)
        for conn in (self.client, self.server):
            while conn is not None and (ev := conn.next_event()) is not None:
                if conn is self.server and isinstance(ev, events.StreamDataReceived):
                    self.received += ev.data
                    self.finished = self.finished or ev.end_stream

    def step(self) -> None:
        """Send what both sides have, deliver what arrived, then move the clock on."""
        self._send("client", self.client_mtu.datagrams_to_send(self.now))
        if self.server is not None:
            self._send("server", self.server_mtu.datagrams_to_send(self.now))
        timers = [t for c in (self.client, self.server) if c is not None
                  for t in (c.get_timer(),) if t is not None]
        arrivals = [w[0] for w in self.wire]
        self.now = max(self.now + 0.0005, min(timers + arrivals + [self.now + 1.0]))
        for conn in (self.client, self.server):
            if conn is not None and (t := conn.get_timer()) is not None and t <= self.now:
                conn.handle_timer(now=self.now)
        self._deliver()

    def handshake(self) -> None:
        for _ in range(2000):
            self.step()
            if self.server is not None and self.client._handshake_confirmed:
                return
        raise AssertionError("handshake did not complete")

    def transfer(self, data: bytes, *, on_progress=None, max_steps: int = 200_000) -> None:
        sid = self.client.get_next_available_stream_id()
        chunk = 64 * 1024
        sent = 0
        for _ in range(max_steps):
            if sent < len(data):
                unacked = sum(
                    s.sender._buffer_stop - s.sender._buffer_start
                    for s in self.client._streams.values()
                )
                while sent < len(data) and unacked < 1 << 20:
                    piece = data[sent:sent + chunk]
                    sent += len(piece)
                    unacked += len(piece)
                    self.client.send_stream_data(sid, piece, end_stream=sent == len(data))
            self.step()
            if on_progress is not None:
                on_progress(len(self.received))
            if self.finished:
                return
        raise AssertionError(f"stalled at {len(self.received)} of {len(data)} bytes")


PAYLOAD = hashlib.sha256(b"pmtu").digest() * (3 * 1024 * 1024 // 32)


def _check(link: Link) -> None:
    assert hashlib.sha256(bytes(link.received)).digest() == hashlib.sha256(PAYLOAD).digest()
    assert link.client._close_event is None and link.server._close_event is None


def test_clean_path_goes_to_1452_both_ways():
    link = Link()
    link.handshake()
    link.transfer(PAYLOAD)
    _check(link)
    assert link.client_mtu.size == link.server_mtu.size == PROBE_SIZE
    assert compat.max_datagram_size(link.client) == PROBE_SIZE
    assert link.client._loss._cc._max_datagram_size == link.client._loss._pacer._max_datagram_size == PROBE_SIZE
    assert max(link.sizes_sent["client"]) == max(link.sizes_sent["server"]) == PROBE_SIZE
    assert ("client", PROBE_SIZE, "probe acknowledged") in link.changes
    assert ("server", PROBE_SIZE, "probe acknowledged") in link.changes


def test_path_that_drops_large_datagrams_still_carries_the_transfer():
    """The attack: every datagram over 1,200 bytes vanishes. Only the probes are lost."""
    link = Link(limit=BASE_SIZE)
    link.handshake()
    link.transfer(PAYLOAD)
    _check(link)
    for mtu in (link.client_mtu, link.server_mtu):
        assert mtu.size == BASE_SIZE
        assert mtu.prober.state is State.SMALL
        assert mtu.probes_lost == mtu.prober.max_probes and mtu.probes_acked == 0
    # what vanished were the probes, nothing else
    assert link.dropped == {"client": 3, "server": 3}
    assert sorted(link.changes) == [("client", BASE_SIZE, "probes of 1452 bytes lost"),
                                    ("server", BASE_SIZE, "probes of 1452 bytes lost")]


def test_black_hole_mid_transfer_falls_back_and_finishes():
    link = Link()
    link.handshake()

    def progress(received: int) -> None:
        if link.limit is None and received > len(PAYLOAD) // 4:
            assert link.client_mtu.size == PROBE_SIZE
            link.limit = BASE_SIZE  # the path shrinks under a running transfer

    link.transfer(PAYLOAD, on_progress=progress)
    _check(link)
    assert link.limit == BASE_SIZE
    assert link.client_mtu.size == BASE_SIZE
    assert link.client_mtu.prober.black_holes == 1
    assert ("client", BASE_SIZE, "black hole: full-size packets lost") in link.changes


def test_peer_limit_caps_the_size(monkeypatch):
    monkeypatch.setattr(compat, "peer_max_udp_payload", lambda quic: 1300)
    link = Link()
    link.handshake()
    link.transfer(PAYLOAD[: 1 << 20])
    assert link.client_mtu.prober.target == link.client_mtu.size == 1300  # probed 1300, not more
    assert max(link.sizes_sent["client"]) == 1300
    assert compat.set_max_datagram_size(link.client, PROBE_SIZE) == 1300
    assert compat.set_max_datagram_size(link.client, 900) == BASE_SIZE  # never below 1,200


# ----------------------------------------------------------------- loopback, the transport


def test_loopback_connection_uses_1452_both_ways(pki, caplog):
    """Over real UDP sockets (loopback carries 1,452): both sides raise the size, log it, and
    the sockets send with DF set."""
    import asyncio
    import logging
    import socket

    from transport_helpers import ALPN, SERVER_NAME, run, running_server

    from tunnel.transport import connect

    async def main():
        async with running_server(pki) as h:
            host, port = h.server.address[:2]
            client = await connect(host, port, identity=pki.device, server_name=SERVER_NAME,
                                   alpn=ALPN, keepalive=None)
            server = await h.connections.get()
            stream = await client.open_stream()
            await stream.write(b"x" * 200_000)
            for _ in range(200):
                if client._protocol.pmtu.size == server._protocol.pmtu.size == PROBE_SIZE:
                    break
                await asyncio.sleep(0.01)
            sock = client._protocol.endpoint._sock
            df = sock.getsockopt(socket.IPPROTO_IP, udp.IP_MTU_DISCOVER)
            sizes = client._protocol.pmtu.size, server._protocol.pmtu.size
            client.close()
            return sizes, df

    with caplog.at_level(logging.INFO, logger="tunnel.transport.pmtu"):
        sizes, df = run(main())
    assert sizes == (PROBE_SIZE, PROBE_SIZE)
    assert df == udp.PMTUDISC_PROBE
    logged = [(r.fields["side"], r.fields["size"]) for r in caplog.records
              if r.msg == "datagram size"]
    assert ("client", PROBE_SIZE) in logged and ("server", PROBE_SIZE) in logged


def test_a_new_path_starts_over_at_1200_and_probes_again():
    """The client migrates (it says so) and the server sees a new peer address: both go back to
    1,200 before anything is sent on the new path, then probe it and go up again."""
    link = Link()
    link.handshake()
    moved = []

    def progress(received: int) -> None:
        if not moved and received > len(PAYLOAD) // 4:
            assert link.client_mtu.size == link.server_mtu.size == PROBE_SIZE
            moved.append(link.now)
            link.client_addr = ("10.0.0.9", 50001)  # what the server sees from now on
            link.client_mtu.path_changed(link.now)

    link.transfer(PAYLOAD, on_progress=progress)
    _check(link)
    assert ("client", BASE_SIZE, "path changed") in link.changes
    assert ("server", BASE_SIZE, "path changed") in link.changes
    assert not [c for c in link.changes if "black hole" in c[2]]
    assert link.client_mtu.size == link.server_mtu.size == PROBE_SIZE
    assert link.server.get_peer_address() == ("10.0.0.9", 50001)


def test_a_datagram_too_big_for_the_interface_is_a_loss_not_an_error():
    """With DF set, a datagram over the local interface's MTU fails with EMSGSIZE: it is
    dropped and counted (the search sees a lost probe); the connection is not told of a
    network failure (the agent would re-examine its uplinks)."""
    import asyncio
    import errno
    import socket

    class TooBig:
        def __init__(self, sock):
            self._sock = sock

        def __getattr__(self, name):
            return getattr(self._sock, name)

        def sendto(self, data, addr):
            raise OSError(errno.EMSGSIZE, "Message too long")

        def sendmsg(self, *args):
            raise OSError(errno.EMSGSIZE, "Message too long")

    async def main():
        errors = []
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        ep = udp.DatagramEndpoint(asyncio.get_running_loop(), sock, lambda d, a: None,
                                  lambda: None, errors.append, gso=True)
        assert sock.getsockopt(socket.IPPROTO_IP, udp.IP_MTU_DISCOVER) == udp.PMTUDISC_PROBE
        ep._sock = TooBig(sock)
        addr = ("127.0.0.1", 9)
        ep.send([(b"p" * PROBE_SIZE, addr)])  # one plain send
        ep.send([(b"d" * PROBE_SIZE, addr)] * 3)  # one GSO send
        ep.close()
        return ep, errors

    ep, errors = asyncio.run(main())
    assert ep.dropped_sends == 4 and ep.gso is True
    assert errors == []
