"""A feed's next page fetched while its page is applied: the decision (a table), the pages held
(real tasks), and a backfill end to end on the simulator and a real Redis: exactly once, no
request more than pages, within the tenant's max_in_flight and request rate."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.daemon import Daemon
from syncd.engine.ahead import AHEAD_MAX, AheadFacts, FetchAhead, may_fetch_ahead
from syncd.engine.due import FeedState
from syncd.servicetitan.page import Page
from syncd.simulator.faults import FaultOverrides
from syncd.simulator.limits import TokenBucket as SimBucket
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import (
    assert_exactly_once,
    config_dict,
    settings,
    sim_stats,
    stream_events,
    truth,
)

CUSTOMERS = "crm.customers"
LOCATIONS = "crm.locations"

GO = AheadFacts(
    has_more=True,
    next_cursor="c2",
    replicas_waited=False,
    stopping=False,
    held=False,
    tenant_paused=False,
    feed_paused=False,
    outstanding=0,
    worker_spare=True,
)


@pytest.mark.parametrize(
    ("change", "fetch"),
    [
        ({}, True),
        ({"outstanding": AHEAD_MAX - 1}, True),
        ({"has_more": False}, False),  # the feed's end: nothing after it yet
        ({"next_cursor": ""}, False),  # no cursor to ask with
        ({"replicas_waited": True}, False),  # nothing past a cursor replicas may not hold
        ({"stopping": True}, False),
        ({"held": True}, False),  # Redis unreachable or full: nothing new starts
        ({"tenant_paused": True}, False),  # a 429's wait is not over
        ({"feed_paused": True}, False),
        ({"outstanding": AHEAD_MAX}, False),  # memory: a page held each
        ({"worker_spare": False}, False),  # max_in_flight, shares: as for any poll
    ],
)
def test_when_a_page_is_fetched_ahead(change: dict[str, Any], fetch: bool) -> None:
    assert may_fetch_ahead(dataclasses.replace(GO, **change)) is fetch


def _page(cursor: str) -> Page:
    return Page(True, cursor, [], [], [], [], [])


async def test_a_page_fetched_ahead_goes_only_to_the_poll_that_asks_for_its_cursor() -> None:
    ahead = FetchAhead()
    fs = FeedState(None, None, "c1", True, 30.0)  # type: ignore[arg-type]
    ended: list[str] = []

    async def fetch() -> Page:
        return _page("c3")

    ahead.start(fs, "c2", fetch, lambda: ended.append("one"))
    task = ahead.take(fs, "c2")
    assert task is not None
    page = await task
    assert page is not None
    assert page.continue_from == "c3"
    assert ahead.take(fs, "c2") is None  # taken once
    # Asked with another cursor (the page before was not applied, or another instance moved
    # the feed on): dropped, its fetch cancelled, and its worker given back all the same.
    gate = asyncio.Event()

    async def slow() -> Page:
        await gate.wait()
        return _page("c4")

    ahead.start(fs, "c3", slow, lambda: ended.append("two"))
    assert len(ahead) == 1
    assert ahead.take(fs, "c2") is None
    assert len(ahead) == 0
    for _ in range(5):  # the cancellation, then the task's callbacks
        await asyncio.sleep(0)
    assert ended == ["one", "two"]


async def test_a_failed_fetch_ahead_reaches_its_poll_and_close_cancels_the_rest() -> None:
    ahead = FetchAhead()
    one = FeedState(None, None, "a", True, 30.0)  # type: ignore[arg-type]
    two = FeedState(None, None, "b", True, 30.0)  # type: ignore[arg-type]
    ended: list[FeedState] = []

    async def failing() -> Page:
        raise ConnectionError("reset")

    async def hanging() -> Page:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    ahead.start(one, "a2", failing, lambda: ended.append(one))
    ahead.start(two, "b2", hanging, lambda: ended.append(two))
    task = ahead.take(one, "a2")
    assert task is not None
    with pytest.raises(ConnectionError):
        await task
    await ahead.close()
    assert len(ahead) == 0
    assert ended == [one, two]


@pytest.mark.parametrize(
    ("max_in_flight", "rate"),
    [(1, 10.0), (2, 10.0), (2, 60.0)],
)
async def test_a_backfill_fetches_ahead_within_the_tenants_limits(
    redis: aioredis.Redis, redis_server: RedisServer, max_in_flight: int, rate: float
) -> None:
    """Pages are fetched while the one before is applied, unless the tenant's max_in_flight
    leaves no room (every page after the first when neither it nor the rate holds them back:
    at 60 requests/s the burst of 10 tokens covers the 8 pages, each a token net, the poll
    giving back the one it did not use): one request a page, never more in flight than
    max_in_flight, never over the request rate (the simulator answers 429 over it), and every
    record published once."""
    tenant = 7301
    records = 210 if rate == 60.0 else 600
    async with run_simulator(
        tenants=[tenant], records=records, page_size=30, rate_limit=rate * 1.2
    ) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [CUSTOMERS])
        data["defaults"].update(requests_per_second=rate, max_in_flight=max_in_flight)
        with capture_logs() as logs:
            assert await asyncio.wait_for(Daemon(settings(data), once=True).run(), 60) == 0
        pages = [e for e in logs if e["event"] == "page_applied"]
        assert len(pages) >= records // 30  # 30 a page, pages overlapping a little
        ahead = sum(e["fetched_ahead"] for e in pages)
        if max_in_flight == 1:
            assert ahead == 0
        elif rate == 60.0:
            assert ahead == len(pages) - 1
        else:  # a token a page: a page is fetched ahead when one is left (the burst's first)
            assert ahead > 0
        stats = (await sim_stats(sim.url))["tenants"][str(tenant)]
        assert stats["requests"] == len(pages)
        assert stats["rate_limited"] == 0
        assert stats["max_in_flight"] <= max_in_flight
        records = await truth(sim.url, tenant, CUSTOMERS)
        assert_exactly_once(await stream_events(redis, tenant, CUSTOMERS), records)


class RecordingBucket(SimBucket):
    """The simulator's per-tenant limiter, recording when each export request reached it and
    what it answered (0.0: allowed, else the wait it announced in Retry-After)."""

    seen: list[tuple[float, float]]

    def take(self, now: float) -> float:
        wait = super().take(now)
        self.seen.append((now, wait))
        return wait


def _requests_inside_retry_after(seen: list[tuple[float, float]]) -> list[str]:
    """Export requests that reached the API while a 429 it answered earlier still asked the
    tenant to wait (Retry-After: whole seconds, rounded up), with 50 ms of slack either side
    for requests already on their way when the 429 was sent."""
    bad = []
    for at, wait in seen:
        if wait <= 0:
            continue
        until = at + max(1, math.ceil(wait))
        for later, _ in seen:
            if at + 0.05 < later < until - 0.05:
                bad.append(f"request {later - at:.3f}s after a 429 asking for {until - at:.0f}s")
    return bad


async def test_no_request_goes_out_while_a_429_pause_lasts(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A 429 pauses the tenant for the announced wait, fetches ahead too. Two feeds of one
    tenant: both polls go at once, the API lets one through (slowly) and answers the other
    429, Retry-After 1 s. The slow page arrives within that second with more after it: the
    page after it is not fetched before the pause is over."""
    tenant = 7601
    async with run_simulator(
        tenants=[tenant], records=600, page_size=30, rate_limit=1.0, fault_latency=500.0
    ) as sim:
        bucket = RecordingBucket(1.0)
        bucket.seen = []
        sim.state.buckets[tenant] = bucket
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [CUSTOMERS, LOCATIONS])
        data["defaults"].update(requests_per_second=50.0, max_in_flight=4)
        daemon = Daemon(settings(data))
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.sleep(4.0)
        finally:
            assert daemon.scheduler is not None
            daemon.scheduler.stop()
            assert await asyncio.wait_for(task, 30) == 0
        assert any(wait > 0 for _, wait in bucket.seen)  # the scenario happened
        assert _requests_inside_retry_after(bucket.seen) == []


