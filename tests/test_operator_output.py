"""What operators read: `syncd status`'s table and the text a 429 leaves in logs and status."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from structlog.testing import capture_logs

from syncd import catalogue
from syncd.cli import commands
from syncd.config import Secret
from syncd.daemon import http_session
from syncd.errors import RateLimited
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.client import ExportClient
from syncd.testing.redis_server import RedisServer
from tests.engine_helpers import config_dict, settings
from tests.upstream_helpers import serve

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


async def test_status_shows_the_last_pass_whole(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    state = f"st:{{{TENANT}}}:state"
    await redis.hset(
        state,
        mapping={
            "jpm.jobs:pass_finished": "1796000000.000",
            "jpm.jobs:pass_seen": 1234567,
            "jpm.jobs:pass_drift": 89012,
            "jpm.jobs:pass_deleted": 345678,
        },
    )
    data = config_dict(redis_server.url, "http://127.0.0.1:9", "app-key", [TENANT], FEEDS)
    out = io.StringIO()
    commands.render_table(await commands.collect_status(settings(data), redis), out)
    header, *lines = out.getvalue().splitlines()
    at = header.index("last pass (seen, drift, deleted)")
    cells = {line.split()[1]: line[at:].split("  ")[0] for line in lines}
    assert cells["crm.customers"] == "-"
    assert cells["jpm.jobs"].endswith(" (1234567, 89012, 345678)"), cells  # nothing cut


def test_a_429_without_a_usable_wait_says_so() -> None:
    assert str(RateLimited(None)) == "rate limited (api), no usable Retry-After, backing off"
    assert str(RateLimited(None, where="token")) == (
        "rate limited (token), no usable Retry-After, backing off"
    )
    assert str(RateLimited(2.5)) == "rate limited (api), retry after 2.5s"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    data = config_dict("redis://127.0.0.1:1/0", "http://127.0.0.1:1", "ak-0001", [1], FEEDS)
    async with http_session(settings(data)) as s:
        yield s


@pytest.mark.parametrize("header", ["soon", "nan", "-5", ""])
async def test_a_429_with_an_unreadable_retry_after(
    session: aiohttp.ClientSession, header: str
) -> None:
    async def exports(request: web.Request) -> web.Response:
        headers = {"Retry-After": header} if header else {}
        return web.json_response({"title": "Too Many Requests"}, status=429, headers=headers)

    async with serve(exports) as up:
        tokens = TokenProvider(
            session, up.url + "/connect/token", 1, "client-1", Secret("secret-1-abcdef")
        )
        client = ExportClient(session, up.url, Secret("ak-0001"))
        with capture_logs(), pytest.raises(RateLimited) as exc:
            await client.fetch(
                tokens, catalogue.feed("crm.customers"), None, include_recent_changes=False
            )
    assert exc.value.retry_after is None
    assert str(exc.value) == "rate limited (api), no usable Retry-After, backing off"
    assert "None" not in str(exc.value)
