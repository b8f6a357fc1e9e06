"""Datagram size search for one QUIC connection, sans-I/O (RFC 8899 DPLPMTUD in spirit).

Why: aioquic's cost is per datagram, so 1,452-byte datagrams move a MB for less CPU than
1,200-byte ones (10-25 % in ``bench/quicfloor.py``'s in-memory runs). But a path may not carry them: a tunnel, PPPoE or a
cellular carrier with a smaller MTU, and a firewall that drops the ICMP "too big" message,
silently swallows every large datagram. A connection that simply used 1,452 would stall on
such a path. So each side starts at the size every QUIC path carries (1,200) and *probes* its
own send direction: one padded, ack-eliciting packet of exactly the larger size. Only an
acknowledged probe raises the size; a lost probe is retried a few times, then the path is
taken as small and probed again much later. Both ends search independently (the two
directions of a path may differ).

After the size went up, the path may still shrink (a new route, a tunnel coming up): when
full-size packets keep being lost while nothing full-size gets through, that is a *black
hole*, and the size drops back to 1,200 at once (lost data is resent at the small size). A
migration or a new peer address is a new path: back to 1,200 and probe again.

This module only decides. ``aioquic_compat.PathMtu`` builds the probe packets, reports
acknowledgements and losses, and applies the size to aioquic's connection, congestion
controller and pacer. Times are the caller's clock (seconds); nothing here reads one.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

#: the size every QUIC path must carry (RFC 9000 section 14): where every connection starts
BASE_SIZE = 1200
#: the size we try: an Ethernet MTU of 1,500 minus IPv6 (40) and UDP (8) headers
PROBE_SIZE = 1452
#: probes of one search before the path is taken as small
MAX_PROBES = 3
#: how long a small path stays small before it is probed again (RFC 8899: 600 s)
REPROBE_AFTER = 600.0
#: after the first black hole on a path, how soon a probe checks whether it was real
BLACK_HOLE_RECHECK = 30.0
#: full-size packets lost in a row, none acknowledged since, that make a black hole
BLACK_HOLE_LOSSES = 3


class State(Enum):
    #: the handshake is not confirmed yet: nothing is probed before it
    WAITING = "waiting"
    #: probing the larger size (a probe is due or in flight)
    SEARCHING = "searching"
    #: the larger size is in use
    RAISED = "raised"
    #: the path did not carry the larger size: at the base size until ``next_probe_at``
    SMALL = "small"


@dataclass(frozen=True)
class Probe:
    """Send one probe packet of ``size`` bytes (UDP payload); report it back by ``probe_id``."""

    probe_id: int
    size: int


@dataclass(frozen=True)
class SizeChange:
    """Use datagrams of ``size`` bytes from now on, because of ``reason``."""

    size: int
    reason: str


class Prober:
    """The datagram size decision of one connection's send direction.

    Inputs: ``handshake_confirmed``, ``poll`` (is a probe due?), ``probe_acked``,
    ``probe_lost``, ``large_acked``, ``large_lost`` and ``path_changed``. Outputs: ``Probe``
    (from ``poll``) and ``SizeChange`` (from the others), applied by the caller.
    """

    # one per QUIC connection, thousands on a proxy: no per-instance dict
    __slots__ = ("base", "target", "max_probes", "reprobe_after", "black_hole_recheck",
                 "black_hole_losses", "state", "size", "next_probe_at", "probes_sent",
                 "in_flight", "lost_in_search", "black_holes", "_large_losses",
                 "_newest_large_acked", "_raised_at")

    def __init__(
        self,
        *,
        base: int = BASE_SIZE,
        target: int = PROBE_SIZE,
        max_probes: int = MAX_PROBES,
        reprobe_after: float = REPROBE_AFTER,
        black_hole_recheck: float = BLACK_HOLE_RECHECK,
        black_hole_losses: int = BLACK_HOLE_LOSSES,
    ) -> None:
        if not base <= target:
            raise ValueError(f"probe size {target} is below the base size {base}")
        self.base = base
        self.target = target
        self.max_probes = max_probes
        self.reprobe_after = reprobe_after
        self.black_hole_recheck = black_hole_recheck
        self.black_hole_losses = black_hole_losses
        self.state = State.WAITING
        #: the datagram size in use
        self.size = base
        #: when the next probe may go (None: not before the handshake is confirmed)
        self.next_probe_at: float | None = None
        #: probes sent (ever); the id of the one in flight, if any
        self.probes_sent = 0
        self.in_flight: int | None = None
        #: probes of the current search that were lost
        self.lost_in_search = 0
        #: black holes seen on this path (the second one keeps the path small for long)
        self.black_holes = 0
        #: full-size packets lost since one was last acknowledged (black hole detection)
        self._large_losses = 0
        #: send time of the newest full-size packet acknowledged since the size went up
        self._newest_large_acked: float | None = None
        #: when the size went up (packets sent before are not full-size)
        self._raised_at = 0.0

    # -- inputs

    def handshake_confirmed(self, now: float) -> None:
        """Start searching: the first probe is due at once."""
        if self.state is State.WAITING:
            self._search(now)

    def poll(self, now: float) -> Probe | None:
        """A probe to send now, if one is due (at most one in flight)."""
        if self.in_flight is not None or self.next_probe_at is None or now < self.next_probe_at:
            return None
        if self.state is State.SMALL:
            self._search(now)  # the long wait is over: search again from the start
        if self.state is not State.SEARCHING:
            return None
        self.probes_sent += 1
        self.in_flight = self.probes_sent
        return Probe(self.probes_sent, self.target)

    def probe_acked(self, probe_id: int, now: float) -> SizeChange | None:
        """The peer acknowledged a probe: the path carries the larger size."""
        if probe_id != self.in_flight:
            return None  # a probe of an earlier path or search: says nothing of this one
        self.in_flight = None
        self.next_probe_at = None
        self.state = State.RAISED
        self._raised_at = now
        self._large_losses = 0
        self._newest_large_acked = None
        return self._set(self.target, "probe acknowledged")

    def probe_lost(self, probe_id: int, now: float) -> SizeChange | None:
        """A probe was declared lost: retry, or after ``max_probes`` take the path as small."""
        if probe_id != self.in_flight:
            return None
        self.in_flight = None
        self.lost_in_search += 1
        if self.lost_in_search < self.max_probes:
            self.next_probe_at = now  # loss detection already waited about a PTO
            return None
        self.state = State.SMALL
        self.next_probe_at = now + self.reprobe_after
        return None  # still at the base size: a search never raised it

    def large_acked(self, sent_time: float) -> None:
        """A full-size packet sent at ``sent_time`` was acknowledged."""
        if self.state is State.RAISED:
            self._large_losses = 0
            if self._newest_large_acked is None or sent_time > self._newest_large_acked:
                self._newest_large_acked = sent_time

    def large_lost(self, sent_time: float, now: float) -> SizeChange | None:
        """A full-size packet sent at ``sent_time`` was declared lost (or given up on by PTO).

        A loss is evidence of a black hole only when no full-size packet sent after it was
        acknowledged: a burst of congestion losses is followed by later full-size packets
        that do arrive, a black hole by none.
        """
        if self.state is not State.RAISED or sent_time < self._raised_at:
            return None
        if self._newest_large_acked is not None and sent_time <= self._newest_large_acked:
            return None
        self._large_losses += 1
        if self._large_losses < self.black_hole_losses:
            return None
        self.black_holes += 1
        self.state = State.SMALL
        self.next_probe_at = now + (
            self.black_hole_recheck if self.black_holes == 1 else self.reprobe_after
        )
        return self._set(self.base, "black hole: full-size packets lost")

    def path_changed(self, now: float) -> SizeChange | None:
        """A new path (migration, new peer address): it may be smaller; start over."""
        self.black_holes = 0
        self.in_flight = None  # its answer, if any, would be about the old path
        if self.state is State.WAITING:
            return None
        self._search(now)
        return self._set(self.base, "path changed")

    # -- helpers

    def _search(self, now: float) -> None:
        self.state = State.SEARCHING
        self.lost_in_search = 0
        self.next_probe_at = now
        if self.target <= self.base:
            self.state = State.SMALL  # nothing to search for
            self.next_probe_at = None

    def _set(self, size: int, reason: str) -> SizeChange | None:
        if size == self.size:
            return None
        self.size = size
        return SizeChange(size, reason)
