"""The scheduler end to end when the API misbehaves: pages that make no progress, tenants
whose requests or token endpoint hang. Real simulator (its per-tenant quirks), real Redis."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.config import Secret
from syncd.daemon import Daemon
from syncd.engine.scheduler import Scheduler
from syncd.errors import TransientError
from syncd.servicetitan.auth import TokenProvider
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import (
    assert_exactly_once,
    config_dict,
    mutate,
    settings,
    sim_stats,
    stream_events,
    truth,
)

CUSTOMERS = "crm.customers"
TEN_FEEDS = [
    "crm.customers",
    "crm.locations",
    "crm.leads",
    "jpm.jobs",
    "jpm.appointments",
    "jpm.job-history",
    "accounting.payments",
    "accounting.invoices",
    "customer-interactions.technician-ratings",
    "memberships.membership-status-changes",
]


def events_named(logs: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def until(condition: Any, what: str, timeout: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await condition():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("cursor", ["same", "empty", "null", "missing", "alternate"])
async def test_no_progress_feed_fails_a_once_run_after_its_failures(
    redis: aioredis.Redis, redis_server: RedisServer, cursor: str
) -> None:
    """hasMore true, no records, and the cursor it was asked with (or none at all, or one it
    was asked with two pages before: A -> B -> A): --once
    gives up on the feed after once_max_failures such pages (one request each, not thousands)
    and exits 1; the episode is logged once, with what the API sent; another tenant completes.
    """
    stuck, fine = 7001, 7003
    async with run_simulator(
        tenants=[stuck, fine],
        records=90,
        page_size=30,
        tenant_quirks={stuck: {"no_progress": 1.0, "no_progress_cursor": cursor}},
    ) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [stuck, fine], [CUSTOMERS])
        data["engine"]["once_max_failures"] = 4
        with capture_logs() as logs:
            code = await asyncio.wait_for(Daemon(settings(data), once=True).run(), 60)
        assert code == 1
        served = (await sim_stats(sim.url))["tenants"][str(stuck)]["no_progress"]
        # With "same", the first page (asked without a cursor) names one: that is progress;
        # alternating, so is the second (B), until A comes back.
        assert served == 4 + {"same": 1, "alternate": 2}.get(cursor, 0)
        [stalled] = events_named(logs, "feed_no_progress")
        assert (stalled["tenant"], stalled["feed"]) == (stuck, CUSTOMERS)
        assert (stalled["has_more"], stalled["records"]) == (True, 0)
        named = cursor in ("same", "alternate")
        assert stalled["cursor_repeated"] is named
        assert stalled["cursor_missing"] is not named
        assert stalled["log_level"] == "warning"
        [failed] = events_named(logs, "feed_failed")
        assert (failed["tenant"], failed["feed"]) == (stuck, CUSTOMERS)
        assert "no progress" in failed["error"]
        state = await redis.hgetall(f"st:{{{stuck}}}:state")
        assert b"no progress" in state[b"crm.customers:last_error"]
        records = await truth(sim.url, fine, CUSTOMERS)
        assert_exactly_once(await stream_events(redis, fine, CUSTOMERS), records)


async def test_no_progress_episode_backs_off_and_ends_when_the_api_moves_on(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A running daemon retries a stalled feed with backoff, logs the episode once however
    many stalled pages come, and once the API moves on again finishes the feed."""
    tenant = 7002
    async with run_simulator(
        tenants=[tenant], records=90, page_size=30, tenant_quirks={tenant: {"no_progress": 1.0}}
    ) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [CUSTOMERS])
        data["engine"].update(backoff_base=0.02, backoff_max=0.1)
        daemon = Daemon(settings(data))
        with capture_logs() as logs:
            task = asyncio.create_task(daemon.run())

            async def stalled_often() -> bool:
                stats = (await sim_stats(sim.url))["tenants"].get(str(tenant), {})
                return int(stats.get("no_progress", 0)) >= 8

            await until(stalled_often, "the stalled feed was not retried")
            assert len(events_named(logs, "feed_no_progress")) == 1
            assert daemon.scheduler is not None
            fs = daemon.scheduler.tenants[tenant].feeds[CUSTOMERS]
            assert fs.stuck
            assert fs.failures >= 6
            sim.set_quirks(tenant, no_progress=0.0)
            records = await truth(sim.url, tenant, CUSTOMERS)

            async def synced() -> bool:
                return len(await stream_events(redis, tenant, CUSTOMERS)) == len(records)

            await until(synced, "the feed did not resume")
            daemon.scheduler.stop()
            assert await asyncio.wait_for(task, 30) == 0
        assert len(events_named(logs, "feed_no_progress")) == 1
        assert len(events_named(logs, "feed_progress_resumed")) == 1
        assert not fs.stuck
        assert fs.failures == 0
        assert_exactly_once(await stream_events(redis, tenant, CUSTOMERS), records)


