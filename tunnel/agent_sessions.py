"""The agent's resumable sessions: held while their tunnel stream is away, re-attached on resume.

A session opened with a ``resume_secret`` (and ``resume_hold`` above 0 in the agent's config) is
spliced through :class:`tunnel.resumable.ResumableEnds` instead of the raw stream. When that
stream is lost without an END or ABORT (the proxy restarted, the agent's connection was
replaced), the local service connection (sshd…) stays open and the session is *held* here, by
id, for the hold time, while the agent reconnects on its own. A resume ``open`` re-attaches it
after the checks of :func:`resume_refusal` (held, the secret, the same identity) and the replay
buffer's offset check. When the hold runs out, or the proxy says the session may not resume
(a lock or relabel issued during the outage), the session is given up: the local connection is
reset and one log line says why.

The agent's connection loop stays in :mod:`tunnel.agent`; this module keeps the bookkeeping, and
its one decision (:func:`resume_refusal`) is pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tunnel import wire
from tunnel.log import event
from tunnel.resume import ResumeError, secret_digest, secret_matches
from tunnel.transport import Stream, TransportError

if TYPE_CHECKING:  # loaded with the first resumable session: an idle agent does without it
    from tunnel.resumable import ResumableEnds

log = logging.getLogger("tunnel.agent")

#: at most this many ended sessions wait to be told to the proxy
MAX_FINISHED = 256


@dataclass(frozen=True)
class Refused:
    """Why a resume ``open`` was refused: a stable ``code`` (audited by the proxy) and a reason.

    The codes are those of :data:`tunnel.resume.CODES`. (A resume for a session whose old
    stream still looks attached is not refused: the new stream replaces it.)
    """

    code: str
    reason: str


@dataclass
class HeldSession:
    """One resumable session: what a resume must match, and whether it is attached now."""

    id: str
    digest: bytes
    identity: str
    service: str
    login: str | None
    ends: ResumableEnds
    #: set while a stream is attached; cleared when it is lost
    attached: asyncio.Event = field(default_factory=asyncio.Event)
    #: why the session ended for good (hold expired, refused by the proxy), once it did
    ended: str | None = None

    @property
    def held(self) -> bool:
        return self.ended is None and not self.attached.is_set()


def resume_refusal(held: HeldSession | None, secret: str | None, identity: str) -> Refused | None:
    """Why a resume ``open`` may not re-attach ``held`` (pure; None: it may).

    The session must exist and not have ended, the secret must match its digest (a constant-time
    compare), and the identity the proxy authenticated must be the session's own: another user
    holding a stolen secret is still refused.
    """
    if held is None or held.ended is not None:
        return Refused("resume_unknown",
                       "no such session is held on this device (it ended, or the agent restarted)")
    if not secret_matches(secret, held.digest):
        return Refused("resume_secret", "the resume secret does not match this session")
    if identity != held.identity:
        return Refused("resume_identity", "this session belongs to another identity")
    return None


class HeldSessions:
    """Every resumable session of the agent, by id, from its open until it ended."""

    def __init__(self, device_id: str, hold: float, buffer: int, *,
                 clock: Callable[[], float] = time.monotonic):
        self.device_id, self.hold, self.buffer, self._clock = device_id, hold, buffer, clock
        self.sessions: dict[str, HeldSession] = {}
        #: resumable sessions that ended here not cleanly (hold time, abort, refusal) → why:
        #: told to the proxy with the next held check, so it writes their session.end (bounded:
        #: the oldest are dropped past MAX_FINISHED; the proxy's sweep ends those anyway)
        self.finished: dict[str, str] = {}

    @property
    def enabled(self) -> bool:
        return self.hold > 0

    def held(self) -> list[HeldSession]:
        """The sessions whose stream is away now (the agent reports them to the proxy)."""
        return [s for s in self.sessions.values() if s.held]

    def open(self, msg: wire.Message) -> HeldSession:
        """A new resumable session for an accepted ``open`` with a ``resume_secret``."""
        from tunnel.resumable import ResumableEnds

        ends = ResumableEnds(msg["session"], hold=self.hold, buffer=self.buffer)
        session = HeldSession(msg["session"], secret_digest(msg["resume_secret"]), msg["identity"],
                              msg["service"], msg.get("login"), ends)
        self.sessions[session.id] = session
        return session

    async def attach_first(self, session: HeldSession, stream: Stream, rest: bytes) -> None:
        await session.ends.attach(stream, rest, 0)
        session.attached.set()

    async def run(self, session: HeldSession, work: asyncio.Future) -> None:
        """Follow ``session`` until ``work`` (its splice, then its closing handshake) is done,
        noting each loss (the session is held) and re-attach; resume opens find it meanwhile.
        The hold time itself is kept by the ends: when it runs out they cut the session and
        ``work`` raises ``SessionCut``. The caller awaits ``work``, then :meth:`forget`."""
        while not work.done():
            lost = asyncio.ensure_future(session.ends.lost())
            await asyncio.wait({lost, work}, return_when=asyncio.FIRST_COMPLETED)
            if not lost.done():
                lost.cancel()
                return
            session.attached.clear()
            event(log, "session held: its tunnel stream was lost", session=session.id,
                  reason=lost.result(), hold=self.hold)
            attached = asyncio.ensure_future(session.attached.wait())
            await asyncio.wait({attached, work}, return_when=asyncio.FIRST_COMPLETED)
            attached.cancel()

    def forget(self, session: HeldSession) -> None:
        """The session is over here: no resume can find it any more."""
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]

    def ended(self, session_id: str, cut: BaseException) -> str:
        """The one line for a session that was cut (hold time, a refusal): why, by whom."""
        reason = getattr(cut, "reason", None) or str(cut)
        line = reason if reason.startswith("session ") else f"session {session_id} to {self.device_id} ended: {reason}"
        event(log, "session ended", level=logging.WARNING, session=session_id, reason=line)
        self.finished[session_id] = reason
        while len(self.finished) > MAX_FINISHED:
            del self.finished[next(iter(self.finished))]
        return line

    def give_up(self, session: HeldSession, reason: str) -> None:
        """End ``session`` for good: its local connection is reset (the data stream was cut)."""
        if session.ended is not None:
            return
        session.ended = reason
        session.ends.give_up(reason)

    def drop(self, session_id: str, reason: str) -> None:
        if (session := self.sessions.get(session_id)) is not None:
            self.give_up(session, reason)

    def drop_all(self, reason: str) -> None:
        """The agent is stopping: every resumable session ends (its local connection reset)."""
        for session in list(self.sessions.values()):
            self.give_up(session, reason)

    def drop_held(self, reason: str) -> None:
        """The proxy refused this device (locked, decommissioned…): no held session can resume."""
        for session in self.held():
            self.give_up(session, reason)

    def report(self) -> list[dict]:
        """What the proxy needs to re-check each held session against its policy (``held``)."""
        return [{"session": s.id, "identity": s.identity, "service": s.service,
                 **({"login": s.login} if s.login else {})} for s in self.held()]

    async def resume(self, stream: Stream, msg: wire.Message, rest: bytes) -> None:
        """Answer a resume ``open``: re-attach the held session to ``stream``, or refuse it
        with a code (audited by the proxy) leaving the held session as it was."""
        session = self.sessions.get(msg["resume"])
        refusal = resume_refusal(session, msg.get("resume_secret"), msg["identity"])
        if refusal is None and session is not None:
            try:  # before anything changes: a refused resume leaves the session as it was
                session.ends.check_offset(msg.get("received", 0))
            except ResumeError as exc:
                refusal = Refused(exc.code, str(exc))
            else:
                # the engineer's end is back before this end noticed the loss: drop the old
                # stream first, so the counts in the reply are final (it delivers nothing more)
                session.ends.detach("the other end re-attached")
        if refusal is not None or session is None:
            assert refusal is not None
            event(log, "resume refused", level=logging.WARNING, session=msg["resume"], code=refusal.code,
                  reason=refusal.reason)
            with contextlib.suppress(TransportError):
                await stream.write(wire.reply_refused(refusal.code, refusal.reason))
                stream.write_eof()
            return
        try:
            await stream.write(wire.reply_ok(session=session.id, resumable=True,
                                             received=session.ends.received, sent=session.ends.sent))
            replayed = await session.ends.attach(stream, rest, msg.get("received", 0))
        except ResumeError as exc:  # the engineer's offset is outside the replay buffer
            self.give_up(session, f"session {session.id} to {self.device_id} ended: {exc}")
            with contextlib.suppress(TransportError):
                stream.reset(1)
            return
        except TransportError:
            return  # the new stream is gone too: still held, the next resume may succeed
        session.attached.set()
        event(log, "session resumed", session=session.id, identity=session.identity, replayed=replayed)

