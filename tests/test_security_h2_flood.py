"""HTTP/2 control-frame floods on the TLS/TCP transport (issue 13, item 13).

The attack: a raw TLS client — no certificate, ALPN fleet-enroll/1 (what the proxy lets in
before authentication), or an engineer's certificate — sends the HTTP/2 preface and then
megabytes of SETTINGS and PING frames, which h2 would each parse and answer. The proxy must
close it with GOAWAY(ENHANCE_YOUR_CALM) and a log line, and a session of another engineer on
the same proxy must keep working.
"""

import asyncio
import ssl
import threading

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from fleet_harness import wait_until
from h2.config import H2Configuration
from h2.connection import H2Connection

from tunnel.transport.tcp import (
    ANONYMOUS_BUDGET,
    AUTHENTICATED_BUDGET,
    CLIENT_PREFACE,
    ControlFrameMeter,
    FrameBudget,
)

SETTINGS = bytes.fromhex("000000" "04" "00" "00000000")  # empty SETTINGS, stream 0
PING = bytes.fromhex("000008" "06" "00" "00000000") + b"12345678"
GOAWAY, ENHANCE_YOUR_CALM = 7, 0xB


def frame(type_: int, payload: bytes = b"", flags: int = 0, sid: int = 1) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([type_, flags]) + sid.to_bytes(4, "big") + payload


# --- the meter, pure ---------------------------------------------------------------------------


def test_meter_counts_control_frames_not_data_and_survives_any_split():
    budget = FrameBudget(rate=0, burst=5)
    stream = (CLIENT_PREFACE + SETTINGS + frame(0, b"x" * 70_000) + PING + frame(1, b"h" * 20)
              + frame(0, b"") + frame(8, b"\0\0\0\1") + frame(0, b"y" * 10))
    for cut in (1, 2, 5, 9, 10, 17, 4096):
        meter = ControlFrameMeter(budget, 0.0)
        assert all(meter.feed(stream[i:i + cut], 0.0) for i in range(0, len(stream), cut))
        assert meter.frames == 5  # SETTINGS, PING, HEADERS, empty DATA, WINDOW_UPDATE
    meter = ControlFrameMeter(budget, 0.0)
    assert not meter.feed(stream + SETTINGS, 0.0)  # the sixth control frame


def test_meter_refills_at_its_rate_and_switches_budget():
    meter = ControlFrameMeter(FrameBudget(rate=10, burst=10), 0.0)
    assert meter.feed(CLIENT_PREFACE + SETTINGS * 10, 0.0)
    assert not meter.feed(SETTINGS, 0.0)
    meter = ControlFrameMeter(FrameBudget(rate=10, burst=10), 0.0)
    assert meter.feed(CLIENT_PREFACE + SETTINGS * 10, 0.0)
    assert meter.feed(SETTINGS * 5, 0.5)  # 5 back after half a second
    assert meter.feed(SETTINGS * 100, 10.0, FrameBudget(rate=1000, burst=1000))
    # authorized with an empty bucket: the larger burst minus the smaller one, not a full refill
    meter = ControlFrameMeter(FrameBudget(rate=0, burst=10), 0.0)
    assert meter.feed(CLIENT_PREFACE + SETTINGS * 10, 0.0)
    assert meter.feed(SETTINGS * 90, 0.0, FrameBudget(rate=0, burst=100))
    assert not meter.feed(SETTINGS, 0.0)


# --- the attack on a real proxy ----------------------------------------------------------------


async def wait_for_hello(received: bytearray) -> None:
    async with asyncio.timeout(15):
        while not any(t == 1 for t, _ in _server_frames(bytes(received))):  # HEADERS: the answer
            await asyncio.sleep(0.02)


def _server_frames(data: bytes):
    pos = 0
    while pos + 9 <= len(data):
        length = int.from_bytes(data[pos:pos + 3], "big")
        yield data[pos + 3], data[pos + 9:pos + 9 + length]
        pos += 9 + length


