"""Pure timing logic: token bucket, Retry-After parsing, backoff, when a feed is due next.

The clock is always an argument: everything here is tested without sockets or sleeps.
"""

from __future__ import annotations

import email.utils
import random
import re
from dataclasses import dataclass

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

    def throttled(self, now: float) -> None:
        """A 429: slow down, and spend nothing saved up."""
        self._refill(now)
        self.current = max(MIN_RATE, self.current * DECREASE)
        self.tokens = min(self.tokens, 0.0)

    def set_rate(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.current = min(self.current, rate)
        self.tokens = min(self.tokens, burst)


def default_burst(rate: float) -> float:
    """A small burst: enough to fill a few connections at once, not a second's worth."""
    return max(1.0, min(rate, 10.0))


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


# A feed refused with 403/404 is tried again this much later (permissions may be granted).
PARK_S = 3600.0
# Credentials refused by the token endpoint: retry no faster than this.
AUTH_RETRY_S = 300.0
# Fresh start: spread the first polls over this window (or the poll interval, if shorter).
STARTUP_SPREAD_S = 5.0


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one poll, as far as scheduling is concerned."""

    kind: str  # "page", "more", "refused", "rate_limited", "parked", "auth", "error"
    retry_after: float | None = None


def resume_delay(
    now_unix: float,
    last_ok: float | None,
    more: bool,
    interval: float,
    rng: random.Random,
) -> float:
    """Seconds until a resumed feed is first due after a (re)start (pure).

    A feed that had more pages waiting goes at once; a drained one keeps its rhythm (due an
    interval after its last success); overdue or unknown ones spread over a few seconds.
    """
    if more:
        return 0.0
    spread = rng.uniform(0, min(interval, STARTUP_SPREAD_S))
    if last_ok is None:
        return spread
    due_in = last_ok + interval - now_unix
    if due_in <= 0:
        return spread
    return min(due_in, interval)


def next_due(
    outcome: Outcome,
    now: float,
    *,
    poll_interval: float,
    failures: int,
    backoff_base: float,
    backoff_max: float,
    jitter: float,
    rng: random.Random,
) -> float:
    """When a feed is due again after `outcome` (pure)."""
    if outcome.kind in ("more", "refused"):
        return now
    if outcome.kind == "page":
        return now + jittered(poll_interval, jitter, rng)
    if outcome.kind == "rate_limited":
        wait = outcome.retry_after
        if wait is None:
            wait = backoff(failures, base=backoff_base, cap=backoff_max, jitter=jitter, rng=rng)
        return now + wait
    if outcome.kind == "parked":
        return now + PARK_S
    if outcome.kind == "auth":
        return now + max(AUTH_RETRY_S, backoff(failures, base=backoff_base, cap=backoff_max))
    return now + backoff(failures, base=backoff_base, cap=backoff_max, jitter=jitter, rng=rng)
