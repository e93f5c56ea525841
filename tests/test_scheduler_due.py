"""What is due next (syncd.engine.due), driven by an explicit clock: no sockets, no sleeps."""

from __future__ import annotations

import random

import pytest

from syncd import catalogue
from syncd.config import Secret, TenantSettings
from syncd.engine.due import PAUSED_RECHECK_S, Timetable

FEEDS = ["crm.customers", "crm.locations", "jpm.jobs"]


def tenant(tid: int, *, rate: float = 100.0, max_in_flight: int = 8) -> TenantSettings:
    return TenantSettings(
        id=tid,
        client_id=f"client-{tid}",
        client_secret=Secret("s"),
        requests_per_second=rate,
        max_in_flight=max_in_flight,
        poll_interval=300.0,
        include_recent_changes=True,
        start=None,
        feeds=tuple(FEEDS),
    )


def specs(cursor: str | None = None) -> list[tuple[catalogue.Feed, str | None, bool, float]]:
    return [(catalogue.feed(f), cursor, True, 300.0) for f in FEEDS]


def timetable(*tenants: TenantSettings, cursor: str | None = None) -> Timetable:
    tt = Timetable(rng=random.Random(4))
    for t in tenants:
        tt.add_tenant(t, None, specs(cursor), now=0.0)  # type: ignore[arg-type]
    return tt


def test_new_feeds_are_due_at_once_and_tenants_take_turns() -> None:
    tt = timetable(tenant(1), tenant(2))
    assert tt.pop_ready(0.0) == [1, 2]
    polled = []
    for tid in (1, 2, 1):
        fs = tt.take(tid, 0.0)
        assert fs is not None
        polled.append((tid, fs.name))
        assert fs.running
    assert polled == [(1, "crm.customers"), (2, "crm.customers"), (1, "crm.locations")]
    # Each taken tenant went back to the global heap, behind the other.
    assert tt.pop_ready(0.0) == [2, 1]


@pytest.mark.parametrize(
    ("cursor", "delays", "low", "high"),
    [
        (None, None, 0.0, 0.0),  # new feeds: at once
        ("c", {"crm.customers": 120.0, "crm.locations": 120.0, "jpm.jobs": 120.0}, 120.0, 120.0),
        ("c", None, 0.0, 5.0),  # resumed, nothing stored: spread over a few seconds
    ],
)
def test_first_due_times(
    cursor: str | None, delays: dict[str, float] | None, low: float, high: float
) -> None:
    tt = Timetable(rng=random.Random(4))
    t = tt.add_tenant(tenant(1), None, specs(cursor), now=100.0, delays=delays)  # type: ignore[arg-type]
    assert all(low <= fs.due - 100.0 <= high for fs in t.feeds.values())


def test_max_in_flight_bounds_what_a_tenant_takes() -> None:
    tt = timetable(tenant(1, max_in_flight=2))
    taken = [tt.take(1, 0.0) for _ in range(3)]
    assert [fs is not None for fs in taken] == [True, True, False]
    assert tt.tenants[1].ready_time() is None  # at its cap: not in the global heap
    first = taken[0]
    assert first is not None
    tt.done(first)
    assert tt.tenants[1].ready_time() == 0.0
    assert tt.pop_ready(0.0) == [1]


def test_rate_limiter_and_pause_delay_the_tenant_not_the_others() -> None:
    tt = timetable(tenant(1, rate=1.0), tenant(2))
    assert tt.take(1, 0.0) is not None  # burst of one
    assert tt.take(1, 0.0) is None  # no token: back in the heap for when it has one
    assert tt.tenants[1].next_token > 0.0
    tt.tenants[2].paused_until = 30.0  # a 429 pause
    tt.arm(tt.tenants[2])
    assert tt.take(2, 0.0) is None
    ready = {tid: t.ready_time() for tid, t in tt.tenants.items()}
    assert ready[2] == 30.0
    assert ready[1] is not None
    assert 0.0 < ready[1] < 2.0
    assert tt.pop_ready(29.0) == [1]
    assert tt.pop_ready(30.0) == [2]


def test_paused_and_removed_feeds_cost_no_token() -> None:
    tt = timetable(tenant(1, rate=1.0))
    t = tt.tenants[1]
    t.feeds["crm.customers"].paused = "group billing lags"
    t.feeds["crm.locations"].removed = True
    assert tt.take(1, 0.0) is None  # paused: looked at again later
    assert t.feeds["crm.customers"].due == PAUSED_RECHECK_S
    assert tt.take(1, 0.0) is None  # removed: dropped
    fs = tt.take(1, 0.0)
    assert fs is not None
    assert fs.name == "jpm.jobs"  # the one token went to a feed that is polled


def test_reconfigure_adds_and_removes_feeds_and_retry_now() -> None:
    tt = timetable(tenant(1), cursor="c")
    t = tt.tenants[1]
    gone = t.feeds["jpm.jobs"]
    added, removed = tt.reconfigure_tenant(
        tenant(1), [(catalogue.feed("crm.customers"), "c", True, 60.0)], now=10.0
    )
    assert (added, removed) == ([], ["crm.locations", "jpm.jobs"])
    assert gone.removed
    assert t.feeds["crm.customers"].poll_interval == 60.0
    added, _ = tt.reconfigure_tenant(
        tenant(1),
        [(catalogue.feed(f), None, True, 300.0) for f in ("crm.customers", "crm.leads")],
        now=10.0,
    )
    assert added == ["crm.leads"]
    assert t.feeds["crm.leads"].due == 10.0
    t.feeds["crm.customers"].due = 500.0
    tt.push(t.feeds["crm.customers"], 500.0)
    tt.retry_now(1, lambda fs: fs.name == "crm.customers", now=20.0)
    assert t.feeds["crm.customers"].due == 20.0


def test_removed_tenant_is_never_ready() -> None:
    tt = timetable(tenant(1), tenant(2))
    tt.remove_tenant(1)
    assert tt.pop_ready(0.0) == [2]
    assert tt.take(1, 0.0) is None


def test_tenant_added_again_is_ready_when_an_old_poll_ends() -> None:
    """The scheduler's pool counts the old polls of a tenant removed and added again, and may
    pass the new one over while they run: each of them ending makes the new one ready again."""
    tt = timetable(tenant(1))
    assert tt.pop_ready(0.0) == [1]
    old = tt.take(1, 0.0)
    assert old is not None
    tt.remove_tenant(1)
    tt.add_tenant(tenant(1), None, specs(), now=1.0)  # type: ignore[arg-type]
    assert tt.pop_ready(1.0) == [1]  # ... and passed over: the pool has no room for it
    assert tt.pop_ready(2.0) == []
    tt.done(old)
    assert tt.pop_ready(2.0) == [1]
