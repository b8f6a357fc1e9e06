"""Resumable sessions in the audit log (issue 17): which are open, detached, resumable.

A resumable session's life in the log is::

    session.start (resumable) … session.detach … session.resume … session.end

``session.detach`` is written when the session's stream through a proxy is lost (the
engineer's or the agent's connection went away, the proxy is stopping): the ends hold the
session and may come back through any proxy on the same registry. ``session.resume`` records a
re-attach. A session that is never resumed gets its ``session.end`` (reason ``not resumed``)
from :func:`end_if_not_resumed`, run by the proxy's sweep over the detached sessions it knows —
from its own detaches, and after a restart from :func:`recover_open_sessions`, which reads them
back from here. The registry is the only state a resume needs, so a proxy restart (and later a
second proxy on the same registry) changes nothing.

Storage layer: the functions take the registry's database handle inside ``Registry.write()``
(the proxy runs them in its registry writer's thread).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from enroll import audit
from enroll.registry import parse_iso

#: why a session that was detached and never came back ends
NOT_RESUMED = "not resumed"
#: the start's fields an end or a detach repeats (so a query for either finds all of them)
_KEPT = ("service", "requested", "login", "session", "remote", "resumable")
_LIFECYCLE = ("session.start", "session.resume", "session.detach", "session.end")


@dataclass
class Detached:
    """A resumable session whose stream is away: when its hold began, and what its events repeat."""

    session: str
    start_seq: int
    common: dict[str, Any] = field(default_factory=dict)


def _start_common(actor: str, roles: str, device: str | None, labels: str | None, fields: dict) -> dict:
    return dict(actor=actor, actor_roles=json.loads(roles), device=device,
                labels=json.loads(labels) if labels is not None else None,
                **{k: fields[k] for k in _KEPT if k in fields})


def _last_event(db, session: str, start_seq: int) -> tuple[str, str] | None:
    """(type, time) of the session's latest lifecycle event at or after its start."""
    row = db.conn.execute(
        "SELECT type, time FROM audit WHERE seq >= ? AND type IN (?, ?, ?, ?) "
        "AND json_extract(fields, '$.session') = ? ORDER BY seq DESC LIMIT 1",
        [start_seq, *_LIFECYCLE, session]).fetchone()
    return (row[0], row[1]) if row else None


def recover_open_sessions(db, reason: str) -> tuple[list[str], list[Detached]]:
    """At start-up: close what the last run left open; return (ended ids, detached sessions).

    A session that is not resumable cannot outlive the proxy process: it gets ``session.end``
    with ``reason`` (as before issue 17). A resumable one may still be held at both ends: it
    gets ``session.detach`` with ``reason`` unless its last event already is one, and is
    returned so the sweep ends it if it is not resumed within the hold time.
    """
    rows = db.conn.execute(
        "SELECT seq, actor, actor_roles, device, labels, fields FROM audit WHERE type = 'session.start' "
        "AND json_extract(fields, '$.session') IS NOT NULL "
        "AND json_extract(fields, '$.session') NOT IN ("
        "  SELECT json_extract(fields, '$.session') FROM audit WHERE type = 'session.end'"
        "  AND json_extract(fields, '$.session') IS NOT NULL) "
        "ORDER BY seq").fetchall()
    ended: list[str] = []
    detached: list[Detached] = []
    for seq, actor, roles, device, labels, fields in rows:
        start = json.loads(fields)
        common = _start_common(actor, roles, device, labels, start)
        if not start.get("resumable"):
            audit.append(db, "session.end", **common, result="error", reason=reason)
            ended.append(start["session"])
            continue
        last = _last_event(db, start["session"], seq)
        if last is None or last[0] != "session.detach":
            audit.append(db, "session.detach", **common, result="error", reason=reason)
        detached.append(Detached(start["session"], seq, common))
    return ended, detached


def end_if_not_resumed(db, detached: Detached, hold: float, now: dt.datetime | None = None, *,
                       reason: str = NOT_RESUMED) -> str:
    """The sweep's decision for one detached session, written if it is an end.

    Returns ``ended`` (its ``session.end`` with ``reason`` was appended), ``waiting``
    (detached, still within ``hold`` seconds) or ``gone`` (resumed — by this or another proxy —
    or ended meanwhile: nothing to do here any more).
    """
    now = now or dt.datetime.now(dt.UTC)
    last = _last_event(db, detached.session, detached.start_seq)
    if last is None or last[0] != "session.detach":
        return "gone"
    since = parse_iso(last[1])
    if (now - since).total_seconds() < hold:
        return "waiting"
    audit.append(db, "session.end", **detached.common, result="error", reason=reason, now=now)
    return "ended"


@dataclass(frozen=True)
class Resumable:
    """What the registry says about a session a resume names (see :func:`find_resumable`)."""

    start_seq: int
    common: dict[str, Any]
    detached: bool  # its last event is a detach (else it still looks attached somewhere)


def find_resumable(db, session: str, actor: str, device: str) -> Resumable | None:
    """The resumable session ``session`` of ``actor`` on ``device`` that has not ended, or None.

    Another user's session id, a session that ended (or was never resumable) all give None:
    one answer (``resume_unknown``), so a resume cannot probe for session ids.
    """
    row = db.conn.execute(
        "SELECT seq, actor, actor_roles, device, labels, fields FROM audit WHERE type = 'session.start' "
        "AND json_extract(fields, '$.session') = ? ORDER BY seq DESC LIMIT 1", [session]).fetchone()
    if row is None:
        return None
    seq, start_actor, roles, start_device, labels, fields = row
    start = json.loads(fields)
    if start_actor != actor or start_device != device or not start.get("resumable"):
        return None
    last = _last_event(db, session, seq)
    if last is not None and last[0] == "session.end":
        return None
    return Resumable(seq, _start_common(start_actor, roles, start_device, labels, start),
                     last is not None and last[0] == "session.detach")
