"""The proxy: admits agents and engineers on one port (QUIC over UDP, TLS over TCP) and routes each session.

Three kinds of peer, told apart by ALPN before any stream is accepted:

- ``fleet-agent/1`` — a device certificate. The agent's connection is kept in ``agents`` (device
  id → :class:`AgentLink`); a newer connection from the same device replaces the old one at once.
- ``fleet-user/1`` — an engineer's user certificate. Each stream starts with a ``dial`` (then
  the proxy opens a stream to the device's agent and splices the two) or a ``request`` (ls,
  status).
- ``fleet-enroll/1`` — no certificate yet: one enrollment request (token + CSR), size- and
  rate-limited.

Where is a session authorized? :meth:`Proxy._dial` asks :func:`tunnel.access.decide`; peers
are admitted by :func:`tunnel.admission.admit`. Both are pure functions over the policy snapshot
that :class:`tunnel.live_policy.LivePolicy` keeps fresh off the event loop. Every refusal is
audited.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import datetime as dt
import logging
import secrets
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from enroll import audit
from enroll.enrollment import enroll, renew
from enroll.registry import iso
from enroll.repositories import Devices
from enroll.request import EnrollError, parse_request
from enroll.state import FleetState
from tunnel import access, wire
from tunnel.admission import CODES, Denied, Peer, admit, identify, recheck_agent, seen_by
from tunnel.live_policy import LivePolicy
from tunnel.log import event
from tunnel.memory import TRIM_INTERVAL, release_free_memory
from tunnel.metrics import ProxyMetrics
from tunnel.protocol import (
    ALPN_AGENT,
    ALPN_ENROLL,
    ALPN_USER,
    HEADER_TIMEOUT,
    read_header,
    reply_with_body,
)
from tunnel.ratelimit import RateLimiter, RefusalTally, source_of
from tunnel.registry_writer import RegistryWriter
from tunnel.splice import StreamEnds, splice
from tunnel.transport import (
    Connection,
    PathChange,
    Refused,
    Stream,
    TLSIdentity,
    TransportError,
    serve,
    tcp_serve,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from enroll.users import User
    from tunnel.transport import Server

log = logging.getLogger("tunnel.proxy")

PEER_KIND = {ALPN_AGENT: "device", ALPN_USER: "user"}
AGENT_REPLY_TIMEOUT = 10.0
#: How long a dial that arrives right after the agent connected waits for its hello (which
#: carries the device's service table, needed to resolve a port to a service name).
HELLO_WAIT = 2.0
#: How long a dial waits for its ``session.start`` to be durable before refusing the engineer
#: (registry locked, disk full): the event is still written when the registry frees up, and a
#: ``session.end`` queued behind it keeps the log paired.
START_AUDIT_WAIT = 3.0
#: Threads that run login password checks (each scrypt holds 128 MiB; see enroll.users), and
#: how many logins may wait for one before new ones are refused ``busy``.
LOGIN_THREADS = 2
MAX_PENDING_LOGINS = 16
#: How long a refusal waits for its audit event before answering anyway.
DENIAL_AUDIT_WAIT = 3.0
#: On SIGTERM: how long open sessions get to end and write their ``session.end``.
SHUTDOWN_BUDGET = 2.0
#: On start-up: how long to wait for closing the sessions a crash left open before listening.
RECOVERY_WAIT = 5.0
#: Probing an agent with open sessions: a PING every PROBE_INTERVAL; DEAD_AFTER PINGs in a row
#: unanswered (each given max(PROBE_TIMEOUT, 2 RTT)) with nothing else heard means it is dead.
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 1.0
DEAD_AFTER = 3
# Long enough for ssh to authenticate with it; sessions outlive it (sshd checks it once).
SSH_CERT_TTL = dt.timedelta(minutes=5)


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
    """Is an agent with open sessions still there? (pure; :meth:`Proxy._probe_agent` drives it)

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


