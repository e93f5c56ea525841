"""Pure timing logic: token bucket, backoff and jitter (due times: `policy`; how long a 429 asks
to wait: `syncd.servicetitan.retry_after`).

The clock is always an argument: everything here is tested without sockets or sleeps.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import structlog

log = structlog.get_logger("syncd.ratelimit")

# Pace a little under the configured ceiling: requests reach the server with network jitter,
# and a limiter there with no slack left answers 429 to the ones that arrive early.
PACE = 0.97
# On a 429 the tenant's rate drops to this share (multiplicative decrease) ...
DECREASE = 0.7
# ... and climbs back by this share of the ceiling per second (additive increase).
RECOVERY = 0.02
MIN_RATE = 0.2


@dataclass(slots=True)
class TokenBucket:
    """At most `rate` requests per second, bursts up to `burst`, adapting to 429s.

    `try_acquire(now)` either takes a token (returns 0.0) or returns how long to wait for one;
    it never sleeps, so a scheduler can serve other tenants meanwhile. `throttled(now)` (a 429)
    cuts the current rate, which then recovers towards `rate`: when another integration spends
    part of the tenant's budget, syncd settles at what is left instead of retrying into 429s.
    """

    rate: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0
    current: float = -1.0

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst
        if self.current < 0:
            self.current = self.rate

    def _refill(self, now: float) -> None:
        elapsed = now - self.updated
        if elapsed > 0:
            self.current = min(self.rate, self.current + RECOVERY * self.rate * elapsed)
            self.tokens = min(self.burst, self.tokens + elapsed * self.current * PACE)
            self.updated = now

    def try_acquire(self, now: float) -> float:
        self._refill(now)
        # The epsilon absorbs float error: waiting exactly the returned time must succeed.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / (self.current * PACE)

    def give_back(self, now: float) -> None:
        """A token taken for a request that was not made (its page was fetched ahead, on a
        token of its own) returns to the bucket."""
        self._refill(now)
        self.tokens = min(self.burst, self.tokens + 1.0)

    def spare(self, now: float) -> bool:
        """Take a token only if the bucket is full, all but that token: what the tenant's own
        requests leave over (a reconciliation pass spends nothing else). Whether it took one."""
        self._refill(now)
        if self.tokens >= self.burst - 1e-9 and self.tokens >= 1.0 - 1e-9:
            self.tokens -= 1.0
            return True
        return False

    def throttled(self, now: float) -> None:
        """A 429: slow down, and spend nothing saved up."""
        self._refill(now)
        self.current = max(MIN_RATE, self.current * DECREASE)
        self.tokens = min(self.tokens, 0.0)

    def set_rate(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.current = min(self.current, rate)
        self.tokens = min(self.tokens, burst)

    def allowed(self, now: float) -> float:
        """The rate allowed at `now`: the current rate as recovered since it was last updated."""
        elapsed = max(0.0, now - self.updated)
        return min(self.rate, self.current + RECOVERY * self.rate * elapsed)


def default_burst(rate: float) -> float:
    """A small burst: enough to fill a few connections at once, not a second's worth."""
    return max(1.0, min(rate, 10.0))


# Doublings of the backoff base past which the wait grows no more: 2.0 ** 1000 is still a float
# (a product past the largest float is inf, which the cap takes), 2.0 ** 1024 raises.
MAX_DOUBLINGS = 1000


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
    # The exponent stops growing long before a float would overflow (2.0 ** 1024 raises): a
    # feed failing for days keeps counting failures, and its wait is simply the cap.
    delay = min(cap, base * (2.0 ** min(max(0, attempt - 1), MAX_DOUBLINGS)))
    r = (rng or random).uniform(-jitter, jitter)
    return max(0.0, delay * (1.0 + r))


def jittered(interval: float, jitter: float, rng: random.Random | None = None) -> float:
    """`interval` spread by +-jitter (a share of it)."""
    return interval * (1.0 + (rng or random).uniform(-jitter, jitter))
