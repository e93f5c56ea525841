"""The sync engine end to end: real simulator, real Redis, the daemon's own code paths."""

from __future__ import annotations

import asyncio
import json

import redis.asyncio as aioredis
import redis.exceptions

from syncd.daemon import Daemon
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import (
    assert_exactly_once,
    config_dict,
    latest_by_key,
    mutate,
    settings,
    sim_post,
    sim_stats,
    stream_events,
    truth,
)

TENANTS = [1001, 1002, 1003]
FEEDS = [
    "crm.customers",
    "customer-interactions.technician-ratings",
    "jpm.job-history",
    "jpm.appointments",
    "memberships.membership-status-changes",
]


async def lengths(r: aioredis.Redis, tenant: int, feeds: list[str]) -> list[int]:
    """Stream lengths, or [] while the server does not answer."""
    try:
        return [await r.xlen(f"st:{{{tenant}}}:{f}") for f in feeds]
    except redis.exceptions.ConnectionError:
        return []


async def run_once(data: dict[str, object]) -> int:
    return await Daemon(settings(data), once=True).run()


async def test_once_publishes_every_record_exactly_once_then_only_changes(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=TENANTS, records=150, page_size=40, seed=3) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, TENANTS, FEEDS)
        assert await run_once(data) == 0
        for t in TENANTS:
            for f in FEEDS:
                records = await truth(sim.url, t, f)
                events = await stream_events(redis, t, f)
                assert_exactly_once(events, records, where=f"{t}/{f}")
                assert latest_by_key(events) == records
                sample = events[0]
                assert set(sample) >= {"op", "key", "data", "modified_on"}

        changed = {f: set(await mutate(sim.url, 1002, f, 7)) for f in FEEDS[:3]}
        before = {(t, f): len(await stream_events(redis, t, f)) for t in TENANTS for f in FEEDS}
        assert await run_once(data) == 0
        for t in TENANTS:
            for f in FEEDS:
                new = (await stream_events(redis, t, f))[before[t, f] :]
                expected = changed.get(f, set()) if t == 1002 else set()
                assert [e["op"] for e in new] == [b"updated"] * len(expected), f"{t}/{f}"
                assert {e["key"].decode() for e in new} == expected
                records = await truth(sim.url, t, f)
                assert latest_by_key(await stream_events(redis, t, f)) == records

        # A third pass over unchanged data (overlapping pages, replays) adds nothing.
        total = [await redis.xlen(f"st:{{{t}}}:{f}") for t in TENANTS for f in FEEDS]
        assert await run_once(data) == 0
        assert total == [await redis.xlen(f"st:{{{t}}}:{f}") for t in TENANTS for f in FEEDS]


async def test_without_recent_changes_and_upsert_mode(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[2001], records=90, page_size=25, recent_delay=0) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [2001],
            ["crm.customers", "jpm.jobs"],
            include_recent_changes=False,
        )
        data["feeds"] = {"jpm.jobs": {"change_detection": False}}
        assert await run_once(data) == 0
        records = await truth(sim.url, 2001, "crm.customers")
        assert_exactly_once(await stream_events(redis, 2001, "crm.customers"), records)
        jobs = await stream_events(redis, 2001, "jpm.jobs")
        assert {e["op"] for e in jobs} == {b"upsert"}
        assert len(jobs) == 90  # no overlaps without includeRecentChanges
        assert not await redis.exists("st:{2001}:seen:jpm.jobs")


