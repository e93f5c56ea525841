"""`[redis] wait_replicas`: a page counts as done once enough replicas have it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from syncd import catalogue
from syncd.engine.publisher import Publisher
from syncd.errors import TransientError
from syncd.servicetitan.client import decode_page
from syncd.testing.redis_server import RedisServer

FEED = catalogue.feed("crm.customers")


@pytest.fixture
def replicated() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(extra_args=["--appendonly", "no", "--repl-diskless-sync-delay", "0"])
    primary.start()
    replica = RedisServer(
        extra_args=["--appendonly", "no", "--replicaof", "127.0.0.1", str(primary.port)]
    )
    replica.start()
    yield primary, replica
    replica.stop()
    primary.stop()


@pytest.fixture
async def client(replicated: tuple[RedisServer, RedisServer]) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(replicated[0].url)
    deadline = time.monotonic() + 30
    while (await c.info("replication")).get("slave0", {}).get("state") != "online":
        assert time.monotonic() < deadline, "the replica did not come online"
        await asyncio.sleep(0.05)
    yield c
    await c.aclose()


def page(n: int, cursor: str) -> bytes:
    data = ",".join(f'{{"id": {i}, "modifiedOn": "2024-01-01T00:00:00Z"}}' for i in range(n))
    return f'{{"hasMore": true, "continueFrom": "{cursor}", "data": [{data}]}}'.encode()


async def test_a_page_is_done_once_the_replica_has_it(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    _, replica = replicated
    pub = Publisher(client, "st", wait_replicas=1, wait_timeout=2.0)
    first = await pub.apply(1, FEED.name, None, decode_page(page(50, "c1"), FEED))
    assert (first.applied, first.published) == (True, 50)
    # The replica answers with what it has: the page arrived with its cursor.
    on_replica = aioredis.Redis.from_url(replica.url)
    try:
        assert await on_replica.xlen("st:{1}:crm.customers") == 50
        assert await on_replica.hget("st:{1}:cursors", FEED.name) == b"c1"
    finally:
        await on_replica.aclose()

    replica.stop()
    second = decode_page(page(60, "c2"), FEED)
    with pytest.raises(TransientError, match="only 0 of 1 replicas acknowledged the page"):
        await pub.apply(1, FEED.name, "c1", second)
    # Applied on the primary, not counted done: the retry finds the cursor moved and adds
    # nothing, so the page is not published twice.
    assert await client.xlen("st:{1}:crm.customers") == 60
    retry = await pub.apply(1, FEED.name, "c1", second)
    assert (retry.applied, retry.stored) == (False, "c2")
    assert await client.xlen("st:{1}:crm.customers") == 60


async def test_without_waiting_nothing_changes(client: aioredis.Redis) -> None:
    pub = Publisher(client, "st")
    applied = await pub.apply(2, FEED.name, None, decode_page(page(5, "c1"), FEED))
    assert (applied.applied, applied.published) == (True, 5)
