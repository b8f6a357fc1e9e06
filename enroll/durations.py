"""Durations as operators write them (``90s``, ``30m``, ``8h``, ``30d``, ``2w``): pure core.

Token lifetimes, lock TTLs, role ``max_session_ttl``, the agent's timers and audit queries all
read durations. They live in this module of their own, with no imports from the project and no
I/O, so that the device (``tunnel agent``), the policy code and the CA host all share one rule
without the device loading the CA host's modules to get it.
"""

from __future__ import annotations

import datetime as dt

from enroll.errors import FleetError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


class DurationError(FleetError, ValueError):
    """Not a duration; the message shows the accepted form. A ValueError for older callers."""

    code = "bad_duration"


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``30m``, ``8h``, ``30d``, ``2w`` → timedelta; a whole positive number and one unit."""
    text = str(text).strip()
    if len(text) >= 2 and text[-1] in UNITS and text[:-1].isascii() and text[:-1].isdigit() \
            and int(text[:-1]) > 0:
        return dt.timedelta(seconds=int(text[:-1]) * UNITS[text[-1]])
    raise DurationError(f"bad duration {text!r}: use a positive number with s, m, h, d or w (e.g. 30m)")
