"""How long ServiceTitan asks to wait after a 429: the Retry-After header, else a wait written
in the body's texts. Pure: the clock is an argument."""

from __future__ import annotations

import email.utils
import math
import re
from collections.abc import Sequence

import structlog

log = structlog.get_logger("syncd.ratelimit")

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
