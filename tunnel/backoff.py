"""Reconnect delays: exponential backoff with full jitter (pure, seedable for tests).

Full jitter (a uniform delay between 0 and the exponential cap) spreads a whole fleet's
reconnects after a proxy restart instead of having every agent retry in lockstep.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class Backoff:
    base: float = 1.0
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return self.rng.uniform(0, ceiling)

    def reset(self) -> None:
        """After a connection that worked: the next failure starts from the base again."""
        self.attempt = 0
