"""The agent on the device: one outbound connection (QUIC), a local TCP connection per session.

It listens on no network port. The loop is: dial the first proxy endpoint the current uplink
may use (jittered exponential backoff when none answers; a change of network retries at once),
say hello (with why it reconnected), then serve streams the proxy opens — each names a service
from the config, which the agent connects to on the device and splices. A refusal decides the
next step (:func:`tunnel.backoff.after_refusal`): decommissioned, revoked or unknown stops the
agent for good (``retired``; ``tunnel agent`` exits 5), locked waits minutes.

Where UDP is blocked, TLS over TCP joins the race after a 0.3 s head start; while on TCP the
agent keeps trying QUIC (:meth:`Agent._back_to_quic`) and moves over, letting open sessions
finish on the TCP connection (:meth:`Agent._drain`).

Every decision is a pure function in :mod:`tunnel.agent_decisions` (unit-tested by table, no
root needed); this module is the thin adapter that samples routes, dials, sends PINGs, migrates
and waits. The route sampler, the dialer and the clock are constructor parameters.

Path logic (:meth:`Agent._watch_routes` over :func:`~tunnel.agent_decisions.next_path`, and
:meth:`Agent._probe` over :func:`~tunnel.agent_decisions.next_probe`):

* The route toward the proxy endpoint is re-checked on every netlink route/address/link event,
  on every failed send and every ``probe_interval`` (1 s): which local address and which
  interface (uplink) the kernel would use now. No packet is sent for that.
* The source address changed (Wi-Fi → cellular), or the route came back after an outage: the
  live connection migrates — new UDP socket on the new address, new connection ID, in-flight
  packets retransmitted at once — and a probe goes out immediately. Sessions continue.
* The uplink the route now uses may not reach this endpoint (the satellite network only reaches
  the ground-station address), a TCP connection saw the network change, an outage outlived the
  idle timeout, or the connection ended (proxy restarted): the agent reconnects to an endpoint
  the current uplink may use and says why in its hello, which the proxy audits as
  ``device.reconnect``.
* Liveness: a PING every ``keepalive`` (25 s) when idle, every ``probe_interval`` while sessions
  are open or once a probe went unanswered. Nothing heard from the proxy for ``dead_after``
  probe timeouts (3 s by default) means the path is dead: the agent reconnects.

Tasks: each connection has its watchers (stream accept, route watch, liveness probe, and on TCP
the QUIC retry); ``_serve`` keeps them and cancels and awaits them when the connection ends.
Sessions and background jobs are kept too. Stopping (``stop()``, or the task cancelled by
SIGTERM) goes in order: watchers, background jobs, then the connections are closed ("agent
stopping", the reason the proxy records), the session tasks are awaited (each resets its local
socket), and the connections' close is awaited — each step bounded by ``STOP_GRACE``.

(About 800 lines, on purpose: what is left here is the one adapter whose methods share the
connection's task set and the session counts — dialing, serving, migrating, probing, the
per-session splice. The decisions live in ``agent_decisions.py``, the held resumable sessions
in ``agent_sessions.py``; splitting the adapter further would pass its state around instead.)
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import gc
import logging
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from enroll import certs
from enroll.files import write_file
from tunnel import wire
from tunnel.agent_config import AgentConfig, Endpoint
from tunnel.agent_decisions import (
    Ended,
    EndKind,
    Link,
    Liveness,
    Next,
    PathState,
    ProbeState,
    Reconnect,
    Route,
    Value,
    next_path,
    next_probe,
    offline_since,
    usable_endpoints,
)
from tunnel.log import event
from tunnel.protocol import ALPN_AGENT, CLOSE_NAMES, read_header, read_reply
from tunnel.transport import Connection, ErrorCode, Stream, TLSIdentity, TransportError, dial

if TYPE_CHECKING:  # loaded with the first resumable session (Agent.held): an idle agent does without
    from tunnel.agent_sessions import HeldSession, HeldSessions

__all__ = ["Agent", "Counters", "Route", "load_identity", "sample_routes"]

log = logging.getLogger("tunnel.agent")

LOCAL_CONNECT_TIMEOUT = 5.0
MAX_SESSIONS = 64  # open sessions, held resumable ones included
#: close codes after which no held session can resume (tunnel.protocol.CLOSE_CODES)
REFUSALS_ENDING_HELD = frozenset({"locked", "decommissioned", "revoked", "unknown_identity",
                                  "not_fleet_certificate", "wrong_kind", "expired"})
#: while sessions are held, how often the agent asks the proxy which of them may still resume
HELD_CHECK = 1.0
RENEW_AT = 2 / 3  # renew when this fraction of the certificate's life is gone
HANDSHAKE_TIMEOUT = 3.0
HEAD_START = 0.3  # QUIC's head start before TLS over TCP joins the race
SETTLE = 0.01  # coalesce a burst of netlink events (link up + route replace) into one check
STOP_GRACE = 1.0  # on stop: at most this long for the sessions to end, and for the close to finish
CLOSED_WAIT = 1.0  # after a failed request: at most this long for the close that explains it

# rtnetlink multicast groups (linux/rtnetlink.h)
_RTMGRP = 0x1 | 0x10 | 0x40 | 0x100 | 0x400  # LINK, IPV4_IFADDR, IPV4_ROUTE, IPV6_IFADDR, IPV6_ROUTE
_SIOCGIFADDR = 0x8915

#: ``sampler(endpoints)`` → the route toward each endpoint now (None: no route)
RouteSampler = Callable[[Sequence[Endpoint]], list[Route | None]]
#: ``dialer(host, port, **options)`` → a connection (:func:`tunnel.transport.dial`'s signature)
Dialer = Callable[..., Awaitable[Connection]]


def load_identity(config: AgentConfig) -> TLSIdentity:
    cert = certs.load_cert(config.cert.read_bytes())
    return TLSIdentity([cert], certs.load_key(config.key.read_bytes()), certs.load_cert(config.ca.read_bytes()))


def source_address_toward(host: str, port: int) -> str | None:
    """The local address the kernel would use to reach ``host`` now (no packet is sent)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, port))
        except OSError:
            return None  # no route: every uplink is down
        return s.getsockname()[0]


