"""Pure timing logic, driven by an explicit clock."""

from __future__ import annotations

import random

import pytest

from syncd.engine.policy import Outcome, next_due, resume_delay
from syncd.engine.ratelimit import PACE, TokenBucket, backoff, jittered
from syncd.servicetitan.retry_after import parse_retry_after


def test_bucket_allows_burst_then_paces() -> None:
    b = TokenBucket(rate=10, burst=3, updated=100.0)
    assert [b.try_acquire(100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = b.try_acquire(100.0)
    assert wait == pytest.approx(0.1 / PACE)
    assert b.try_acquire(100.0 + wait) == 0.0
    # An idle bucket refills only up to its burst.
    assert sum(b.try_acquire(200.0) == 0.0 for _ in range(10)) == 3


def test_bucket_rate_over_a_long_run() -> None:
    b = TokenBucket(rate=60, burst=60, updated=0.0)
    now, granted = 0.0, 0
    while now < 10.0:
        wait = b.try_acquire(now)
        if wait == 0.0:
            granted += 1
        else:
            now += wait
    assert 0.96 * 600 <= granted <= 0.98 * 600 + 61


def test_bucket_backs_off_on_429_and_recovers() -> None:
    b = TokenBucket(rate=60, burst=10, updated=0.0)
    b.throttled(0.0)
    assert b.current == pytest.approx(42.0)
    assert b.try_acquire(0.0) > 0  # nothing saved up survives a 429
    for _ in range(5):
        b.throttled(0.0)
    assert b.current == pytest.approx(60 * 0.7**6)
    b.try_acquire(10.0)  # ten quiet seconds: +2% of the ceiling per second
    assert b.current == pytest.approx(60 * 0.7**6 + 12.0)
    b.try_acquire(100.0)
    assert b.current == 60.0


def test_bucket_settles_near_a_stricter_server() -> None:
    """Against a server allowing 10/s, a bucket configured for 60 ends near 10/s."""
    client = TokenBucket(rate=60, burst=10, updated=0.0)
    server = TokenBucket(rate=10, burst=10, updated=0.0)
    now, sent, refused, paused_until = 0.0, 0, 0, 0.0
    while now < 60.0:
        wait = client.try_acquire(now)
        if wait > 0 or now < paused_until:
            now = max(now + wait, paused_until)
            continue
        if server.try_acquire(now) == 0.0:
            sent += 1
        else:
            refused += 1
            client.throttled(now)
            paused_until = now + 1.0
    assert 8.0 <= sent / 60.0 <= 10.5
    assert refused < 60  # one 429 a second would be a storm


@pytest.mark.parametrize(
    ("header", "title", "expected"),
    [
        ("3", None, 3.0),
        ("0.5", None, 0.5),
        (None, "Rate limit is exceeded. Try again in 7 seconds.", 7.0),
        ("", "Too many requests. Try again in 1 second.", 1.0),
        ("2", "Try again in 9 seconds.", 2.0),
        ("Thu, 01 Jan 1970 00:00:30 GMT", None, 20.0),
        (None, "Rate limit is exceeded.", None),
        ("soon", None, None),
        (None, None, None),
    ],
)
def test_parse_retry_after(header: str | None, title: str | None, expected: float | None) -> None:
    assert parse_retry_after(header, title, now_unix=10.0) == expected


def test_backoff_grows_caps_and_jitters() -> None:
    rng = random.Random(1)
    plain = [backoff(n, base=1, cap=60, jitter=0) for n in range(1, 9)]
    assert plain == [1, 2, 4, 8, 16, 32, 60, 60]
    spread = {round(backoff(3, base=1, cap=60, jitter=0.2, rng=rng), 6) for _ in range(50)}
    assert len(spread) > 40
    assert all(3.2 <= x <= 4.8 for x in spread)
    assert 90 <= jittered(100, 0.1, rng) <= 110


@pytest.mark.parametrize(
    ("outcome", "failures", "low", "high"),
    [
        (Outcome("more"), 0, 0.0, 0.0),
        (Outcome("refused"), 0, 0.0, 0.0),
        (Outcome("page"), 0, 270.0, 330.0),
        (Outcome("rate_limited", 12.0), 1, 12.0, 12.0),
        (Outcome("rate_limited"), 3, 3.6, 4.4),
        (Outcome("error"), 1, 0.9, 1.1),
        (Outcome("error"), 20, 270.0, 330.0),
        (Outcome("parked"), 1, 3600.0, 3600.0),
        (Outcome("auth"), 1, 300.0, 300.0),
    ],
)
def test_next_due(outcome: Outcome, failures: int, low: float, high: float) -> None:
    due = next_due(
        outcome,
        1000.0,
        poll_interval=300.0,
        failures=failures,
        backoff_base=1.0,
        backoff_max=300.0,
        jitter=0.1,
        rng=random.Random(7),
    )
    assert low <= due - 1000.0 <= high


@pytest.mark.parametrize(
    ("last_ok", "more", "low", "high"),
    [
        (None, True, 0.0, 0.0),  # more pages were waiting: at once
        (990.0, True, 0.0, 0.0),
        (990.0, False, 290.0, 290.0),  # drained 10 s ago: keeps its rhythm
        (500.0, False, 0.0, 5.0),  # overdue: spread over a few seconds
        (None, False, 0.0, 5.0),  # nothing known: spread over a few seconds
        (2000.0, False, 300.0, 300.0),  # a clock ahead: never more than an interval
    ],
)
def test_resume_delay(last_ok: float | None, more: bool, low: float, high: float) -> None:
    delay = resume_delay(1000.0, last_ok, more, 300.0, random.Random(3))
    assert low <= delay <= high


def test_spare_takes_only_from_a_full_bucket() -> None:
    b = TokenBucket(rate=10, burst=3, updated=0.0)
    assert b.spare(0.0)  # full: one is spare
    assert not b.spare(0.0)  # not full any more
    assert not b.spare(0.05)  # half a token back: still not full
    assert b.spare(0.1 / PACE + 1e-6)  # full again
    assert b.try_acquire(1.0) == 0.0  # a poll took one: nothing spare until it is back
    assert not b.spare(1.0)
    b.throttled(2.0)  # a 429: nothing saved up, nothing spare
    assert not b.spare(2.0)


def test_a_pass_on_spare_tokens_never_delays_polls_that_leave_some() -> None:
    """Polls every 0.5 s at 10 requests/s (burst 3) leave tokens over; a pass taking every
    spare token, a millisecond at a time, must not make any poll wait."""

    def poll_waits(with_pass: bool) -> list[float]:
        b = TokenBucket(rate=10, burst=3, updated=0.0)
        waits, taken = [], 0
        for ms in range(10_000):
            now = ms / 1000
            if ms % 500 == 0:
                waits.append(b.try_acquire(now))
            elif with_pass and b.spare(now):
                taken += 1
        assert not with_pass or taken > 20  # the pass did spend what was left over
        return waits

    assert poll_waits(with_pass=True) == poll_waits(with_pass=False) == [0.0] * 20
