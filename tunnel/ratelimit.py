"""Limits for anonymous traffic, pure and clock-injectable.

:class:`RateLimiter` is a token bucket per key (a source address, or one shared key for a limit
on all anonymous peers together). :class:`RefusalTally` counts refusals per source and time
window so that the audit log gets one summary event per source per window instead of one per
refused request: anonymous peers cannot grow the log (or keep its fsyncs busy) at will.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable
from dataclasses import dataclass, field


class RateLimiter:
    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 10000):
        self.rate, self.burst, self.clock, self.max_keys = rate, burst, clock, max_keys
        self._buckets: dict[object, tuple[float, float]] = {}

    def allow(self, key: object = None) -> bool:
        now = self.clock()
        tokens, last = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self._buckets) >= self.max_keys and key not in self._buckets:
            self._buckets.clear()  # bounded memory under a flood of distinct sources
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1, now)
        return True


#: The source of the refusals beyond ``max_sources`` in one window (their count is kept).
OTHER_SOURCES = "other"


def source_of(address: str) -> str:
    """What one anonymous peer is counted as: its IPv4 address, or its IPv6 /64.

    One IPv6 host usually holds a whole /64, so counting single v6 addresses would let it
    spread its refusals over as many summary events as it likes.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address or "?"
    if ip.version == 4:
        return str(ip)
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.ip_network(f"{ip}/64", strict=False))


@dataclass
class RefusalSummary:
    """Refusals of one source in one window: what one ``anonymous.refused`` event records."""

    source: str
    window_start: float
    window_end: float
    count: int = 0
    #: refusals per code (rate_limited, busy, unknown_token, bad_request…)
    codes: dict[str, int] = field(default_factory=dict)
    first: float = 0.0
    last: float = 0.0


class RefusalTally:
    """Refusals counted per source and per window of ``window`` seconds (aligned to the clock).

    :meth:`note` counts one refusal; :meth:`due` hands out (and forgets) the summaries of the
    windows that have ended, or all of them with ``final=True`` (at shutdown). At most
    ``max_sources`` sources are tracked per window; refusals from any further source are counted
    under :data:`OTHER_SOURCES`, so a window yields at most ``max_sources + 1`` summaries and
    memory stays bounded whatever the number of addresses a flood comes from.
    """

    def __init__(self, window: float = 60.0, max_sources: int = 100,
                 clock: Callable[[], float] = time.time):
        if window <= 0:
            raise ValueError("the refusal window must be positive")
        self.window, self.max_sources, self.clock = window, max_sources, clock
        self._open: dict[float, dict[str, RefusalSummary]] = {}

    def note(self, address: str, code: str) -> None:
        now = self.clock()
        start = (now // self.window) * self.window
        sources = self._open.setdefault(start, {})
        source = source_of(address)
        if source not in sources and len(sources) >= self.max_sources:
            source = OTHER_SOURCES
        summary = sources.get(source)
        if summary is None:
            summary = sources[source] = RefusalSummary(source, start, start + self.window, first=now)
        summary.count += 1
        summary.codes[code] = summary.codes.get(code, 0) + 1
        summary.last = now

    def due(self, final: bool = False) -> list[RefusalSummary]:
        """Summaries of the ended windows (all windows if ``final``), oldest first; forgotten."""
        now = self.clock()
        out: list[RefusalSummary] = []
        for start in sorted(self._open):
            if final or start + self.window <= now:
                out.extend(self._open.pop(start).values())
        return out

    @property
    def pending(self) -> int:
        """Refusals counted but not yet handed out."""
        return sum(s.count for sources in self._open.values() for s in sources.values())
