"""The agent's decisions as pure functions: which path, is it alive, when to reconnect.

Sans-I/O: nothing here opens a socket, reads a clock or awaits. Every input (a route sample,
the time, when the proxy was last heard from, the RTT, how the last connection ended) is passed
in, and every decision is returned as a value that :class:`tunnel.agent.Agent` carries out. That
is what lets ``tests/test_agent_decisions.py`` check them by table without root or a network;
the network lab (``tests/test_migration.py`` and friends) stays the end-to-end proof.

Three decisions:

* **Path choice** (:func:`next_path`): after each route sample toward the connection's endpoint,
  stay, note an outage, migrate (QUIC moves to the new local address), or reconnect (the new
  uplink does not reach this endpoint, TCP cannot migrate, or the outage outlived the idle
  timeout so the proxy has forgotten the connection). :func:`usable_endpoints` orders the
  endpoints a (re)connect may try over the current uplinks.
* **Liveness** (:func:`next_probe`): when to send a PING and when a path counts as dead.
* **Reconnect policy** (:class:`Reconnect`): what to do after each kind of end (:class:`Ended`)
  or after a round of dials that got no connection. It builds on :mod:`tunnel.backoff` (full
  jitter, and :func:`~tunnel.backoff.after_refusal` for what a refusal code means).

How a connection ended is a value (:class:`Ended`, with a ``kind``), not a set of flags written
by concurrent tasks. Resumable sessions (issue 17) will hook in there: whether open sessions are
held across the reconnect is a function of the same ``Ended`` value.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from tunnel.backoff import Backoff, after_refusal

if TYPE_CHECKING:  # only the type: the functions call Endpoint.serves on what they are given
    from tunnel.agent_config import Endpoint

#: a connection that lasted this long resets the reconnect backoff even if the proxy never
#: answered its hello (a proxy that takes long to answer is still a proxy that took us)
STABLE_AFTER = 10.0
#: a PING is due this much before its interval ends: a wake-up a few ms early still sends it
#: instead of sleeping again for a few ms
PROBE_SLACK = 0.005


@dataclass(frozen=True)
class Route:
    """What the kernel would use toward one endpoint now."""

    source: str  # local address
    uplink: str | None  # interface name (None when it cannot be told, e.g. IPv6)


# --- path choice ------------------------------------------------------------------------------


def usable_endpoints(endpoints: Sequence[Endpoint],
                     routes: Sequence[Route | None]) -> list[tuple[Endpoint, Route]]:
    """The endpoints the device may use now, each with its route, in preference order.

    ``routes[i]`` is the route toward ``endpoints[i]`` (None: no route). An endpoint is usable
    when there is a route toward it and the route's uplink is one it serves
    (:meth:`Endpoint.serves`). Per-uplink endpoints (``via``) come first, then the config order.
    """
    out = [(ep, route) for ep, route in zip(endpoints, routes, strict=True)
           if route is not None and ep.serves(route.uplink, tuple(endpoints))]
    out.sort(key=lambda pair: not pair[0].via)  # stable: config order within each group
    return out


def endpoints_for(endpoints: Sequence[Endpoint], uplink: str | None) -> list[Endpoint]:
    """The endpoints to use over ``uplink``: its own (``via``) first, then the shared ones."""
    own = [e for e in endpoints if e.via and uplink in e.via]
    return own + [e for e in endpoints if not e.via and e.serves(uplink, tuple(endpoints))]


@dataclass(frozen=True)
class PathState:
    """What the path watcher knows about the live connection's path."""

    route: Route | None  # the route in use (None while there is none)
    outage_since: float | None = None  # when the route went away, if it did


@dataclass(frozen=True)
class Link:
    """The live connection, as the path decision sees it (read from it at each sample)."""

    transport: str  # "quic" or "tcp"
    local: str  # its local address now
    last_received: float  # when the proxy was last heard from (same clock as ``now``)
    idle_timeout: float  # nothing heard for this long and the proxy forgets the connection


PathAction = Literal["stay", "lost", "migrate", "reconnect"]


@dataclass(frozen=True)
class PathStep:
    """What to do after one route sample.

    ``stay``: nothing (``route`` may still be a new one over the same address, to record).
    ``lost``: the route just went away (an outage starts; say so once).
    ``migrate``: move the connection to ``route.source``; ``outage`` is how long the route was
    gone, if it was. ``reconnect``: give this connection up; ``reason`` says why (told to the
    proxy in the next hello) and ``endpoints`` are the ones the current uplink may use.
    """

    action: PathAction
    route: Route | None = None
    reason: str = ""
    outage: float | None = None
    endpoints: tuple[Endpoint, ...] = ()