class Proxy:
    #: where and how often the proxy appends the audit log's head as an anchor
    #: (``tunnel proxy --anchor-dir DIR --anchor-every 5m``); None: no anchors
    anchor_dir: Path | None = None
    anchor_every: float = 300.0
    #: seconds between giving freed heap memory back to the OS (tunnel/memory.py); None: never
    trim_every: float | None = TRIM_INTERVAL
    trims = 0  # trims done (tests, diagnostics)
    _anchored = 0  # seq of the last anchor written

    def __init__(self, state: FleetState, *, enroll_rate: float = 5.0, watch_interval: float = 1.0,
                 anonymous_rate: float = 20.0, refusal_window: float = 60.0):
        self.state = state
        self.fleet = state.fleet
        self.registry = state.registry()
        #: the policy snapshot every admission, dial and re-check is decided on
        self.policy = LivePolicy(state, self.registry)
        self.agents: dict[str, AgentLink] = {}
        self.peers: dict[Connection, Peer] = {}
        self.sessions: dict[str, Session] = {}  # re-authorized by _watch until cut or ended
        #: every session whose session.start was submitted and whose session.end was not yet
        #: (see _end): what a shutdown must close
        self.open_sessions: dict[str, Session] = {}
        self.stopping = False
        self.probe_interval, self.probe_timeout, self.dead_after = PROBE_INTERVAL, PROBE_TIMEOUT, DEAD_AFTER
        self.device_totals: dict[str, dict[str, int]] = {}  # connections and migrations per device
        self.enroll_limiter = RateLimiter(rate=enroll_rate, burst=max(1.0, enroll_rate * 2))
        # All anonymous peers together (enrollment and login), whatever their number of addresses.
        self.anonymous_limiter = RateLimiter(rate=anonymous_rate, burst=max(1.0, anonymous_rate * 2))
        self.refusals = RefusalTally(window=refusal_window)
        # logins run scrypt off the event loop on their own threads, so a login flood never
        # takes the default executor that renewals, enrollments and the writer's close use
        self._login_pool = concurrent.futures.ThreadPoolExecutor(LOGIN_THREADS, thread_name_prefix="login")
        self._logins_pending = 0
        self.watch_interval = watch_interval
        self.server: Server | None = None
        self.tcp_server: Server | None = None
        self.writer: RegistryWriter | None = None
        self._tasks: set[asyncio.Task] = set()
        self.metrics = ProxyMetrics(self)  # served by `tunnel proxy --metrics-listen`

    # --- lifecycle ----------------------------------------------------------------------------

    def tls_identity(self) -> TLSIdentity:
        from enroll import certs

        cert = certs.load_cert(self.state.path("proxy.crt").read_bytes())
        key = certs.load_key(self.state.path("proxy.key").read_bytes())
        # The CA travels in the chain so a new device can check it against its pin.
        return TLSIdentity([cert, self.state.ca_cert], key, self.state.ca_cert)

    async def start(self, host: str, port: int, *, idle_timeout: float = 60.0, tcp: bool = True):
        """Listen on UDP (QUIC) and, for networks that block UDP, TCP (TLS + HTTP/2), same port.

        QUIC uses the smaller of the two sides' idle timeouts: agents whose keepalive is longer
        than ``idle_timeout`` are dropped between keepalives (``tunnel proxy --idle-timeout``).
        """
        common: dict[str, Any] = dict(  # the keywords both transports' serve() take
            identity=self.tls_identity(), alpns=[ALPN_AGENT, ALPN_USER, ALPN_ENROLL],
            anonymous_alpns=[ALPN_ENROLL], authorize=self._authorize,
            on_connection=self._on_connection, idle_timeout=idle_timeout,
        )
        self.writer = RegistryWriter(self.state)
        self.metrics.watch_writer(self.writer)
        await self._close_left_open()
        self.server = await serve(host, port, **common)
        self.tcp_server = await tcp_serve(host, port, **common) if tcp else None
        self._spawn(self._watch())
        self._spawn(self._audit_refusals())
        if self.anchor_dir is not None:
            self._spawn(self._write_anchors())
        if self.trim_every is not None:
            self._spawn(self._trim_memory())
        event(log, "listening", address=f"{host}:{port}", fleet=self.fleet,
              transports="quic+tcp" if tcp else "quic")
        return self.server

    async def _close_left_open(self) -> None:
        """Write ``session.end`` (reason ``proxy restarted``) for every session a crash left open.

        No session can outlive the proxy process, so before listening every ``session.start``
        without its ``session.end`` is closed. The write is queued first, so it runs before any
        event of this process; if the registry is busy it stays queued and the proxy starts
        anyway. (One registry serves one proxy: a second proxy on it would see its live
        sessions closed here.)
        """
        closing = self._write(lambda db: audit.close_open_sessions(db, "proxy restarted"))
        try:
            closed = await asyncio.wait_for(asyncio.shield(closing), RECOVERY_WAIT)
        except TimeoutError:
            event(log, "closing sessions left open is still queued", level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - never keep the proxy from starting
            event(log, "could not close sessions left open", level=logging.ERROR, error=str(exc))
        else:
            if closed:
                event(log, "closed sessions left open by the last run", level=logging.WARNING,
                      count=len(closed), reason="proxy restarted")

    async def stop(self, budget: float = SHUTDOWN_BUDGET) -> None:
        """Shut down: end every open session (``session.end`` reason ``proxy shutdown``, within
        ``budget`` seconds), then stop listening and commit what the audit writer holds."""
        self.stopping = True
        for session in list(self.open_sessions.values()):
            session.cut("proxy shutdown", CODES["shutdown"], end_reason="proxy shutdown")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        while self.open_sessions and loop.time() < deadline:
            await asyncio.sleep(0.02)  # each session's own task writes its end, with its bytes
        for session in list(self.open_sessions.values()):
            self._end(session, result="error", reason="proxy shutdown")
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A dial cancelled between queuing its start and its end: the end writes only if the
        # start did (see Session.write_end).
        for session in list(self.open_sessions.values()):
            self._end(session, result="error", reason="proxy shutdown")
        for server in (self.server, self.tcp_server):
            if server:
                server.close()
                await server.wait_closed()
        if self.writer:
            await self._flush_at_stop()
            await self.writer.close()
        self._login_pool.shutdown(wait=False, cancel_futures=True)
        self.policy.close()
        self.registry.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _write(self, write: Callable[[Any], Any]) -> asyncio.Future:
        """Queue a write on the registry writer, which exists from :meth:`start` on."""
        if self.writer is None:
            raise RuntimeError("the proxy writes to the registry only once started")
        return self.writer.submit(write)

    def _audit(self, type_: str, **kw) -> asyncio.Future:
        """Queue an audit event; await the result where the caller must know it is durable."""
        return self._write(lambda db: audit.append(db, type_, **kw))

    # --- admission ----------------------------------------------------------------------------

    async def _authorize(self, conn: Connection) -> None:
        if conn.alpn == ALPN_ENROLL:
            return
        remote = "{}:{}".format(*conn.remote_address[:2])
        try:
            ident = identify(conn.peer_certificate, self.fleet)
            snapshot = await self.policy.refresh()
            if not seen_by(snapshot, ident):  # issued a moment ago? look once more
                snapshot = await self.policy.reload()
            peer = admit(ident, self.fleet, snapshot, want=PEER_KIND[conn.alpn])
            if peer.kind == "user" and (denial := access.user_denial(snapshot, peer, dt.datetime.now(dt.UTC))):
                raise Denied(denial.code if denial.code in CODES else "locked", denial.reason)
        except Denied as denied:
            actor = _actor_of(conn.peer_certificate)
            dev = self.policy.snapshot.device(actor.split(":", 1)[1]) if actor.startswith("device:") else None
            # bounded: the peer must get its refusal code (an agent stops or waits by it) even
            # while the registry is locked; the event stays queued
            await self._settled(self._audit(
                "access.denied", actor=actor, device=dev.id if dev else None,
                labels=dev.labels if dev else None, result="denied", reason=denied.reason,
                code=denied.code, remote=remote, stage="connect",
            ))
            event(log, "refused", level=logging.WARNING, actor=actor, code=denied.code, remote=remote)
            self.metrics.refused(denied.code, "connect")
            raise Refused(CODES[denied.code], f"{denied.code}: {denied.reason}") from None
        self.peers[conn] = peer

    async def _on_connection(self, conn: Connection) -> None:
        self.metrics.accepted(conn.alpn)
        try:
            if conn.alpn == ALPN_ENROLL:
                await self._serve_enroll(conn)
            elif conn.alpn == ALPN_AGENT:
                await self._serve_agent(conn, self.peers[conn])
            else:
                await self._serve_user(conn, self.peers[conn])
        finally:
            self.peers.pop(conn, None)

    # --- agents -------------------------------------------------------------------------------

    async def _serve_agent(self, conn: Connection, peer: Peer) -> None:
        device_id = peer.name
        totals = self.device_totals.setdefault(device_id, {"connections": 0, "migrations": 0})
        totals["connections"] += 1
        link = AgentLink(device_id, conn, peer, transport=conn.transport_name, totals=totals)
        old = self.agents.get(device_id)
        take_over = None
        if old is None or old.conn.is_closed:
            self._take_over(link)
        else:
            # The device is connected already: this connection takes over only once the agent
            # says hello on it. A handshake the agent gave up on (the losing side of its race,
            # a QUIC retry that timed out on its side) can still complete here, and it must not
            # cut the sessions of the connection the agent actually uses.
            take_over = self._spawn(self._take_over_after_hello(link))
        remote = "{}:{}".format(*conn.remote_address[:2])
        now = dt.datetime.now(dt.UTC)
        def connected(db):
            Devices(db).seen([device_id], now)
            from enroll.enrollment import device_connected  # older certificates: superseded
            device_connected(db, device_id, peer.identity.serial_hex, now)
            audit.append(
                db, "device.connect", actor=peer.actor, device=device_id,
                labels=peer.device.labels if peer.device else None,
                now=now, remote=remote, transport=link.transport, replaced=old is not None,
            )

        written = self._write(connected)
        conn.on_path_change = lambda change: self._on_path_change(link, change)
        accept = self._spawn(self._agent_requests(link))
        probe = self._spawn(self._probe_agent(link))
        try:
            # A registry that is locked or full must not keep the agent's hello unread (nor the
            # device listed online on a connection nobody serves): the write stays queued.
            await self._settled(written, DENIAL_AUDIT_WAIT)
            event(log, "agent connected", device=device_id, remote=remote)
            error = await conn.wait_closed()
        finally:
            accept.cancel()
            probe.cancel()
            if take_over is not None:
                take_over.cancel()
            if self.agents.get(device_id) is link:
                del self.agents[device_id]
        reason = link.dead_reason or (error.reason if error else "closed by proxy")
        dev = self.registry.device(device_id)
        now = dt.datetime.now(dt.UTC)
        remote = "{}:{}".format(*conn.remote_address[:2])

        def disconnected(db):
            Devices(db).seen([device_id], now)
            audit.append(
                db, "device.disconnect", actor=peer.actor, device=device_id, remote=remote,
                labels=dev.labels if dev else None, now=now, reason=reason,
                duration=round(time.time() - link.connected_at, 3),
                bytes_to_device=link.bytes_down, bytes_from_device=link.bytes_up,
            )

        await self._settled(self._write(disconnected), DENIAL_AUDIT_WAIT)
        event(log, "agent disconnected", device=device_id, reason=reason)

    def _take_over(self, link: AgentLink) -> None:
        """Make ``link`` the device's connection; end (or drain) the one it replaces."""
        old = self.agents.get(link.device_id)
        self.agents[link.device_id] = link
        if old is None or old is link:
            return
        if old.sessions and old.transport != link.transport:
            # The agent moved to another transport (TCP → QUIC) while sessions were open: those
            # finish on the old connection; new sessions go to the new one.
            self._spawn(self._drain(old))
        else:
            old.conn.close(CODES["replaced"], "replaced: the device connected again")

    async def _take_over_after_hello(self, link: AgentLink) -> None:
        await link.hello.wait()
        if not link.conn.is_closed:
            self._take_over(link)

    async def _probe_agent(self, link: AgentLink) -> None:
        """While the agent has open sessions, PING it; a silent agent is declared dead.

        Without this an agent killed mid-transfer (or cut off) left its sessions hanging until
        the connection's idle timeout (60 s) and the device listed online meanwhile.
        """
        conn, loop = link.conn, asyncio.get_running_loop()
        live = Liveness(self.dead_after)
        while True:
            if not link.sessions:
                live.answered()
                await asyncio.sleep(self.probe_interval)
                continue
            sent = loop.time()
            try:
                await conn.ping(max(self.probe_timeout, 2 * (getattr(conn, "rtt", None) or 0.0)))
            except TimeoutError:
                if live.unanswered(getattr(conn, "last_received", 0.0) >= sent):
                    silent = loop.time() - getattr(conn, "last_received", sent)
                    self._declare_dead(link, round(silent, 1))
                    return
                continue  # probe again at once: the timeout was the wait
            except TransportError:
                return
            live.answered()
            await asyncio.sleep(self.probe_interval)

    def _declare_dead(self, link: AgentLink, silent: float) -> None:
        """End the agent's sessions with the reason, list it offline, close its connection."""
        reason = f"device {link.device_id} stopped answering: nothing heard for {silent:g}s"
        event(log, "agent stopped answering", level=logging.WARNING, device=link.device_id, silent=silent)
        link.dead_reason = reason
        for session in list(self.open_sessions.values()):
            if session.link is link:
                session.cut(reason, CODES["unresponsive"], end_reason=reason)
        if self.agents.get(link.device_id) is link:
            del self.agents[link.device_id]
        link.conn.close(CODES["unresponsive"], reason)

    async def _drain(self, link: AgentLink) -> None:
        while link.sessions and not link.conn.is_closed:
            await asyncio.sleep(0.5)
        link.conn.close(CODES["replaced"], "replaced: the device moved to another transport")

    def _on_path_change(self, link: AgentLink, change: PathChange) -> None:
        """The agent's observed address changed (migration or NAT rebinding): count and audit.

        The audit waits 0.5 s so the hello the agent sends right after migrating (with its new
        uplink, see ``AgentLink.note_hello``) is in; a NAT rebinding keeps the uplink it had.
        """
        link.migrations += 1
        link.path_since = time.time()
        link.totals["migrations"] += 1
        old, new = "{}:{}".format(*change.old[:2]), "{}:{}".format(*change.new[:2])
        event(log, "agent path changed", device=link.device_id, old=old, new=new)

        def record() -> None:
            dev = self.registry.device(link.device_id)
            self._audit(
                "device.migrate", actor=link.peer.actor, device=link.device_id,
                labels=dev.labels if dev else None, old=old, new=new, uplink=link.uplink,
            )

        def record_later() -> None:
            try:
                record()
            except Exception:  # the proxy may be stopping; never crash the event loop
                log.exception("could not audit device.migrate")

        try:
            asyncio.get_running_loop().call_later(0.5, record_later)
        except RuntimeError:  # no running loop (tests calling this directly)
            record()

    async def _agent_requests(self, link: AgentLink) -> None:
        """Streams an agent opens: hello (reconnect reason, uplink) and certificate renewal."""
        while True:
            try:
                stream = await link.conn.accept_stream()
            except TransportError:
                return
            self._spawn(self._agent_request(link, stream))

    async def _agent_request(self, link: AgentLink, stream: Stream) -> None:
        try:
            msg, _ = await read_header(stream)
            if msg.kind != "request":
                raise wire.HeaderError("bad_header", "agents may only send requests")
            op, args = msg["op"], msg.get("args", {})
            dev = self.registry.device(link.device_id)
            if op == "hello":
                link.note_hello(args)
                if args.get("tls_interception"):
                    await self._audit("device.tls_intercepted", actor=link.peer.actor, device=link.device_id,
                                labels=dev.labels, result="warning", reason=str(args["tls_interception"]),
                                remote="{}:{}".format(*link.conn.remote_address[:2]),
                                transport=link.transport)
                if args.get("reconnect"):
                    await self._audit(
                        "device.reconnect", actor=link.peer.actor, device=link.device_id,
                        labels=dev.labels, reason=str(args.get("reconnect")),
                        uplink=args.get("uplink"), remote="{}:{}".format(*link.conn.remote_address[:2]),
                        outage=args.get("outage"),
                    )
                await stream.write(wire.reply_ok())
            elif op == "renew":
                cert = await asyncio.to_thread(
                    _renew_in_thread, self.state, link.device_id, str(args.get("csr", ""))
                )
                await stream.write(reply_with_body({"cert": cert}))
            else:
                await stream.write(wire.reply_refused("unknown_op", f"unknown request {op!r}"))
        except (ValueError, TimeoutError) as exc:
            # HeaderError, EnrollError/RenewalError (bad CSR, renewal limit), CertError: every
            # refusal is answered with a code and audited, never left to time out on the agent.
            code = getattr(exc, "code", "refused")
            dev = self.registry.device(link.device_id)
            await self._audit("access.denied", actor=link.peer.actor, device=link.device_id,
                        labels=dev.labels if dev else None,
                        result="denied", reason=str(exc), code=code, stage="agent-request")
            await _try_write(stream, wire.reply_refused(code, str(exc)))
        except sqlite3.Error as exc:  # the registry is locked or full: answer, never time out
            event(log, "agent request failed", level=logging.ERROR, device=link.device_id, error=str(exc))
            await _try_write(stream, wire.reply_refused(
                "registry_unavailable", f"the proxy cannot write its registry now ({exc}); retry later"))
        except TransportError:
            return
        stream.write_eof()

    # --- engineers ----------------------------------------------------------------------------

    async def _serve_user(self, conn: Connection, peer: Peer) -> None:
        event(log, "engineer connected", level=logging.DEBUG, user=peer.name, remote="{}:{}".format(*conn.remote_address[:2]))
        while True:
            try:
                stream = await conn.accept_stream()
            except TransportError:
                return
            self._spawn(self._user_stream(conn, peer, stream))

    async def _user_stream(self, conn: Connection, peer: Peer, stream: Stream) -> None:
        remote = "{}:{}".format(*conn.remote_address[:2])
        try:
            msg, rest = await read_header(stream)
        except (wire.HeaderError, TimeoutError) as exc:
            code = getattr(exc, "code", "timeout")
            await self._audit("access.denied", actor=peer.actor, actor_roles=peer.identity.roles,
                        result="denied", reason=str(exc) or "no header in time", code=code,
                        remote=remote, stage="header")
            await _try_write(stream, wire.reply_refused(code, str(exc) or "no header in time"))
            _finish(stream)
            return
        except TransportError:
            return
        # A connection outlives its admission (the engineer's per-user helper keeps one for
        # 30 min): each stream checks the account again, and one locked, revoked or expired
        # since gets the very refusal the connect would give, closing the connection.
        snapshot = await self.policy.refresh()
        if (denial := access.user_denial(snapshot, peer, dt.datetime.now(dt.UTC))) is not None:
            code = denial.code if denial.code in CODES else "locked"
            await self._settled(self._audit(
                "access.denied", actor=peer.actor, actor_roles=peer.identity.roles, result="denied",
                reason=denial.reason, code=code, remote=remote, stage="stream"))
            self.metrics.refused(code, "stream")
            conn.close(CODES[code], f"{code}: {denial.reason}")
            return
        if msg.kind == "dial":
            await self._dial(peer, stream, msg, rest, remote)
        elif msg.kind == "request":
            await self._user_request(peer, stream, msg)
        else:
            await self._audit("access.denied", actor=peer.actor, actor_roles=peer.identity.roles,
                        result="denied", code="bad_header",
                        reason=f"engineers cannot send {msg.kind!r} headers", remote=remote,
                        stage="header")
            await _try_write(stream, wire.reply_refused("bad_header", f"unexpected {msg.kind!r} header"))
            _finish(stream)

    async def _dial(self, peer: Peer, stream: Stream, msg: wire.Message, rest: bytes, remote: str) -> None:
        device_id, requested, login = msg["device"], msg["service"], msg.get("login")
        snapshot = await self.policy.refresh()
        dev = snapshot.device(device_id)
        link = self.agents.get(device_id)
        if link is not None and not link.hello.is_set():
            # the agent just connected: its service table comes with its hello
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(link.hello.wait(), HELLO_WAIT)
        # One canonical name, decided here, is what gets authorized, audited and opened.
        resolved = access.canonical_service(requested, link.services if link else None, device_id)
        service = resolved.name
        decision = access.decide(snapshot, peer, device_id, service or requested, login,
                                 online=link is not None)
        if not resolved.ok and (decision.allowed or (service is None and decision.code == "forbidden")):
            decision = access.Decision(False, resolved.code, resolved.reason)
        if decision.allowed and self.stopping:
            decision = access.Decision(False, "shutdown", "the proxy is shutting down: retry in a moment")
        session = secrets.token_hex(8)
        common = dict(actor=peer.actor, actor_roles=peer.identity.roles, device=device_id,
                      labels=dev.labels if dev else None, remote=remote, service=service,
                      requested=requested if requested != service else None,
                      login=login, session=session)
        if not decision.allowed:
            await self._refuse(stream, decision.code, decision.reason, result="denied", stage="dial", **common)
            return
        assert link is not None and service is not None  # allowed: the device is online, the service known
        agent_stream = None
        try:
            agent_stream = await link.conn.open_stream()
            await agent_stream.write(wire.encode("open", service=service, session=session,
                                                 identity=peer.actor, login=login))
            reply, agent_rest = await read_header(agent_stream, AGENT_REPLY_TIMEOUT)
        except (TransportError, wire.HeaderError, TimeoutError) as exc:
            if agent_stream is not None:
                with contextlib.suppress(TransportError):
                    agent_stream.reset(1)
            reason = f"device {device_id} did not answer: {exc or 'timeout'}"
            await self._refuse(stream, "device_unreachable", reason, result="failed", stage="open", **common)
            return
        if not reply.get("ok"):
            code, reason = reply.get("code", "refused"), reply.get("reason", "refused by the device")
            await self._refuse(stream, code, reason, result="denied", stage="device", **common)
            return
        tracked = Session(session, peer, device_id, service, login, (stream, agent_stream),
                          link=link, common=common)
        self.open_sessions[session] = tracked
        # Recorded (durable) before the engineer is told the session is open; but never waited
        # for without bound: a locked or full registry refuses the session at once.
        start = self._write(tracked.write_start)
        try:
            await asyncio.wait_for(asyncio.shield(start), START_AUDIT_WAIT)
        except Exception as exc:  # noqa: BLE001 - TimeoutError or why the write failed
            with contextlib.suppress(TransportError):
                agent_stream.reset(1)
            why = f"no answer within {START_AUDIT_WAIT:g}s" if isinstance(exc, TimeoutError) else str(exc)
            # If the start is still written later, this end follows it; if not, it writes nothing.
            self._end(tracked, result="error", reason=f"not opened: the audit log was unavailable ({why})")
            reason = (f"the proxy could not record this session in its audit log ({why}): nothing was "
                      "opened; retry in a moment, and tell the proxy's operators if it persists")
            event(log, "session refused: audit unavailable", level=logging.ERROR, session=session, error=why)
            await self._refuse(stream, "audit_unavailable", reason, result="failed", stage="audit",
                               audit_wait=0, **common)  # queued behind the stuck start: no wait
            return
        if tracked.cut_reason:  # the proxy began shutting down (or the agent died) meanwhile
            agent_stream.reset(1)
            self._end(tracked, result="error", reason=tracked.end_reason or f"cut: {tracked.cut_reason}")
            code = "shutdown" if self.stopping else "device_unreachable"
            await _try_write(stream, wire.reply_refused(code, tracked.cut_reason))
            _finish(stream)
            return
        try:
            await stream.write(wire.reply_ok(session=session))
        except TransportError:
            agent_stream.reset(1)
            await self._settled(self._end(tracked, result="error", reason="engineer went away"))
            return
        event(log, "session start", session=session, user=peer.name, device=device_id, service=service)
        link.sessions += 1
        link.sessions_total += 1
        started = time.monotonic()
        self.sessions[session] = tracked
        try:
            result = await splice(StreamEnds(stream, rest), StreamEnds(agent_stream, agent_rest))
        finally:
            self.sessions.pop(session, None)
            link.sessions -= 1
        link.bytes_down += result.a_to_b
        link.bytes_up += result.b_to_a
        self.metrics.spliced(result.a_to_b, result.b_to_a)
        dev = self.policy.snapshot.device(device_id)
        if tracked.cut_reason:
            result.error = tracked.end_reason or f"cut: {tracked.cut_reason}"
        ended = self._end(
            tracked, result="error" if result.error else "ok", reason=result.error or "",
            labels=dev.labels if dev else None, bytes_to_device=result.a_to_b,
            bytes_from_device=result.b_to_a, duration=round(time.monotonic() - started, 3),
        )
        event(log, "session end", session=session, up=result.b_to_a, down=result.a_to_b)
        await self._settled(ended, None)

    def _end(self, session: Session, **fields) -> asyncio.Future | None:
        """Queue the session's ``session.end`` exactly once (whoever ends it first: its own task,
        a failed start, or a shutdown); None if it was already queued."""
        if self.open_sessions.pop(session.id, None) is None:
            return None
        return self._write(session.write_end(**fields))

    async def _settled(self, future: asyncio.Future | None, timeout: float | None = DENIAL_AUDIT_WAIT) -> bool:
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

    async def _refuse(self, stream: Stream, code: str, reason: str, *, result: str, stage: str,
                      audit_wait: float = DENIAL_AUDIT_WAIT, **common) -> None:
        """Audit an ``access.denied`` and refuse the engineer's dial; a slow or failing audit
        write delays the answer by at most ``audit_wait`` seconds."""
        denied = self._audit("access.denied", result=result, reason=reason, code=code, stage=stage, **common)
        self.metrics.refused(code, stage)
        if audit_wait > 0:
            await self._settled(denied, audit_wait)
        await _try_write(stream, wire.reply_refused(code, reason))
        _finish(stream)

    async def _user_request(self, peer: Peer, stream: Stream, msg: wire.Message) -> None:
        op = msg["op"]
        args = msg.get("args", {})
        body: dict[str, Any]
        if op == "ls":
            await self.policy.refresh()
            body = {"devices": self.listing(peer)}
        elif op == "status":
            snapshot = await self.policy.refresh()
            roles = access.peer_roles(snapshot, peer)
            body = {"agents": [a.as_dict() for a in self.agents.values()
                               if access.may_see(roles, snapshot.device(a.device_id))]}
        elif op == "whoami":
            roles = access.peer_roles(await self.policy.refresh(), peer)
            body = {"user": peer.name, "roles": [r.name for r in roles],
                    "expires": peer.identity.not_after.isoformat(),
                    "reachable_devices": len(self.listing(peer)),
                    "logins": sorted({lg for r in roles for lg in (r.allow.logins or ())}),
                    "services": sorted({sv for r in roles for sv in r.allowed_services})}
        elif op == "ssh-cert":
            await self._ssh_cert(peer, stream, args)
            return
        else:
            await _try_write(stream, wire.reply_refused("unknown_op", f"unknown request {op!r}"))
            _finish(stream)
            return
        await _try_write(stream, reply_with_body(body))
        _finish(stream)

    async def _ssh_cert(self, peer: Peer, stream: Stream, args: dict) -> None:
        """A short-lived SSH user certificate valid for one login on one device only.

        Its single principal is ``LOGIN@DEVICE``; each device's sshd accepts, for login L, only
        the principal ``L@<its own id>`` (AuthorizedPrincipalsFile), so the certificate works
        nowhere else.
        """
        from enroll import certs

        device_id, login = str(args.get("device", "")), str(args.get("login", ""))
        snapshot = await self.policy.refresh()
        dev = snapshot.device(device_id)
        decision = access.decide(snapshot, peer, device_id, "ssh", login)
        common = dict(actor=peer.actor, actor_roles=peer.identity.roles, device=device_id,
                      labels=dev.labels if dev else None, login=login, service="ssh")
        if not decision.allowed:
            await self._audit("access.denied", result="denied", reason=decision.reason,
                        code=decision.code, stage="ssh-cert", **common)
            await _try_write(stream, wire.reply_refused(decision.code, decision.reason))
            _finish(stream)
            return
        try:
            key = certs.load_ssh_public(str(args.get("public_key", "")))
        except certs.CertError as exc:
            await _try_write(stream, wire.reply_refused("bad_key", str(exc)))
            _finish(stream)
            return
        now = dt.datetime.now(dt.UTC)
        lifetime = min(SSH_CERT_TTL, peer.identity.not_after - now)
        line = certs.ssh_certificate(
            self.state.ssh_user_ca_key, key, host=False, key_id=f"{peer.name}@{self.fleet}",
            principals=[f"{login}@{device_id}"], lifetime=lifetime, now=now,
        )
        await self._audit("cert.issue", kind="ssh-user", not_after=(now + lifetime).isoformat(), **common)
        await _try_write(stream, reply_with_body({"certificate": line}))
        _finish(stream)

    def listing(self, peer: Peer) -> list[dict]:
        rows = []
        roles = access.peer_roles(self.policy.snapshot, peer)
        for dev in self.registry.devices():  # last_seen as of now (the snapshot's may be older)
            if not access.may_see(roles, dev):
                continue
            link = self.agents.get(dev.id)
            rows.append({
                "id": dev.id, "labels": dev.labels, "lifecycle": dev.lifecycle,
                "online": link is not None, "last_seen": dev.last_seen,
                "address": "{}:{}".format(*link.conn.remote_address[:2]) if link else None,
                "locked": dev.locked(dt.datetime.now(dt.UTC)),
            })
        return rows

    # --- enrollment ---------------------------------------------------------------------------

    async def _serve_enroll(self, conn: Connection) -> None:
        """One anonymous request per connection: an enrollment or a login, both rate-limited.

        Two limits apply before any work is done: per source address (``enroll_limiter``) and
        for all anonymous peers together (``anonymous_limiter``), so a flood from many addresses
        cannot keep the CA, scrypt or the audit log busy. Refusals that say nothing about a real
        identity (a limit, a malformed request, a token whose id this fleet never issued, no
        request at all) are counted in ``refusals`` and audited as one ``anonymous.refused``
        event per source per window (see :meth:`_audit_refusals`). An enrollment whose token id
        exists goes on to the CA step, which audits a refusal on its own
        (``device.enroll.denied``): someone holds or guesses a real token. Login refusals are
        audited by :meth:`_login`. A refused request never spends a token.
        """
        remote = "{}:{}".format(*conn.remote_address[:2])
        # an IPv6 host holds a whole /64: limit and count it as one source, not per address
        source = source_of(conn.remote_address[0])
        try:
            stream = await asyncio.wait_for(conn.accept_stream(), HEADER_TIMEOUT)
        except (TransportError, TimeoutError):
            self.refusals.note(source, "no_request")
            conn.close(0, "no enrollment request")
            return
        try:
            if not self.enroll_limiter.allow(source):
                raise _Tallied("rate_limited", "too many enrollment or login attempts from this "
                                               "address; wait a few seconds and retry")
            if not self.anonymous_limiter.allow():
                raise _Tallied("busy", "the proxy is refusing enrollments and logins for a moment "
                                       "(too many at once); retry in a few seconds")
            try:
                msg, _ = await read_header(stream)
            except (wire.HeaderError, TimeoutError) as exc:
                raise _Tallied(getattr(exc, "code", "timeout"), str(exc) or "timeout") from None
            if msg.kind == "request" and msg["op"] == "login":
                await self._login(stream, msg.get("args", {}), remote)
            elif msg.kind != "request" or msg["op"] != "enroll":
                raise _Tallied("bad_request", "this connection only accepts an enrollment or login request")
            else:
                args = msg.get("args", {})
                try:
                    request = parse_request(str(args.get("request", "")).encode())
                except EnrollError as exc:
                    raise _Tallied("bad_request", str(exc)) from None
                token = str(args.get("token", ""))
                self._check_token_id(token)
                bundle = await asyncio.to_thread(_enroll_in_thread, self.state, request, token, remote)
                await stream.write(reply_with_body(bundle))
        except _Tallied as exc:
            self.refusals.note(source, exc.code)
            await _try_write(stream, wire.reply_refused("enroll_refused", str(exc)))
        except (EnrollError, wire.HeaderError, TimeoutError) as exc:  # audited by the CA step
            await _try_write(stream, wire.reply_refused("enroll_refused", str(exc) or "timeout"))
        except TransportError:
            return
        _finish(stream)
        await asyncio.sleep(0.2)  # let the reply leave before the connection is closed
        conn.close(0, "enrollment done")

    def _check_token_id(self, token: str) -> None:
        """Raise _Tallied unless ``token`` is well-formed, for this fleet, with an issued id.

        The answer for an unknown id is the CA step's own wording, so the reply does not tell
        which ids exist.
        """
        from enroll import tokens

        try:
            parsed = tokens.parse(token, self.fleet)
        except tokens.TokenError as exc:
            raise _Tallied("bad_token", str(exc)) from None
        if not tokens.issued(self.registry, parsed.id):
            raise _Tallied("unknown_token", "unknown join token: it was never issued by this fleet, "
                                            "or mistyped")

    async def _audit_refusals(self) -> None:
        """Write the refusal summaries of each window once it has ended (a few seconds late)."""
        while True:
            await asyncio.sleep(min(5.0, self.refusals.window / 4))
            await self._write_refusals(self.refusals.due())

    async def _write_refusals(self, summaries: list) -> None:
        """One ``anonymous.refused`` event per source and window, all in one transaction."""
        if not summaries:
            return

        def write(db):
            for s in summaries:
                codes = ", ".join(f"{code} {n}" for code, n in sorted(s.codes.items()))
                audit.append(
                    db, "anonymous.refused", actor="anonymous", result="denied",
                    reason=f"{s.count} anonymous request(s) refused ({codes})", remote=s.source,
                    count=s.count, codes=dict(s.codes), first=_utc(s.first), last=_utc(s.last),
                    window=f"{_utc(s.window_start)}/{_utc(s.window_end)}",
                )

        try:
            await self._write(write)
        except Exception:  # never lose the loop over an audit summary; it is logged instead
            log.exception("could not audit %d anonymous refusal summaries", len(summaries))
        event(log, "anonymous requests refused", level=logging.WARNING,
              count=sum(s.count for s in summaries), sources=len(summaries))

    async def _flush_at_stop(self) -> None:
        """At shutdown: the refusal summaries of the open window, then a last anchor."""
        await self._write_refusals(self.refusals.due(final=True))
        if self.anchor_dir is not None:
            await self._anchor_now()

    async def _write_anchors(self) -> None:
        """Every ``anchor_every`` seconds, append the log's head to ``anchor_dir`` (if it moved)."""
        while True:
            await asyncio.sleep(self.anchor_every)
            await self._anchor_now()

    async def _trim_memory(self) -> None:
        """Keep RSS at the memory in use: glibc keeps freed session buffers in its heap."""
        while self.trim_every is not None:  # None: trimming was turned off
            await asyncio.sleep(self.trim_every)
            release_free_memory()
            self.trims += 1

    async def _anchor_now(self) -> None:
        if self.anchor_dir is None:
            return
        try:
            seq, digest = audit.tip(self.registry)
            if seq < self._anchored:
                event(log, "the audit log is shorter than its last anchor: run 'tunnel audit verify "
                      "--anchor'", level=logging.ERROR, seq=seq, anchored=self._anchored)
            if seq and seq != self._anchored:
                await asyncio.to_thread(audit.append_anchor, Path(self.anchor_dir) / audit.ANCHOR_FILE,
                                        seq, digest, fleet=self.fleet)
                self._anchored = seq
                event(log, "audit anchor written", anchor=f"{seq}:{digest}")
        except (OSError, sqlite3.Error) as exc:
            event(log, "could not write the audit anchor", level=logging.ERROR,
                  directory=str(self.anchor_dir), error=str(exc))

    async def _login(self, stream: Stream, args: dict, remote: str) -> None:
        """Password (+TOTP) or one-time invite → a short-lived user certificate for a local key."""
        from enroll import certs, users
        from enroll.durations import parse_duration
        from enroll.enrollment import issue_user
        from enroll.roles import session_ttl

        name = str(args.get("user", ""))
        if self._logins_pending >= MAX_PENDING_LOGINS:
            # each login costs a 128 MiB scrypt on one of LOGIN_THREADS threads: queue no deeper
            raise _Tallied("busy", "the proxy is refusing logins for a moment (too many at once); "
                                   "retry in a few seconds")
        try:
            public_key = certs.check_csr(str(args.get("csr", "")))
            self._logins_pending += 1
            try:
                user = await asyncio.get_running_loop().run_in_executor(
                    self._login_pool, _authenticate_in_thread, self.state, name,
                    str(args.get("password", "")), args.get("invite"), args.get("totp"),
                    users.source_of(remote))
            finally:
                self._logins_pending -= 1
            roles = users.load_roles(self.registry, list(user.roles))
            requested = parse_duration(str(args["ttl"])) if args.get("ttl") else None
            # never longer than the fleet's user lifetime; roles' max_session_ttl shorten it
            ttl = session_ttl(roles, requested, self.state.lifetime("user"))
            cert = issue_user(self.state, self.registry, name, public_key, list(user.roles), ttl,
                              actor=f"user:{name}", origin="login")
            self.policy.changed()  # written on the proxy's own connection: its next connect must see it
        except (users.LoginError, certs.CertError, ValueError) as exc:
            if users.get(self.registry, name) is None:
                # a name with no account: summed up per source like other anonymous refusals
                # (the reply is the same as for a real account, so nothing leaks to the peer)
                self.refusals.note(remote.rpartition(":")[0].strip("[]"), "login_unknown_user")
            else:
                await self._audit("user.login.failed", actor=f"user:{name or '?'}", result="denied",
                            reason=str(exc), remote=remote)
            await _try_write(stream, wire.reply_refused("login_failed", str(exc)))
            _finish(stream)
            return
        await self._audit("user.login", actor=f"user:{name}", actor_roles=list(user.roles), remote=remote,
                    not_after=cert.not_valid_after_utc.isoformat(), invite=args.get("invite") is not None)
        await _try_write(stream, reply_with_body({
            "cert": certs.cert_pem(cert).decode(), "ca": certs.cert_pem(self.state.ca_cert).decode(),
            "ssh_host_ca": self.state.ssh_ca_public("host"), "roles": list(user.roles),
            "server_name": self.state.config["proxy_name"],
        }))
        _finish(stream)

    # --- live policy ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Each interval, re-check connected devices and open sessions against the registry.

        A lock or decommission cuts the device's connection; a relabel, role change, user lock
        or certificate expiry cuts each session that is no longer allowed. Within one interval.
        The snapshot is refreshed once (off the loop, only if the policy changed); the checks
        themselves are pure and cost no I/O, however many sessions and agents there are.
        """
        last_touch = time.monotonic()
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                snapshot = await self.policy.refresh()
            except Exception:  # noqa: BLE001 - registry unreadable: keep the last snapshot, retry
                log.exception("could not refresh the policy snapshot")
                snapshot = self.policy.snapshot
            now = dt.datetime.now(dt.UTC)
            for session in list(self.sessions.values()):
                decision = access.decide(snapshot, session.peer, session.device_id,
                                         session.service, session.login, now=now)
                if not decision.allowed:
                    event(log, "cutting session", session=session.id, code=decision.code)
                    session.cut(decision.reason)
                    self.sessions.pop(session.id, None)
            for device_id, link in list(self.agents.items()):
                if (denied := recheck_agent(snapshot, link.peer, now)) is not None:
                    event(log, "cutting agent", device=device_id, code=denied.code)
                    link.conn.close(CODES[denied.code], f"{denied.code}: {denied.reason}")
            if time.monotonic() - last_touch > 60 and self.agents:
                last_touch = time.monotonic()
                online = list(self.agents)

                def touch(db, online=online, seen=now):
                    Devices(db).seen(online, seen)

                self._write(touch)


def _enroll_in_thread(state: FleetState, request: dict, token: str, remote: str) -> dict:
    # SQLite connections belong to one thread: open a registry just for this enrollment.
    with state.registry() as reg:
        return enroll(state, reg, request, token, remote=remote)


def _authenticate_in_thread(state, name, password, invite, totp_code, source=None) -> User:
    from enroll import users

    with state.registry() as reg:  # scrypt takes ~0.3 s: keep it off the event loop
        return users.authenticate(reg, name, password=password, invite=invite, totp_code=totp_code,
                                  source=source)


def _renew_in_thread(state: FleetState, device_id: str, csr: str) -> str:
    with state.registry() as reg:
        return renew(state, reg, device_id, csr)


class _Tallied(EnrollError):
    """An anonymous refusal counted in ``Proxy.refusals`` (audited as a summary, not alone)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def _utc(t: float) -> str:
    return iso(dt.datetime.fromtimestamp(t, dt.UTC))


def _actor_of(cert) -> str:
    from enroll import certs

    if cert is None:
        return "anonymous"
    try:
        ident = certs.identity_of(cert)
        return f"{ident.kind}:{ident.name}"
    except certs.CertError:
        return "unknown:" + cert.subject.rfc4514_string()


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

    def write_end(self, **fields):
        """A ``session.end`` write that appends only behind this session's committed start."""
        def write(db):
            if self.start_seq is None:
                return None
            if not audit.is_session_start(db, self.start_seq, self.id):
                return None  # its start was rolled back: nothing to pair
            return audit.append(db, "session.end", **{**self.common, **fields})

        return write


async def _try_write(stream: Stream, data: bytes) -> None:
    with contextlib.suppress(TransportError):
        await stream.write(data)


def _finish(stream: Stream) -> None:
    with contextlib.suppress(TransportError):
        stream.write_eof()
