"""A handler's reason for failing an event (`Failed(event, reason)`) goes with the event to
the dead stream whichever consumer of the group dead-letters it, and leaves Redis once the
event is settled; and an entry read as syncd writes it becomes the same Event by the fast path
as by `Event.from_entry`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Event, Failed
from syncd.consumer.events import event_of_raw, fields_of
from tests.test_consumer import CUSTOMERS, KEYS, publish
from tests.test_consumer_faults import Runner, make, until

REASON = "PostgreSQL refused the record: 22P05 unsupported Unicode escape sequence"
REASONS = KEYS.reasons("billing")


async def fail_once_with_a_reason(redis: aioredis.Redis) -> None:
    """Keys 1 to 3 published; consumer c1 fails key 2 with REASON, then stops: the event stays
    pending under it."""
    for key in (1, 2, 3):
        await publish(redis, CUSTOMERS, key)

    async def refuse(batch: list[Event]) -> list[Failed]:
        return [Failed(e, REASON) for e in batch if e.key == "2"]

    first = make(redis, "c1", claim_idle_ms=60_000)
    runner = Runner(first, refuse)
    await until(lambda: redis.hlen(REASONS), "the reason kept in Redis")
    await runner.finish()
    await first.close()
    assert await redis.hgetall(REASONS) == {
        KEYS.reason_field(CUSTOMERS, (await redis.xrange(CUSTOMERS))[1][0].decode()).encode(): (
            REASON.encode()
        )
    }


async def dead_letter_from_c2(
    redis: aioredis.Redis, handler: Callable[[list[Event]], Awaitable[list[Event]]]
) -> dict[bytes, bytes]:
    """Consumer c2 runs `handler` (which fails events without a reason) until one event is in
    the dead stream (two deliveries at most); that dead letter's fields."""
    second = make(redis, "c2", claim_idle_ms=100, max_deliveries=2, outage_after=99)
    runner = Runner(second, handler)
    await until(lambda: redis.xlen(KEYS.dead), "the event in the dead stream")
    await runner.finish()
    ((_, dead),) = await redis.xrange(KEYS.dead)
    return dead


async def test_the_reason_reaches_the_dead_letter_from_another_consumer(
    redis: aioredis.Redis,
) -> None:
    await fail_once_with_a_reason(redis)

    async def fail_without_a_reason(batch: list[Event]) -> list[Event]:
        return [e for e in batch if e.key == "2"]

    dead = await dead_letter_from_c2(redis, fail_without_a_reason)
    assert dead[b"key"] == b"2"
    assert dead[b"consumer"] == b"c2"
    assert dead[b"reason"] == b"max_deliveries"
    assert dead[b"detail"] == REASON.encode()
    assert await redis.exists(REASONS) == 0  # settled: nothing kept


async def test_the_reason_goes_when_another_consumer_handles_the_event(
    redis: aioredis.Redis,
) -> None:
    await fail_once_with_a_reason(redis)
    handled: list[str] = []

    async def handle(batch: list[Event]) -> None:
        handled.extend(e.key for e in batch)

    second = make(redis, "c2", claim_idle_ms=100)
    runner = Runner(second, handle)
    await until(lambda: "2" in handled, "the event handled by the other consumer")
    await runner.finish()
    assert await redis.exists(REASONS) == 0
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0
    assert await redis.xlen(KEYS.dead) == 0


async def test_a_reason_redis_cannot_keep_is_said_and_the_event_still_fails(
    redis: aioredis.Redis,
) -> None:
    await publish(redis, CUSTOMERS, 1)
    await redis.set(REASONS, "not a hash")  # HSET and HMGET fail: WRONGTYPE

    async def refuse(batch: list[Event]) -> list[Failed]:
        return [Failed(e, REASON) for e in batch]

    c = make(redis, "c1", claim_idle_ms=100, max_deliveries=2)
    with capture_logs() as logs:
        runner = Runner(c, refuse)
        await until(lambda: redis.xlen(KEYS.dead), "the event in the dead stream")
        await runner.finish()
    assert {e["doing"] for e in logs if e["event"] == "consumer_reasons_failed"} == {
        "keeping",
        "reading",
    }
    ((_, dead),) = await redis.xrange(KEYS.dead)
    assert dead[b"detail"] == REASON.encode()  # its own consumer still knew it


ENTRY = {
    b"op": b"updated",
    b"key": b"42",
    b"data": b'{"id":42}',
    b"modified_on": b"2024-05-01T12:00:00.45Z",
    b"modified_at": b"2024-05-01T12:00:00.4500000Z",
}


@pytest.mark.parametrize(
    ("raw", "fast"),
    [
        (ENTRY, True),
        ({**ENTRY, b"extra": b"ignored"}, True),
        ({**ENTRY, b"modified_on": b"", b"modified_at": b""}, True),  # no timestamp
        ({**ENTRY, b"key": b"\xff"}, True),  # not UTF-8: replaced, as from_entry does
        ({k: v for k, v in ENTRY.items() if k != b"modified_at"}, False),  # before 0.3.0
        ({k: v for k, v in ENTRY.items() if k != b"op"}, False),  # malformed
        ({k.decode(): v.decode() for k, v in ENTRY.items()}, False),  # decode_responses
    ],
)
def test_an_entry_read_fast_is_the_event_from_entry_makes(raw: dict[Any, Any], fast: bool) -> None:
    event = event_of_raw(CUSTOMERS, b"1714564800123-4", raw, KEYS.tenant, "crm.customers")
    assert (event is not None) == fast
    if event is not None:
        fields = fields_of(raw)
        expected = Event.from_entry(
            CUSTOMERS,
            "1714564800123-4",
            fields,
            tenant=KEYS.tenant,
            feed="crm.customers",
            deliveries=1,
        )
        assert event == expected


async def test_a_handler_slower_than_claim_idle_keeps_its_batch(redis: aioredis.Redis) -> None:
    """While `run`'s handler works on a batch for several times `claim_idle_ms`, another
    consumer of the group takes none of it over: each event is delivered once."""
    await publish(redis, CUSTOMERS, 1)
    started = asyncio.Event()
    handled: list[str] = []

    async def slow(batch: list[Event]) -> None:
        started.set()
        await asyncio.sleep(0.8)  # 8 x claim_idle_ms
        handled.extend(e.key for e in batch)

    async def other(batch: list[Event]) -> None:
        handled.extend("other " + e.key for e in batch)

    first = Runner(make(redis, "c1", claim_idle_ms=100), slow)
    await asyncio.wait_for(started.wait(), 10)
    second = Runner(make(redis, "c2", claim_idle_ms=100), other)
    await until(lambda: bool(handled), "the slow handler to finish")
    await second.finish()
    await first.finish()
    assert handled == ["1"]
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0
