"""`syncd mirror` through restarts of the servers it stands on: PostgreSQL or Redis restarted in
the middle of a backfill, it waits, carries on, and its tables end equal to the ground truth
(each key's newest version: nothing lost, nothing older winning), nothing dead-lettered and
nothing left pending in its group."""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Subscription
from syncd.consumer.events import parse_stream
from syncd.consumer.trimmed import missed
from syncd.daemon import Daemon
from syncd.mirror import Mirror
from syncd.testing.postgres_server import PostgresServer, find_bindir
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import RunningSimulator, run_simulator
from tests.engine_helpers import mutate, settings, truth
from tests.mirror_helpers import GROUP, caught_up, mirror_config, running_mirror, table
from tests.test_consumer_faults import until

TENANT = 6464
FEEDS = ["crm.customers", "jpm.jobs"]
SUBS = [Subscription(TENANT, FEEDS)]
RECORDS = 1500
# Events applied before the restart: the backfill under way, far from its end.
UNDER_WAY = 300


def simulator() -> AbstractAsyncContextManager[RunningSimulator]:
    """The upstream of a backfill: 1,500 records a feed, some keys published twice."""
    return run_simulator(
        tenants=[TENANT], records=RECORDS, page_size=500, seed=12, quirks={"duplicate_keys": 0.2}
    )


def config(redis_url: str, pg_url: str, sim: RunningSimulator) -> dict[str, Any]:
    # Small batches: the backfill takes hundreds of transactions, the restart lands amid them.
    return mirror_config(redis_url, pg_url, [TENANT], FEEDS, sim.url, sim.app_key, batch=10)


async def publish_backfill(r: aioredis.Redis, sim: RunningSimulator, data: dict[str, Any]) -> int:
    """Every record published, then newer versions of some behind their first ones; how many
    events the streams hold."""
    assert await Daemon(settings(data), once=True).run() == 0
    for feed in FEEDS:
        await mutate(sim.url, TENANT, feed, 200)
    assert await Daemon(settings(data), once=True).run() == 0
    return sum([await r.xlen(f"st:{{{TENANT}}}:{feed}") for feed in FEEDS])


async def assert_mirrored(
    r: aioredis.Redis, pg_url: str, sim: RunningSimulator, mirror: Mirror, total: int
) -> None:
    """The tables hold each key's newest version; nothing refused, dead-lettered or pending."""
    for feed in FEEDS:
        expected = {(TENANT, k): v for k, v in (await truth(sim.url, TENANT, feed)).items()}
        assert await table(pg_url, feed) == expected, feed
    assert mirror.refused == 0
    assert mirror.applied >= total  # some events applied twice: never fewer than all
    assert await r.xlen(f"st:{{{TENANT}}}:dead") == 0
    for feed in FEEDS:
        (group,) = await r.xinfo_groups(f"st:{{{TENANT}}}:{feed}")
        assert group["name"].decode() == GROUP
        assert (group["pending"], group["lag"]) == (0, 0), feed


async def restart_mid_backfill(
    r: aioredis.Redis, redis_url: str, pg_url: str, server: RedisServer | PostgresServer
) -> list[dict[str, Any]]:
    """A backfill by a mirror, `server` restarted in its middle (in a thread: the mirror goes
    on meanwhile and meets the server gone); its tables then hold the ground truth. What the
    mirror logged."""
    async with simulator() as sim:
        data = config(redis_url, pg_url, sim)
        total = await publish_backfill(r, sim, data)
        with capture_logs() as logs:
            async with running_mirror(data) as mirror:
                await until(lambda: mirror.applied >= UNDER_WAY, "the backfill under way")
                before = mirror.applied
                await asyncio.to_thread(server.restart)
                assert before < total, "restarted after the backfill, not in the middle"
                await until(lambda: caught_up(r, SUBS), "the mirror to catch up")
        await assert_mirrored(r, pg_url, sim, mirror, total)
    return logs


async def test_a_postgresql_restart_mid_backfill_leaves_the_tables_equal_to_the_truth(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    bindir = find_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server programs (initdb) for a server of this test's own")
    # A server of its own: restarting the session's would pull it from under other tests.
    server = PostgresServer(bindir)
    await asyncio.to_thread(server.start)
    try:
        pg_url = server.url(await asyncio.to_thread(server.create_database))
        logs = await restart_mid_backfill(redis, redis_server.url, pg_url, server)
        # A batch was held while PostgreSQL was down, then applied once it was back.
        held = [e for e in logs if e["event"] == "mirror_postgres_unavailable"]
        assert held
        assert all("events" in e for e in held), held  # in a batch, not at start
        assert [e for e in logs if e["event"] == "mirror_postgres_available"]
        assert not [e for e in logs if e["event"] == "consumer_handler_outage"]
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_redis_restart_mid_backfill_leaves_the_tables_equal_to_the_truth(
    pg_url: str,
) -> None:
    # A server of its own, saving every write (AOF) so the streams and the group outlive the
    # restart; restarting the session's server would pull it from under other tests.
    server = RedisServer(extra_args=["--appendonly", "yes"])
    await asyncio.to_thread(server.start)
    r = aioredis.Redis.from_url(server.url)
    try:
        run_id = (await r.info("server"))["run_id"]
        logs = await restart_mid_backfill(r, server.url, pg_url, server)
        assert (await r.info("server"))["run_id"] != run_id  # restarted, and persisted
        # The group came back with the streams: found again, not made anew; and what Redis
        # counts it read came back with it: no gap is taken for events missed.
        streams = {s: parse_stream(s, "st") for sub in SUBS for s in sub.streams()}
        assert await missed(r, "st", GROUP, streams) == []
        names = {e["event"] for e in logs}
        assert not names & {"consumer_group_missing", "consumer_group_recreated"}, names
        assert "consumer_handler_outage" not in names
    finally:
        await r.aclose()
        await asyncio.to_thread(server.stop)
