"""Anonymous traffic (issue 13, item 7): a global limit on top of the per-address one, and
refusals summed up in the audit log instead of one fsynced event each.

The attack: bogus enrollments from many source addresses (127.0.0.x, over QUIC and TLS/TCP)
against a real proxy process. It must be limited globally, the audit log must grow by a bounded
number of summary events whose counts add up, a token that really exists still gets its own
event, and a real enrollment succeeds right after the flood.
"""

import asyncio
import json
import secrets
import signal

from fleet_harness import PY, wait_until

from enroll import device, tokens
from enroll.online import enroll_online
from enroll.request import EnrollError
from tunnel.client import Refusal, exchange
from tunnel.enroll_cli import enroll_exchange
from tunnel.protocol import ALPN_ENROLL
from tunnel.ratelimit import OTHER_SOURCES, RateLimiter, RefusalTally, source_of
from tunnel.transport import connect as quic_connect
from tunnel.transport import tcp_connect

SOURCES = 40
PER_SOURCE = 3


# --- the pure parts --------------------------------------------------------------------------


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def test_one_shared_bucket_limits_all_keys_together():
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=4, clock=clock)
    assert [limiter.allow() for _ in range(6)] == [True] * 4 + [False] * 2
    clock.now += 0.5  # one token back
    assert limiter.allow() and not limiter.allow()


def test_tally_sums_per_source_and_window_and_caps_the_sources():
    clock = Clock(120.0)
    tally = RefusalTally(window=60, max_sources=3, clock=clock)
    for i in range(5):
        for _ in range(i + 1):
            tally.note(f"198.51.100.{i}", "busy")
    tally.note("198.51.100.0", "unknown_token")
    assert tally.due() == []  # the window has not ended
    clock.now = 180.0
    got = {s.source: s for s in tally.due()}
    assert set(got) == {"198.51.100.0", "198.51.100.1", "198.51.100.2", OTHER_SOURCES}
    assert got["198.51.100.0"].count == 2 and got["198.51.100.0"].codes == {"busy": 1, "unknown_token": 1}
    assert got[OTHER_SOURCES].count == 4 + 5  # sources 3 and 4, beyond the cap
    assert (got["198.51.100.1"].window_start, got["198.51.100.1"].window_end) == (120.0, 180.0)
    assert tally.due() == [] and tally.pending == 0
    tally.note("198.51.100.9", "busy")  # the open window goes out at shutdown
    assert [s.count for s in tally.due(final=True)] == [1]


def test_an_ipv6_host_counts_as_its_64():
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::2") == "2001:db8:1:2::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("192.0.2.7") == "192.0.2.7"


# --- the attack on a real proxy --------------------------------------------------------------


def _start_proxy(fleet, *extra):
    log = fleet.root / "proxy.log"
    proc = fleet.start([PY, "-m", "tunnel.cli", "proxy", "--state", str(fleet.state.root),
                        "--listen", fleet.address, "--log-format", "json", *extra], log)

    def listening():
        assert proc.poll() is None, log.read_text()
        return '"listening"' in log.read_text()

    wait_until(listening, 15, 0.05, "proxy listening")
    return proc


async def _enroll_from(fleet, source: str, transport: str, request: str, token: str) -> str:
    """One enrollment over a connection whose socket is bound to ``source``; the refusal text."""
    dial = tcp_connect if transport == "tcp" else quic_connect
    conn = await dial(fleet.proxy_host, fleet.proxy_port, identity=None, ca=fleet.state.ca_cert,
                      server_name="proxy.test", alpn=ALPN_ENROLL, keepalive=None,
                      local_addr=(source, 0), handshake_timeout=20)
    try:
        await exchange(conn, "enroll", {"request": request, "token": token}, 20)
    except Refusal as exc:
        return str(exc)
    finally:
        conn.close(0, "done")
    return "enrolled"


def _bogus_token(fleet) -> str:
    return f"ft1.{fleet.state.fleet}.{secrets.token_hex(5)}.{secrets.token_urlsafe(32)}"


def test_bogus_enrollments_from_many_addresses_are_limited_globally_and_summed_up(fleet, tmp_path):
    proxy = _start_proxy(fleet, "--anonymous-rate", "2")
    request = json.dumps(device.prepare(tmp_path / "flood", "flood"))

    async def flood():
        jobs = [_enroll_from(fleet, f"127.0.0.{10 + i % SOURCES}", ("tcp", "quic")[i % 2], request,
                             _bogus_token(fleet))
                for i in range(SOURCES * PER_SOURCE)]
        return await asyncio.gather(*jobs)

    answers = asyncio.run(flood())
    assert "enrolled" not in answers
    busy = [a for a in answers if "refusing enrollments and logins for a moment" in a]
    unknown = [a for a in answers if "unknown join token" in a]
    assert busy, answers[:5]  # the global limit refused requests no per-address limit saw
    assert len(busy) + len(unknown) == len(answers), set(answers)

    # A token whose id exists but whose secret is wrong is worth an event of its own.
    with fleet.state.registry() as reg:
        real, _ = tokens.create(reg, fleet.state.fleet, labels={"customer": "acme"})
    guessed = real.rsplit(".", 1)[0] + "." + secrets.token_urlsafe(32)

    def attempt(token, directory, name=None):
        try:
            return asyncio.run(enroll_online(directory, fleet.address, token, fleet.pin, exchange=enroll_exchange,
                                             server_name="proxy.test", name=name))
        except EnrollError as exc:
            return str(exc)

    wait_until(lambda: "unknown join token" in attempt(guessed, tmp_path / "guess"), 20, 0.3,
               "the guessed secret refused by the CA step (not by the limit)")

    # Right after the flood, a real enrollment gets through (the limit refills within a second).
    got = wait_until(lambda: (lambda r: r if isinstance(r, dict) else None)(
        attempt(real, tmp_path / "real", "real-1")), 20, 0.3, "a real enrollment after the flood")
    assert got["device_id"] == "real-1"
    assert proxy.poll() is None

    fleet.stop(proxy, signal.SIGTERM)  # the open window's summaries are written at shutdown
    events = fleet.audit()
    summaries = [e for e in events if e["type"] == "anonymous.refused"]
    # At most one per source per window (the flood may straddle a window boundary); the
    # legitimate client on 127.0.0.1 may have been told "busy" too while the bucket refilled.
    assert 1 <= len(summaries) <= 2 * (SOURCES + 1), len(summaries)
    for e in summaries:
        assert e["actor"] == "anonymous" and e["result"] == "denied"
        assert e["fields"]["count"] == sum(e["fields"]["codes"].values())
    flood_events = [e for e in summaries if e["fields"]["remote"] != "127.0.0.1"]
    assert {e["fields"]["remote"] for e in flood_events} == {f"127.0.0.{10 + i}" for i in range(SOURCES)}
    assert sum(e["fields"]["count"] for e in flood_events) == SOURCES * PER_SOURCE
    by_code: dict[str, int] = {}
    for e in flood_events:
        for code, n in e["fields"]["codes"].items():
            by_code[code] = by_code.get(code, 0) + n
    assert by_code == {"busy": len(busy), "unknown_token": len(unknown)}
    denied = [e for e in events if e["type"] == "device.enroll.denied"]
    assert len(denied) == 1 and denied[0]["actor"] == f"token:{real.split('.')[2]}"
    assert [e["device"] for e in events if e["type"] == "device.enroll"] == ["real-1"]