async def test_a_bug_in_a_poll_and_in_its_rescheduling_stops_only_that_feed(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A poll that crashes, and whose rescheduling crashes too, leaves the scheduler running:
    the feed is tried again after the longest backoff, the other tenant syncs completely."""
    broken, fine = 7201, 7202
    async with run_simulator(tenants=[broken, fine], records=60, page_size=30) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [broken, fine], [CUSTOMERS])
        data["engine"]["backoff_max"] = 600.0
        daemon = Daemon(settings(data))
        with capture_logs() as logs:
            task = asyncio.create_task(daemon.run())
            while daemon.scheduler is None or broken not in daemon.scheduler.tenants:
                await asyncio.sleep(0.01)
            sched = daemon.scheduler
            poll, after = sched._poll, sched._after

            async def crashing_poll(fs: Any) -> None:
                if fs.tenant.id == broken:
                    raise RuntimeError("a bug in a poll")
                await poll(fs)

            def crashing_after(fs: Any, outcome: Any, **kw: Any) -> Any:
                if fs.tenant.id == broken:
                    raise RuntimeError("a bug in the rescheduling")
                return after(fs, outcome, **kw)

            sched._poll = crashing_poll  # type: ignore[method-assign]
            sched._after = crashing_after  # type: ignore[method-assign]
            records = await truth(sim.url, fine, CUSTOMERS)

            async def fine_synced() -> bool:
                return len(await stream_events(redis, fine, CUSTOMERS)) == len(records)

            await until(fine_synced, "the healthy tenant did not sync")
            fs = sched.tenants[broken].feeds[CUSTOMERS]
            await until(
                lambda: asyncio.sleep(0, result=bool(events_named(logs, "poll_reschedule_failed"))),
                "the rescheduling did not fail",
            )
            assert not sched.crashed
            assert fs.due - sched.clock() > 500
            sched.stop()
            assert await asyncio.wait_for(task, 30) == 0
        assert_exactly_once(await stream_events(redis, fine, CUSTOMERS), records)


HANGING = list(range(7101, 7110))
HEALTHY = 7110


@pytest.mark.parametrize("where", ["requests", "token"])
async def test_healthy_tenant_backfills_beside_nine_hanging_ones(
    redis: aioredis.Redis, redis_server: RedisServer, where: str
) -> None:
    """Default pool and per-tenant limits (64 workers, 8 in flight: 9 x 8 > 64). Nine tenants
    whose requests (or token requests) never end hold their share of the pool and no more;
    the tenth backfills all its feeds, and later picks up changes, while they still hang."""
    tenants = [*HANGING, HEALTHY]
    quirk = "hang" if where == "requests" else "hang_token"
    async with run_simulator(
        tenants=tenants,
        records=60,
        page_size=20,
        seed=5,
        tenant_quirks={t: {quirk: 1.0} for t in HANGING},
    ) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, tenants, TEN_FEEDS)
        # Hangs outlast the test: what is measured is the pool, not a timeout ending them.
        data["servicetitan"].update(request_timeout=600.0, token_timeout=600.0)
        data["defaults"].update(poll_interval=0.5)
        data["engine"]["shutdown_grace"] = 0.5
        s = settings(data)
        assert (s.config.engine.workers, s.tenants[0].max_in_flight) == (64, 8)
        daemon = Daemon(s)
        task = asyncio.create_task(daemon.run())
        records = {f: await truth(sim.url, HEALTHY, f) for f in TEN_FEEDS}

        async def hanging_now() -> dict[int, int]:
            """Each hanging tenant's requests unanswered right now; with the token endpoint
            hanging, its polls waiting for a token that has not come (nor failed) yet."""
            stats = (await sim_stats(sim.url))["tenants"]
            if where == "requests":
                return {t: int(stats.get(str(t), {}).get("in_flight", 0)) for t in HANGING}
            sched = daemon.scheduler
            if sched is None:
                return dict.fromkeys(HANGING, 0)
            waiting = {}
            for t in HANGING:
                state = sched.tenants.get(t)
                hung = int(stats.get(str(t), {}).get("hung", 0))
                alive = state is not None and state.tokens.last_error is None and hung >= 1
                waiting[t] = state.inflight if state is not None and alive else 0
            return waiting

        async def healthy_synced() -> bool:
            assert max((await hanging_now()).values()) <= 8
            counts = [len(await stream_events(redis, HEALTHY, f)) for f in TEN_FEEDS]
            return counts == [len(records[f]) for f in TEN_FEEDS]

        await until(healthy_synced, "the healthy tenant did not finish its backfill", 90)
        assert daemon.scheduler is not None
        hanging = await hanging_now()
        assert min(hanging.values()) >= 1, hanging  # all nine still hang
        assert sum(hanging.values()) <= 64
        assert daemon.liveness()[0]
        # Afterwards too, while the healthy tenant is idle between polls, the hanging ones
        # cannot take the whole pool: its next poll finds a worker and picks up changes.
        changed = set(await mutate(sim.url, HEALTHY, CUSTOMERS, 5))

        async def changes_seen() -> bool:
            events = await stream_events(redis, HEALTHY, CUSTOMERS)
            return {e["key"].decode() for e in events if e["op"] == b"updated"} >= changed

        await until(changes_seen, "the healthy tenant's changes were not picked up", 60)
        assert min((await hanging_now()).values()) >= 1
        stats = (await sim_stats(sim.url))["tenants"]
        assert stats[str(HEALTHY)]["max_in_flight"] <= 8
        assert all(stats[str(t)]["max_in_flight"] <= 8 for t in HANGING if str(t) in stats)
        grants = [stats.get(str(t), {}).get("token_grants", 0) for t in HANGING]
        assert all(g >= 1 for g in grants) if where == "requests" else not any(grants)
        daemon.scheduler.stop()
        assert await asyncio.wait_for(task, 30) == 0
        for f in TEN_FEEDS:
            events = await stream_events(redis, HEALTHY, f)
            created = [e for e in events if e["op"] == b"created"]
            assert_exactly_once(created, records[f], where=f)


async def test_token_endpoint_has_its_own_timeout() -> None:
    """A token endpoint that does not answer fails the renewal after token_timeout, not after
    the session's (much longer) request timeout."""
    async with (
        run_simulator(tenants=[7201], tenant_quirks={7201: {"hang_token": 1.0}}) as sim,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session,
    ):
        tokens = TokenProvider(
            session, sim.auth_url, 7201, "client-7201", Secret("secret-7201"), timeout=0.3
        )
        with pytest.raises(TransientError, match=r"did not answer within 0.3s"):
            await asyncio.wait_for(tokens.token(), 30)
        assert tokens.last_error is not None
        stats = await sim_stats(sim.url)
        assert stats["tenants"]["7201"]["hung"] == 1


@pytest.mark.parametrize("how", ["grace", "force"])
async def test_shutdown_cancels_hanging_polls(
    redis: aioredis.Redis, redis_server: RedisServer, how: str
) -> None:
    """Stopping waits for polls under way for the grace period, or until forced, then
    cancels them: a hanging request never holds the daemon up."""
    tenant = 7301
    async with run_simulator(tenants=[tenant], tenant_quirks={tenant: {"hang": 1.0}}) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [CUSTOMERS])
        data["servicetitan"]["request_timeout"] = 600.0
        data["engine"]["shutdown_grace"] = 0.3 if how == "grace" else 40.0
        daemon = Daemon(settings(data))
        with capture_logs() as logs:
            task = asyncio.create_task(daemon.run())

            async def hanging() -> bool:
                stats = (await sim_stats(sim.url))["tenants"].get(str(tenant), {})
                return int(stats.get("in_flight", 0)) >= 1

            await until(hanging, "the request did not reach the simulator")
            assert daemon.scheduler is not None
            daemon.scheduler.stop()
            if how == "force":
                await asyncio.sleep(0.2)
                assert not task.done()  # still in its grace period
                daemon.scheduler.force()
            assert await asyncio.wait_for(task, 30) == 0
        assert events_named(logs, "shutdown_grace_expired")
        assert daemon.scheduler.running_polls() == 0
        assert await redis.hget(f"st:{{{tenant}}}:cursors", CUSTOMERS) is None