def interface_addresses() -> dict[str, str]:
    """IPv4 address -> interface name, for every interface that has one (one ioctl each)."""
    out: dict[str, str] = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue  # no IPv4 address
            out[socket.inet_ntoa(raw[20:24])] = name
    return out


def route_toward(host: str, port: int, ifaddrs: dict[str, str] | None = None) -> Route | None:
    source = source_address_toward(host, port)
    if source is None:
        return None
    if ifaddrs is None:
        ifaddrs = interface_addresses() if ":" not in host else {}
    return Route(source, ifaddrs.get(source))


def sample_routes(endpoints: Sequence[Endpoint]) -> list[Route | None]:
    """The default route sampler: ask the kernel (one interface listing for all endpoints)."""
    ifaddrs = interface_addresses() if any(":" not in ep.host for ep in endpoints) else {}
    return [route_toward(ep.host, ep.port, ifaddrs if ":" not in ep.host else {}) for ep in endpoints]


def open_netlink() -> socket.socket | None:
    """A socket that becomes readable on any route, address or link change (Linux)."""
    try:
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
    except (AttributeError, OSError):
        return None
    try:
        s.bind((0, _RTMGRP))
        s.setblocking(False)
    except OSError:
        s.close()
        return None
    return s


class Closed(Value):
    """What a :class:`TransportError` says about why the proxy ended a connection.

    :func:`read_close` is the one place in the agent that reads the error's numeric code and
    ``application`` flag.
    """

    __slots__ = ("name", "label", "text", "reason")

    def __init__(self, name: str | None, label: str | int, text: str, reason: str) -> None:
        self.name = name  # the fleet close code's name (``tunnel.protocol.CLOSE_CODES``), if any
        self.label = label  # for the log: that name, else the numeric code
        self.text = text  # why, in a word or a sentence: the code's name, else the reason given
        self.reason = reason  # the reason the peer gave


def read_close(err: TransportError) -> Closed:
    if not err.application:
        return Closed(None, err.wire_code, err.reason, err.reason or "")
    name = CLOSE_NAMES.get(err.wire_code)
    if name is None and err.wire_code == ErrorCode.SHUTDOWN:  # the transport server's own shutdown close
        return Closed("shutdown", err.wire_code, err.reason, err.reason or "")
    return Closed(name, name or err.wire_code, name or err.reason, err.reason or "")


@dataclass
class Counters:
    migrations: int = 0
    reconnects: int = 0
    sessions: int = 0


