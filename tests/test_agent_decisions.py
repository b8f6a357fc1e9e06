"""The agent's decisions, by table, without root or a network (issue 16).

Path choice, liveness and the reconnect policy are pure functions in
``tunnel.agent_decisions``; these tables pin what the agent does in each situation the network
lab (tests/test_migration.py, test_fallback.py, test_tunnel_lab.py) proves end to end. The last
tests run the real agent adapter in-process against a real proxy, with its route sampler and
dialer injected, to check that what the decisions say is what it does, and that it stops in order.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from tunnel.agent_config import Endpoint
from tunnel.agent_decisions import (
    STABLE_AFTER,
    Ended,
    Link,
    Liveness,
    PathState,
    ProbeState,
    ProbeStep,
    Reconnect,
    Route,
    endpoints_for,
    next_path,
    next_probe,
    offline_since,
    usable_endpoints,
)
from tunnel.backoff import LOCKED_WAIT
from tunnel.protocol import CLOSE_CODES
from tunnel.transport import TransportError

# --- endpoints per uplink -----------------------------------------------------------------------

MAIN = Endpoint("198.51.100.1", 4433, "proxy.example")
GROUND = Endpoint("203.0.113.7", 4433, "proxy.example", via=("sat0",))
BACKUP = Endpoint("192.0.2.9", 4433, "proxy.example")
ALL = (MAIN, GROUND, BACKUP)

WIFI = Route("10.0.0.5", "wlan0")
CELL = Route("100.64.0.9", "wwan0")
SAT = Route("172.16.0.3", "sat0")


@pytest.mark.parametrize("routes, expected", [
    ((WIFI, WIFI, WIFI), [(MAIN, WIFI), (BACKUP, WIFI)]),  # wlan0 has no endpoint of its own
    ((SAT, SAT, SAT), [(GROUND, SAT)]),  # the satellite reaches only the ground station
    ((WIFI, SAT, WIFI), [(GROUND, SAT), (MAIN, WIFI), (BACKUP, WIFI)]),  # per-uplink first
    ((None, None, CELL), [(BACKUP, CELL)]),  # no route toward the others
    ((None, None, None), []),  # every uplink down
    ((Route("::1", None), None, None), [(MAIN, Route("::1", None))]),  # uplink unknown (IPv6)
], ids=["shared", "satellite", "per-uplink-first", "one-route", "no-route", "unknown-uplink"])
def test_usable_endpoints(routes, expected):
    assert usable_endpoints(ALL, routes) == expected


def test_records_are_values():
    assert Route("10.0.0.5", "wlan0") == WIFI and hash(Route("10.0.0.5", "wlan0")) == hash(WIFI)
    assert WIFI != CELL and WIFI != ("10.0.0.5", "wlan0")  # a record, not a tuple
    assert PathState(WIFI).replace(outage_since=3.0) == PathState(WIFI, 3.0)
    assert repr(ProbeState(1.0)) == "ProbeState(last_probe=1.0, pending=None)"
    with pytest.raises(AttributeError):
        WIFI.extra = 1  # slots: no stray fields


@pytest.mark.parametrize("uplink, expected", [
    ("sat0", [GROUND]), ("wlan0", [MAIN, BACKUP]), (None, [MAIN, BACKUP]),
])
def test_endpoints_for(uplink, expected):
    assert endpoints_for(ALL, uplink) == expected


# --- path choice --------------------------------------------------------------------------------

NOW = 1000.0
IDLE = 60.0
QUIC_ON_WIFI = Link("quic", WIFI.source, last_received=NOW - 0.5, idle_timeout=IDLE)
TCP_ON_WIFI = Link("tcp", WIFI.source, last_received=NOW - 0.5, idle_timeout=IDLE)
ON_WIFI = PathState(WIFI)
OUTAGE_5S = PathState(None, NOW - 5)


def _silent(link: Link, seconds: float) -> Link:
    return Link(link.transport, link.local, NOW - seconds, link.idle_timeout)


@pytest.mark.parametrize("state, sample, link, action, route, outage, reason", [
    # the route goes away: an outage starts (said once), then nothing can be decided
    (ON_WIFI, None, QUIC_ON_WIFI, "lost", None, None, ""),
    (OUTAGE_5S, None, QUIC_ON_WIFI, "stay", None, None, ""),
    # same address, same uplink: stay
    (ON_WIFI, WIFI, QUIC_ON_WIFI, "stay", WIFI, None, ""),
    # same address, the uplink got a name (interface renamed / learnt): stay, note it
    (PathState(Route(WIFI.source, None)), WIFI, QUIC_ON_WIFI, "stay", WIFI, None, ""),
    # Wi-Fi -> cellular on QUIC: migrate
    (ON_WIFI, CELL, QUIC_ON_WIFI, "migrate", CELL, None, ""),
    # the route came back after 5 s: migrate (re-validate) even over the same address
    (OUTAGE_5S, WIFI, QUIC_ON_WIFI, "migrate", WIFI, 5.0, ""),
    (OUTAGE_5S, CELL, QUIC_ON_WIFI, "migrate", CELL, 5.0, ""),
    # silent nearly the whole idle timeout: the proxy is about to forget us, reconnect
    (OUTAGE_5S, CELL, _silent(QUIC_ON_WIFI, IDLE - 1.0), "reconnect", CELL, 5.0, "outlived"),
    (OUTAGE_5S, CELL, _silent(QUIC_ON_WIFI, IDLE - 1.01), "migrate", CELL, 5.0, ""),
    # a silence without an outage is the liveness probe's business, not the path's
    (ON_WIFI, WIFI, _silent(QUIC_ON_WIFI, IDLE * 2), "stay", WIFI, None, ""),
    # TCP cannot migrate: a new address, or any outage, means a new connection
    (ON_WIFI, CELL, TCP_ON_WIFI, "reconnect", CELL, None, "TCP connection cannot migrate"),
    (OUTAGE_5S, WIFI, TCP_ON_WIFI, "reconnect", WIFI, None, "TCP connection cannot migrate"),
    (ON_WIFI, WIFI, TCP_ON_WIFI, "stay", WIFI, None, ""),
    # the satellite uplink does not reach the main endpoint: reconnect (to the ground station)
    (ON_WIFI, SAT, QUIC_ON_WIFI, "reconnect", SAT, None, "uplink sat0 does not reach 198.51.100.1:4433"),
    (OUTAGE_5S, SAT, QUIC_ON_WIFI, "reconnect", SAT, None, "per-uplink endpoints: 203.0.113.7:4433"),
], ids=["lost", "still-lost", "same", "uplink-named", "wifi-to-cell", "back-same-address",
        "back-new-address", "outage-outlived-idle", "outage-just-within-idle", "silent-no-outage",
        "tcp-new-address", "tcp-after-outage", "tcp-same", "uplink-not-served",
        "uplink-not-served-after-outage"])
def test_path_choice(state, sample, link, action, route, outage, reason):
    new, step = next_path(state, sample, NOW, link, endpoint=MAIN, endpoints=ALL, probe_timeout=1.0)
    assert step.action == action
    assert step.route == route
    assert step.outage == outage
    assert reason in step.reason
    if action == "reconnect":
        assert step.reason
        assert step.endpoints == tuple(endpoints_for(ALL, sample.uplink))  # where to go instead


def test_path_state_through_an_outage():
    """Lost at t, back at t+5 on another uplink: migrate once with outage 5 s, and the outage
    is over in the state (a failed migration is retried by the next sample, not reported as an
    outage again)."""
    state, step = next_path(ON_WIFI, None, NOW, QUIC_ON_WIFI, endpoint=MAIN, endpoints=ALL, probe_timeout=1.0)
    assert (step.action, state) == ("lost", PathState(None, NOW))
    state, step = next_path(state, None, NOW + 1, QUIC_ON_WIFI, endpoint=MAIN, endpoints=ALL, probe_timeout=1.0)
    assert (step.action, state.outage_since) == ("stay", NOW)
    state, step = next_path(state, CELL, NOW + 5, QUIC_ON_WIFI, endpoint=MAIN, endpoints=ALL, probe_timeout=1.0)
    assert (step.action, step.outage, state.outage_since) == ("migrate", 5.0, None)
    # the migration failed (the connection is still on Wi-Fi's address): the next sample retries
    state, step = next_path(state, CELL, NOW + 6, QUIC_ON_WIFI, endpoint=MAIN, endpoints=ALL, probe_timeout=1.0)
    assert (step.action, step.outage) == ("migrate", None)


def test_the_ground_station_stays_on_its_uplink():
    link = Link("quic", SAT.source, NOW, IDLE)
    _, step = next_path(PathState(SAT), SAT, NOW, link, endpoint=GROUND, endpoints=ALL, probe_timeout=1.0)
    assert step.action == "stay"
    _, step = next_path(PathState(SAT), CELL, NOW, link, endpoint=GROUND, endpoints=ALL, probe_timeout=1.0)
    assert step.action == "reconnect" and step.endpoints == (MAIN, BACKUP)


# --- liveness -----------------------------------------------------------------------------------

LIVE = Liveness(probe_interval=1.0, probe_timeout=1.0, keepalive=25.0, dead_after=3)


@pytest.mark.parametrize("state, now, heard, rtt, route, sessions, forced, expected, pending", [
    # idle: a keepalive every 25 s, nothing before
    (ProbeState(0.0), 10.0, 9.0, 0.01, True, False, False, ProbeStep(silent=1.0), None),
    (ProbeState(0.0), 25.0, 24.0, 0.01, True, False, False, ProbeStep(ping=True, silent=1.0), 25.0),
    # sessions open: every probe_interval
    (ProbeState(0.0), 1.0, 0.5, 0.01, True, True, False, ProbeStep(ping=True, silent=0.5), 1.0),
    (ProbeState(0.0), 0.5, 0.5, 0.01, True, True, False, ProbeStep(silent=0.0), None),
    # a wake-up a few ms early still probes
    (ProbeState(0.0), 0.996, 0.5, 0.01, True, True, False, ProbeStep(ping=True, silent=0.496), 0.996),
    # just migrated: probe now, whatever the interval
    (ProbeState(0.0), 0.1, 0.0, 0.01, True, False, True, ProbeStep(ping=True, silent=0.1), 0.1),
    # the proxy answered the pending probe: cleared, and idle again
    (ProbeState(5.0, 5.0), 6.0, 5.02, 0.01, True, False, False, ProbeStep(silent=0.98), None),
    # unanswered: probe every second, dead after 3 answer windows
    (ProbeState(6.0, 5.0), 7.0, 4.0, 0.01, True, False, False, ProbeStep(ping=True, silent=3.0), 5.0),
    (ProbeState(7.0, 5.0), 8.0, 4.0, 0.01, True, False, False, ProbeStep(dead=True, silent=4.0), 5.0),
    # a slow path (RTT 2 s) gets answer windows of two RTTs: not dead yet
    (ProbeState(7.0, 5.0), 8.0, 4.0, 2.0, True, False, False, ProbeStep(ping=True, silent=4.0), 5.0),
    (ProbeState(16.0, 5.0), 17.0, 4.0, 2.0, True, False, False, ProbeStep(dead=True, silent=13.0), 5.0),
    # no route at all: nothing to probe, nothing to conclude (the path watcher handles it)
    (ProbeState(7.0, 5.0), 30.0, 4.0, 0.01, False, True, False, ProbeStep(), None),
], ids=["idle", "keepalive", "sessions", "sessions-early", "slack", "forced", "answered",
        "unanswered", "dead", "slow-path", "slow-path-dead", "no-route"])
def test_liveness(state, now, heard, rtt, route, sessions, forced, expected, pending):
    new, step = next_probe(state, LIVE, now=now, last_received=heard, rtt=rtt, route_known=route,
                           sessions_open=sessions, forced=forced)
    assert (step.ping, step.dead) == (expected.ping, expected.dead)
    assert step.silent == pytest.approx(expected.silent)
    assert new.pending == pending
    if step.ping:
        assert new.last_probe == now


@pytest.mark.parametrize("state, sessions, now, wait", [
    (ProbeState(0.0), False, 5.0, 20.0),  # idle: until the keepalive
    (ProbeState(0.0), True, 0.25, 0.75),  # sessions: until the next second
    (ProbeState(0.0, 0.0), False, 0.25, 0.75),  # an answer overdue: fast too
    (ProbeState(0.0), False, 30.0, 0.0),  # overdue: now
])
def test_liveness_wait(state, sessions, now, wait):
    assert LIVE.wait(state, sessions, now) == pytest.approx(wait)


def _time_to_dead(policy: Liveness, *, silent_from: float, sessions: bool, rtt: float = 0.01) -> float:
    """Simulate the probe loop on a path that went silent at ``silent_from``: when is it dead?"""
    state, now, heard = ProbeState(0.0), 0.0, 0.0
    for _ in range(10_000):
        now += policy.wait(state, sessions, now)
        if now < silent_from:
            heard = now  # every probe answered at once
        state, step = next_probe(state, policy, now=now, last_received=heard, rtt=rtt,
                                 route_known=True, sessions_open=sessions)
        if step.dead:
            return now
    raise AssertionError("never declared dead")


@pytest.mark.parametrize("sessions, silent_from, dead_at", [
    (True, 10.5, 14.0),  # with sessions: the next probe (11) unanswered for 3 windows
    (False, 10.5, 28.0),  # idle: the keepalive at 25 is the first unanswered probe
])
def test_a_silent_path_is_declared_dead(sessions, silent_from, dead_at):
    assert _time_to_dead(LIVE, silent_from=silent_from, sessions=sessions) == pytest.approx(dead_at)


# --- reconnect policy ---------------------------------------------------------------------------


class TopRng(random.Random):
    """Full jitter at its ceiling, so the table can name each delay exactly."""

    def uniform(self, a: float, b: float) -> float:
        return b


def _policy() -> Reconnect:
    return Reconnect(base=0.5, cap=30.0, no_route_wait=1.0, rng=TopRng())


@pytest.mark.parametrize("ended, action, delay, cause, wake_on", [
    # refused for good: stop
    (Ended("closed", "decommissioned", "decommissioned", accepted=True), "stop", 0.0, "decommissioned", "network"),
    (Ended("error", "revoked", "revoked"), "stop", 0.0, "revoked", "network"),
    # locked: minutes, or until the lock's end; a new network ends the wait early
    (Ended("closed", "locked", "locked", "locked until None"), "wait", LOCKED_WAIT, "locked", "network"),
    # after a connection the proxy took: at once
    (Ended("network", "uplink sat0 does not reach x", accepted=True), "connect", 0.0, "", "network"),
    (Ended("dead", "path dead", accepted=True), "connect", 0.0, "", "network"),
    (Ended("closed", "replaced", "replaced", accepted=True), "connect", 0.0, "", "network"),
    (Ended("closed", "closed", accepted=True), "connect", 0.0, "", "network"),
    (Ended("upgrade", "back on QUIC", accepted=True), "connect", 0.0, "", "network"),
    # the network changed before the hello was answered: at once too
    (Ended("network", "TCP cannot migrate"), "connect", 0.0, "", "network"),
    # a proxy shutting down: jittered backoff, so a fleet does not come back in lockstep
    (Ended("closed", "server shutting down", "shutdown", accepted=True), "wait", 0.5, "backoff", "network"),
    # closed before the proxy answered the hello: backoff
    (Ended("error", "transport error"), "wait", 0.5, "backoff", "network"),
    (Ended("closed", "closed", lasted=STABLE_AFTER), "wait", 0.5, "backoff", "network"),
], ids=["decommissioned", "revoked", "locked", "network", "dead", "replaced", "closed", "upgrade",
        "network-before-hello", "shutdown", "error-before-hello", "closed-after-stable"])
def test_after_a_connection(ended, action, delay, cause, wake_on):
    step = _policy().after_end(ended)
    assert (step.action, step.delay, step.cause, step.wake_on) == (action, delay, cause, wake_on)
    if action == "stop":
        assert step.why


def test_backoff_grows_until_a_connection_works():
    policy = _policy()
    refused_early = Ended("error", "transport error")
    delays = [policy.after_end(refused_early).delay for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert policy.after_end(Ended("dead", "path dead", accepted=True)).action == "connect"
    assert policy.after_end(refused_early).delay == 0.5  # the working connection reset it
    policy.after_end(refused_early)
    policy.network_changed()  # a new network is worth trying at once
    assert policy.after_end(refused_early).delay == 0.5
    # a connection that lasted, even unanswered, resets it too
    policy.after_end(refused_early)
    assert policy.after_end(Ended("closed", "closed", lasted=STABLE_AFTER)).delay == 0.5


def test_locked_wait_ends_at_the_lock_end_and_resets_the_backoff():
    policy = _policy()
    for _ in range(4):
        policy.after_end(Ended("error", "x"))
    step = policy.after_end(Ended("closed", "locked", "locked", "locked until 2000-01-01T00:00:00Z"))
    assert (step.action, step.delay) == ("wait", 1.0)  # the lock already ended: re-check soon
    assert policy.after_end(Ended("error", "x")).delay == 0.5


@pytest.mark.parametrize("refused, offered, action, delay, cause", [
    (("revoked", "revoked: certificate ab"), True, "stop", 0.0, "revoked"),
    (("unknown_identity", ""), True, "stop", 0.0, "unknown_identity"),
    (("locked", "locked until None"), True, "wait", LOCKED_WAIT, "locked"),
    (("replaced", ""), True, "wait", 0.5, "backoff"),  # about one connection: the usual backoff
    (("shutdown", "server shutting down"), True, "wait", 0.5, "backoff"),
    (None, True, "wait", 0.5, "backoff"),  # no endpoint answered
    (None, False, "wait", 1.0, "no_route"),  # no endpoint usable: look again each probe interval
], ids=["revoked", "unknown", "locked", "replaced", "shutdown", "no-answer", "no-route"])
def test_after_a_round_without_connection(refused, offered, action, delay, cause):
    step = _policy().after_no_connection(refused, offered)
    assert (step.action, step.delay, step.cause) == (action, delay, cause)
    if action == "wait":
        assert step.wake_on == "endpoints"  # only a change of usable endpoints ends it early


def test_every_close_code_has_a_next_step():
    for name in CLOSE_CODES:
        assert _policy().after_end(Ended("closed", name, name, accepted=True)).action in {"connect", "wait", "stop"}
        assert _policy().after_no_connection((name, ""), True).action in {"wait", "stop"}


def test_full_jitter_stays_within_the_ceiling():
    policy = Reconnect(base=0.5, cap=30.0, rng=random.Random(7))
    for attempt in range(12):
        delay = policy.after_no_connection(None, True).delay
        assert 0.0 <= delay <= min(30.0, 0.5 * 2**attempt)


@pytest.mark.parametrize("lost_at, heard, now, expected", [
    (None, 95.0, 100.0, 95.0),  # last heard from the proxy
    (90.0, 95.0, 100.0, 90.0),  # the route went away first
    (None, 105.0, 100.0, 100.0),  # never in the future
])
def test_offline_since(lost_at, heard, now, expected):
    assert offline_since(lost_at, heard, now) == expected


# --- what a transport error says about the end ----------------------------------------------------


@pytest.mark.parametrize("error, name, label, text", [
    (TransportError(CLOSE_CODES["locked"], "locked: until x", remote=True), "locked", "locked", "locked"),
    (TransportError(CLOSE_CODES["revoked"], "revoked: ab", remote=True), "revoked", "revoked", "revoked"),
    (TransportError(4, "server shutting down", remote=True), "shutdown", 4, "server shutting down"),
    (TransportError(0x77, "something new", remote=True), None, 0x77, "something new"),
    (TransportError(0x12A, "TLS alert", application=False), None, 0x12A, "TLS alert"),  # not the proxy's word
], ids=["locked", "revoked", "transport-shutdown", "unknown-code", "transport-close"])
def test_read_close(error, name, label, text):
    from tunnel.agent import read_close

    closed = read_close(error)
    assert (closed.name, closed.label, closed.text, closed.reason) == (name, label, text, error.reason)


# --- the adapter, in-process against a real proxy -------------------------------------------------


def test_the_adapter_uses_what_it_is_given_and_stops_in_order(fleet, echo):
    """The real Agent with an injected route sampler and dialer, against a real proxy. Asked
    to stop with a session open, it closes its connection with "agent stopping" (the proxy
    audits that reason), the session ends as cut for the engineer (exit 4), and run() returns
    with no task, session or connection left behind."""
    from fleet_harness import PY, wait_until

    from tunnel import agent_config
    from tunnel.agent import Agent
    from tunnel.transport import dial

    config = agent_config.load(fleet.enroll_device("robot-1", {"env": "lab"}, {"echo": f"127.0.0.1:{echo.port}"}))
    ops = fleet.user("ops", ["admin"])
    fleet.start_proxy()
    samples: list[int] = []
    dials: list[str] = []

    def sampler(endpoints):
        samples.append(len(endpoints))
        return [Route("127.0.0.1", "lo") for _ in endpoints]

    async def dialer(host, port, **options):
        dials.append(f"{host}:{port}")
        return await dial(host, port, **options)

    async def until(predicate, what):
        for _ in range(400):
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    async def main():
        agent = Agent(config, sample_routes=sampler, dialer=dialer)
        run = asyncio.create_task(agent.run())
        await until(lambda: agent.conn is not None, "connected")
        conn = agent.conn
        engineer = await asyncio.create_subprocess_exec(
            PY, "-m", "tunnel.cli", "proxy-command", "robot-1", "echo", "--identity", str(ops),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, **fleet.env})
        engineer.stdin.write(b"ping\n")
        assert await asyncio.wait_for(engineer.stdout.readline(), 30) == b"ping\n"
        assert agent.active_sessions == 1 and agent._sessions
        agent.stop()
        await asyncio.wait_for(run, 10)
        assert conn.is_closed
        assert not agent._tasks and not agent._sessions and not agent._conns and agent.conn is None
        assert not agent._conn_sessions  # nothing keeps a closed connection alive
        assert agent.active_sessions == 0 and agent.retired is None
        _, err = await asyncio.wait_for(engineer.communicate(), 30)
        return engineer.returncode, err

    status, err = asyncio.run(main())
    assert status == 4, err  # cut, not a clean end
    assert samples and dials == [fleet.address]  # the injected sampler and dialer were used
    ends = wait_until(lambda: [e for e in fleet.audit() if e["type"] == "device.disconnect"], what="disconnect")
    assert ends[-1]["reason"] == "agent stopping"


def test_a_refusal_for_good_stops_the_adapter(fleet):
    """The injected dialer gets the proxy's 'decommissioned' close: run() returns, retired."""
    from tunnel import agent_config
    from tunnel.agent import Agent

    config = agent_config.load(fleet.enroll_device("robot-2", {"env": "lab"}, {}))
    calls: list[str] = []

    async def dialer(host, port, **options):
        calls.append(host)
        raise TransportError(CLOSE_CODES["decommissioned"], "decommissioned: device robot-2 is decommissioned",
                             application=True, remote=True)

    async def main():
        agent = Agent(config, sample_routes=lambda eps: [Route("127.0.0.1", "lo") for _ in eps], dialer=dialer)
        await asyncio.wait_for(agent.run(), 10)
        return agent

    agent = asyncio.run(main())
    assert calls == ["127.0.0.1"]
    assert agent.retired is not None and agent.retired.action == "stop" and agent.retired.why