async def test_start_date_skips_older_records(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[2101], records=120, page_size=50) as sim:
        records = await truth(sim.url, 2101, "crm.customers")
        stamps = sorted(r["modifiedOn"] for r in records.values())
        start = stamps[len(stamps) // 2][:10]
        data = config_dict(
            redis_server.url, sim.url, sim.app_key, [2101], ["crm.customers"], start=start
        )
        assert await run_once(data) == 0
        events = await stream_events(redis, 2101, "crm.customers")
        expected = {k for k, r in records.items() if r["modifiedOn"][:10] >= start}
        assert {e["key"].decode() for e in events} == expected
        assert 0 < len(expected) < len(records)


async def test_token_expiry_mid_backfill_costs_nothing(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[3001], records=600, page_size=20) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [3001],
            ["crm.customers"],
            requests_per_second=20.0,
        )
        daemon = Daemon(settings(data), once=True)
        task = asyncio.create_task(daemon.run())
        while await redis.xlen("st:{3001}:crm.customers") < 100:
            await asyncio.sleep(0.02)
        await sim_post(sim.url, "/_sim/tokens/expire")
        assert await asyncio.wait_for(task, 30) == 0
        records = await truth(sim.url, 3001, "crm.customers")
        assert_exactly_once(await stream_events(redis, 3001, "crm.customers"), records)
        stats = await sim_stats(sim.url)
        assert stats["tenants"]["3001"]["token_grants"] == 2


async def test_failing_tenant_does_not_stop_or_slow_others(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[4001, 4002, 4003], records=400, page_size=20) as sim:
        # 4002 answers every request with 429 (tiny rate limit), 4003 is down (503).
        await sim_post(sim.url, "/_sim/tenants/4002/faults", {"rate_limit": 0.2})
        await sim_post(sim.url, "/_sim/tenants/4003/faults", {"error_rate": 1.0, "status": 503})
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [4001, 4002, 4003],
            ["crm.customers", "crm.locations"],
            max_in_flight=4,
        )
        daemon = Daemon(settings(data))
        task = asyncio.create_task(daemon.run())
        loop = asyncio.get_running_loop()
        started = loop.time()
        healthy = {f: await truth(sim.url, 4001, f) for f in ("crm.customers", "crm.locations")}
        while True:
            counts = [len(await stream_events(redis, 4001, f)) for f in healthy]
            if counts == [len(v) for v in healthy.values()]:
                break
            assert loop.time() - started < 20, f"healthy tenant stalled at {counts}"
            await asyncio.sleep(0.1)
        healthy_s = loop.time() - started
        assert await redis.xlen("st:{4003}:crm.customers") == 0
        # The others recover when their trouble ends.
        await sim_post(sim.url, "/_sim/tenants/4002/faults", {})
        await sim_post(sim.url, "/_sim/tenants/4003/faults", {})
        while [await redis.xlen(f"st:{{{t}}}:{f}") for t in (4002, 4003) for f in healthy] != [
            400
        ] * 4:
            assert loop.time() - started < 60, "failing tenants did not recover"
            await asyncio.sleep(0.2)
        assert daemon.scheduler is not None
        daemon.scheduler.stop()
        assert await asyncio.wait_for(task, 10) == 0
        stats = (await sim_stats(sim.url))["tenants"]
        assert stats["4002"]["rate_limited"] > 0
        assert stats["4003"]["errors"] > 0
        assert healthy_s < 10
        for t in (4001, 4002, 4003):
            for f in healthy:
                records = await truth(sim.url, t, f)
                assert_exactly_once(await stream_events(redis, t, f), records, where=f"{t}/{f}")


async def test_redis_restart_mid_run_loses_nothing() -> None:
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    r = aioredis.Redis.from_url(server.url)
    try:
        async with run_simulator(tenants=[5001], records=1500, page_size=25) as sim:
            data = config_dict(
                server.url,
                sim.url,
                sim.app_key,
                [5001],
                ["crm.customers", "jpm.jobs"],
                requests_per_second=30.0,
            )
            daemon = Daemon(settings(data))
            task = asyncio.create_task(daemon.run())
            while await r.xlen("st:{5001}:crm.customers") < 200:
                await asyncio.sleep(0.05)
            await asyncio.to_thread(server.stop, keep_data=True)
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 40
            while await lengths(r, 5001, ["crm.customers", "jpm.jobs"]) != [1500, 1500]:
                assert loop.time() < deadline, "did not recover after the Redis restart"
                await asyncio.sleep(0.2)
            assert daemon.scheduler is not None
            daemon.scheduler.stop()
            assert await asyncio.wait_for(task, 10) == 0
            for f in ("crm.customers", "jpm.jobs"):
                records = await truth(sim.url, 5001, f)
                assert_exactly_once(await stream_events(r, 5001, f), records, where=f)
    finally:
        await r.aclose()
        server.stop()


