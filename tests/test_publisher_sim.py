"""The page script's promises against the simulator at its unkindest, through the daemon."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from syncd.daemon import Daemon
from syncd.servicetitan.page import sortable_instant
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, latest_by_key, mutate, settings, stream_events, truth

TENANT = 5151
FEEDS = ["crm.customers", "customer-interactions.technician-ratings"]
QUIRKS = {
    "stale_repeats": 0.5,  # the repeated tail of a drained feed holds older versions
    "duplicate_keys": 0.3,  # a key twice in a page, one of them its previous version
    "out_of_order": 0.5,
    "shared_timestamps": 0.5,
    "required_nulls": 0.2,
    "enum_integers": 0.2,
    "naive_timestamps": 0.3,  # no zone, 0 to 9 fractional digits
    "keyless": 0.1,
}


async def create(sim_url: str, feed: str, count: int) -> None:
    url = f"{sim_url}/_sim/tenants/{TENANT}/feeds/{feed}/mutate"
    params = {"kind": "create", "count": str(count)}
    async with aiohttp.ClientSession() as s, s.post(url, params=params) as resp:
        resp.raise_for_status()


async def keyless(sim_url: str, feed: str) -> Any:
    url = f"{sim_url}/_sim/tenants/{TENANT}/feeds/{feed}/truth"
    async with aiohttp.ClientSession() as s, s.get(url) as resp:
        resp.raise_for_status()
        return (await resp.json())["keyless"]


async def test_an_unkind_api_gives_each_version_once_never_back_in_time(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(
        tenants=[TENANT], records=120, page_size=30, seed=11, quirks=QUIRKS
    ) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [TENANT], FEEDS)
        daemon = Daemon(settings(data), once=True)
        assert await daemon.run() == 0
        for _ in range(2):
            for feed in FEEDS:
                await mutate(sim.url, TENANT, feed, 15)
                await create(sim.url, feed, 20)  # some without a usable key
            assert await Daemon(settings(data), once=True).run() == 0
        dead_before = await redis.xlen(f"st:{{{TENANT}}}:dead")
        # Polled again: the repeated tails (stale versions, keyless records) add nothing.
        lengths = [await redis.xlen(f"st:{{{TENANT}}}:{f}") for f in FEEDS]
        again = Daemon(settings(data), once=True)
        assert await again.run() == 0
        assert [await redis.xlen(f"st:{{{TENANT}}}:{f}") for f in FEEDS] == lengths
        assert await redis.xlen(f"st:{{{TENANT}}}:dead") == dead_before

        served_keyless = 0
        for feed in FEEDS:
            events = await stream_events(redis, TENANT, feed)
            assert latest_by_key(events) == await truth(sim.url, TENANT, feed), feed
            versions: dict[bytes, list[dict[str, bytes]]] = defaultdict(list)
            for e in events:
                versions[e["key"]].append(e)
            for key, evs in versions.items():
                datas = [e["data"] for e in evs]
                assert len(set(datas)) == len(datas), f"{feed} {key!r}: a version twice"
                instants = [sortable_instant(e["modified_on"].decode()) for e in evs]
                dated = [i for i in instants if i]
                assert dated == sorted(dated), f"{feed} {key!r} went back in time: {instants}"
            served_keyless += (await keyless(sim.url, feed))["distinct_served"]
        dead = [f[b"data"] for _, f in await redis.xrange(f"st:{{{TENANT}}}:dead")]
        assert served_keyless > 0
        assert len(dead) == len(set(dead)) == served_keyless
        stale = [int(await redis.hget(f"st:{{{TENANT}}}:state", f"{f}:stale") or 0) for f in FEEDS]
        assert sum(stale) > 0
        # One tenant: the per-feed count is this tenant's.
        labels = {"feed": FEEDS[0]}
        assert (again.metrics.sample("syncd_feed_stale_records_total", labels) or 0) <= stale[0]
