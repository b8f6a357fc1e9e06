"""The proxy's engineer side: each stream an engineer opens is a dial or a request.

A dial (:meth:`UserSessions._dial`) is authorized by :func:`tunnel.access.decide` over the
policy snapshot, opened on the device's agent, recorded (``session.start`` durable before the
engineer hears "ok") and spliced until either side ends or the proxy's re-check cuts it; every
refusal is audited (:meth:`UserSessions._refuse`). Requests answer ``ls``, ``status``,
``whoami`` and ``ssh-cert`` (a short-lived SSH certificate for one login on one device). It
shares the proxy's state through :class:`tunnel.proxy_core.ProxyCore`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import secrets
import time
from typing import Any

from enroll.session_log import NOT_RESUMED, Detached, Resumable, end_if_not_resumed, find_resumable
from tunnel import access, wire
from tunnel.admission import CODES, Peer
from tunnel.log import event
from tunnel.protocol import read_header, reply_with_body
from tunnel.proxy_core import DENIAL_AUDIT_WAIT, AgentLink, ProxyCore, Session, finish, try_write
from tunnel.proxy_resume import replayed
from tunnel.splice import StreamEnds, splice
from tunnel.transport import Connection, Stream, TransportError

log = logging.getLogger("tunnel.proxy")


class _NoAnswer(Exception):
    """The agent did not take a stream and answer its header in time (the reason)."""


AGENT_REPLY_TIMEOUT = 10.0
#: a device's refusals of a resume that mean it no longer holds the session (its agent
#: restarted, or the session ended or ran out of hold there): the session ends at once
DEVICE_DROPPED = frozenset({"resume_unknown", "resume_expired"})
#: How long a dial that arrives right after the agent connected waits for its hello (which
#: carries the device's service table, needed to resolve a port to a service name).
HELLO_WAIT = 2.0
#: How long a dial waits for its ``session.start`` to be durable before refusing the engineer
#: (registry locked, disk full): the event is still written when the registry frees up, and a
#: ``session.end`` queued behind it keeps the log paired.
START_AUDIT_WAIT = 3.0
# Long enough for ssh to authenticate with it; sessions outlive it (sshd checks it once).
SSH_CERT_TTL = dt.timedelta(minutes=5)


class UserSessions:
    """Serves engineers' connections for the proxy (``proxy``: the state they share)."""

    def __init__(self, proxy: ProxyCore):
        self.proxy = proxy

    async def serve(self, conn: Connection, peer: Peer) -> None:
        event(log, "engineer connected", level=logging.DEBUG, user=peer.name, remote="{}:{}".format(*conn.remote_address[:2]))
        while True:
            try:
                stream = await conn.accept_stream()
            except TransportError:
                return
            if self.proxy.stopping:  # its task would outlive the registry: refuse it at once
                with contextlib.suppress(TransportError):
                    stream.reset(CODES["shutdown"])
                continue
            self.proxy.spawn(self._user_stream(conn, peer, stream))

    async def _user_stream(self, conn: Connection, peer: Peer, stream: Stream) -> None:
        remote = "{}:{}".format(*conn.remote_address[:2])
        try:
            msg, rest = await read_header(stream)
        except (wire.HeaderError, TimeoutError) as exc:
            code = getattr(exc, "code", "timeout")
            await self.proxy.audit("access.denied", actor=peer.actor, actor_roles=peer.identity.roles,
                        result="denied", reason=str(exc) or "no header in time", code=code,
                        remote=remote, stage="header")
            await try_write(stream, wire.reply_refused(code, str(exc) or "no header in time"))
            finish(stream)
            return
        except TransportError:
            return
        # A connection outlives its admission (the engineer's per-user helper keeps one for
        # 30 min): each stream checks the account again, and one locked, revoked or expired
        # since gets the very refusal the connect would give, closing the connection.
        snapshot = await self.proxy.policy.refresh()
        if (denial := access.user_denial(snapshot, peer, dt.datetime.now(dt.UTC))) is not None:
            code = denial.code if denial.code in CODES else "locked"
            await self.proxy.settled(self.proxy.audit(
                "access.denied", actor=peer.actor, actor_roles=peer.identity.roles, result="denied",
                reason=denial.reason, code=code, remote=remote, stage="stream"))
            self.proxy.metrics.refused(code, "stream")
            conn.close(CODES[code], f"{code}: {denial.reason}")
            return
        if msg.kind == "dial":
            await self._dial(peer, stream, msg, rest, remote)
        elif msg.kind == "request":
            await self._user_request(peer, stream, msg)
        else:
            await self.proxy.audit("access.denied", actor=peer.actor, actor_roles=peer.identity.roles,
                        result="denied", code="bad_header",
                        reason=f"engineers cannot send {msg.kind!r} headers", remote=remote,
                        stage="header")
            await try_write(stream, wire.reply_refused("bad_header", f"unexpected {msg.kind!r} header"))
            finish(stream)

    async def _decide(self, peer: Peer, device_id: str, requested: str, login: str | None):
        """The device, its link, the canonical service name and the decision for a dial or a
        resume (which is authorized exactly as a dial)."""
        snapshot = await self.proxy.policy.refresh()
        dev = snapshot.device(device_id)
        link = self.proxy.agents.get(device_id)
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
        if decision.allowed and self.proxy.stopping:
            decision = access.Decision(False, "shutdown", "the proxy is shutting down: retry in a moment")
        return dev, link, service, decision

    async def _dial(self, peer: Peer, stream: Stream, msg: wire.Message, rest: bytes, remote: str) -> None:
        if msg.get("resume") is not None:
            await self._resume(peer, stream, msg, rest, remote)
            return
        device_id, requested, login = msg["device"], msg["service"], msg.get("login")
        dev, link, service, decision = await self._decide(peer, device_id, requested, login)
        session = secrets.token_hex(8)
        common = dict(actor=peer.actor, actor_roles=peer.identity.roles, device=device_id,
                      labels=dev.labels if dev else None, remote=remote, service=service,
                      requested=requested if requested != service else None,
                      login=login, session=session)
        if not decision.allowed:
            await self._refuse(stream, decision.code, decision.reason, result="denied", stage="dial", **common)
            return
        assert link is not None and service is not None  # allowed: the device is online, the service known
        # a resumable session (issue 17) when the engineer asked, this proxy allows it and the
        # agent can (an older agent rejects an open with fields it does not know)
        secret = msg.get("resume_secret") if self.proxy.resume_hold > 0 and link.resumes else None
        try:
            agent_stream, reply, agent_rest = await self._open_at_agent(link, wire.encode(
                "open", service=service, session=session, identity=peer.actor, login=login, resume_secret=secret))
        except _NoAnswer as exc:
            await self._refuse(stream, "device_unreachable", f"device {device_id} did not answer: {exc}",
                               result="failed", stage="open", **common)
            return
        if not reply.get("ok"):
            # the agent's refusal came with its FIN; ours ends the stream, or it would keep one of
            # the streams the agent grants this connection until it reconnects
            finish(agent_stream)
            code, reason = reply.get("code", "refused"), reply.get("reason", "refused by the device")
            await self._refuse(stream, code, reason, result="denied", stage="device", **common)
            return
        resumable = bool(reply.get("resumable")) and secret is not None
        if resumable:
            common["resumable"] = True
        tracked = Session(session, peer, device_id, service, login, (stream, agent_stream),
                          link=link, common=common, resumable=resumable)
        self.proxy.open_sessions[session] = tracked
        # Recorded (durable) before the engineer is told the session is open; but never waited
        # for without bound: a locked or full registry refuses the session at once.
        start = self.proxy.write(tracked.write_start)
        try:
            await asyncio.wait_for(asyncio.shield(start), START_AUDIT_WAIT)
        except Exception as exc:  # noqa: BLE001 - TimeoutError or why the write failed
            with contextlib.suppress(TransportError):
                agent_stream.reset(1)
            why = f"no answer within {START_AUDIT_WAIT:g}s" if isinstance(exc, TimeoutError) else str(exc)
            # If the start is still written later, this end follows it; if not, it writes nothing.
            self.proxy.end_session(tracked, result="error", reason=f"not opened: the audit log was unavailable ({why})")
            reason = (f"the proxy could not record this session in its audit log ({why}): nothing was "
                      "opened; retry in a moment, and tell the proxy's operators if it persists")
            event(log, "session refused: audit unavailable", level=logging.ERROR, session=session, error=why)
            await self._refuse(stream, "audit_unavailable", reason, result="failed", stage="audit",
                               audit_wait=0, **common)  # queued behind the stuck start: no wait
            return
        if tracked.cut_reason:  # the proxy began shutting down (or the agent died) meanwhile
            agent_stream.reset(1)
            self.proxy.end_session(tracked, result="error", reason=tracked.end_reason or f"cut: {tracked.cut_reason}")
            code = "shutdown" if self.proxy.stopping else "device_unreachable"
            await try_write(stream, wire.reply_refused(code, tracked.cut_reason))
            finish(stream)
            return
        try:
            await stream.write(wire.reply_ok(session=session, resumable=resumable or None))
        except TransportError:
            agent_stream.reset(1)
            await self.proxy.settled(self.proxy.end_session(tracked, result="error", reason="engineer went away"))
            return
        event(log, "session start", session=session, user=peer.name, device=device_id, service=service)
        await self._carry(tracked, stream, rest, agent_stream, agent_rest, link)

    async def _carry(self, tracked: Session, stream: Stream, rest: bytes, agent_stream: Stream,
                     agent_rest: bytes, link: AgentLink) -> None:
        """Splice an opened (or resumed) session until it ends; write its end (or detach)."""
        session, device_id = tracked.id, tracked.device_id
        link.sessions += 1
        link.sessions_total += 1
        started = time.monotonic()
        self.proxy.sessions[session] = tracked
        try:
            result = await splice(StreamEnds(stream, rest), StreamEnds(agent_stream, agent_rest))
        finally:
            if self.proxy.sessions.get(session) is tracked:  # not replaced by its resume meanwhile
                del self.proxy.sessions[session]
            link.sessions -= 1
        link.bytes_down += result.a_to_b
        link.bytes_up += result.b_to_a
        self.proxy.metrics.spliced(result.a_to_b, result.b_to_a)
        dev = self.proxy.policy.snapshot.device(device_id)
        if tracked.cut_reason:
            result.error = tracked.end_reason or f"cut: {tracked.cut_reason}"
        ended = self.proxy.end_session(
            tracked, result="error" if result.error else "ok", reason=result.error or "",
            labels=dev.labels if dev else None, bytes_to_device=result.a_to_b,
            bytes_from_device=result.b_to_a, duration=round(time.monotonic() - started, 3),
        )
        event(log, "session end", session=session, up=result.b_to_a, down=result.a_to_b)
        await self.proxy.settled(ended, None)

    async def _resume(self, peer: Peer, stream: Stream, msg: wire.Message, rest: bytes, remote: str) -> None:
        """Re-attach a held session (issue 17): authorized exactly as a new dial, then the
        registry must know it as this user's live resumable session on this device, then the
        agent checks its secret, identity and offset. Every refusal is audited and leaves the
        real session as it was; a success writes ``session.resume`` (outage, bytes replayed)."""
        device_id, requested, login, session = msg["device"], msg["service"], msg.get("login"), msg["resume"]
        dev, link, service, decision = await self._decide(peer, device_id, requested, login)
        away = msg.get("away", 0.0)
        if decision.allowed and away > self.proxy.resume_hold:
            decision = access.Decision(False, "resume_expired",
                                       f"session {session} was away {away:.0f}s, longer than this proxy holds "
                                       f"a session ({self.proxy.resume_hold:g}s)")
        common = dict(actor=peer.actor, actor_roles=peer.identity.roles, device=device_id,
                      labels=dev.labels if dev else None, remote=remote, service=service,
                      requested=requested if requested != service else None, login=login, session=session)
        if not decision.allowed:
            await self._refuse(stream, decision.code, decision.reason, result="denied", stage="resume", **common)
            return
        assert link is not None and service is not None
        try:
            found = await asyncio.wait_for(asyncio.shield(self.proxy.write(
                lambda db: find_resumable(db, session, peer.actor, device_id))), START_AUDIT_WAIT)
        except Exception as exc:  # noqa: BLE001 - TimeoutError or why the read failed
            await self._refuse(stream, "audit_unavailable", f"the proxy cannot read its audit log now ({exc})",
                               result="failed", stage="resume", audit_wait=0, **common)
            return
        if found is None or found.common.get("service") != service or found.common.get("login") != login:
            await self._refuse(stream, "resume_unknown", f"no resumable session {session} of yours on {device_id}",
                               result="denied", stage="resume", **common)
            return
        try:
            agent_stream, reply, agent_rest = await self._open_at_agent(link, wire.encode(
                "open", service=service, session=session, identity=peer.actor, login=login, resume=session,
                resume_secret=msg.get("resume_secret"), received=msg.get("received", 0)))
        except _NoAnswer as exc:
            await self._refuse(stream, "device_unreachable", f"device {device_id} did not answer: {exc}",
                               result="failed", stage="resume", **common)
            return
        if not reply.get("ok"):
            # the agent's refusal came with its FIN; ours ends the stream, or it would keep one of
            # the streams the agent grants this connection until it reconnects
            finish(agent_stream)
            code, reason = reply.get("code", "refused"), reply.get("reason", "refused by the device")
            await self._refuse(stream, code, reason, result="denied", stage="resume", **common)
            if code in DEVICE_DROPPED and found.detached:
                self._end_dropped(session, found, f"{NOT_RESUMED}: {reason}")
            return
        # the same session through this proxy still looks attached (its loss not seen yet): the
        # agent has moved it to the new stream, so the old one ends here without an event
        if (old := self.proxy.open_sessions.pop(session, None)) is not None:
            old.cut("resumed on a new stream", end_reason=None)
        common = {**found.common, "labels": common["labels"], "remote": remote}
        tracked = Session(session, peer, device_id, service, login, (stream, agent_stream), link=link,
                          common=common, resumable=True, start_seq=found.start_seq)
        self.proxy.open_sessions[session] = tracked
        self.proxy.detached.pop(session, None)
        resumed = self.proxy.audit("session.resume", **common, outage=round(away, 3),
                              replayed_to_device=replayed(msg.get("sent"), reply.get("received")),
                              replayed_from_device=replayed(reply.get("sent"), msg.get("received")))
        await self.proxy.settled(resumed, START_AUDIT_WAIT)
        try:
            await stream.write(wire.reply_ok(session=session, resumable=True, received=reply.get("received"),
                                             sent=reply.get("sent")))
        except TransportError:
            agent_stream.reset(1)
            await self.proxy.settled(self.proxy.end_session(tracked, result="error", reason="engineer went away"))
            return
        event(log, "session resume", session=session, user=peer.name, device=device_id, outage=away)
        await self._carry(tracked, stream, rest, agent_stream, agent_rest, link)

    @staticmethod
    async def _open_at_agent(link: AgentLink, header: bytes) -> tuple[Stream, wire.Message, bytes]:
        """Open a stream to the agent, send ``header`` and read its reply, under one deadline (a
        stream the agent has no slot for must not wait for ever either), so the proxy answers
        within the engineer's DIAL_TIMEOUT. Raises :class:`_NoAnswer` (the stream reset)."""
        agent_stream = None
        try:
            async with asyncio.timeout(AGENT_REPLY_TIMEOUT):
                agent_stream = await link.conn.open_stream()
                await agent_stream.write(header)
                reply, rest = await read_header(agent_stream, AGENT_REPLY_TIMEOUT)
        except (TransportError, wire.HeaderError, TimeoutError) as exc:
            if agent_stream is not None:
                with contextlib.suppress(TransportError):
                    agent_stream.reset(1)
            raise _NoAnswer(str(exc) or f"nothing within {AGENT_REPLY_TIMEOUT:g}s") from None
        return agent_stream, reply, rest

    def _end_dropped(self, session: str, found: Resumable, reason: str) -> None:
        """Write ``session.end`` now for a detached session its device no longer holds.

        Its ends can never meet again (the bytes in flight were in the agent's replay buffer):
        waiting for the sweep would leave the session without an end for the whole hold time,
        and without one for good if the proxy stopped meanwhile."""
        kept = self.proxy.detached.pop(session, None)
        detached = Detached(session, found.start_seq, found.common)

        def written(future: asyncio.Future) -> None:
            if future.cancelled() or future.exception() is not None:  # the sweep tries again
                event(log, "session end not written", level=logging.WARNING, session=session,
                      error=str(future.exception()) if not future.cancelled() else "cancelled")
                if kept is not None:
                    self.proxy.detached.setdefault(session, kept)

        self.proxy.write(lambda db: end_if_not_resumed(db, detached, hold=0, reason=reason)).add_done_callback(written)

    async def _refuse(self, stream: Stream, code: str, reason: str, *, result: str, stage: str,
                      audit_wait: float = DENIAL_AUDIT_WAIT, **common) -> None:
        """Audit an ``access.denied`` and refuse the engineer's dial; a slow or failing audit
        write delays the answer by at most ``audit_wait`` seconds."""
        denied = self.proxy.audit("access.denied", result=result, reason=reason, code=code, stage=stage, **common)
        self.proxy.metrics.refused(code, stage)
        if audit_wait > 0:
            await self.proxy.settled(denied, audit_wait)
        await try_write(stream, wire.reply_refused(code, reason))
        finish(stream)

    async def _user_request(self, peer: Peer, stream: Stream, msg: wire.Message) -> None:
        op = msg["op"]
        args = msg.get("args", {})
        body: dict[str, Any]
        if op == "ls":
            await self.proxy.policy.refresh()
            body = {"devices": self.listing(peer)}
        elif op == "status":
            snapshot = await self.proxy.policy.refresh()
            roles = access.peer_roles(snapshot, peer)
            body = {"agents": [a.as_dict() for a in self.proxy.agents.values()
                               if access.may_see(roles, snapshot.device(a.device_id))]}
        elif op == "whoami":
            roles = access.peer_roles(await self.proxy.policy.refresh(), peer)
            body = {"user": peer.name, "roles": [r.name for r in roles],
                    "expires": peer.identity.not_after.isoformat(),
                    "reachable_devices": len(self.listing(peer)),
                    "logins": sorted({lg for r in roles for lg in (r.allow.logins or ())}),
                    "services": sorted({sv for r in roles for sv in r.allowed_services})}
        elif op == "ssh-cert":
            await self._ssh_cert(peer, stream, args)
            return
        else:
            await try_write(stream, wire.reply_refused("unknown_op", f"unknown request {op!r}"))
            finish(stream)
            return
        await try_write(stream, reply_with_body(body))
        finish(stream)

    async def _ssh_cert(self, peer: Peer, stream: Stream, args: dict) -> None:
        """A short-lived SSH user certificate valid for one login on one device only.

        Its single principal is ``LOGIN@DEVICE``; each device's sshd accepts, for login L, only
        the principal ``L@<its own id>`` (AuthorizedPrincipalsFile), so the certificate works
        nowhere else.
        """
        from enroll import certs

        device_id, login = str(args.get("device", "")), str(args.get("login", ""))
        snapshot = await self.proxy.policy.refresh()
        dev = snapshot.device(device_id)
        decision = access.decide(snapshot, peer, device_id, "ssh", login)
        common = dict(actor=peer.actor, actor_roles=peer.identity.roles, device=device_id,
                      labels=dev.labels if dev else None, login=login, service="ssh")
        if not decision.allowed:
            await self.proxy.audit("access.denied", result="denied", reason=decision.reason,
                        code=decision.code, stage="ssh-cert", **common)
            await try_write(stream, wire.reply_refused(decision.code, decision.reason))
            finish(stream)
            return
        try:
            key = certs.load_ssh_public(str(args.get("public_key", "")))
        except certs.CertError as exc:
            await try_write(stream, wire.reply_refused("bad_key", str(exc)))
            finish(stream)
            return
        now = dt.datetime.now(dt.UTC)
        lifetime = min(SSH_CERT_TTL, peer.identity.not_after - now)
        line = certs.ssh_certificate(
            self.proxy.state.ssh_user_ca_key, key, host=False, key_id=f"{peer.name}@{self.proxy.fleet}",
            principals=[f"{login}@{device_id}"], lifetime=lifetime, now=now,
        )
        await self.proxy.audit("cert.issue", kind="ssh-user", not_after=(now + lifetime).isoformat(), **common)
        await try_write(stream, reply_with_body({"certificate": line}))
        finish(stream)

    def listing(self, peer: Peer) -> list[dict]:
        rows = []
        roles = access.peer_roles(self.proxy.policy.snapshot, peer)
        for dev in self.proxy.registry.devices():  # last_seen as of now (the snapshot's may be older)
            if not access.may_see(roles, dev):
                continue
            link = self.proxy.agents.get(dev.id)
            rows.append({
                "id": dev.id, "labels": dev.labels, "lifecycle": dev.lifecycle,
                "online": link is not None, "last_seen": dev.last_seen,
                "address": "{}:{}".format(*link.conn.remote_address[:2]) if link else None,
                "locked": dev.locked(dt.datetime.now(dt.UTC)),
            })
        return rows
