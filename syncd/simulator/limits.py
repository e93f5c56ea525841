"""Throttles of the simulated API, as pure functions of the time passed in."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True)
class TokenBucket:
    """`rate` requests per second with a burst of `rate`: ServiceTitan's per-tenant limit."""

    rate: float
    tokens: float = -1.0  # -1: full on first use
    updated: float = 0.0

    def take(self, now: float) -> float:
        """Spend one request; 0.0 if allowed, else the seconds until one would be."""
        capacity = max(self.rate, 1.0)
        if self.tokens < 0:
            self.tokens, self.updated = capacity, now
        self.tokens = min(capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(slots=True)
class SlidingWindow:
    """At most `limit` events in any `window` seconds (the token endpoint's grant throttle)."""

    limit: int
    window: float = 60.0
    events: deque[float] = field(default_factory=deque)

    def wait(self, now: float) -> float:
        """0.0 if another event is allowed now, else the seconds until one is."""
        while self.events and self.events[0] <= now - self.window:
            self.events.popleft()
        if len(self.events) < self.limit:
            return 0.0
        return self.events[0] + self.window - now

    def record(self, now: float) -> None:
        """Count one event at `now`."""
        self.events.append(now)


def retry_after_seconds(wait: float) -> int:
    """Whole seconds for a Retry-After header: rounded up, never below 1."""
    return max(1, math.ceil(wait))
