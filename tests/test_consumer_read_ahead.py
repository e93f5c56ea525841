"""`Consumer(read_ahead=True)`: the next batch is read while the handler works on one; batches
still come one at a time, in order, each acknowledged after its call, and a batch read ahead is
handled, not dropped, when `stop` comes or an outage begins."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Event
from syncd.testing.redis_server import running
from tests.test_consumer import CUSTOMERS, publish
from tests.test_consumer_faults import Runner, dead_keys, make, until


async def entries_read(client: aioredis.Redis) -> int:
    groups = await client.xinfo_groups(CUSTOMERS)
    return int(groups[0]["entries-read"] or 0) if groups else 0


async def test_the_next_batch_is_read_while_the_handler_works(redis: aioredis.Redis) -> None:
    for key in range(6):
        await publish(redis, CUSTOMERS, key)
    batches: list[list[str]] = []

    async def handler(batch: list[Event]) -> None:
        if not batches:
            # The second batch is read (delivered) while the first is still in here.
            await until(lambda: _at_least(redis, 4), "the next batch read ahead")
        batches.append([e.key for e in batch])

    runner = Runner(make(redis, batch=2, read_ahead=True), handler)
    await until(lambda: len(batches) == 3, "every batch")
    await runner.finish()
    assert batches == [["0", "1"], ["2", "3"], ["4", "5"]]
    (group,) = await redis.xinfo_groups(CUSTOMERS)
    assert (group["pending"], group["lag"]) == (0, 0)


async def _at_least(client: aioredis.Redis, n: int) -> bool:
    return await entries_read(client) >= n


async def test_a_batch_read_ahead_when_stopped_is_handled_before_run_returns(
    redis: aioredis.Redis,
) -> None:
    for key in range(6):
        await publish(redis, CUSTOMERS, key)
    handled: list[str] = []
    runner: Runner | None = None

    async def handler(batch: list[Event]) -> None:
        if not handled:
            assert runner is not None
            runner.stop.set()
            await until(lambda: _at_least(redis, 4), "the batch read ahead")
        handled.extend(e.key for e in batch)

    runner = Runner(make(redis, batch=2, read_ahead=True), handler)
    await asyncio.wait_for(runner.task, 30)
    assert handled == ["0", "1", "2", "3"]  # the batch read ahead too; nothing read after stop
    (group,) = await redis.xinfo_groups(CUSTOMERS)
    assert (group["pending"], group["lag"]) == (0, 2)


async def test_read_ahead_through_an_outage(redis: aioredis.Redis) -> None:
    down = True
    handled: set[str] = set()

    async def handler(batch: list[Event]) -> None:
        if down:
            raise ConnectionRefusedError("the downstream database is down")
        handled.update(e.key for e in batch)

    for key in range(10):
        await publish(redis, CUSTOMERS, key)
    c = make(redis, batch=2, outage_after=1, claim_idle_ms=60_000, read_ahead=True)
    runner = Runner(c, handler)
    await until(lambda: _at_least(redis, 4), "a batch read ahead before the outage showed")
    await asyncio.sleep(0.2)
    down = False
    await until(lambda: len(handled) == 10, "every event once the outage is over")
    await runner.finish()
    assert await dead_keys(redis) == []
    rows = await redis.xpending_range(CUSTOMERS, "billing", "-", "+", 100)
    assert rows == []


@pytest.mark.parametrize("read_ahead", [False, True])
async def test_cancelling_run_cancels_the_read_ahead(
    redis: aioredis.Redis, read_ahead: bool
) -> None:
    for key in range(4):
        await publish(redis, CUSTOMERS, key)
    entered = asyncio.Event()

    async def handler(batch: list[Event]) -> None:
        entered.set()
        await asyncio.Event().wait()  # never returns

    runner = Runner(make(redis, batch=2, read_ahead=read_ahead), handler)
    await asyncio.wait_for(entered.wait(), 30)
    runner.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(runner.task, 30)


async def test_a_read_ahead_that_failed_is_not_awaited_again() -> None:
    # The read ahead loses its server while the handler works: its error is handled once, and
    # reading goes on once the server is back (it used to await the failed read forever).
    with running() as server:
        client = aioredis.Redis.from_url(server.url)
        keys: list[str] = []

        async def handler(batch: list[Event]) -> None:
            if not keys:
                server.stop(keep_data=True)
            keys.extend(e.key for e in batch)

        try:
            await publish(client, CUSTOMERS, 1)
            runner = Runner(make(client, read_ahead=True, block_ms=5_000), handler)
            with capture_logs() as logs:
                await until(lambda: keys == ["1"], "the first event")
                await until(
                    lambda: any(e["event"] == "consumer_redis_unavailable" for e in logs),
                    "the failed read ahead noticed",
                )
                server.start()
                await publish(client, CUSTOMERS, 2)
                await until(lambda: keys == ["1", "2"] and runner.alive(), "event 2")
                await runner.finish()
        finally:
            await client.aclose()
