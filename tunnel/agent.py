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

Path logic (:meth:`Agent._watch_routes` and :meth:`Agent._probe`):

* The route toward the proxy endpoint is re-checked on every netlink route/address/link event,
  on every failed send and every ``probe_interval`` (1 s): which local address and which
  interface (uplink) the kernel would use now. No packet is sent for that.
* The source address changed (Wi-Fi → cellular), or the route came back after an outage: the
  live connection migrates — new UDP socket on the new address, new connection ID, in-flight
  packets retransmitted at once — and a probe goes out immediately. Sessions continue.
* The uplink the route now uses may not reach this endpoint (the satellite network only reaches
  the ground-station address), or the connection ended (proxy restarted, idle timeout): the
  agent reconnects to an endpoint the current uplink may use and says why in its hello, which
  the proxy audits as ``device.reconnect``.
* Liveness: a PING every ``keepalive`` (25 s) when idle, every ``probe_interval`` while sessions
  are open or once a probe went unanswered. Nothing heard from the proxy for ``dead_after``
  probe timeouts (3 s by default) means the path is dead: the agent reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fcntl
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass

from enroll import certs
from enroll.files import write_file
from tunnel import wire
from tunnel.agent_config import AgentConfig, Endpoint
from tunnel.backoff import AfterRefusal, Backoff, after_refusal
from tunnel.log import event
from tunnel.protocol import ALPN_AGENT, CLOSE_NAMES, read_header, read_reply
from tunnel.splice import SocketEnds, StreamEnds, splice
from tunnel.transport import Connection, ErrorCode, Stream, TLSIdentity, TransportError, dial

log = logging.getLogger("tunnel.agent")

LOCAL_CONNECT_TIMEOUT = 5.0
MAX_SESSIONS = 64
RENEW_AT = 2 / 3  # renew when this fraction of the certificate's life is gone
HANDSHAKE_TIMEOUT = 3.0
HEAD_START = 0.3  # QUIC's head start before TLS over TCP joins the race
STABLE_AFTER = 10.0  # a connection that lasted this long resets the reconnect backoff
SETTLE = 0.01  # coalesce a burst of netlink events (link up + route replace) into one check

# rtnetlink multicast groups (linux/rtnetlink.h)
_RTMGRP = 0x1 | 0x10 | 0x40 | 0x100 | 0x400  # LINK, IPV4_IFADDR, IPV4_ROUTE, IPV6_IFADDR, IPV6_ROUTE
_SIOCGIFADDR = 0x8915


def load_identity(config: AgentConfig) -> TLSIdentity:
    cert = certs.load_cert(config.cert.read_bytes())
    return TLSIdentity([cert], certs.load_key(config.key.read_bytes()), certs.load_cert(config.ca.read_bytes()))


@dataclass(frozen=True)
class Route:
    """What the kernel would use toward one endpoint now."""

    source: str  # local address
    uplink: str | None  # interface name (None when it cannot be told, e.g. IPv6)


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


@dataclass
class Counters:
    migrations: int = 0
    reconnects: int = 0
    sessions: int = 0


