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
from typing import TYPE_CHECKING, Any, Literal

from tunnel.backoff import Backoff, after_refusal

if TYPE_CHECKING:  # only the type: the functions call Endpoint.serves on what they are given
    from tunnel.agent_config import Endpoint

#: a connection that lasted this long resets the reconnect backoff even if the proxy never
#: answered its hello (a proxy that takes long to answer is still a proxy that took us)
STABLE_AFTER = 10.0
#: a PING is due this much before its interval ends: a wake-up a few ms early still sends it
#: instead of sleeping again for a few ms
PROBE_SLACK = 0.005


class Value:
    """Base of the small immutable records below: equal, hashed and shown by their fields.

    Written out instead of ``@dataclass(frozen=True)`` or a named tuple: those generate code
    per class, about 5-13 KB of an idle agent's memory each, where a class with ``__slots__``
    costs 2 KB. The records are values: nothing assigns to their fields after ``__init__``
    (a new one is made, e.g. with :meth:`replace`).
    """

    __slots__: tuple[str, ...] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self._values() == other._values()

    def __hash__(self) -> int:
        return hash((type(self).__name__, self._values()))

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__name__}({fields})"

    def replace(self, **changes: Any) -> Any:
        return type(self)(**{name: changes.get(name, getattr(self, name)) for name in self.__slots__})


class Route(Value):
    """What the kernel would use toward one endpoint now."""

    __slots__ = ("source", "uplink")

    def __init__(self, source: str, uplink: str | None) -> None:
        self.source = source  # local address
        self.uplink = uplink  # interface name (None when it cannot be told, e.g. IPv6)


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


class PathState(Value):
    """What the path watcher knows about the live connection's path."""

    __slots__ = ("route", "outage_since")

    def __init__(self, route: Route | None, outage_since: float | None = None) -> None:
        self.route = route  # the route in use (None while there is none)
        self.outage_since = outage_since  # when the route went away, if it did


class Link(Value):
    """The live connection, as the path decision sees it (read from it at each sample)."""

    __slots__ = ("transport", "local", "last_received", "idle_timeout")

    def __init__(self, transport: str, local: str, last_received: float, idle_timeout: float) -> None:
        self.transport = transport  # "quic" or "tcp"
        self.local = local  # its local address now
        self.last_received = last_received  # when the proxy was last heard from (``now``'s clock)
        self.idle_timeout = idle_timeout  # nothing heard for this long: the proxy forgets it


PathAction = Literal["stay", "lost", "migrate", "reconnect"]


class PathStep(Value):
    """What to do after one route sample.

    ``stay``: nothing (``route`` may still be a new one over the same address, to record).
    ``lost``: the route just went away (an outage starts; say so once).
    ``migrate``: move the connection to ``route.source``; ``outage`` is how long the route was
    gone, if it was. ``reconnect``: give this connection up; ``reason`` says why (told to the
    proxy in the next hello) and ``endpoints`` are the ones the current uplink may use.
    """

    __slots__ = ("action", "route", "reason", "outage", "endpoints")

    def __init__(self, action: PathAction, route: Route | None = None, reason: str = "",
                 outage: float | None = None, endpoints: tuple[Endpoint, ...] = ()) -> None:
        self.action = action
        self.route = route
        self.reason = reason
        self.outage = outage
        self.endpoints = endpoints


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
        return state.replace(route=sample), PathStep("stay", sample)
    outage = round(now - state.outage_since, 3) if state.outage_since is not None else None
    state = state.replace(outage_since=None)
    if after_outage and now - link.last_received >= link.idle_timeout - probe_timeout:
        return state, PathStep(
            "reconnect", sample, outage=outage, endpoints=tuple(endpoints_for(endpoints, sample.uplink)),
            reason=f"outage of {outage}s outlived the connection's {link.idle_timeout:g}s idle timeout")
    return state, PathStep("migrate", sample, outage=outage)


# --- liveness ---------------------------------------------------------------------------------


class Liveness(Value):
    """Probe settings (``agent.yaml``): ``keepalive`` when idle, ``probe_interval`` while sessions
    are open or a probe went unanswered, dead after ``dead_after`` answer windows of silence."""

    __slots__ = ("probe_interval", "probe_timeout", "keepalive", "dead_after")

    def __init__(self, probe_interval: float = 1.0, probe_timeout: float = 1.0,
                 keepalive: float = 25.0, dead_after: int = 3) -> None:
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout
        self.keepalive = keepalive
        self.dead_after = dead_after

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


class ProbeState(Value):
    __slots__ = ("last_probe", "pending")

    def __init__(self, last_probe: float, pending: float | None = None) -> None:
        self.last_probe = last_probe  # when the last PING went out (or the watcher started)
        self.pending = pending  # the oldest PING nothing was heard after


class ProbeStep(Value):
    __slots__ = ("ping", "dead", "silent")

    def __init__(self, ping: bool = False, dead: bool = False, silent: float = 0.0) -> None:
        self.ping = ping  # send a PING now
        self.dead = dead  # nothing heard for too long: give the path up
        self.silent = silent  # seconds since the proxy was last heard from


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


class Ended(Value):
    """How one connection ended: the only input the reconnect policy needs."""

    __slots__ = ("kind", "reason", "code", "close_reason", "accepted", "lasted")

    def __init__(self, kind: EndKind, reason: str, code: str | None = None, close_reason: str = "",
                 accepted: bool = False, lasted: float = 0.0) -> None:
        self.kind = kind
        self.reason = reason  # for the log and the next hello's ``reconnect``
        self.code = code  # the proxy's close code name (``tunnel.protocol.CLOSE_CODES``), if any
        self.close_reason = close_reason  # and the reason it gave (a lock's end)
        self.accepted = accepted  # the proxy answered our hello
        self.lasted = lasted  # seconds the connection was up


class Next(Value):
    """What the agent does next.

    ``connect`` at once; ``wait`` ``delay`` seconds, ended early (and the backoff reset) by a
    network change (``wake_on="network"``) or only by one that changes the usable endpoints
    (``"endpoints"``); ``stop`` for good (``why`` says what an operator must do).
    """

    __slots__ = ("action", "delay", "wake_on", "why", "cause")

    def __init__(self, action: Literal["connect", "wait", "stop"], delay: float = 0.0,
                 wake_on: Literal["network", "endpoints"] = "network", why: str = "",
                 cause: str = "") -> None:
        self.action = action
        self.delay = delay
        self.wake_on = wake_on
        self.why = why
        #: what it is for, for the log: ``backoff``, ``locked``, ``no_route``, or the stop's code
        self.cause = cause


class Reconnect:
    """The reconnect policy: jittered exponential backoff (reset by a connection that worked or
    by a new network) and the proxy's refusal codes.

    After a connection the proxy took, the first retry is immediate: the device comes back as
    soon as possible after a path change or a dead path (a proxy killed, a link gone silent). A
    connection closed before the proxy answered (refused, or a proxy still starting), or closed by
    a proxy shutting down (a restart), backs off with full jitter so a fleet does not reconnect in
    lockstep.
    ``no_route_wait``: how often to look again while no endpoint has a route.
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, *, no_route_wait: float = 1.0,
                 stable_after: float = STABLE_AFTER, rng: random.Random | None = None) -> None:
        self.no_route_wait = no_route_wait
        self.stable_after = stable_after
        self.backoff = Backoff(base=base, cap=cap, rng=rng or random.Random())

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
