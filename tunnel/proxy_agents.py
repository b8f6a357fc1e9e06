"""The proxy's agent side: one task per connected device's agent.

:meth:`AgentLinks.serve` runs an agent's connection from admission to close: it makes the link
the device's (at once, or only after its hello when the device is connected already: see
:meth:`AgentLinks._take_over_after_hello`), audits ``device.connect`` / ``device.disconnect``,
answers the agent's own requests (hello, certificate renewal), counts path changes, and probes
an agent that has open sessions so a silent one is declared dead within seconds instead of at
the idle timeout. It shares the proxy's state through :class:`tunnel.proxy_core.ProxyCore`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import sqlite3
import time

from enroll import audit
from enroll.enrollment import renew
from enroll.repositories import Devices
from enroll.session_log import end_if_not_resumed
from enroll.state import FleetState
from tunnel import wire
from tunnel.admission import CODES, Peer
from tunnel.log import event
from tunnel.protocol import read_header, reply_with_body
from tunnel.proxy_core import DENIAL_AUDIT_WAIT, AgentLink, Liveness, ProxyCore, finish, try_write
from tunnel.proxy_resume import held_denials
from tunnel.transport import Connection, PathChange, Stream, TransportError

log = logging.getLogger("tunnel.proxy")


class AgentLinks:
    """Serves agents' connections for the proxy (``proxy``: the state they share)."""

    def __init__(self, proxy: ProxyCore):
        self.proxy = proxy

    async def serve(self, conn: Connection, peer: Peer) -> None:
        device_id = peer.name
        totals = self.proxy.device_totals.setdefault(device_id, {"connections": 0, "migrations": 0})
        totals["connections"] += 1
        link = AgentLink(device_id, conn, peer, transport=conn.transport_name, totals=totals)
        old = self.proxy.agents.get(device_id)
        replaced = old is not None
        take_over = None
        if old is None or old.conn.is_closed:
            self._take_over(link)
        else:
            # The device is connected already: this connection takes over only once the agent
            # says hello on it. A handshake the agent gave up on (the losing side of its race,
            # a QUIC retry that timed out on its side) can still complete here, and it must not
            # cut the sessions of the connection the agent actually uses.
            take_over = self.proxy.spawn(self._take_over_after_hello(link))
        # This frame lives as long as the new connection: holding the link it replaces would keep
        # that ended connection (its TLS, crypto, HTTP/2 or QUIC state and buffers) alive too, one
        # per reconnected device (measured in the soak, issue 19).
        del old
        remote = "{}:{}".format(*conn.remote_address[:2])
        now = dt.datetime.now(dt.UTC)
        def connected(db):
            Devices(db).seen([device_id], now)
            from enroll.enrollment import device_connected  # older certificates: superseded
            device_connected(db, device_id, peer.identity.serial_hex, now)
            audit.append(
                db, "device.connect", actor=peer.actor, device=device_id,
                labels=peer.device.labels if peer.device else None,
                now=now, remote=remote, transport=link.transport, replaced=replaced,
            )

        written = self.proxy.write(connected)
        conn.on_path_change = lambda change: self._on_path_change(link, change)
        accept = self.proxy.spawn(self._agent_requests(link))
        probe = self.proxy.spawn(self.probe(link))
        try:
            # A registry that is locked or full must not keep the agent's hello unread (nor the
            # device listed online on a connection nobody serves): the write stays queued.
            await self.proxy.settled(written, DENIAL_AUDIT_WAIT)
            event(log, "agent connected", device=device_id, remote=remote)
            error = await conn.wait_closed()
        finally:
            accept.cancel()
            probe.cancel()
            if take_over is not None:
                take_over.cancel()
            if self.proxy.agents.get(device_id) is link:
                del self.proxy.agents[device_id]
        reason = link.dead_reason or (error.reason if error else "closed by proxy")
        dev = self.proxy.registry.device(device_id)
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

        await self.proxy.settled(self.proxy.write(disconnected), DENIAL_AUDIT_WAIT)
        event(log, "agent disconnected", device=device_id, reason=reason)

    def _take_over(self, link: AgentLink) -> None:
        """Make ``link`` the device's connection; end (or drain) the one it replaces."""
        old = self.proxy.agents.get(link.device_id)
        self.proxy.agents[link.device_id] = link
        if old is None or old is link:
            return
        if old.sessions and old.transport != link.transport:
            # The agent moved to another transport (TCP → QUIC) while sessions were open: those
            # finish on the old connection; new sessions go to the new one.
            self.proxy.spawn(self._drain(old))
        else:
            old.conn.close(CODES["replaced"], "replaced: the device connected again")

    async def _take_over_after_hello(self, link: AgentLink) -> None:
        await link.hello.wait()
        if not link.conn.is_closed:
            self._take_over(link)

    async def probe(self, link: AgentLink) -> None:
        """While the agent has open sessions, PING it; a silent agent is declared dead.

        Without this an agent killed mid-transfer (or cut off) left its sessions hanging until
        the connection's idle timeout (60 s) and the device listed online meanwhile.
        """
        conn, loop = link.conn, asyncio.get_running_loop()
        live = Liveness(self.proxy.dead_after)
        while True:
            if not link.sessions:
                live.answered()
                await asyncio.sleep(self.proxy.probe_interval)
                continue
            sent = loop.time()
            try:
                await conn.ping(max(self.proxy.probe_timeout, 2 * (getattr(conn, "rtt", None) or 0.0)))
            except TimeoutError:
                if live.unanswered(getattr(conn, "last_received", 0.0) >= sent):
                    silent = loop.time() - getattr(conn, "last_received", sent)
                    self._declare_dead(link, round(silent, 1))
                    return
                continue  # probe again at once: the timeout was the wait
            except TransportError:
                return
            live.answered()
            await asyncio.sleep(self.proxy.probe_interval)

    def _declare_dead(self, link: AgentLink, silent: float) -> None:
        """End the agent's sessions with the reason, list it offline, close its connection."""
        reason = f"device {link.device_id} stopped answering: nothing heard for {silent:g}s"
        event(log, "agent stopped answering", level=logging.WARNING, device=link.device_id, silent=silent)
        link.dead_reason = reason
        for session in list(self.proxy.open_sessions.values()):
            if session.link is link:
                session.cut(reason, CODES["unresponsive"], end_reason=reason)
        if self.proxy.agents.get(link.device_id) is link:
            del self.proxy.agents[link.device_id]
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
            dev = self.proxy.registry.device(link.device_id)
            self.proxy.audit(
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
            self.proxy.spawn(self._agent_request(link, stream))

    async def _agent_request(self, link: AgentLink, stream: Stream) -> None:
        try:
            msg, _ = await read_header(stream)
            if msg.kind != "request":
                raise wire.HeaderError("bad_header", "agents may only send requests")
            op, args = msg["op"], msg.get("args", {})
            dev = self.proxy.registry.device(link.device_id)
            if op == "hello":
                link.note_hello(args)
                if args.get("tls_interception"):
                    await self.proxy.audit("device.tls_intercepted", actor=link.peer.actor, device=link.device_id,
                                labels=dev.labels, result="warning", reason=str(args["tls_interception"]),
                                remote="{}:{}".format(*link.conn.remote_address[:2]),
                                transport=link.transport)
                if args.get("reconnect"):
                    await self.proxy.audit(
                        "device.reconnect", actor=link.peer.actor, device=link.device_id,
                        labels=dev.labels, reason=str(args.get("reconnect")),
                        uplink=args.get("uplink"), remote="{}:{}".format(*link.conn.remote_address[:2]),
                        outage=args.get("outage"),
                    )
                await stream.write(wire.reply_ok())
            elif op == "held":
                # the agent's held sessions (issue 17): which may no longer resume, and why —
                # asked every second while it holds any, so a lock or relabel issued during the
                # outage ends them at the device too (each detached one gets its session.end);
                # the sessions that ended at the device (hold time, an abort) get theirs, with
                # the device's reason
                drop = held_denials(self.proxy.policy.snapshot, link.device_id, args.get("sessions"))
                for report in args.get("sessions") or []:  # cut here for good (certificate, lock)
                    session_id = report.get("session") if isinstance(report, dict) else None
                    if isinstance(session_id, str) and (cut := self.proxy.policy_cuts.get(session_id)):
                        drop.setdefault(session_id, cut[0])
                ended = args.get("ended")
                reported = {e["session"]: e["reason"] for e in (ended if isinstance(ended, list) else [])[:256]
                            if isinstance(e, dict) and isinstance(e.get("session"), str)
                            and isinstance(e.get("reason"), str)}
                for session_id, reason in {**reported, **drop}.items():
                    detached = self.proxy.detached.get(session_id)
                    if detached is not None and detached.common.get("device") == link.device_id:
                        del self.proxy.detached[session_id]  # this device's own session only
                        why = reason if session_id in drop else f"ended at the device: {reason[:200]}"
                        self.proxy.write(functools.partial(end_if_not_resumed, detached=detached, hold=0,
                                                           reason=why))
                await stream.write(reply_with_body({"drop": drop}))
            elif op == "renew":
                cert = await asyncio.to_thread(
                    _renew_in_thread, self.proxy.state, link.device_id, str(args.get("csr", ""))
                )
                await stream.write(reply_with_body({"cert": cert}))
            else:
                await stream.write(wire.reply_refused("unknown_op", f"unknown request {op!r}"))
        except (ValueError, TimeoutError, KeyError, TypeError, AttributeError) as exc:
            # HeaderError, EnrollError/RenewalError (bad CSR, renewal limit), CertError, a
            # request of the wrong shape: every refusal is answered with a code and audited,
            # never left to time out on the agent.
            code = getattr(exc, "code", "refused")
            dev = self.proxy.registry.device(link.device_id)
            await self.proxy.audit("access.denied", actor=link.peer.actor, device=link.device_id,
                        labels=dev.labels if dev else None,
                        result="denied", reason=str(exc), code=code, stage="agent-request")
            await try_write(stream, wire.reply_refused(code, str(exc)))
        except sqlite3.Error as exc:  # the registry is locked or full: answer, never time out
            event(log, "agent request failed", level=logging.ERROR, device=link.device_id, error=str(exc))
            await try_write(stream, wire.reply_refused(
                "registry_unavailable", f"the proxy cannot write its registry now ({exc}); retry later"))
        except TransportError:
            pass
        finally:
            finish(stream)  # whatever happened: a stream left open keeps one of the agent's slots


def _renew_in_thread(state: FleetState, device_id: str, csr: str) -> str:
    with state.registry() as reg:
        return renew(state, reg, device_id, csr)
