"""Reconnect delays: exponential backoff with full jitter (pure, seedable for tests).

Full jitter (a uniform delay between 0 and the exponential cap) spreads a whole fleet's
reconnects after a proxy restart instead of having every agent retry in lockstep.

:func:`after_refusal` decides what a refusal means: a decommissioned, revoked or unknown device
stops (retrying cannot help and floods the audit log), a locked one waits minutes.

The agent's reconnect policy (:class:`tunnel.agent_decisions.Reconnect`: which kind of end
waits how long) builds on both.
"""

from __future__ import annotations

import datetime as dt
import random
import re


class Backoff:
    """Full-jitter exponential backoff: ``uniform(0, min(cap, base * 2**attempt))``.

    (Plain classes here and in :mod:`tunnel.agent_decisions`, not dataclasses: each dataclass
    costs an idle agent 5-13 KB of generated code.)
    """

    __slots__ = ("base", "cap", "rng", "attempt")

    def __init__(self, base: float = 1.0, cap: float = 30.0, rng: random.Random | None = None,
                 attempt: int = 0) -> None:
        self.base = base
        self.cap = cap
        self.rng = rng if rng is not None else random.Random()
        self.attempt = attempt

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        """After a connection that worked: the next failure starts from the base again."""
        self.attempt = 0


# --- what a refusal means for the next attempt -----------------------------------------------

#: Refusals no retry can change: the proxy will refuse this identity every time until an
#: operator acts on the device itself (re-enrolls it, replaces its certificate, fixes its
#: config). Retrying would only fill the proxy's audit log with refusals.
FINAL = {
    "decommissioned": "the device was decommissioned",
    "revoked": "this device's certificate was revoked (or superseded by a newer one)",
    "unknown_identity": "the proxy does not know this device or its certificate",
    "not_fleet_certificate": "the certificate is not one of this fleet's",
    "wrong_kind": "the configured identity is not a device certificate",
    "expired": "the device's certificate expired (it can no longer renew itself)",
}
#: A locked device retries this often at most (sooner if the refusal says the lock ends sooner):
#: an operator's unlock is seen within minutes, and a locked fleet costs the proxy little.
LOCKED_WAIT = 300.0
_LOCKED_UNTIL = re.compile(r"locked until (\d{4}-\d\d-\d\d[T ][\d:.]+(?:Z|[+-]\d\d:?\d\d)?)")


class AfterRefusal:
    """What the agent does after the proxy closed or refused it with ``code``.

    ``action`` is ``retry`` (the usual backoff), ``wait`` (``delay`` seconds, unless the
    network changes) or ``stop`` (exit; ``why`` says what an operator must do).
    """

    __slots__ = ("action", "delay", "why")

    def __init__(self, action: str, delay: float = 0.0, why: str = "") -> None:
        self.action = action
        self.delay = delay
        self.why = why

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AfterRefusal) and (self.action, self.delay, self.why) == (
            other.action, other.delay, other.why)

    def __hash__(self) -> int:
        return hash((self.action, self.delay, self.why))

    def __repr__(self) -> str:
        return f"AfterRefusal(action={self.action!r}, delay={self.delay!r}, why={self.why!r})"


def after_refusal(code: str | None, reason: str = "", now: dt.datetime | None = None) -> AfterRefusal:
    """Decide from a close/refusal code name (``tunnel.protocol.CLOSE_CODES``) and its reason.

    Pure: the agent's reconnect loop applies the result. Unknown codes and transport errors
    (``None``) retry with the usual backoff, as do ``shutdown``, ``replaced``, ``renewed`` and
    ``unresponsive``: those are about one connection, not about the device's standing.
    """
    if code in FINAL:
        return AfterRefusal("stop", why=FINAL[code])
    if code == "locked":
        delay = LOCKED_WAIT
        if match := _LOCKED_UNTIL.search(reason or ""):
            try:
                until = dt.datetime.fromisoformat(match.group(1).replace("Z", "+00:00"))
            except ValueError:
                until = None
            if until is not None:
                if until.tzinfo is None:
                    until = until.replace(tzinfo=dt.UTC)
                left = (until - (now or dt.datetime.now(dt.UTC))).total_seconds()
                delay = min(LOCKED_WAIT, max(1.0, left))
        return AfterRefusal("wait", delay, "the device is locked")
    return AfterRefusal("retry")
