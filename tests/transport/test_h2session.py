"""The fleet-over-HTTP/2 session, sans-I/O: a client and a server session wired in memory
(bytes handed across by the test; no sockets, no TLS, no event loop)."""

from __future__ import annotations

from tunnel.transport import h2session as wire
from tunnel.transport.h2session import FleetH2Session
from tunnel.transport.h2wire import ControlFrameMeter, FrameBudget


def pump(client: FleetH2Session, server: FleetH2Session) -> tuple[list, list]:
    """Move bytes both ways until neither side has any: (client's events, server's events)."""
    got_c, got_s = [], []
    for _ in range(50):
        to_s, to_c = client.data_to_send(), server.data_to_send()
        if not to_s and not to_c:
            return got_c, got_s
        if to_s:
            got_s += server.receive(to_s, 0.0)
        if to_c:
            got_c += client.receive(to_c, 0.0)
    raise AssertionError("the sessions never went quiet")


def hello_pair(pool: int = 2) -> tuple[FleetH2Session, FleetH2Session]:
    client = FleetH2Session(client=True, stream_window=65536, server_name="proxy.test")
    server = FleetH2Session(client=False, stream_window=65536)
    server.start()
    client.start()
    client.send_hello(30.0)
    got_c, got_s = pump(client, server)
    [req] = [e for e in got_s if isinstance(e, wire.HelloRequested)]
    assert req.headers[":path"] == "/fleet/hello" and req.headers["fleet-idle-timeout"] == "30"
    assert req.headers[":authority"] == "proxy.test"
    server.answer_hello(pool, 20.0, b"CA PEM")
    got_c, _ = pump(client, server)
    [ans] = [e for e in got_c if isinstance(e, wire.HelloAnswered)]
    assert ans.headers[":status"] == "200" and ans.body == b"CA PEM"
    assert ans.headers["fleet-reverse-pool"] == str(pool)
    client.reverse_target = pool
    client.replenish_pool()
    _, got_s = pump(client, server)
    assert sum(isinstance(e, wire.PoolGrew) for e in got_s) == pool
    return client, server


def test_client_streams_carry_data_fin_and_credit():
    client, server = hello_pair()
    assert client.can_open_stream()
    sid = client.open_stream()
    client.send_data(sid, b"hello")
    client.end_stream(sid)
    _, got = pump(client, server)
    assert wire.PeerStream(sid) in got
    assert wire.StreamData(sid, b"hello", 5) in got and wire.StreamEnd(sid) in got
    # credit comes back only as the server's application consumes (here: acks)
    sid = client.open_stream()
    pump(client, server)
    sent = 0
    while (room := client.send_room(sid)) > 0:
        client.send_data(sid, b"y" * room)
        sent += room
    assert sent == 65536  # exactly the stream window, then nothing
    _, got = pump(client, server)
    assert client.send_room(sid) == 0
    server.ack(sid, sent)
    got, _ = pump(client, server)
    assert any(isinstance(e, wire.SendRoom) for e in got)
    assert client.send_room(sid) > 0


def test_the_server_opens_streams_by_claiming_the_clients_reverse_requests():
    client, server = hello_pair(pool=2)
    first = server.claim_reverse()
    second = server.claim_reverse()
    assert first is not None and second is not None and server.claim_reverse() is None
    server.send_data(first, b"from proxy")
    got, _ = pump(client, server)
    assert wire.PeerStream(first) in got and wire.PeerStream(second) in got
    assert wire.StreamData(first, b"from proxy", 10) in got
    # the client offered replacements at once: the server may open two more
    _, got_s = pump(client, server)
    assert len(client.reverse_pool) == 2 and len(server.reverse_pool) == 2


def test_reset_ping_and_goaway():
    client, server = hello_pair()
    sid = client.open_stream()
    client.send_data(sid, b"x")
    pump(client, server)
    server.reset_stream(sid, 9)
    server.ping(7)
    got_c, got_s = pump(client, server)
    assert wire.StreamAborted(sid, 9) in got_c
    assert wire.PingAnswered(7) in got_s
    server.goaway(4001, "device revoked", application=True)
    got_c, _ = pump(client, server)
    [closed] = [e for e in got_c if isinstance(e, wire.Closed)]
    err = closed.error
    assert (err.wire_code, err.reason, err.application, err.remote, err.code) == (
        4001, "device revoked", True, True, "refused"
    )


def test_unknown_paths_are_refused_and_garbage_closes_as_a_protocol_error():
    client, server = hello_pair()
    sid = client.h2.get_next_available_stream_id()
    client.h2.send_headers(sid, client.request_headers("/not/fleet"))
    got_c, got_s = pump(client, server)
    assert not any(isinstance(e, wire.PeerStream) for e in got_s)
    assert any(isinstance(e, wire.StreamAborted) and e.stream_id == sid for e in got_c)
    data_on_stream_0 = bytes.fromhex("000001" "00" "00" "00000000") + b"x"
    [closed] = server.receive(data_on_stream_0, 0.0)
    assert isinstance(closed, wire.Closed) and closed.error.code == "protocol"
    assert not closed.stop_reading and server.data_to_send()  # h2's GOAWAY


def test_a_control_frame_flood_closes_without_parsing_and_stops_reading():
    client = FleetH2Session(client=True, stream_window=65536)
    server = FleetH2Session(client=False, stream_window=65536,
                            meter=ControlFrameMeter(FrameBudget(rate=1, burst=10), 0.0))
    server.start()
    client.start()
    for i in range(50):
        client.ping(i + 1)
    events = server.receive(client.data_to_send(), 0.0)
    [closed] = events
    assert isinstance(closed, wire.Closed) and closed.stop_reading
    assert closed.error.code == "protocol" and "too many HTTP/2 control frames" in closed.error.reason
    assert server.meter is None  # nothing more is metered: nothing more is read
