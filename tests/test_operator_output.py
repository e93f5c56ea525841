"""What operators read: `syncd status`'s table."""

from __future__ import annotations

import io

import redis.asyncio as aioredis

from syncd.cli import commands
from syncd.testing.redis_server import RedisServer
from tests.engine_helpers import config_dict, settings

TENANT = 6161
FEEDS = ["crm.customers", "jpm.jobs", "settings.technicians"]
LAG = "consumer_lag: billing 5000 unacknowledged"


async def test_status_shows_why_a_feed_is_paused(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    state = f"st:{{{TENANT}}}:state"
    await redis.hset(state, "jpm.jobs:paused", LAG)
    data = config_dict(redis_server.url, "http://127.0.0.1:9", "app-key", [TENANT], FEEDS)
    rows = await commands.collect_status(settings(data), redis)
    out = io.StringIO()
    commands.render_table(rows, out)
    header, *lines = out.getvalue().splitlines()

    assert "paused" in header.split()
    at = header.index("paused")
    cells = {line.split()[1]: line[at:].split("  ")[0] for line in lines}
    assert cells == {"crm.customers": "-", "jpm.jobs": LAG[:23] + "…", "settings.technicians": "-"}

    # Redis near maxmemory pauses every feed: each row says so.
    await redis.hset(state, "memory_paused", "Redis uses 950 MB of maxmemory 1000 MB")
    rows = await commands.collect_status(settings(data), redis)
    out = io.StringIO()
    commands.render_table(rows, out)
    _, *lines = out.getvalue().splitlines()
    shown = [line[at:].split("  ")[0] for line in lines]
    assert shown == [
        "Redis uses 950 MB of ma…",
        LAG[:23] + "…",
        "Redis uses 950 MB of ma…",
    ]