async def test_a_429_answered_to_a_fetch_ahead_that_is_dropped_still_pauses_the_tenant(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A 429 pauses the tenant however its request was made. One feed, an API letting one
    request through every 20 s. Page 1 is fetched (slowly); the page after it, fetched ahead,
    is answered 429, Retry-After 20 s; page 1's apply then fails (Redis unreachable for a
    moment), so the next poll asks for page 1 again and the page fetched ahead is dropped:
    its 429 paused the tenant all the same, and no request goes out inside the 20 s."""
    from syncd.testing.tcpproxy import proxy

    tenant = 7621
    async with (
        proxy(redis_server.port) as link,
        run_simulator(
            tenants=[tenant], records=600, page_size=30, rate_limit=0.05, fault_latency=1000.0
        ) as sim,
    ):
        bucket = RecordingBucket(0.05)
        bucket.seen = []
        sim.state.buckets[tenant] = bucket
        data = config_dict(link.url, sim.url, sim.app_key, [tenant], [CUSTOMERS])
        data["redis"]["timeout"] = 1.0
        data["defaults"].update(requests_per_second=50.0, max_in_flight=2)
        with capture_logs() as logs:
            daemon = Daemon(settings(data))
            task = asyncio.create_task(daemon.run())
            try:
                deadline = time.monotonic() + 10
                while not bucket.seen:  # page 1's request reached the API (held 0.5-1.5 s)
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.005)
                link.cut(close=True)
                while not any(e["event"] == "redis_unavailable" for e in logs):
                    assert time.monotonic() < deadline + 10, "page 1's apply did not fail"
                    await asyncio.sleep(0.02)
                link.restore()
                await asyncio.sleep(4.0)
            finally:
                assert daemon.scheduler is not None
                daemon.scheduler.stop()
                await asyncio.wait_for(task, 30)
        ahead_429 = [w for _, w in bucket.seen[1:2] if w > 0]
        assert ahead_429, f"the scenario did not happen: {bucket.seen}"  # the fetch ahead's 429
        paused = [e for e in logs if e["event"] == "rate_limited"]
        assert _requests_inside_retry_after(bucket.seen) == [], (bucket.seen, paused)


async def test_a_feed_goes_on_after_a_reload_lowers_max_in_flight_during_a_fetch_ahead(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Any
) -> None:
    """A reload lowers a backfilling tenant's max_in_flight from 2 to 1 while page N is being
    applied (Redis writes paused a moment, as a busy Redis would) and page N+1 is fetched ahead
    (slowly). The pool finds the tenant at its cap while the fetch ahead holds its worker; once
    that worker is given back the tenant is ready again, and the feed is synced to its end."""
    from tests.test_reload import running_daemon, write_config

    tenant = 7631
    path = tmp_path / "syncd.toml"
    async with run_simulator(
        tenants=[tenant], records=900, page_size=30, fault_latency=300.0
    ) as sim:
        stats = sim.state.tenant_stats(tenant)
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [CUSTOMERS])
        data["defaults"].update(requests_per_second=50.0, max_in_flight=2)
        records = await truth(sim.url, tenant, CUSTOMERS)
        async with running_daemon(data, path) as daemon:
            deadline = time.monotonic() + 20
            while len(await stream_events(redis, tenant, CUSTOMERS)) < 90:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            # A request in flight now: from here on its poll's page N waits for Redis writes,
            # and the request for page N+1 (fetched ahead) takes 3 to 9 s.
            while stats.in_flight < 1:
                await asyncio.sleep(0.001)
            seen = stats.requests
            sim.state.set_overrides(tenant, FaultOverrides(latency_ms=6000.0))
            await redis.execute_command("CLIENT", "PAUSE", "2000", "WRITE")
            while stats.requests == seen:  # page N+1's request arrived (fetched ahead)
                assert time.monotonic() < deadline + 10, "no fetch ahead"
                await asyncio.sleep(0.001)
            sim.state.set_overrides(tenant, FaultOverrides(latency_ms=50.0))
            data["defaults"]["max_in_flight"] = 1
            write_config(path, data)
            assert await daemon.reload()
            # 900 records: about 20 pages left at about 20 a second once the slow one is in.
            deadline = time.monotonic() + 30
            done = 0
            while time.monotonic() < deadline:
                done = len(await stream_events(redis, tenant, CUSTOMERS))
                if done >= len(records):
                    break
                await asyncio.sleep(0.2)
            assert daemon.scheduler is not None
            sched = daemon.scheduler
            t = sched.tenants[tenant]
            fs = t.feeds[CUSTOMERS]
            state = (
                f"pool busy {sched.pool.busy}, tenant inflight {t.inflight}, feed running "
                f"{fs.running}, due in {fs.due - sched.clock():.1f}s, aheads {len(sched._ahead)}"
            )
        assert done >= len(records), f"feed stalled at {done}/{len(records)} events: {state}"
