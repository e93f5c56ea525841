"""A fleet taking over a tenant in the middle of its reconciliation pass: the new owner goes on
where the pass was, and each key gone upstream is reported deleted once."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from syncd.daemon import Daemon
from syncd.keys import Keys
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, settings, stream_events
from tests.test_reconcile import FEED, mutate, ops

LEASE = 2.0


async def test_a_takeover_mid_pass_goes_on_and_reports_each_delete_once(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant = 9201
    keys = Keys("st", tenant)
    async with run_simulator(tenants=[tenant], records=3000, page_size=100, seed=2) as sim:
        data = config_dict(
            redis_server.url, sim.url, sim.app_key, [tenant], [FEED], poll_interval=30.0
        )
        assert await Daemon(settings(data), once=True).run() == 0
        gone = await mutate(sim.url, tenant, "delete", 50)
        # Slow passes (a few requests a second), so that the owner dies in the middle of one.
        data["defaults"]["requests_per_second"] = 6.0
        data["feeds"] = {FEED: {"reconcile_interval": 3600.0}}
        data["fleet"] = {"enabled": True, "lease": LEASE}
        a = asyncio.create_task(Daemon(settings(data), instance="a").run())
        try:
            for _ in range(400):
                if await redis.hget(keys.index(FEED), "pass_cursor"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("a's pass never fetched a page")
            assert await redis.hget(keys.state, f"{FEED}:pass_finished") is None
        finally:
            a.cancel()  # a crash: its lease runs out, nothing handed over
            await asyncio.gather(a, return_exceptions=True)
        fetched = await redis.hget(keys.index(FEED), "pass_fetched")
        b_daemon = Daemon(settings(data), instance="b")
        b = asyncio.create_task(b_daemon.run())
        try:
            for _ in range(1200):
                if await redis.hget(keys.state, f"{FEED}:pass_finished"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("b never finished the pass")
        finally:
            b.cancel()
            await asyncio.gather(b, return_exceptions=True)
    reported = ops(await stream_events(redis, tenant, FEED), "deleted")
    assert sorted(reported) == sorted(gone)
    state = await redis.hgetall(keys.state)
    assert int(state[f"{FEED}:pass_deleted".encode()]) == len(gone)
    # b went on from where a was: the pass fetched each page about once, not twice.
    assert int(state[f"{FEED}:pass_fetched".encode()]) < 2 * 3000
    assert fetched is not None