async def test_dead_letters_and_fence(redis: aioredis.Redis) -> None:
    from syncd import catalogue
    from syncd.engine.publisher import Publisher
    from syncd.servicetitan.client import decode_page

    feed = catalogue.feed("customer-interactions.technician-ratings")
    body = json.dumps(
        {
            "hasMore": False,
            "continueFrom": "c1",
            "data": [
                {"technicianId": 1, "jobId": 2, "rating": 5, "modifiedOn": "2024-01-01T00:00:00Z"},
                {"technicianId": 1, "rating": 4},
                {"technicianId": {"x": 1}, "jobId": 3},
                7,
            ],
        }
    ).encode()
    page = decode_page(body, feed)
    pub = Publisher(redis, "st")
    applied = await pub.apply(9, feed.name, None, page)
    assert (applied.applied, applied.published, applied.dead) == (True, 1, 3)
    events = await stream_events(redis, 9, feed.name)
    assert [(e["op"], e["key"]) for e in events] == [(b"created", b"1:2")]
    assert events[0]["modified_on"] == b"2024-01-01T00:00:00Z"
    dead = await redis.xrange("st:{9}:dead")
    reasons = [fields[b"reason"].decode() for _, fields in dead]
    assert "record has no key (technicianId+jobId)" in reasons
    assert all(fields[b"feed"] == feed.name.encode() for _, fields in dead)
    assert next(fields[b"data"] for _, fields in dead) == b'{"technicianId": 1, "rating": 4}'
    # A second instance applying the same page from the same cursor is refused.
    again = await pub.apply(9, feed.name, None, page)
    assert (again.applied, again.stored) == (False, "c1")
    assert await redis.xlen("st:{9}:crm.customers") == 0
    assert await redis.xlen(f"st:{{9}}:{feed.name}") == 1
    assert await pub.cursors(9) == {feed.name: "c1"}


async def test_fence_tells_an_empty_cursor_from_none(redis: aioredis.Redis) -> None:
    from syncd import catalogue
    from syncd.engine.publisher import Publisher
    from syncd.servicetitan.client import decode_page

    feed = catalogue.feed("crm.customers")
    page = decode_page(b'{"hasMore": false, "continueFrom": "next", "data": [{"id": 1}]}', feed)
    pub = Publisher(redis, "st")
    await redis.hset("st:{8}:cursors", feed.name, "")
    refused = await pub.apply(8, feed.name, None, page)
    assert (refused.applied, refused.stored) == (False, "")
    applied = await pub.apply(8, feed.name, "", page)
    assert (applied.applied, applied.published) == (True, 1)
    await redis.hdel("st:{8}:cursors", feed.name)
    gone = await pub.apply(8, feed.name, "next", page)
    assert (gone.applied, gone.stored) == (False, None)


async def test_restart_keeps_drained_feeds_on_their_rhythm(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[8301], records=40, page_size=20) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [8301],
            ["crm.customers", "jpm.jobs"],
            poll_interval=120.0,
        )
        assert await run_once(data) == 0
        # jpm.jobs was cut short with pages still waiting: it must resume at once.
        await redis.hset("st:{8301}:state", "jpm.jobs:more", "1")
        daemon = Daemon(settings(data))
        task = asyncio.create_task(daemon.run())
        while daemon.scheduler is None or 8301 not in daemon.scheduler.tenants:
            await asyncio.sleep(0.01)
        now = daemon.scheduler.clock()
        feeds = daemon.scheduler.tenants[8301].feeds
        assert 100.0 < feeds["crm.customers"].due - now <= 120.0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while feeds["jpm.jobs"].last_ok is None:  # polled right after the restart
            assert loop.time() < deadline, "the interrupted feed did not resume at once"
            await asyncio.sleep(0.02)
        assert feeds["crm.customers"].last_ok is None
        daemon.scheduler.stop()
        assert await asyncio.wait_for(task, 10) == 0
        state = await redis.hgetall("st:{8301}:state")
        assert state[b"crm.customers:more"] == b"0"