async def test_stop_during_startup_with_a_silent_redis() -> None:
    """A Redis that accepts connections and never answers (stopped with SIGSTOP) holds the
    startup; a stop signal ends it at once, not after the Redis socket timeout."""
    server = RedisServer()
    server.start()
    assert server.proc is not None
    tenant = 7401
    try:
        async with run_simulator(tenants=[tenant]) as sim:
            data = config_dict(server.url, sim.url, sim.app_key, [tenant], [CUSTOMERS])
            data["redis"]["timeout"] = 600.0
            os.kill(server.proc.pid, signal.SIGSTOP)
            daemon = Daemon(settings(data))
            with capture_logs() as logs:
                task = asyncio.create_task(daemon.run())

                async def started() -> bool:
                    return daemon.scheduler is not None

                await until(started, "the daemon did not begin its startup")
                await asyncio.sleep(0.3)  # its first Redis call is under way, unanswered
                assert not task.done()
                assert daemon.scheduler is not None
                daemon.scheduler.stop()
                assert await asyncio.wait_for(task, 30) == 0
            assert not events_named(logs, "started")
            assert daemon.scheduler.tenants == {}
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()


async def test_a_cancel_that_comes_with_a_wake_is_not_lost() -> None:
    """Whatever wakes the dispatcher (a poll that ends, stop()) in the same step as the
    scheduler's task is cancelled: the cancellation still ends the run, rather than being
    swallowed (which left a cancelled daemon polling on)."""
    sched = Scheduler(None, None)  # type: ignore[arg-type]
    running = asyncio.create_task(sched.run(grace=0))
    for _ in range(10):  # the dispatcher is asleep, nothing being due
        await asyncio.sleep(0)
    assert not running.done()
    sched.stop()
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