class Agent:
    """The adapter: samples routes, dials, serves, and carries out what
    :mod:`tunnel.agent_decisions` decides.

    ``sample_routes``, ``dialer`` and ``clock`` default to the kernel's routes,
    :func:`tunnel.transport.dial` and ``time.monotonic`` (the clock the connections stamp
    ``last_received`` with: the event loop's). Waiting itself is asyncio's.
    """

    def __init__(self, config: AgentConfig, *, probe_interval: float | None = None,
                 probe_timeout: float | None = None, sample_routes: RouteSampler = sample_routes,
                 dialer: Dialer = dial, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.probe_interval = probe_interval or config.probe_interval
        self.probe_timeout = probe_timeout or config.probe_timeout
        self._sample_routes = sample_routes
        self._dialer = dialer
        self._clock = clock
        self._liveness = Liveness(self.probe_interval, self.probe_timeout, config.keepalive,
                                  config.dead_after)
        self.counters = Counters()
        self.active_sessions = 0
        self.conn: Connection | None = None
        self.endpoint: Endpoint | None = None
        self.route: Route | None = None  # current path of the live connection
        #: set when the proxy refused this device for good (decommissioned, revoked, unknown):
        #: ``run`` returned and ``tunnel agent`` exits with its own status (see cli.EXIT_RETIRED)
        self.retired: Next | None = None
        self._stop = asyncio.Event()
        self._net_changed = asyncio.Event()  # netlink event or failed send: re-check routes
        self._probe_now = asyncio.Event()  # written by _watch_routes after a migration
        self._netlink: socket.socket | None = None
        self._path = PathState(None)  # the live connection's path: written by _watch_routes only
        self._interception: str | None = None  # a TLS-interception error to report once through
        self._conn_sessions: dict[Connection, int] = {}  # open sessions per connection
        self._conns: set[Connection] = set()  # every connection we opened and did not close yet
        self._sessions: set[asyncio.Task] = set()  # one per session (see _spawn)
        self._tasks: set[asyncio.Task] = set()  # drains and uplink reports
        #: resumable sessions, held while their stream is away (tunnel.agent_sessions); made
        #: with the first session that needs it (see ``held``)
        self._held: HeldSessions | None = None

    @property
    def held(self) -> HeldSessions:
        """The resumable sessions' bookkeeping, made (and its modules loaded) on first use.

        Until a session is opened there is nothing to hold, so an idle agent — most of a
        device's life — does not load ``tunnel.agent_sessions`` and ``tunnel.resume`` (about
        0.16 MiB of its RSS, measured). The idle paths (the held check, a refusal, stopping) ask
        ``_held`` instead, and find None.
        """
        if self._held is None:
            from tunnel.agent_sessions import HeldSessions

            self._held = HeldSessions(self.config.device_id, self.config.resume_hold,
                                      self.config.resume_buffer)
        return self._held

    def _spawn(self, coro, kept: set[asyncio.Task] | None = None) -> asyncio.Task:
        """Start a task and keep it until it ends: the event loop holds tasks only weakly, so
        an unreferenced session task could be garbage-collected mid-session; and a kept task
        can be ended in order when the agent stops."""
        kept = self._tasks if kept is None else kept
        task = asyncio.create_task(coro)
        kept.add(task)
        task.add_done_callback(kept.discard)
        return task

    def stop(self) -> None:
        """Ask ``run`` to stop: it ends the watchers, the sessions and the connection in order."""
        self._stop.set()

    # --- network change notifications -----------------------------------------------------------

    def _start_netlink(self) -> None:
        self._netlink = open_netlink()
        if self._netlink is None:
            event(log, "no netlink: route changes are noticed by polling", level=logging.WARNING,
                  interval=self.probe_interval)
            return
        asyncio.get_running_loop().add_reader(self._netlink, self._on_netlink)

    def _stop_netlink(self) -> None:
        if self._netlink is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._netlink)
            self._netlink.close()
            self._netlink = None

    def _on_netlink(self) -> None:
        netlink = self._netlink
        with contextlib.suppress(OSError):
            while netlink is not None and netlink.recv(65536):
                pass
        self._net_changed.set()

    def _on_send_error(self, exc: Exception) -> None:
        self._net_changed.set()

    async def _wait_change(self, timeout: float) -> bool:
        """Wait for a network change (True) or ``timeout`` / stop (False)."""
        waits = [asyncio.ensure_future(self._net_changed.wait()), asyncio.ensure_future(self._stop.wait())]
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        changed = self._net_changed.is_set()
        if changed:
            await asyncio.sleep(SETTLE)
            self._net_changed.clear()
        return changed

    # --- endpoint choice ------------------------------------------------------------------------

    def candidates(self) -> list[tuple[Endpoint, Route]]:
        """Endpoints the device may use now, each with the route toward it, in preference order
        (:func:`~tunnel.agent_decisions.usable_endpoints`)."""
        return usable_endpoints(self.config.proxies, self._sample_routes(self.config.proxies))

    # --- connection loop ------------------------------------------------------------------------

    async def run(self) -> None:
        # Start-up's cyclic garbage (the command line parser's tables, ~0.1 MB) would wait for a
        # full collection that an idle agent may not run for hours; freed now, the connection
        # and its handshake reuse that memory (idle RSS 0.09 MiB lower, measured).
        gc.collect()
        self._start_netlink()
        try:
            await self._run()
        except asyncio.CancelledError:
            self._stop.set()  # cancelled from outside (SIGTERM): stop in order below
            raise
        finally:
            self._stop.set()
            try:
                await self._shutdown()
            finally:
                self._stop_netlink()

    async def _run(self) -> None:
        policy = Reconnect(base=self.config.reconnect_backoff, cap=self.config.reconnect_backoff_max,
                           no_route_wait=self.probe_interval)
        reason: str | None = None
        offline_at: float | None = None  # when the device was last known reachable
        successor: Connection | None = None  # a QUIC connection found while on TCP
        while not self._stop.is_set():
            offered = self.candidates()
            conn, successor = successor, None
            refused: tuple[str, str] | None = None
            if conn is None and offered:
                conn, refused = await self._dial_any(offered)
            if conn is None:
                offline_at = offline_at or self._clock()
                step = policy.after_no_connection(refused, bool(offered))
                if refused is not None:
                    self._refused_held(*refused)
                if step.action == "stop" and refused is not None:  # only a refusal stops
                    return self._retire(step, *refused)
                if step.cause == "locked" and refused is not None:
                    event(log, "refused by the proxy; waiting", level=logging.WARNING,
                          code=refused[0], delay=round(step.delay, 1), reason=refused[1])
                elif step.cause == "backoff":
                    event(log, "no proxy endpoint answered; retrying", delay=round(step.delay, 2),
                          tried=",".join(ep.address for ep, _ in offered))
                else:
                    event(log, "no route toward any proxy endpoint; waiting for a network",
                          level=logging.DEBUG)
                await self._wait_next(step, policy, offered)
                continue
            outage = round(self._clock() - offline_at, 3) if offline_at else None
            if reason:
                self.counters.reconnects += 1
            ended, successor = await self._serve(conn, reason, outage)
            reason = ended.reason
            # offline since the route went away, or since the proxy was last heard from
            offline_at = offline_since(self._path.outage_since, conn.last_received, self._clock())
            if self._stop.is_set():
                return
            step = policy.after_end(ended)
            if ended.code:
                self._refused_held(ended.code, ended.close_reason)
            if step.action == "stop":
                return self._retire(step, ended.code or "", ended.close_reason)
            event(log, "connection ended; reconnecting", reason=reason)
            if step.cause == "locked":
                event(log, "the device is locked; waiting", level=logging.WARNING,
                      delay=round(step.delay, 1), reason=ended.close_reason)
            if step.action == "wait":
                await self._wait_next(step, policy)

    async def _wait_next(self, step: Next, policy: Reconnect,
                         offered: list[tuple[Endpoint, Route]] | None = None) -> None:
        """Wait as ``step`` says; a network change ends the wait early and resets the backoff
        (with ``wake_on="endpoints"``, only a change of the usable endpoints does)."""
        if step.wake_on == "network":
            if await self._wait_change(step.delay):
                policy.network_changed()
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + step.delay
        while not self._stop.is_set() and loop.time() < deadline:
            changed = await self._wait_change(deadline - loop.time())
            if changed and self.candidates() != offered:
                policy.network_changed()
                return

    def _refused_held(self, code: str, reason: str) -> None:
        """The proxy refused this device (locked, decommissioned, revoked…): sessions held for
        a resume cannot resume through it, so they end now, with its reason."""
        if code in REFUSALS_ENDING_HELD and self._held is not None and self._held.held():
            self._held.drop_held(f"the proxy refused this device ({code}): {reason}")

    def _retire(self, step: Next, code: str, reason: str) -> None:
        """Stop for good: the proxy will refuse this identity until an operator acts."""
        self.retired = step
        event(log, "stopping: the proxy refused this device for good; re-enroll it to bring it back",
              level=logging.ERROR, code=code, why=step.why, reason=reason)
        self._stop.set()

    async def _dial_any(self, offered: list[tuple[Endpoint, Route]]
                        ) -> tuple[Connection | None, tuple[str, str] | None]:
        """Try each usable endpoint in order; the first that completes a handshake wins.

        Returns the connection (None if none answered) and the (code name, reason) of the last
        refusal with a fleet close code in this round, for the reconnect decision.
        """
        identity = load_identity(self.config)
        refused: tuple[str, str] | None = None
        for ep, route in offered:
            try:
                conn = await self._dial(ep, route, identity, self.config.transports)
            except TransportError as exc:
                if exc.code == "intercepted":  # the transport says why: TLS interception
                    self._interception = exc.reason  # told to the proxy once we get through
                closed = read_close(exc)
                if closed.name is not None:
                    refused = (closed.name, closed.reason)
                event(log, "dial failed", level=logging.WARNING, endpoint=ep.address,
                      uplink=route.uplink, code=closed.label, reason=exc.reason)
                continue
            except OSError as exc:
                event(log, "dial failed", level=logging.WARNING, endpoint=ep.address,
                      uplink=route.uplink, error=str(exc))
                continue
            self.endpoint, self.route = ep, route
            return conn, None
        return None, refused

    async def _dial(self, ep: Endpoint, route: Route, identity: TLSIdentity,
                    transports: tuple[str, ...]) -> Connection:
        conn = await self._dialer(
            ep.host, ep.port, transports=transports, head_start=HEAD_START,
            identity=identity, server_name=ep.server_name, local_addr=(route.source, 0),
            alpn=ALPN_AGENT, keepalive=None,  # _probe sends the keepalives
            idle_timeout=max(60.0, self.config.keepalive * 3), handshake_timeout=HANDSHAKE_TIMEOUT,
        )
        self._conns.add(conn)
        return conn

    def _close(self, conn: Connection, reason: str) -> None:
        conn.close(0, reason)
        self._conns.discard(conn)

    async def _back_to_quic(self, conn: Connection) -> Connection:
        """On TCP, keep trying QUIC (every ``quic_retry`` s, and on a network change)."""
        while True:
            await self._wait_change(self.config.quic_retry * (0.75 + random.random() / 2))
            if self.route is None or self.endpoint is None:
                continue
            try:
                return await self._dial(self.endpoint, self.route, load_identity(self.config), ("quic",))
            except (TransportError, OSError):
                continue

    async def _serve(self, conn: Connection, reconnect: str | None,
                     outage: float | None) -> tuple[Ended, Connection | None]:
        """Run one connection until it ends; return how it ended, and the QUIC connection that
        replaces it if it was a TCP one and QUIC works again."""
        ep, route = self.endpoint, self.route
        assert ep is not None and route is not None  # _dial_any() set both with the connection
        self.conn = conn
        conn.on_send_error = self._on_send_error
        self._path = PathState(route)
        started = self._clock()
        accepted = False
        successor: Connection | None = None
        event(log, "connected", endpoint=ep.address, uplink=route.uplink,
              local="{}:{}".format(*conn.local_address[:2]), reconnect=reconnect, outage=outage)
        upgrade: asyncio.Task | None = None
        held_check: asyncio.Task | None = None
        if conn.transport_name == "tcp" and "quic" in self.config.transports:
            upgrade = asyncio.create_task(self._back_to_quic(conn))
        # in the order their decisions count when several are ready at once
        watchers: dict[asyncio.Task, EndKind] = {
            **({upgrade: "upgrade"} if upgrade else {}),
            asyncio.create_task(self._watch_routes(conn)): "network",
            asyncio.create_task(self._probe(conn)): "dead",
            asyncio.create_task(self._accept(conn)): "closed",  # only ends by raising
        }

        def ended(kind: EndKind, reason: str, closed: Closed | None = None) -> Ended:
            return Ended(kind, reason, closed.name if closed else None, closed.reason if closed else "",
                         accepted, self._clock() - started)

        try:
            await self._hello(conn, reconnect, outage)
            accepted = True
            held_check = asyncio.create_task(self._check_held(conn))
            await self._maybe_renew(conn)
            closed = asyncio.create_task(conn.wait_closed())
            stop = asyncio.create_task(self._stop.wait())
            try:
                done, _ = await asyncio.wait({closed, stop, *watchers}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
                closed.cancel()
            for task, kind in watchers.items():
                if task in done and not task.cancelled():
                    result = task.result()  # a TransportError from a watcher: handled below
                    if task is upgrade:
                        successor = result
                        return ended(kind, "back on QUIC"), successor
                    if isinstance(result, str):
                        return ended(kind, result), None
            error = closed.result() if closed in done and not closed.cancelled() else None
            if error is not None:
                why = read_close(error)
                return ended("closed", why.text, why), None
            return ended("closed", "closed"), None
        except TransportError as exc:
            # Refused after the handshake (during the hello) or cut while a stream was open:
            # the connection's close code is what the reconnect decision needs.
            by: Closed | None = read_close(exc)
            if by is not None and by.name is None:
                by = None
                if conn.is_closed:
                    with contextlib.suppress(Exception):
                        err = await asyncio.wait_for(conn.wait_closed(), CLOSED_WAIT)
                        by = read_close(err) if err is not None and err.application else None
            return ended("error", exc.reason or "transport error", by), None
        except TimeoutError:
            # the proxy did not answer the hello (or a renewal) in time: a loaded proxy (seen in
            # the soak right after a restart), not a reason for the agent to exit: reconnect
            return ended("error", "the proxy did not answer in time"), None
        except asyncio.CancelledError:
            self._stop.set()  # run() is being cancelled: it stops in order
            raise
        finally:
            await _cancel([*watchers, *([held_check] if held_check else [])])
            if upgrade is not None and successor is None and upgrade.done() and not upgrade.cancelled() \
                    and upgrade.exception() is None:
                self._close(upgrade.result(), "not needed")  # QUIC came back as this one ended
            if self._stop.is_set():
                pass  # run() closes every connection on its way out, after the sessions
            elif successor is not None and self._conn_sessions.get(conn):
                # moving to QUIC: open sessions finish on the old connection, new ones go to QUIC
                self._spawn(self._drain(conn))
            else:
                self._close(conn, "agent reconnecting")
            self.conn = None

    async def _drain(self, conn: Connection) -> None:
        while self._conn_sessions.get(conn) and not conn.is_closed:
            await asyncio.sleep(0.5)
        self._conn_sessions.pop(conn, None)
        self._close(conn, "drained")

    async def _shutdown(self) -> None:
        """Stop in order (each step bounded by ``STOP_GRACE``): the per-connection watchers are
        already gone (``_serve``); background jobs (drains, uplink reports) end; every connection
        is closed with "agent stopping" (the reason the proxy records), which ends every
        session's stream; the session tasks are awaited (each resets its local socket); then the
        connections' close is awaited, so the close has left before the process exits.

        The close comes before the sessions end rather than after: a session ended first would
        reach the proxy as a bare stream reset, without the reason."""
        await _cancel(self._tasks)
        if self._held is not None:
            self._held.drop_all("agent stopping")
        conns = list(self._conns)
        for conn in conns:
            self._close(conn, "agent stopping")
        if self._sessions:
            await asyncio.wait(set(self._sessions), timeout=STOP_GRACE)
            await _cancel(self._sessions)
        closing = [asyncio.ensure_future(conn.wait_closed()) for conn in conns]
        if closing:
            await asyncio.wait(closing, timeout=STOP_GRACE)
            await _cancel(closing)
        self.conn = None

    async def _request(self, conn: Connection, op: str, **args) -> tuple[wire.Message, dict]:
        stream = await conn.open_stream()
        await stream.write(wire.encode("request", op=op, args=args))
        stream.write_eof()
        return await read_reply(stream)

    async def _hello(self, conn: Connection, reconnect: str | None, outage: float | None,
                     **extra) -> None:
        args = {"uplink": self.route.uplink if self.route else None,
                "endpoint": self.endpoint.address if self.endpoint else None,
                "transport": conn.transport_name,
                "migrations": self.counters.migrations, "reconnects": self.counters.reconnects,
                # the proxy resolves a port to one of these names before it authorizes a session
                "services": self.config.service_ports(),
                # it can hold and re-attach sessions (issue 17): the proxy offers resuming only
                # to an agent that says so, so an older agent keeps getting the raw open it knows
                "resume": True, **extra}
        if reconnect:
            args.update(reconnect=reconnect, outage=outage)
        if self._interception:
            args["tls_interception"], self._interception = self._interception, None
        await self._request(conn, "hello", **args)

    async def _check_held(self, conn: Connection) -> None:
        """While sessions are held, ask the proxy every ``HELD_CHECK`` s which of them may no
        longer resume (a lock, relabel or user lock issued during the outage) and end those
        with its reason. An older proxy that does not know the request is asked no more."""
        while True:
            held = self._held  # None until a session needed it: nothing to report
            report, finished = (held.report(), dict(held.finished)) if held is not None else ([], {})
            if report or finished:
                ended = [{"session": s, "reason": r} for s, r in finished.items()]
                try:
                    reply, body = await self._request(conn, "held", sessions=report, ended=ended)
                except (TransportError, wire.HeaderError, TimeoutError):
                    reply, body = None, {}
                if reply is not None and reply.get("ok"):
                    for session_id in finished:  # told: the proxy writes their ends
                        self.held.finished.pop(session_id, None)
                if reply is not None and not reply.get("ok") and reply.get("code") == "unknown_op":
                    return
                drop = body.get("drop") if isinstance(body, dict) else None
                for session_id, reason in (drop.items() if isinstance(drop, dict) else ()):
                    if isinstance(session_id, str) and isinstance(reason, str):
                        self.held.drop(session_id, reason)
            await asyncio.sleep(HELD_CHECK)

    async def _maybe_renew(self, conn: Connection) -> None:
        cert = certs.load_cert(self.config.cert.read_bytes())
        life = cert.not_valid_after_utc - cert.not_valid_before_utc
        if dt.datetime.now(dt.UTC) < cert.not_valid_before_utc + life * RENEW_AT:
            return
        csr = certs.csr_pem(certs.load_key(self.config.key.read_bytes()))
        reply, body = await self._request(conn, "renew", csr=csr)
        if not reply.get("ok"):
            event(log, "renewal refused", level=logging.WARNING, reason=reply.get("reason"))
            return
        new = certs.load_cert(body["cert"].encode())
        certs.verify_issued_by(new, certs.load_cert(self.config.ca.read_bytes()))
        write_file(self.config.cert, certs.cert_pem(new))
        event(log, "certificate renewed", not_after=new.not_valid_after_utc.isoformat())

    # --- path watching ------------------------------------------------------------------------

    async def _watch_routes(self, conn: Connection) -> str:
        """Follow the kernel's route toward the endpoint: migrate, or return why to reconnect
        (:func:`~tunnel.agent_decisions.next_path` decides)."""
        ep = self.endpoint
        assert ep is not None  # _dial_any() set it with the connection
        while True:
            await self._wait_change(self.probe_interval)
            sample = self._sample_routes([ep])[0]
            link = Link(conn.transport_name, conn.local_address[0],
                        getattr(conn, "last_received", 0.0), conn.idle_timeout)
            self._path, step = next_path(self._path, sample, self._clock(), link, endpoint=ep,
                                         endpoints=self.config.proxies, probe_timeout=self.probe_timeout)
            if step.action == "lost":
                self.route = None
                event(log, "no route toward the proxy", endpoint=ep.address)
            elif step.action == "stay":
                if step.route is not None and step.route != self.route:
                    self.route = step.route
            elif step.action == "reconnect":
                return step.reason
            elif step.action == "migrate" and step.route is not None:
                await self._migrate(conn, step.route, step.outage)

    async def _migrate(self, conn: Connection, route: Route, outage: float | None) -> None:
        old, old_local = self.route, conn.local_address[0]
        try:
            await conn.migrate((route.source, 0))
        except (OSError, TransportError) as exc:
            event(log, "migration failed", level=logging.WARNING, error=str(exc))
            return  # the next sample tries again
        self.route = route
        self._path = PathState(route, self._path.outage_since)
        self.counters.migrations += 1
        self._probe_now.set()  # the proxy learns the new path from the next packet
        event(log, "migrated", old=old_local, new=route.source,
              old_uplink=old.uplink if old else None, uplink=route.uplink, outage=outage)
        if old is None or old.uplink != route.uplink:
            self._spawn(self._tell_uplink(conn))

    async def _tell_uplink(self, conn: Connection) -> None:
        with contextlib.suppress(TransportError, wire.HeaderError, TimeoutError):
            await self._hello(conn, None, None, migrated=True)

    async def _probe(self, conn: Connection) -> str:
        """Keepalives and liveness probes (:func:`~tunnel.agent_decisions.next_probe` decides);
        return when the path has been silent too long."""
        state = ProbeState(self._clock())
        while True:
            wait = self._liveness.wait(state, self.active_sessions > 0, self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), wait)
            forced = self._probe_now.is_set()
            self._probe_now.clear()
            state, step = next_probe(state, self._liveness, now=self._clock(),
                                     last_received=conn.last_received, rtt=conn.rtt,
                                     route_known=self.route is not None,
                                     sessions_open=self.active_sessions > 0, forced=forced)
            if step.dead:
                silent = round(step.silent, 1)
                event(log, "path dead: nothing heard from the proxy", level=logging.WARNING,
                      silent=silent, uplink=self.route.uplink if self.route else None)
                return f"path dead: nothing heard for {silent}s"
            if step.ping:
                conn.send_ping()

    # --- sessions -----------------------------------------------------------------------------

    async def _accept(self, conn: Connection) -> None:
        while True:
            stream = await conn.accept_stream()
            self._spawn(self._session(stream, conn), self._sessions)

    async def _session(self, stream: Stream, conn: Connection) -> None:
        try:
            msg, rest = await read_header(stream)
        except (wire.HeaderError, TimeoutError, TransportError) as exc:
            with contextlib.suppress(TransportError):
                await stream.write(wire.reply_refused(getattr(exc, "code", "bad_header"), str(exc)))
                stream.write_eof()
            return
        if msg.kind != "open":
            await self._refuse(stream, "bad_header", f"expected an open header, got {msg.kind!r}")
            return
        if msg.get("resume") is not None:  # re-attach a held session (tunnel.agent_sessions)
            await self.held.resume(stream, msg, rest)
            return
        resumable = msg.get("resume_secret") is not None and self.held.enabled
        found = self.config.service_for(msg["service"])  # exact listed names only, never ports
        if found is None:
            listed = ", ".join(sorted(self.config.services)) or "none"
            await self._refuse(stream, "unknown_service",
                               f"{self.config.device_id} exposes no service {msg['service']!r} (listed: {listed})")
            return
        name, (host, port) = found
        if self.active_sessions >= MAX_SESSIONS:
            await self._refuse(stream, "over_limit", f"{self.config.device_id} has {MAX_SESSIONS} sessions open")
            return
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), LOCAL_CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            await self._refuse(stream, "connection_refused",
                               f"service {name} ({host}:{port}) on {self.config.device_id} is not accepting: {exc}")
            return
        try:
            await stream.write(wire.reply_ok(session=msg["session"], resumable=resumable or None))
        except TransportError:
            writer.close()
            return
        self.active_sessions += 1
        # a resumable session is not tied to this connection (a drain may close it: the session
        # re-attaches over the next one), so only raw ones keep a connection open
        counted = not resumable
        if counted:
            self._conn_sessions[conn] = self._conn_sessions.get(conn, 0) + 1
        self.counters.sessions += 1
        event(log, "session", session=msg["session"], service=name, identity=msg["identity"],
              resumable=resumable)
        spliced: asyncio.Future | None = None
        held: HeldSession | None = None
        finishing: asyncio.Future | None = None
        try:
            # loaded with the first session: an idle agent (most of a device's life) does
            # without the ~45 KB the splicing module costs, and without tunnel.resume
            from tunnel.resume import SessionCut
            from tunnel.splice import Ends, SocketEnds, StreamEnds, splice

            if resumable:
                held = self.held.open(msg)
                await self.held.attach_first(held, stream, rest)
                ends: Ends = held.ends
            else:
                ends = StreamEnds(stream, rest)
            spliced = asyncio.ensure_future(splice(ends, SocketEnds(reader, writer)))
            if held is not None:
                await self.held.run(held, spliced)
            try:
                result = await spliced
                if held is not None and not result.error:
                    # clean here; the closing handshake (our END acknowledged) may still need a
                    # re-attach, so the session stays findable until it is done
                    finishing = asyncio.ensure_future(held.ends.finished())
                    await self.held.run(held, finishing)
                    await finishing
            except SessionCut as cut:  # hold time over, or refused by the proxy: reset locally
                self.held.ended(msg["session"], cut)
            except TransportError as exc:  # PeerAborted while finishing: the engineer's end cut it
                if held is not None:
                    self.held.finished[held.id] = str(exc)
            else:
                if held is not None and result.error:  # the engineer's end aborted it
                    self.held.finished[held.id] = result.error
        finally:
            for task in (spliced, finishing):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            if held is not None:
                self.held.forget(held)
                await held.ends.close()  # its stream and tasks: a cut one is reset
            self.active_sessions -= 1
            if counted:
                self._conn_sessions[conn] -= 1
                if not self._conn_sessions[conn]:
                    del self._conn_sessions[conn]  # holds no closed connection alive
            writer.close()

    async def _refuse(self, stream: Stream, code: str, reason: str) -> None:
        event(log, "session refused", level=logging.WARNING, code=code, reason=reason)
        with contextlib.suppress(TransportError):
            await stream.write(wire.reply_refused(code, reason))
            stream.write_eof()


async def _cancel(tasks: Iterable[asyncio.Future]) -> None:
    """Cancel ``tasks`` and wait until each has ended (its ``finally`` blocks have run)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