def next_path(state: PathState, sample: Route | None, now: float, link: Link, *,
              endpoint: Endpoint, endpoints: Sequence[Endpoint],
              probe_timeout: float) -> tuple[PathState, PathStep]:
    """Decide from one route sample toward ``endpoint``; return the new state and the step.

    The order matters and is the agent's contract:

    1. No route: an outage (``lost`` the first time, then ``stay``); nothing can be decided.
    2. The uplink the route uses does not reach this endpoint (a satellite link reaching only
       the ground station): ``reconnect`` to one it does reach.
    3. A TCP connection cannot migrate: after an outage or on a new source address it
       ``reconnect``\\ s.
    4. Same source address and no outage: ``stay`` (note a new uplink name, if any).
    5. After an outage longer than the idle timeout (less one probe timeout, so the migration
       is not a race against the proxy's timer) the proxy has dropped the connection:
       ``reconnect``.
    6. Otherwise ``migrate`` to the new source address (or re-validate the same one after an
       outage: the proxy learns that the path works again from the next packet).

    A migration that fails leaves the state as returned (outage over, old route): the next
    sample tries again.
    """
    if sample is None:
        if state.outage_since is None:
            return PathState(None, now), PathStep("lost")
        return state, PathStep("stay")
    if not endpoint.serves(sample.uplink, tuple(endpoints)):
        others = tuple(endpoints_for(endpoints, sample.uplink))
        listed = ", ".join(e.address for e in others) or "none"
        return state, PathStep(
            "reconnect", sample, endpoints=others,
            reason=f"uplink {sample.uplink} does not reach {endpoint.address} (per-uplink endpoints: {listed})")
    after_outage = state.outage_since is not None
    if link.transport == "tcp" and (after_outage or sample.source != link.local):
        return state, PathStep("reconnect", sample, "network changed; a TCP connection cannot migrate",
                               endpoints=tuple(endpoints_for(endpoints, sample.uplink)))
    if sample.source == link.local and not after_outage:
        return replace(state, route=sample), PathStep("stay", sample)
    outage = round(now - state.outage_since, 3) if state.outage_since is not None else None
    state = replace(state, outage_since=None)
    if after_outage and now - link.last_received >= link.idle_timeout - probe_timeout:
        return state, PathStep(
            "reconnect", sample, outage=outage, endpoints=tuple(endpoints_for(endpoints, sample.uplink)),
            reason=f"outage of {outage}s outlived the connection's {link.idle_timeout:g}s idle timeout")
    return state, PathStep("migrate", sample, outage=outage)


# --- liveness ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Liveness:
    """Probe settings (``agent.yaml``): ``keepalive`` when idle, ``probe_interval`` while sessions
    are open or a probe went unanswered, dead after ``dead_after`` answer windows of silence."""

    probe_interval: float = 1.0
    probe_timeout: float = 1.0
    keepalive: float = 25.0
    dead_after: int = 3

    def interval(self, state: ProbeState, sessions_open: bool) -> float:
        """How often to probe now: fast while sessions are open or an answer is overdue."""
        fast = sessions_open or state.pending is not None
        return self.probe_interval if fast else self.keepalive

    def answer_within(self, rtt: float | None) -> float:
        """How long an answer may take: the probe timeout, or two RTTs on a slow path."""
        return max(self.probe_timeout, 2 * (rtt or 0.0))

    def wait(self, state: ProbeState, sessions_open: bool, now: float) -> float:
        """Seconds until the next check is due (a forced probe may come sooner)."""
        return max(0.0, state.last_probe + self.interval(state, sessions_open) - now)


@dataclass(frozen=True)
class ProbeState:
    last_probe: float  # when the last PING went out (or the watcher started)
    pending: float | None = None  # the oldest PING nothing was heard after


@dataclass(frozen=True)
class ProbeStep:
    ping: bool = False  # send a PING now
    dead: bool = False  # nothing heard for too long: give the path up
    silent: float = 0.0  # seconds since the proxy was last heard from


def next_probe(state: ProbeState, policy: Liveness, *, now: float, last_received: float,
               rtt: float | None, route_known: bool, sessions_open: bool,
               forced: bool = False) -> tuple[ProbeState, ProbeStep]:
    """One liveness check: anything heard since the oldest unanswered PING clears it; without a
    route there is nothing to probe and nothing to conclude; a PING unanswered for
    ``dead_after`` answer windows means the path is dead; otherwise a PING is due when
    ``forced`` (just migrated) or when the interval has passed."""
    pending = state.pending
    if pending is not None and last_received >= pending:
        pending = None
    if not route_known:
        return ProbeState(now, None), ProbeStep()
    silent = now - last_received
    if pending is not None and now - pending >= policy.dead_after * policy.answer_within(rtt):
        return ProbeState(state.last_probe, pending), ProbeStep(dead=True, silent=silent)
    state = ProbeState(state.last_probe, pending)
    if forced or now - state.last_probe >= policy.interval(state, sessions_open) - PROBE_SLACK:
        return ProbeState(now, pending if pending is not None else now), ProbeStep(ping=True, silent=silent)
    return state, ProbeStep(silent=silent)