async def _flood(fleet, alpn: str, payload: bytes, cert_dir=None, limit: int = 3_000_000) -> bytes:
    """Send the preface and up to ``limit`` bytes of ``payload`` frames; what the server sent."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cadata=fleet.state.ca_cert.public_bytes(Encoding.PEM).decode())
    ctx.check_hostname = False
    ctx.set_alpn_protocols([alpn])
    if cert_dir is not None:
        ctx.load_cert_chain(cert_dir / "user.crt", cert_dir / "user.key")
    reader, writer = await asyncio.open_connection(fleet.proxy_host, fleet.proxy_port, ssl=ctx,
                                                   server_hostname="proxy.test")
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == alpn
    received = bytearray()

    async def read():
        try:
            while chunk := await reader.read(65536):
                received.extend(chunk)
        except (OSError, ssl.SSLError):
            pass

    reading = asyncio.create_task(read())
    chunk = payload * (65536 // len(payload))
    sent = 0
    try:
        if cert_dir is None:
            writer.write(CLIENT_PREFACE + SETTINGS)
        else:
            # First get in: the proxy answers the hello only once authorize() admitted us.
            h2 = H2Connection(H2Configuration(client_side=True))
            h2.initiate_connection()
            h2.send_headers(1, [(":method", "GET"), (":scheme", "https"), (":authority", "proxy.test"),
                                (":path", "/fleet/hello")], end_stream=True)
            writer.write(h2.data_to_send())
            await wait_for_hello(received)
        while sent < limit and not reading.done():
            writer.write(chunk)
            sent += len(chunk)
            await asyncio.wait_for(writer.drain(), 5)
    except (OSError, ssl.SSLError, TimeoutError):
        pass  # the proxy stopped reading and closed: that is the point
    await asyncio.wait_for(reading, 15)
    writer.transport.abort()
    return bytes(received)


@pytest.fixture
def tcp_fleet(fleet, echo):
    fleet.env["FLEET_TRANSPORT"] = "tcp"
    config = fleet.enroll_device("robot-1", {"customer": "acme"}, {"echo": f"127.0.0.1:{echo.port}"},
                                 transport="tcp")
    fleet.start_proxy()
    fleet.start_agent(config)
    ops = fleet.user("ops", ["admin"])
    fleet.wait_online(ops, "robot-1")
    return fleet, ops


def _echo_works(fleet, ops, text: bytes) -> None:
    out = fleet.tunnel("proxy-command", "robot-1", "echo", identity=ops, input=text)
    assert out.returncode == 0 and out.stdout == text, out.stderr


@pytest.mark.parametrize("who,frames", [("anonymous", SETTINGS), ("anonymous", PING),
                                        ("engineer", PING + SETTINGS)])
def test_control_frame_flood_is_cut_and_other_sessions_keep_working(tcp_fleet, who, frames):
    fleet, ops = tcp_fleet
    alpn, cert_dir = ("fleet-enroll/1", None) if who == "anonymous" else ("fleet-user/1", ops)
    result: dict = {}

    def attack():
        result["data"] = asyncio.run(_flood(fleet, alpn, frames, cert_dir))

    attacker = threading.Thread(target=attack)
    attacker.start()
    _echo_works(fleet, ops, b"during the flood\n")  # another engineer's session
    attacker.join(60)
    assert not attacker.is_alive()
    goaways = [p for t, p in _server_frames(result["data"]) if t == GOAWAY]
    assert goaways, "the proxy did not send GOAWAY"
    assert int.from_bytes(goaways[-1][4:8], "big") == ENHANCE_YOUR_CALM
    assert b"too many HTTP/2 control frames" in goaways[-1][8:]
    # the flood was cut long before the 3 MB were taken in: few answers came back
    acks = sum(1 for t, _ in _server_frames(result["data"]) if t in (4, 6))
    budget = ANONYMOUS_BUDGET if who == "anonymous" else AUTHENTICATED_BUDGET
    assert acks <= budget.burst + 200
    log = fleet.root / "proxy.log"
    wait_until(lambda: "too many HTTP/2 control frames" in log.read_text(), 10, 0.1, "the log line")
    line = next(x for x in log.read_text().splitlines() if "too many HTTP/2 control frames" in x)
    assert f"allowed: {budget.burst:g} at once" in line  # engineers: let in first, then cut
    _echo_works(fleet, ops, b"after the flood\n")
    assert fleet.processes[0].poll() is None  # the proxy is still up
