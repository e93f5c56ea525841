"""`Consumer.stop(deadline)` against a real Redis: it cuts a blocked XREADGROUP short, lets the
handler calls in flight finish until the deadline and cancels them then, their events left
pending and delivered again later: nothing lost, nothing unhandled acknowledged."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Consumer, Event
from tests.test_consumer import CUSTOMERS, pending_ids, publish
from tests.test_consumer_faults import until

# Far beyond any test's patience: a stop that waited the read out would time the test out.
LONG_BLOCK_MS = 60_000

Start = Callable[[Consumer, Callable[[Event], Awaitable[None]]], Awaitable[None]]


def make(client: aioredis.Redis, name: str = "c1", **options: Any) -> Consumer:
    options.setdefault("streams", [CUSTOMERS])
    options.setdefault("block_ms", LONG_BLOCK_MS)
    return Consumer(client, "billing", name, **options)


def start(consumer: Consumer, mode: str, handle: Callable[[Event], Awaitable[None]]) -> Any:
    """`run` (a batch handler calling `handle` per event) or `run_each`, as a task."""
    if mode == "each":
        return asyncio.create_task(consumer.run_each(handle))

    async def batch(events: list[Event]) -> None:
        for event in events:
            await handle(event)

    return asyncio.create_task(consumer.run(batch))


async def blocked_readers(client: aioredis.Redis) -> int:
    clients = await client.client_list()
    return sum(1 for c in clients if c.get("cmd") == "xreadgroup" and "b" in c.get("flags", ""))


@pytest.mark.parametrize("mode", ["batch", "each"])
async def test_stop_cuts_a_blocked_read_short(redis: aioredis.Redis, mode: str) -> None:
    async def handle(event: Event) -> None:
        raise AssertionError("nothing to handle")

    consumer = make(redis)
    task = start(consumer, mode, handle)
    await until(lambda: _blocked(redis), "the consumer blocked in XREADGROUP")

    started = time.monotonic()
    await asyncio.wait_for(consumer.stop(deadline=5.0), 10)
    assert time.monotonic() - started < 5.0  # not the 60 s the read would block
    assert task.done()
    await task
    await until(lambda: _not_blocked(redis), "the blocked read gone from the server")
    # Stopped stays stopped: run and run_each return at once.
    await asyncio.wait_for(consumer.run(lambda batch: asyncio.sleep(0)), 1)
    await asyncio.wait_for(consumer.run_each(handle), 1)


async def _blocked(client: aioredis.Redis) -> bool:
    return await blocked_readers(client) == 1


async def _not_blocked(client: aioredis.Redis) -> bool:
    return await blocked_readers(client) == 0


@pytest.mark.parametrize("mode", ["batch", "each"])
async def test_calls_in_flight_finish_within_the_deadline_and_are_acknowledged(
    redis: aioredis.Redis, mode: str
) -> None:
    ids = [await publish(redis, CUSTOMERS, key) for key in range(3)]
    entered = asyncio.Event()
    handled: list[str] = []

    async def handle(event: Event) -> None:
        entered.set()
        await asyncio.sleep(0.3)
        handled.append(event.id)

    consumer = make(redis, concurrency=3, batch=3)
    task = start(consumer, mode, handle)
    await asyncio.wait_for(entered.wait(), 10)
    started = time.monotonic()
    await asyncio.wait_for(consumer.stop(deadline=10.0), 20)
    # Waited for the calls (not for the deadline, nor for the blocked read after them).
    assert 0.2 < time.monotonic() - started < 5.0
    await task
    assert sorted(handled) == sorted(ids)
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


@pytest.mark.parametrize("mode", ["batch", "each"])
async def test_calls_past_the_deadline_are_cancelled_and_their_events_come_back(
    redis: aioredis.Redis, mode: str
) -> None:
    entry_id = await publish(redis, CUSTOMERS, 1)
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def stuck(event: Event) -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    consumer = make(redis, claim_idle_ms=100)
    task = start(consumer, mode, stuck)
    await asyncio.wait_for(entered.wait(), 10)
    started = time.monotonic()
    with capture_logs() as logs:
        await asyncio.wait_for(consumer.stop(deadline=0.3), 10)
    assert 0.25 < time.monotonic() - started < 5.0
    assert cancelled.is_set()
    await task
    assert "consumer_stop_cancelled_handler" in [e["event"] for e in logs]
    # Not acknowledged: still pending, and delivered again to the next consumer.
    assert await pending_ids(redis, CUSTOMERS, "billing") == {entry_id: "c1"}
    await asyncio.sleep(0.15)
    other = make(redis, "c2", claim_idle_ms=100, block_ms=50)
    (again,) = await other.read()
    assert (again.id, again.deliveries) == (entry_id, 2)


async def test_a_second_stop_shortens_the_deadline(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, 1)
    entered = asyncio.Event()

    async def stuck(event: Event) -> None:
        entered.set()
        await asyncio.sleep(3600)

    consumer = make(redis)
    task = start(consumer, "each", stuck)
    await asyncio.wait_for(entered.wait(), 10)
    first = asyncio.create_task(consumer.stop(deadline=3600))
    await asyncio.sleep(0.1)
    assert not first.done()
    started = time.monotonic()
    await asyncio.wait_for(consumer.stop(deadline=0), 10)
    assert time.monotonic() - started < 5.0
    await asyncio.wait_for(first, 1)
    await task


async def test_run_each_leaves_events_it_did_not_start_pending_and_loses_none(
    redis: aioredis.Redis,
) -> None:
    ids = [await publish(redis, CUSTOMERS, key) for key in range(12)]
    handled: list[str] = []
    entered = asyncio.Event()

    async def slow(event: Event) -> None:
        entered.set()
        await asyncio.sleep(0.2)
        handled.append(event.id)

    consumer = make(redis, concurrency=2, batch=12, claim_idle_ms=100)
    task = start(consumer, "each", slow)
    await asyncio.wait_for(entered.wait(), 10)
    await asyncio.wait_for(consumer.stop(deadline=10.0), 20)
    await task
    assert len(handled) == 2  # the two calls in flight; the others were never started
    left = await pending_ids(redis, CUSTOMERS, "billing")
    assert set(left) == set(ids) - set(handled)

    # Another consumer takes the rest over: every event handled once, none twice. Its events
    # wait their turn for up to a few handler times (longer on a loaded machine): it claims
    # only those idle for longer than that, or it would claim its own again.
    await asyncio.sleep(1.05)
    rest = make(redis, "c2", concurrency=4, claim_idle_ms=1000, block_ms=50)
    task = start(rest, "each", slow)
    try:
        await until(lambda: len(handled) == len(ids), "the rest handled by the other consumer")
    finally:
        await rest.stop()
        await task
    assert sorted(handled) == sorted(ids)
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


async def test_stop_without_a_loop_returns_at_once(redis: aioredis.Redis) -> None:
    consumer = make(redis)
    await asyncio.wait_for(consumer.stop(), 1)