class Agent:
    def __init__(self, config: AgentConfig, *, probe_interval: float | None = None,
                 probe_timeout: float | None = None):
        self.config = config
        self.probe_interval = probe_interval or config.probe_interval
        self.probe_timeout = probe_timeout or config.probe_timeout
        self.counters = Counters()
        self.active_sessions = 0
        self.conn: Connection | None = None
        self.endpoint: Endpoint | None = None
        self.route: Route | None = None  # current path of the live connection
        self._stop = asyncio.Event()
        self._net_changed = asyncio.Event()  # netlink event or failed send: re-check routes
        self._probe_now = asyncio.Event()
        self._netlink: socket.socket | None = None
        self._outage_since: float | None = None  # loop.time() the route went away, if it did
        self._network_moved = False  # the last connection ended because the network changed
        self._closed_code: int | None = None  # application code the proxy closed us with
        self._closed_reason = ""  # and the reason it gave (a lock's end)
        self._refused: tuple[str, str] | None = None  # (code name, reason) of the last dial refused
        #: set when the proxy refused this device for good (decommissioned, revoked, unknown):
        #: ``run`` returned and ``tunnel agent`` exits with its own status (see cli.EXIT_RETIRED)
        self.retired: AfterRefusal | None = None
        self._accepted = False  # the proxy answered our hello on the last connection
        self._next_conn: Connection | None = None  # a QUIC connection found while on TCP
        self._conn_sessions: dict[Connection, int] = {}  # open sessions per connection
        self._interception: str | None = None  # a TLS-interception error to report once through
        self._tasks: set[asyncio.Task] = set()  # sessions, drains, uplink reports (see _spawn)

    def _spawn(self, coro) -> asyncio.Task:
        """Start a task and keep it until it ends: the event loop holds tasks only weakly, so
        an unreferenced session task could be garbage-collected mid-session."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def stop(self) -> None:
        self._stop.set()
        if self.conn:
            self.conn.close(0, "agent stopping")

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
        with contextlib.suppress(OSError):
            while self._netlink.recv(65536):
                pass
        self._net_changed.set()

    def _on_send_error(self, exc: Exception) -> None:
        self._net_changed.set()

    async def _wait_change(self, timeout: float) -> bool:
        """Wait for a network change (True) or ``timeout`` / stop (False)."""
        waits = [asyncio.ensure_future(self._net_changed.wait()), asyncio.ensure_future(self._stop.wait())]
        try:
            done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
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
        """Endpoints the device may use now, each with the route toward it, in preference order.

        An endpoint is usable when the kernel has a route toward it and the interface of that
        route is one the endpoint serves (``via``; endpoints without ``via`` serve every uplink
        that has no endpoint of its own). Per-uplink endpoints come first.
        """
        ifaddrs = interface_addresses()
        out = []
        for ep in self.config.proxies:
            route = route_toward(ep.host, ep.port, ifaddrs if ":" not in ep.host else {})
            if route is not None and ep.serves(route.uplink, self.config.proxies):
                out.append((ep, route))
        out.sort(key=lambda pair: not pair[0].via)
        return out

    # --- connection loop ------------------------------------------------------------------------

    async def run(self) -> None:
        self._start_netlink()
        try:
            await self._run()
        finally:
            self._stop_netlink()

    async def _run(self) -> None:
        backoff = Backoff(base=self.config.reconnect_backoff, cap=self.config.reconnect_backoff_max)
        loop = asyncio.get_running_loop()
        reason: str | None = None
        outage_started: float | None = None  # loop.time() the device was last known reachable
        while not self._stop.is_set():
            offered = self.candidates()
            conn, self._next_conn = self._next_conn, None
            if conn is None:
                conn = await self._dial_any(offered) if offered else None
            if conn is None:
                outage_started = outage_started or loop.time()
                decision = after_refusal(*self._refused) if self._refused else AfterRefusal("retry")
                if decision.action == "stop":
                    return self._retire(decision, *self._refused)
                if decision.action == "wait":
                    delay = decision.delay
                    event(log, "refused by the proxy; waiting", level=logging.WARNING,
                          code=self._refused[0], delay=round(delay, 1), reason=self._refused[1])
                elif offered:
                    delay = backoff.next_delay()
                    event(log, "no proxy endpoint answered; retrying", delay=round(delay, 2),
                          tried=",".join(ep.address for ep, _ in offered))
                else:
                    delay = self.probe_interval
                    event(log, "no route toward any proxy endpoint; waiting for a network",
                          level=logging.DEBUG)
                # A new network (route or address change) is worth trying at once.
                deadline = time.monotonic() + delay
                while not self._stop.is_set() and time.monotonic() < deadline:
                    changed = await self._wait_change(deadline - time.monotonic())
                    if changed and self.candidates() != offered:
                        backoff.reset()
                        break
                continue
            outage = round(loop.time() - outage_started, 3) if outage_started else None
            if reason:
                self.counters.reconnects += 1
            self._outage_since = None
            self._network_moved = False
            self._closed_code, self._closed_reason = None, ""
            self._accepted = False
            started = loop.time()
            reason = await self._serve(conn, reason, outage)
            # offline since the route went away, or since the proxy was last heard from
            outage_started = min(self._outage_since or loop.time(), conn.last_received, loop.time())
            if self._stop.is_set():
                return
            decision = after_refusal(CLOSE_NAMES.get(self._closed_code), self._closed_reason)
            if decision.action == "stop":
                return self._retire(decision, CLOSE_NAMES[self._closed_code], self._closed_reason)
            event(log, "connection ended; reconnecting", reason=reason)
            if decision.action == "wait":
                event(log, "the device is locked; waiting", level=logging.WARNING,
                      delay=round(decision.delay, 1), reason=self._closed_reason)
                backoff.reset()
                await self._wait_change(decision.delay)  # a new network (or stop) ends it early
                continue
            if self._accepted or loop.time() - started >= STABLE_AFTER:
                backoff.reset()  # the proxy took us: the first retry is immediate
            shutdown = self._closed_code == ErrorCode.SHUTDOWN
            if not self._network_moved and (shutdown or not self._accepted):
                # Closed before the proxy took us (refused, locked), or a proxy shutting down:
                # back off with jitter so a fleet does not reconnect in lockstep (a new network
                # retries at once). After a working connection the first retry is immediate.
                delay = backoff.next_delay()
                changed = await self._wait_change(delay)
                if changed:
                    backoff.reset()

    def _retire(self, decision: AfterRefusal, code: str, reason: str) -> None:
        """Stop for good: the proxy will refuse this identity until an operator acts."""
        self.retired = decision
        event(log, "stopping: the proxy refused this device for good; re-enroll it to bring it back",
              level=logging.ERROR, code=code, why=decision.why, reason=reason)
        self._stop.set()

    async def _dial_any(self, offered: list[tuple[Endpoint, Route]]) -> Connection | None:
        """Try each usable endpoint in order; the first that completes a handshake wins.

        A refusal with a fleet close code is remembered (``_refused``, reset each round) for
        the reconnect decision.
        """
        identity = load_identity(self.config)
        self._refused = None
        for ep, route in offered:
            try:
                conn = await self._dial(ep, route, identity, self.config.transports)
            except TransportError as exc:
                if "intercepting TLS" in exc.reason:
                    self._interception = exc.reason  # told to the proxy once we get through
                code = CLOSE_NAMES.get(exc.wire_code, exc.wire_code) if exc.application else exc.wire_code
                if exc.application and exc.wire_code in CLOSE_NAMES:
                    self._refused = (CLOSE_NAMES[exc.wire_code], exc.reason or "")
                event(log, "dial failed", level=logging.WARNING, endpoint=ep.address,
                      uplink=route.uplink, code=code, reason=exc.reason)
                continue
            except OSError as exc:
                event(log, "dial failed", level=logging.WARNING, endpoint=ep.address,
                      uplink=route.uplink, error=str(exc))
                continue
            self.endpoint, self.route = ep, route
            return conn
        return None

    async def _dial(self, ep: Endpoint, route: Route, identity: TLSIdentity,
                    transports: tuple[str, ...]) -> Connection:
        return await dial(
            ep.host, ep.port, transports=transports, head_start=HEAD_START,
            identity=identity, server_name=ep.server_name, local_addr=(route.source, 0),
            alpn=ALPN_AGENT, keepalive=None,  # _probe sends the keepalives
            idle_timeout=max(60.0, self.config.keepalive * 3), handshake_timeout=HANDSHAKE_TIMEOUT,
        )

    async def _back_to_quic(self, conn: Connection) -> str:
        """On TCP, keep trying QUIC (every ``quic_retry`` s, and on a network change)."""
        while True:
            await self._wait_change(self.config.quic_retry * (0.75 + random.random() / 2))
            if self.route is None:
                continue
            try:
                self._next_conn = await self._dial(self.endpoint, self.route, load_identity(self.config),
                                                   ("quic",))
            except (TransportError, OSError):
                continue
            return "back on QUIC"

    async def _serve(self, conn: Connection, reconnect: str | None, outage: float | None) -> str:
        """Run one connection until it ends; return why it ended."""
        self.conn = conn
        conn.on_send_error = self._on_send_error
        event(log, "connected", endpoint=self.endpoint.address, uplink=self.route.uplink,
              local="{}:{}".format(*conn.local_address[:2]), reconnect=reconnect, outage=outage)
        tasks = [asyncio.create_task(self._accept(conn)),
                 asyncio.create_task(self._watch_routes(conn)),
                 asyncio.create_task(self._probe(conn))]
        if conn.transport_name == "tcp" and "quic" in self.config.transports:
            tasks.append(asyncio.create_task(self._back_to_quic(conn)))
        try:
            await self._hello(conn, reconnect, outage)
            self._accepted = True
            await self._maybe_renew(conn)
            closed = asyncio.create_task(conn.wait_closed())
            stop = asyncio.create_task(self._stop.wait())
            done, _ = await asyncio.wait({closed, stop, *tasks}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            for t in done:
                if t in tasks and not t.cancelled() and isinstance(t.result(), str):
                    return t.result()
            if closed in done and closed.result() is not None:
                err = closed.result()
                self._closed_code = err.wire_code if err.application else None
                self._closed_reason = err.reason or ""
                return CLOSE_NAMES.get(err.wire_code, err.reason) if err.application else err.reason
            return "closed"
        except TransportError as exc:
            # Refused after the handshake (during the hello) or cut while a stream was open:
            # the connection's close code is what the reconnect decision needs.
            err = exc if exc.application and exc.wire_code in CLOSE_NAMES else None
            if err is None and conn.is_closed:
                with contextlib.suppress(Exception):
                    err = await asyncio.wait_for(conn.wait_closed(), 1.0)
            if err is not None and err.application:
                self._closed_code, self._closed_reason = err.wire_code, err.reason or ""
            return exc.reason or "transport error"
        finally:
            for t in tasks:
                t.cancel()
            if self._next_conn is not None and self._conn_sessions.get(conn):
                # moving to QUIC: open sessions finish on the old connection, new ones go to QUIC
                self._spawn(self._drain(conn))
            else:
                conn.close(0, "agent reconnecting")
            self.conn = None

    async def _drain(self, conn: Connection) -> None:
        while self._conn_sessions.get(conn) and not conn.is_closed:
            await asyncio.sleep(0.5)
        self._conn_sessions.pop(conn, None)
        conn.close(0, "drained")

    async def _request(self, conn: Connection, op: str, **args) -> tuple[wire.Message, dict]:
        stream = await conn.open_stream()
        await stream.write(wire.encode("request", op=op, args=args))
        stream.write_eof()
        return await read_reply(stream)

    async def _hello(self, conn: Connection, reconnect: str | None, outage: float | None,
                     **extra) -> None:
        args = {"uplink": self.route.uplink if self.route else None,
                "endpoint": self.endpoint.address, "transport": conn.transport_name,
                "migrations": self.counters.migrations, "reconnects": self.counters.reconnects,
                # the proxy resolves a port to one of these names before it authorizes a session
                "services": self.config.service_ports(), **extra}
        if reconnect:
            args.update(reconnect=reconnect, outage=outage)
        if self._interception:
            args["tls_interception"], self._interception = self._interception, None
        await self._request(conn, "hello", **args)

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
        """Follow the kernel's route toward the endpoint: migrate, or ask for a reconnect."""
        ep = self.endpoint
        outage_since: float | None = None
        while True:
            await self._wait_change(self.probe_interval)
            route = route_toward(ep.host, ep.port)
            if route is None:
                if outage_since is None:
                    outage_since = time.monotonic()
                    self._outage_since = asyncio.get_running_loop().time()
                    self.route = None
                    event(log, "no route toward the proxy", endpoint=ep.address)
                continue
            if not ep.serves(route.uplink, self.config.proxies):
                self._network_moved = True
                return (f"uplink {route.uplink} does not reach {ep.address}"
                        f" (per-uplink endpoints: {', '.join(e.address for e in self.config.endpoints_for(route.uplink)) or 'none'})")
            after_outage = outage_since is not None
            if conn.transport_name == "tcp" and (after_outage or route.source != conn.local_address[0]):
                self._network_moved = True
                return "network changed; a TCP connection cannot migrate"
            if route.source == conn.local_address[0] and not after_outage:
                if route != self.route:
                    self.route = route
                continue
            outage = round(time.monotonic() - outage_since, 3) if after_outage else None
            outage_since = self._outage_since = None
            silent = asyncio.get_running_loop().time() - getattr(conn, "last_received", 0.0)
            if after_outage and silent >= conn.idle_timeout - self.probe_timeout:
                # the proxy has forgotten this connection by now: a migration cannot work
                self._network_moved = True
                return f"outage of {outage}s outlived the connection's {conn.idle_timeout:g}s idle timeout"
            old = self.route
            old_local = conn.local_address[0]
            try:
                await conn.migrate((route.source, 0))
            except (OSError, TransportError) as exc:
                event(log, "migration failed", level=logging.WARNING, error=str(exc))
                continue
            self.route = route
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
        """Keepalives and liveness probes; return when the path has been silent too long."""
        loop = asyncio.get_running_loop()
        last_probe = loop.time()
        pending: float | None = None  # time of the oldest probe nothing was heard after
        while True:
            fast = self.active_sessions > 0 or pending is not None
            interval = self.probe_interval if fast else self.config.keepalive
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._probe_now.wait(), max(0.0, last_probe + interval - loop.time()))
            forced = self._probe_now.is_set()
            self._probe_now.clear()
            now = loop.time()
            if pending is not None and conn.last_received >= pending:
                pending = None
            if self.route is None:  # no route at all: nothing to probe, nothing to conclude
                pending, last_probe = None, now
                continue
            answer_within = max(self.probe_timeout, 2 * (conn.rtt or 0.0))
            if pending is not None and now - pending >= self.config.dead_after * answer_within:
                silent = round(now - conn.last_received, 1)
                event(log, "path dead: nothing heard from the proxy", level=logging.WARNING,
                      silent=silent, uplink=self.route.uplink)
                return f"path dead: nothing heard for {silent}s"
            fast = self.active_sessions > 0 or pending is not None
            interval = self.probe_interval if fast else self.config.keepalive
            if forced or now - last_probe >= interval - 0.005:
                conn.send_ping()
                last_probe = now
                if pending is None:
                    pending = now

    # --- sessions -----------------------------------------------------------------------------

    async def _accept(self, conn: Connection) -> None:
        while True:
            stream = await conn.accept_stream()
            self._spawn(self._session(stream, conn))

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
            await stream.write(wire.reply_ok(session=msg["session"]))
        except TransportError:
            writer.close()
            return
        self.active_sessions += 1
        self._conn_sessions[conn] = self._conn_sessions.get(conn, 0) + 1
        self.counters.sessions += 1
        event(log, "session", session=msg["session"], service=name, identity=msg["identity"])
        try:
            await splice(StreamEnds(stream, rest), SocketEnds(reader, writer))
        finally:
            self.active_sessions -= 1
            self._conn_sessions[conn] -= 1
            writer.close()

    async def _refuse(self, stream: Stream, code: str, reason: str) -> None:
        event(log, "session refused", level=logging.WARNING, code=code, reason=reason)
        with contextlib.suppress(TransportError):
            await stream.write(wire.reply_refused(code, reason))
            stream.write_eof()
