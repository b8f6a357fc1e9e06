"""What the proxy's parts share: its live state, the registry write queue, and the records.

The proxy is one :class:`ProxyCore` (the :class:`tunnel.proxy.Proxy` facade is its subclass)
and three collaborators that each get it: :mod:`tunnel.proxy_agents` (agent links),
:mod:`tunnel.proxy_sessions` (engineers: dials, requests) and :mod:`tunnel.proxy_enroll`
(anonymous enrollment and login). This module holds what they all read and write: the
connected agents and open sessions, the policy snapshot, the limiters, and the one way to the
registry, a queue on :class:`tunnel.registry_writer.RegistryWriter` (:meth:`ProxyCore.write`,
:meth:`ProxyCore.audit`, :meth:`ProxyCore.settled`). It imports none of them, so no part
imports another's facade.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from enroll import audit
from enroll.session_log import Detached
from enroll.state import FleetState
from tunnel import access
from tunnel.admission import CODES, Peer
from tunnel.live_policy import LivePolicy
from tunnel.log import event
from tunnel.metrics import ProxyMetrics
from tunnel.ratelimit import RateLimiter, RefusalTally
from tunnel.resume import DEFAULT_HOLD
from tunnel.transport import Connection, Stream, TransportError

if TYPE_CHECKING:
    from collections.abc import Callable

    from tunnel.registry_writer import RegistryWriter
    from tunnel.transport import Server

log = logging.getLogger("tunnel.proxy")

#: How long a refusal waits for its audit event before answering anyway.
DENIAL_AUDIT_WAIT = 3.0
#: Probing an agent with open sessions: a PING every PROBE_INTERVAL; DEAD_AFTER PINGs in a row
#: unanswered (each given max(PROBE_TIMEOUT, 2 RTT)) with nothing else heard means it is dead.
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0
DEAD_AFTER = 3


@dataclass
class AgentLink:
    """One connected agent, as ``tunnel status`` shows it."""

    device_id: str
    conn: Connection
    peer: Peer
    connected_at: float = field(default_factory=time.time)
    sessions: int = 0
    sessions_total: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    migrations: int = 0
    transport: str = "quic"
    #: the uplink the agent reports (hello ``uplink``); None until it says
    uplink: str | None = None
    path_since: float = field(default_factory=time.time)
    #: this device's counts for the life of the proxy process (shared by its successive links)
    totals: dict[str, int] = field(default_factory=lambda: {"connections": 1, "migrations": 0})
    #: the device's listed services (name → port) from its hello; None until it says
    services: dict[str, int] | None = None
    #: the agent said it can resume sessions (hello ``resume``, issue 17); an older agent does not
    resumes: bool = False
    #: set once the first hello was handled (a dial waits for it briefly, see HELLO_WAIT)
    hello: asyncio.Event = field(default_factory=asyncio.Event)
    #: why the proxy gave up on this agent (it stopped answering probes), if it did
    dead_reason: str | None = None

    def note_hello(self, args: dict) -> None:
        """Record what an agent's hello says about its path and services (call from the hello
        handler)."""
        if args.get("uplink"):
            self.uplink = str(args["uplink"])
        if "services" in args:
            self.services = access.service_table(args["services"])
        self.resumes = args.get("resume") is True
        self.hello.set()

    def as_dict(self) -> dict:
        address = "{}:{}".format(*self.conn.remote_address[:2])
        t = self.totals
        return {
            "device": self.device_id,
            "address": address,
            "uplink": self.uplink,
            "path": f"{address} via {self.uplink}" if self.uplink else address,
            "path_since": dt.datetime.fromtimestamp(self.path_since, dt.UTC).isoformat(timespec="seconds"),
            "transport": self.transport,
            "connected_since": dt.datetime.fromtimestamp(self.connected_at, dt.UTC).isoformat(timespec="seconds"),
            "sessions": self.sessions,
            "sessions_total": self.sessions_total,
            "bytes_to_device": self.bytes_down,
            "bytes_from_device": self.bytes_up,
            "migrations": self.migrations,
            "migrations_total": t["migrations"],
            "reconnects": t["connections"] - 1,
        }


@dataclass
class Liveness:
    """Is an agent with open sessions still there? (pure; :meth:`tunnel.proxy_agents.AgentLinks.probe` drives it)

    A probe that went unanswered counts as a miss only if nothing at all arrived from the agent
    meanwhile (a PING can queue behind bulk data on TCP); ``dead_after`` misses in a row mean
    the agent is gone: the same rule the agent applies to the proxy.
    """

    dead_after: int = DEAD_AFTER
    misses: int = 0

    def answered(self) -> None:
        self.misses = 0

    def unanswered(self, heard_meanwhile: bool) -> bool:
        """Record a probe that timed out; True when the agent is to be declared dead."""
        self.misses = 0 if heard_meanwhile else self.misses + 1
        return self.misses >= self.dead_after


class ProxyCore:
    """The proxy's shared state and its registry write queue (see the module docstring)."""

    def __init__(self, state: FleetState, *, enroll_rate: float = 5.0, watch_interval: float = 1.0,
                 anonymous_rate: float = 20.0, refusal_window: float = 60.0):
        self.state = state
        self.fleet = state.fleet
        self.registry = state.registry()
        #: the policy snapshot every admission, dial and re-check is decided on
        self.policy = LivePolicy(state, self.registry)
        self.agents: dict[str, AgentLink] = {}
        self.peers: dict[Connection, Peer] = {}
        self.sessions: dict[str, Session] = {}  # re-authorized by Proxy._watch until cut or ended
        #: every session whose session.start was submitted and whose session.end was not yet
        #: (see end_session): what a shutdown must close
        self.open_sessions: dict[str, Session] = {}
        self.stopping = False
        #: the longest a resumable session may be away and still resume (``--resume-hold``)
        self.resume_hold = DEFAULT_HOLD
        #: resumable sessions whose stream is away, by id: the sweep ends those not resumed
        #: (:meth:`tunnel.proxy.Proxy._sweep_detached`)
        self.detached: dict[str, Detached] = {}
        #: resumable sessions this proxy cut for good (a revoked or expired certificate, a lock):
        #: id → (reason, when); the agent, which saw only a lost stream and holds the session, is
        #: told to drop it at its next ``held`` check. Kept for the hold time.
        self.policy_cuts: dict[str, tuple[str, float]] = {}
        self.probe_interval, self.probe_timeout, self.dead_after = PROBE_INTERVAL, PROBE_TIMEOUT, DEAD_AFTER
        self.device_totals: dict[str, dict[str, int]] = {}  # connections and migrations per device
        self.enroll_limiter = RateLimiter(rate=enroll_rate, burst=max(1.0, enroll_rate * 2))
        # All anonymous peers together (enrollment and login), whatever their number of addresses.
        self.anonymous_limiter = RateLimiter(rate=anonymous_rate, burst=max(1.0, anonymous_rate * 2))
        self.refusals = RefusalTally(window=refusal_window)
        self.watch_interval = watch_interval
        self.server: Server | None = None
        self.tcp_server: Server | None = None
        self.writer: RegistryWriter | None = None
        self._tasks: set[asyncio.Task] = set()
        self.metrics = ProxyMetrics(self)  # served by `tunnel proxy --metrics-listen`

    def spawn(self, coro) -> asyncio.Task:
        """Start a task the proxy keeps (and cancels at :meth:`tunnel.proxy.Proxy.stop`)."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def write(self, write: Callable[[Any], Any]) -> asyncio.Future:
        """Queue a write on the registry writer, which exists from :meth:`start` on."""
        if self.writer is None:
            raise RuntimeError("the proxy writes to the registry only once started")
        return self.writer.submit(write)

    def audit(self, type_: str, **kw) -> asyncio.Future:
        """Queue an audit event; await the result where the caller must know it is durable."""
        return self.write(lambda db: audit.append(db, type_, **kw))

    def end_session(self, session: Session, **fields) -> asyncio.Future | None:
        """Queue the session's ``session.end`` exactly once (whoever ends it first: its own task,
        a failed start, or a shutdown); None if it was already queued, or if the session was
        replaced by its own resume meanwhile.

        A resumable session whose stream was lost (an error, not a policy cut) is not over: it
        gets ``session.detach`` instead, and the sweep ends it if it is not resumed within the
        hold time (see :mod:`enroll.session_log`)."""
        if self.open_sessions.get(session.id) is not session:
            return None
        del self.open_sessions[session.id]
        if session.resumable and fields.get("result") == "error":
            self.detached[session.id] = Detached(session.id, session.start_seq or 0, session.common)
            return self.write(session.write_end(type_="session.detach", **fields))
        self.detached.pop(session.id, None)
        return self.write(session.write_end(**fields))

    async def settled(self, future: asyncio.Future | None, timeout: float | None = DENIAL_AUDIT_WAIT) -> bool:
        """Wait (at most ``timeout`` s) for a queued write; False if it failed or is still queued.

        The write itself is never cancelled: it commits whenever the registry lets it.
        """
        if future is None:
            return False
        try:
            await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            event(log, "audit write still queued", level=logging.WARNING, waited=timeout)
            return False
        except Exception as exc:  # noqa: BLE001 - the registry refused the write (locked, full)
            event(log, "audit write failed", level=logging.ERROR, error=str(exc))
            return False
        return True


@dataclass
class Session:
    """An open engineer session, re-authorized every watch interval.

    It writes its own audit pair: :meth:`write_start` remembers the sequence number it got, and
    :meth:`write_end` appends ``session.end`` only if that ``session.start`` is in the log — so
    an end queued behind a start that was never committed (registry locked, disk full) writes
    nothing, and every end has its start.
    """

    id: str
    peer: Peer
    device_id: str
    service: str
    login: str | None
    streams: tuple[Stream, Stream]
    cut_reason: str | None = None
    link: AgentLink | None = None
    #: the audit fields shared by its session.start and session.end
    common: dict = field(default_factory=dict)
    #: the reason session.end gives, when it must be exactly that (shutdown, dead agent)
    end_reason: str | None = None
    start_seq: int | None = None
    #: both ends hold it when its streams are lost (issue 17): a loss is a detach, not an end
    resumable: bool = False

    def cut(self, reason: str, code: int = CODES["revoked"], end_reason: str | None = None) -> None:
        self.cut_reason = reason
        self.end_reason = end_reason
        for s in self.streams:
            with contextlib.suppress(TransportError):
                s.reset(code)

    def write_start(self, db) -> int:
        """The ``session.start`` write (runs in the registry writer's thread)."""
        self.start_seq = audit.append(db, "session.start", **self.common)
        return self.start_seq

    def write_end(self, type_: str = "session.end", **fields):
        """A ``session.end`` (or ``session.detach``) write that appends only behind this
        session's committed start."""
        def write(db):
            if self.start_seq is None:
                return None
            if not audit.is_session_start(db, self.start_seq, self.id):
                return None  # its start was rolled back: nothing to pair
            return audit.append(db, type_, **{**self.common, **fields})

        return write


async def try_write(stream: Stream, data: bytes) -> None:
    """Write to a stream the peer may have closed meanwhile (then nothing happens)."""
    with contextlib.suppress(TransportError):
        await stream.write(data)


def finish(stream: Stream) -> None:
    """End our side of a stream, whatever state it is in."""
    with contextlib.suppress(TransportError):
        stream.write_eof()
