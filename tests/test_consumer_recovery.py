"""A consumer starting before its Redis: it starts anyway, and runs once Redis is up."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from structlog.testing import capture_logs

from syncd.consumer import Consumer, Event
from syncd.testing.redis_server import RedisServer, free_port, running
from tests.test_consumer import CUSTOMERS, publish
from tests.test_consumer_faults import make, until

# -- starting while Redis is down -------------------------------------------------------


async def test_a_consumer_starts_before_its_redis_and_runs_once_it_is_up() -> None:
    # The README's example: `async with consumer: await consumer.run(...)`. Redis is down
    # when it starts, and comes up later: no traceback, the groups are created then.
    server = RedisServer(port=free_port())  # not started yet
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
    keys: list[str] = []

    async def handler(batch: list[Event]) -> None:
        keys.extend(e.key for e in batch)

    try:
        stop = asyncio.Event()
        with capture_logs() as logs:
            async with Consumer(
                client, "billing", "c1", streams=[CUSTOMERS], block_ms=50
            ) as consumer:
                task = asyncio.create_task(consumer.run(handler, stop=stop))
                await until(
                    lambda: (
                        sum(e["event"] == "consumer_redis_unavailable" for e in logs) >= 2
                        and not task.done()
                    ),
                    "run to retry while Redis is down",
                )
                await asyncio.to_thread(server.start)
                writer = aioredis.Redis.from_url(server.url)
                try:
                    await publish(writer, CUSTOMERS, 1)
                finally:
                    await writer.aclose()
                await until(lambda: keys == ["1"], "the event published once Redis is up")
                stop.set()
                await asyncio.wait_for(task, 30)
        unavailable = [e for e in logs if e["event"] == "consumer_redis_unavailable"]
        assert unavailable[0]["log_level"] == "warning"
        assert "Connect" in unavailable[0]["error"]
        assert [e["stream"] for e in logs if e["event"] == "consumer_group_created"] == [CUSTOMERS]
        assert not [e for e in logs if e["log_level"] == "error"]
    finally:
        await client.aclose()
        server.stop()


async def test_a_consumer_stops_while_its_redis_never_came() -> None:
    server = RedisServer(port=free_port())  # never started
    client = aioredis.Redis.from_url(server.url, socket_connect_timeout=1)
    try:
        stop = asyncio.Event()
        async with make(client) as consumer:
            task = asyncio.create_task(consumer.run(lambda batch: asyncio.sleep(0), stop=stop))
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.wait_for(task, 30)  # `stop` ends it, as during any outage
    finally:
        await client.aclose()


async def test_a_start_that_fails_for_another_reason_still_raises(redis: aioredis.Redis) -> None:
    # Not an outage: the key is no stream. Said at once, where the consumer starts.
    await redis.set(CUSTOMERS, "not a stream")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        async with make(redis):
            pass


async def test_refused_credentials_still_raise_at_start() -> None:
    with running() as server:
        admin = aioredis.Redis.from_url(server.url)
        await admin.config_set("requirepass", "s3cret-pass")
        await admin.aclose()
        client = aioredis.Redis.from_url(server.url)  # no password
        try:
            with pytest.raises(AuthenticationError):
                async with make(client):
                    pass
        finally:
            await client.aclose()
