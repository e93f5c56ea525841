"""Pure timing logic: token bucket, Retry-After parsing, backoff (due times: syncd.policy).

The clock is always an argument: everything here is tested without sockets or sleeps.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
from collections.abc import Sequence
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


# The longest wait a 429 may impose. A gateway asking for more (or for `inf`) is misconfigured
# or hostile; the tenant retries after this long instead of pausing for hours or forever, and
# a 429 then simply pauses it again.
MAX_RETRY_AFTER_S = 600.0

# "... Try again in 3 seconds.", "retry after 2.5 secs", "wait 1 minute": a number and a unit.
_TEXT_WAIT = re.compile(
    r"(?<![\w.])(-?\d{1,9}(?:\.\d{1,6})?)\s*(seconds?|secs?|minutes?|mins?)\b", re.IGNORECASE
)


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) and value >= 0 else None


def _from_header(header: str, now_unix: float) -> float | None:
    header = header.strip()
    try:
        return _finite(float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    try:
        delta = when.timestamp() - now_unix
    except (OverflowError, OSError, ValueError):
        return None
    # A date in the past means "now".
    return None if not math.isfinite(delta) else max(0.0, delta)


def _from_text(text: str) -> float | None:
    for m in _TEXT_WAIT.finditer(text[:2000]):
        value = _finite(float(m.group(1)))
        if value is not None:
            return value * 60.0 if m.group(2).lower().startswith("min") else value
    return None


def parse_retry_after(
    header: str | None,
    hints: str | Sequence[str | None] | None,
    now_unix: float,
    *,
    tenant: int | None = None,
) -> float | None:
    """Seconds to wait after a 429; None when nothing usable says.

    The Retry-After header first (seconds, fractional or not, or an HTTP date), else the first
    "N seconds" in the body's texts (`hints`: ProblemDetails `title` and `detail`, Azure API
    Management's `message`, a plain-text body). Negative, `inf` and `nan` are ignored; a wait
    above MAX_RETRY_AFTER_S is cut to it, with a warning.
    """
    wait = _from_header(header, now_unix) if header else None
    if wait is None and hints:
        for text in [hints] if isinstance(hints, str) else hints:
            if text and (wait := _from_text(text)) is not None:
                break
    if wait is not None and wait > MAX_RETRY_AFTER_S:
        log.warning(
            "retry_after_capped", tenant=tenant, asked_s=round(wait, 3), cap_s=MAX_RETRY_AFTER_S
        )
        wait = MAX_RETRY_AFTER_S
    return wait


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
