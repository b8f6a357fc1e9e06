"""The proxy's part of resumable sessions (issue 17): replay counts and held-session checks.

The proxy stays a pipe: it authorizes each (re)attach and writes the audit log, and keeps no
state a resume needs beyond the registry (the session's life in the log: ``enroll/session_log.py``).
:func:`held_denials` decides, over a policy snapshot, which sessions an agent holds may no longer
resume; :func:`replayed` reads the bytes a re-attach replays from the two ends' headers. Pure.
"""

from __future__ import annotations

import datetime as dt

from enroll.roles import check, visible
from enroll.snapshot import PolicySnapshot
from tunnel.admission import Denied, check_device


def replayed(sender_sent: object, receiver_received: object) -> int | None:
    """Bytes a re-attach replays in one direction: what the sender sent that the receiver had
    not received (from the two ends' headers); None when a count is missing."""
    if type(sender_sent) is not int or type(receiver_received) is not int:
        return None
    return max(0, sender_sent - receiver_received)


def held_denials(snapshot: PolicySnapshot, device_id: str, reports: object,
                 now: dt.datetime | None = None) -> dict[str, str]:
    """Which of the sessions an agent holds may no longer resume, and why (pure).

    ``reports`` is the agent's list of ``{session, identity, service, login}``. Checked as a
    dial would be, as far as the registry can say without the engineer's certificate: the
    device (decommissioned, locked), the user (locked, gone), the roles (the device out of
    reach after a relabel or a role change, the service or login no longer allowed). The
    certificate itself (expiry, revocation) is checked at the resume dial.
    """
    now = now or dt.datetime.now(dt.UTC)
    if not isinstance(reports, list):
        return {}
    device = snapshot.device(device_id)
    denials: dict[str, str] = {}
    for report in reports[:256]:  # at most MAX_SESSIONS are held; a longer list is not an agent's
        if not isinstance(report, dict) or not isinstance(report.get("session"), str):
            continue
        reason = _held_denial(snapshot, device, device_id, report, now)
        if reason is not None:
            denials[report["session"]] = reason
    return denials


def _held_denial(snapshot: PolicySnapshot, device, device_id: str, report: dict,
                 now: dt.datetime) -> str | None:
    identity, service, login = report.get("identity"), report.get("service"), report.get("login")
    if device is None:
        return f"device {device_id} is no longer in the registry"
    try:
        check_device(device, now)
    except Denied as denied:
        return denied.reason
    if not isinstance(identity, str) or not identity.startswith("user:") or not isinstance(service, str):
        return "the session's identity or service is not one a resume could re-check"
    name = identity.removeprefix("user:")
    user = snapshot.user(name)
    if user is None:
        return None  # an identity issued without a user record: its roles live in its certificate
    if user.locked(now):
        message = f": {user.lock_message}" if user.lock_message else ""
        return f"user {name} is locked{message}"
    roles = snapshot.roles_named(user.roles)
    if not visible(roles, device.labels):
        return f"{device_id} is no longer within {name}'s reach"
    verdict = check(roles, device.labels, service, login if isinstance(login, str) else None)
    if not verdict.allowed:
        return f"{device_id}: {verdict.reason}"
    return None
