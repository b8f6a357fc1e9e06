"""The audit log's event types: a stable vocabulary, shared by writers and readers (pure core).

Scripts, SIEM rules and ``tunnel audit query --event`` name these; they never change meaning.
They live apart from :mod:`enroll.audit` (the chain in the registry, which needs SQLite) so that
a command can list them in its help on a host without the registry code.
"""

from __future__ import annotations

#: Stable event type names. Producers: enroll/ (tokens, enrollment, admin), the proxy, and user
#: login (user.login, user.login.failed). ``anonymous.refused`` sums up the refused requests of
#: one source of certificate-less peers over one window (fields count, codes, first, last).
#: A resumable session (issue 17) runs session.start … [session.detach … session.resume]* …
#: session.end: detach when its stream through the proxy was lost, resume when it re-attached
#: (fields outage, replayed_to_device, replayed_from_device).
EVENT_TYPES = (
    "token.create",
    "token.revoke",
    "device.enroll",
    "device.enroll.denied",
    "cert.issue",
    "cert.revoke",
    "device.connect",
    "device.disconnect",
    "device.migrate",
    "device.reconnect",
    "device.relabel",
    "device.decommission",
    "device.lock",
    "device.unlock",
    "user.login",
    "user.login.failed",
    "session.start",
    "session.end",
    "session.resume",
    "session.detach",
    "access.denied",
    "anonymous.refused",
)
