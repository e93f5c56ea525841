"""Pure timing logic: token bucket, Retry-After parsing, backoff. The clock is an argument."""

from __future__ import annotations

import email.utils
import random
import re
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    """Up to `rate` requests per second on average, bursts up to `burst`.

    `try_acquire(now)` either takes a token (returns 0.0) or returns how long to wait for one;
    it never sleeps, so a scheduler can serve other tenants meanwhile.
    """

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def try_acquire(self, now: float) -> float:
        self._refill(now)
        # The epsilon absorbs float error: waiting exactly the returned time must succeed.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def set_rate(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = min(self.tokens, burst)


_TITLE_SECONDS = re.compile(r"(\d+(?:\.\d+)?)\s*seconds?\.?\s*$", re.IGNORECASE)


def parse_retry_after(header: str | None, title: str | None, now_unix: float) -> float | None:
    """Seconds to wait after a 429: the Retry-After header (seconds or HTTP date), else the
    "... N seconds." at the end of the ProblemDetails title; None when neither says."""
    if header:
        header = header.strip()
        try:
            return max(0.0, float(header))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(header)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - now_unix)
    if title:
        m = _TITLE_SECONDS.search(title)
        if m:
            return float(m.group(1))
    return None


def backoff(
    attempt: int,
    *,
    base: float = 1.0,
    cap: float = 300.0,
    jitter: float = 0.1,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff for the `attempt`-th consecutive failure (1-based), with jitter.

    Full-range growth base * 2**(attempt-1), capped, then spread by +-jitter so that many
    feeds failing together do not retry in lockstep.
    """
    delay = min(cap, base * (2.0 ** max(0, attempt - 1)))
    r = (rng or random).uniform(-jitter, jitter)
    return max(0.0, delay * (1.0 + r))


def jittered(interval: float, jitter: float, rng: random.Random | None = None) -> float:
    """`interval` spread by +-jitter (a share of it)."""
    return interval * (1.0 + (rng or random).uniform(-jitter, jitter))
