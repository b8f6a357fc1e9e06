"""The proxy: admits agents and engineers on one port (QUIC over UDP, TLS over TCP) and routes each session.

Three kinds of peer, told apart by ALPN before any stream is accepted:

- ``fleet-agent/1`` — a device certificate. The agent's connection is kept in ``agents`` (device
  id → :class:`AgentLink`); a newer connection from the same device replaces the old one at once.
  Served by :class:`tunnel.proxy_agents.AgentLinks`.
- ``fleet-user/1`` — an engineer's user certificate. Each stream starts with a ``dial`` (then
  the proxy opens a stream to the device's agent and splices the two) or a ``request`` (ls,
  status). Served by :class:`tunnel.proxy_sessions.UserSessions`.
- ``fleet-enroll/1`` — no certificate yet: one enrollment request (token + CSR), size- and
  rate-limited. Served by :class:`tunnel.proxy_enroll.OnlineEnrollment`.

This module is the facade: :class:`Proxy` starts and stops the listeners, admits each
connection (:meth:`Proxy._authorize`) and hands it to its part, and runs the proxy's own loops
(the once-a-second re-check, refusal summaries, audit anchors, memory trim). The state the parts
share and the registry write queue live in :class:`tunnel.proxy_core.ProxyCore`.

Where is a session authorized? :meth:`UserSessions._dial` asks :func:`tunnel.access.decide`;
peers are admitted by :func:`tunnel.admission.admit`. Both are pure functions over the policy
snapshot that :class:`tunnel.live_policy.LivePolicy` keeps fresh off the event loop. Every
refusal is audited.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

from enroll import audit
from enroll.registry import iso
from enroll.repositories import Devices
from enroll.session_log import NOT_RESUMED, end_if_not_resumed, recover_open_sessions
from enroll.state import FleetState
from tunnel import access
from tunnel.admission import CODES, Denied, admit, identify, recheck_agent, seen_by
from tunnel.log import event
from tunnel.memory import TRIM_INTERVAL, release_free_memory
from tunnel.protocol import ALPN_AGENT, ALPN_ENROLL, ALPN_USER
from tunnel.proxy_agents import AgentLinks
from tunnel.proxy_core import AgentLink, Liveness, ProxyCore, Session
from tunnel.proxy_enroll import OnlineEnrollment
from tunnel.proxy_sessions import UserSessions
from tunnel.registry_writer import RegistryWriter
from tunnel.transport import Connection, Refused, TLSIdentity, serve, tcp_serve

__all__ = ["AgentLink", "Liveness", "Proxy", "Session"]

log = logging.getLogger("tunnel.proxy")

PEER_KIND = {ALPN_AGENT: "device", ALPN_USER: "user"}
#: On SIGTERM: how long open sessions get to end and write their ``session.end``.
SHUTDOWN_BUDGET = 2.0
#: On start-up: how long to wait for closing the sessions a crash left open before listening.
RECOVERY_WAIT = 5.0
#: how often the detached resumable sessions are checked for a hold that ran out
SWEEP_INTERVAL = 5.0


class Proxy(ProxyCore):
    """The proxy process: listeners, admission, its own loops, and the three parts it hands
    connections to (``agent_links``, ``user_sessions``, ``enrollment``)."""

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
        super().__init__(state, enroll_rate=enroll_rate, watch_interval=watch_interval,
                         anonymous_rate=anonymous_rate, refusal_window=refusal_window)
        self.agent_links = AgentLinks(self)
        self.user_sessions = UserSessions(self)
        self.enrollment = OnlineEnrollment(self)

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
        self.spawn(self._watch())
        self.spawn(self._audit_refusals())
        if self.anchor_dir is not None:
            self.spawn(self._write_anchors())
        if self.trim_every is not None:
            self.spawn(self._trim_memory())
        event(log, "listening", address=f"{host}:{port}", fleet=self.fleet,
              transports="quic+tcp" if tcp else "quic")
        return self.server

    async def _close_left_open(self) -> None:
        """Write ``session.end`` (reason ``proxy restarted``) for every session a crash left open.

        No raw session can outlive the proxy process, so before listening every ``session.start``
        without its ``session.end`` is closed. A resumable one may still be held at both ends:
        it gets ``session.detach`` instead and joins the sessions the sweep ends if they are not
        resumed within the hold time (:func:`enroll.session_log.recover_open_sessions`). The
        write is queued first, so it runs before any event of this process; if the registry is
        busy it stays queued and the proxy starts anyway. (One registry serves one proxy: a
        second proxy on it would see its live sessions closed here.)
        """
        closing = self.write(lambda db: recover_open_sessions(db, "proxy restarted"))
        try:
            closed, detached = await asyncio.wait_for(asyncio.shield(closing), RECOVERY_WAIT)
        except TimeoutError:
            event(log, "closing sessions left open is still queued", level=logging.WARNING)
        except Exception as exc:  # noqa: BLE001 - never keep the proxy from starting
            event(log, "could not close sessions left open", level=logging.ERROR, error=str(exc))
        else:
            if closed:
                event(log, "closed sessions left open by the last run", level=logging.WARNING,
                      count=len(closed), reason="proxy restarted")
            self.detached.update((d.session, d) for d in detached)

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
            self.end_session(session, result="error", reason="proxy shutdown")  # resumable: a detach
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A dial cancelled between queuing its start and its end: the end writes only if the
        # start did (see Session.write_end).
        for session in list(self.open_sessions.values()):
            self.end_session(session, result="error", reason="proxy shutdown")
        for server in (self.server, self.tcp_server):
            if server:
                server.close()
                await server.wait_closed()
        # a task started while the servers were still open (a resume that raced the shutdown)
        # must not run on after the registry is closed
        for _ in range(3):  # bounded: a task that spawns while cancelled cannot keep stop() here
            if not (tasks := list(self._tasks)):
                break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.writer:
            await self._flush_at_stop()
            await self.writer.close()
        self.enrollment.close()
        self.policy.close()
        self.registry.close()


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
            await self.settled(self.audit(
                "access.denied", actor=actor, device=dev.id if dev else None,
                labels=dev.labels if dev else None, result="denied", reason=denied.reason,
                code=denied.code, remote=remote, stage="connect",
            ))
            event(log, "refused", level=logging.WARNING, actor=actor, code=denied.code, remote=remote)
            self.metrics.refused(denied.code, "connect")
            raise Refused(CODES[denied.code], f"{denied.code}: {denied.reason}") from None
        # Only a connection still open is handed to _on_connection, whose ``finally`` removes
        # its peer; one closed while this ran (the losing side of an agent's QUIC/TCP race, an
        # agent killed mid-handshake) would stay here for good with all its buffers (issue 19).
        if not conn.is_closed:
            self.peers[conn] = peer

    async def _on_connection(self, conn: Connection) -> None:
        self.metrics.accepted(conn.alpn)
        try:
            if conn.alpn == ALPN_ENROLL:
                await self.enrollment.serve(conn)
            elif conn.alpn == ALPN_AGENT:
                await self.agent_links.serve(conn, self.peers[conn])
            else:
                await self.user_sessions.serve(conn, self.peers[conn])
        finally:
            self.peers.pop(conn, None)

    # --- agents -------------------------------------------------------------------------------
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
            await self.write(write)
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
    # --- live policy ----------------------------------------------------------------------------

    async def _watch(self) -> None:
        """Each interval, re-check connected devices and open sessions against the registry.

        A lock or decommission cuts the device's connection; a relabel, role change, user lock
        or certificate expiry cuts each session that is no longer allowed. Within one interval.
        The snapshot is refreshed once (off the loop, only if the policy changed); the checks
        themselves are pure and cost no I/O, however many sessions and agents there are.
        """
        last_touch = last_sweep = time.monotonic()
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
                    if session.resumable:  # the agent will hold it: tell it at its next check
                        self.policy_cuts[session.id] = (decision.reason, time.monotonic())
                    session.resumable = False  # over for good, not detached: its end says why
                    session.cut(decision.reason)
                    self.sessions.pop(session.id, None)
            if (self.detached or self.policy_cuts) and time.monotonic() - last_sweep > SWEEP_INTERVAL:
                last_sweep = time.monotonic()
                self._sweep_detached()
            for device_id, link in list(self.agents.items()):
                if (denied := recheck_agent(snapshot, link.peer, now)) is not None:
                    event(log, "cutting agent", device=device_id, code=denied.code)
                    for session in list(self.sessions.values()):
                        if session.link is link:  # ended for good (the agent ends its held ones
                            session.resumable = False  # on this refusal): the end says why
                            session.cut(denied.reason)
                            self.sessions.pop(session.id, None)
                    link.conn.close(CODES[denied.code], f"{denied.code}: {denied.reason}")
            if time.monotonic() - last_touch > 60 and self.agents:
                last_touch = time.monotonic()
                online = list(self.agents)

                def touch(db, online=online, seen=now):
                    Devices(db).seen(online, seen)

                self.write(touch)

    def _sweep_detached(self) -> None:
        """End (``session.end``, reason ``not resumed``) each detached session not resumed
        within the hold time; forget those resumed (here or through another proxy)."""
        hold = self.resume_hold
        for session_id, (_, when) in list(self.policy_cuts.items()):
            if time.monotonic() - when > hold:
                del self.policy_cuts[session_id]
        for session_id, detached in list(self.detached.items()):
            if session_id in self.open_sessions:
                self.detached.pop(session_id, None)  # resumed here
                continue

            def done(future: asyncio.Future, session_id: str = session_id) -> None:
                if future.cancelled() or future.exception() is not None or future.result() == "waiting":
                    return
                if session_id not in self.open_sessions:
                    self.detached.pop(session_id, None)
                if future.result() == "ended":
                    event(log, "session end", session=session_id, reason=NOT_RESUMED)

            self.write(functools.partial(end_if_not_resumed, detached=detached, hold=hold)).add_done_callback(done)


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


