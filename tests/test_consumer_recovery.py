"""A consumer starting before its Redis, and a consumer whose group vanishes while it holds
events its handler failed: it starts anyway, and it says which events the lost group took."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from structlog.testing import capture_logs

from syncd.consumer import Consumer, Event
from syncd.testing.redis_server import RedisServer, free_port, running
from tests.test_consumer import CUSTOMERS, publish
from tests.test_consumer_faults import Runner, make, until

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


# -- a group lost with the events this consumer failed ----------------------------------


async def run_failing(redis: aioredis.Redis, failing: set[str]) -> tuple[Runner, list[str]]:
    """Consumer.run on keys 1..5, failing `failing`; returns once the others are handled."""
    handled: list[str] = []

    async def handler(batch: list[Event]) -> list[Event]:
        handled.extend(e.key for e in batch if e.key not in failing)
        return [e for e in batch if e.key in failing]

    runner = Runner(make(redis, claim_idle_ms=60_000), handler)
    await until(lambda: len(handled) == 5 - len(failing), "the events that succeed")
    return runner, handled


async def test_a_destroyed_group_names_the_failed_events_it_took(redis: aioredis.Redis) -> None:
    ids = {str(key): await publish(redis, CUSTOMERS, key) for key in range(1, 6)}
    with capture_logs() as logs:
        runner, _ = await run_failing(redis, {"2", "4"})
        # Pending, waiting for their claim idle time: then the group is destroyed under them.
        assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 2
        await redis.xgroup_destroy(CUSTOMERS, "billing")
        await publish(redis, CUSTOMERS, 6)
        await until(
            lambda: any(e["event"] == "consumer_group_recreated" for e in logs), "the new group"
        )
        await runner.finish()
    (lost,) = [e for e in logs if e["event"] == "consumer_pending_lost"]
    assert lost["log_level"] == "error"
    assert (lost["stream"], lost["group"], lost["consumer"]) == (CUSTOMERS, "billing", "c1")
    assert lost["events"] == 2
    assert lost["ids"] == [ids["2"], ids["4"]]
    assert lost["group_was"] == f"created again at {ids['5']}"


async def test_the_ids_named_are_capped_but_counted(redis: aioredis.Redis) -> None:
    for key in range(30):
        await publish(redis, CUSTOMERS, key)
    c = make(redis, batch=100)
    assert len(await c.read()) == 30  # read, never acknowledged
    await redis.xgroup_destroy(CUSTOMERS, "billing")
    with capture_logs() as logs:
        assert await c.read() == []
    (lost,) = [e for e in logs if e["event"] == "consumer_pending_lost"]
    assert lost["events"] == 30
    assert len(lost["ids"]) == 20


async def test_a_group_created_again_by_another_consumer_is_noticed(
    redis: aioredis.Redis,
) -> None:
    ids = [await publish(redis, CUSTOMERS, key) for key in range(3)]
    c = make(redis)
    events = await c.read()
    await c.ack(events[0])  # the other two failed
    await redis.xgroup_destroy(CUSTOMERS, "billing")
    await redis.xgroup_create(CUSTOMERS, "billing", id="$")  # someone else, before c noticed
    with capture_logs() as logs:
        await c.recover_groups()
    (lost,) = [e for e in logs if e["event"] == "consumer_pending_lost"]
    assert (lost["events"], lost["ids"]) == (2, ids[1:])
    assert lost["group_was"] == "created again by another consumer"


async def test_nothing_is_reported_lost_while_the_group_still_holds_it(
    redis: aioredis.Redis,
) -> None:
    # A NOGROUP on another stream sends the consumer through recovery: where its group is
    # there all along, what it holds is still pending and nothing is said.
    await publish(redis, CUSTOMERS, 1)
    c = make(redis)
    assert len(await c.read()) == 1
    with capture_logs() as logs:
        await c.recover_groups()
    assert not [e for e in logs if e["event"] == "consumer_pending_lost"]
    await redis.xgroup_destroy(CUSTOMERS, "billing")
    with capture_logs() as logs:
        await c.recover_groups()
    assert [e["events"] for e in logs if e["event"] == "consumer_pending_lost"] == [1]


async def test_events_taken_over_by_another_consumer_are_not_reported(
    redis: aioredis.Redis,
) -> None:
    await publish(redis, CUSTOMERS, 1)
    first = make(redis, "first", claim_idle_ms=50)
    assert len(await first.read()) == 1  # failed: never acknowledged
    await asyncio.sleep(0.06)
    second = make(redis, "second", claim_idle_ms=50)
    (taken,) = await second.read()
    await second.ack(taken)  # handled by the second consumer
    await asyncio.sleep(0.06)
    assert await first.read() == []  # its scan of stale entries: it no longer holds the event
    await redis.xgroup_destroy(CUSTOMERS, "billing")
    with capture_logs() as logs:
        await first.read()
    assert not [e for e in logs if e["event"] == "consumer_pending_lost"]
    assert [e["event"] for e in logs if e["event"] == "consumer_group_recreated"]


async def test_acknowledged_and_dead_lettered_events_are_not_reported(
    redis: aioredis.Redis,
) -> None:
    for key in range(3):
        await publish(redis, CUSTOMERS, key)
    c = make(redis, claim_idle_ms=50, max_deliveries=1)
    events = await c.read()
    await c.ack(events[0])
    await asyncio.sleep(0.06)
    # Events 1 and 2 come again with a second delivery: beyond max_deliveries, dead-lettered.
    assert await c.read() == []
    await redis.xgroup_destroy(CUSTOMERS, "billing")
    with capture_logs() as logs:
        await c.read()
    assert not [e for e in logs if e["event"] == "consumer_pending_lost"]