# --- reconnect policy -------------------------------------------------------------------------

#: how a connection ended:
#: ``network`` the path decision gave it up (uplink change, TCP on a new network, outage past
#: the idle timeout); ``dead`` liveness probes went unanswered; ``closed`` the proxy closed it
#: (``code`` says why, None for a plain transport close); ``error`` a transport error while
#: talking to the proxy; ``upgrade`` a QUIC connection replaces this TCP one.
EndKind = Literal["network", "dead", "closed", "error", "upgrade"]


@dataclass(frozen=True)
class Ended:
    """How one connection ended: the only input the reconnect policy needs."""

    kind: EndKind
    reason: str  # for the log and the next hello's ``reconnect``
    code: str | None = None  # the proxy's close code name (``tunnel.protocol.CLOSE_CODES``)
    close_reason: str = ""  # and the reason it gave (a lock's end)
    accepted: bool = False  # the proxy answered our hello
    lasted: float = 0.0  # seconds the connection was up


@dataclass(frozen=True)
class Next:
    """What the agent does next.

    ``connect`` at once; ``wait`` ``delay`` seconds, ended early (and the backoff reset) by a
    network change (``wake_on="network"``) or only by one that changes the usable endpoints
    (``"endpoints"``); ``stop`` for good (``why`` says what an operator must do).
    """

    action: Literal["connect", "wait", "stop"]
    delay: float = 0.0
    wake_on: Literal["network", "endpoints"] = "network"
    why: str = ""
    #: what the wait is for, for the log: ``backoff``, ``locked``, ``refused``, ``no_route``
    cause: str = ""


@dataclass
class Reconnect:
    """The reconnect policy: jittered exponential backoff (reset by a connection that worked or
    by a new network) and the proxy's refusal codes.

    After a connection the proxy took, the first retry is immediate: the device comes back as
    soon as possible after a path change, a dead path or a proxy restart's close. A connection
    closed before the proxy answered (refused, or a proxy still starting), or closed by a proxy
    shutting down, backs off with full jitter so a fleet does not reconnect in lockstep.
    """

    base: float = 0.5
    cap: float = 30.0
    no_route_wait: float = 1.0  # re-check this often while no endpoint has a route
    stable_after: float = STABLE_AFTER
    rng: random.Random = field(default_factory=random.Random)
    backoff: Backoff = field(init=False)

    def __post_init__(self) -> None:
        self.backoff = Backoff(base=self.base, cap=self.cap, rng=self.rng)

    def network_changed(self) -> None:
        """A new network is worth trying at once: the next failure starts from the base."""
        self.backoff.reset()

    def after_end(self, ended: Ended) -> Next:
        decision = after_refusal(ended.code, ended.close_reason)
        if decision.action == "stop":
            return Next("stop", why=decision.why, cause=ended.code or "")
        if decision.action == "wait":
            self.backoff.reset()
            return Next("wait", decision.delay, "network", decision.why, cause="locked")
        if ended.accepted or ended.lasted >= self.stable_after:
            self.backoff.reset()
        if ended.kind != "network" and (ended.code == "shutdown" or not ended.accepted):
            return Next("wait", self.backoff.next_delay(), "network", cause="backoff")
        return Next("connect")

    def after_no_connection(self, refused: tuple[str, str] | None, offered: bool) -> Next:
        """No dial succeeded: ``refused`` is the (code name, reason) of the last fleet refusal in
        the round, ``offered`` whether any endpoint was usable at all."""
        if refused is not None:
            decision = after_refusal(*refused)
            if decision.action == "stop":
                return Next("stop", why=decision.why, cause=refused[0])
            if decision.action == "wait":
                return Next("wait", decision.delay, "endpoints", decision.why, cause="locked")
        if offered:
            return Next("wait", self.backoff.next_delay(), "endpoints", cause="backoff")
        return Next("wait", self.no_route_wait, "endpoints", cause="no_route")


def offline_since(route_lost_at: float | None, last_received: float, now: float) -> float:
    """When the device went offline, for the next hello's ``outage``: when the route went away,
    or when the proxy was last heard from, whichever came first."""
    return min(route_lost_at if route_lost_at is not None else now, last_received, now)
