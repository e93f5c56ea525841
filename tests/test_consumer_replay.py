"""Replay streams against a real Redis: a dead-lettered event moved to its group's replay
stream (as `syncd dead replay` moves it) comes back to that group alone, as the event it was,
once; acknowledged, it is gone; failed again, it is dead-lettered again under its own names."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Consumer, Event
from syncd.consumer.replay import MOVE_LUA
from syncd.keys import Keys

TENANT = 6262
KEYS = Keys("st", TENANT)
CUSTOMERS = KEYS.stream("crm.customers")
REPLAY = KEYS.replay("crm.customers", "billing")


async def publish(redis: aioredis.Redis, key: int) -> str:
    data = msgspec.json.encode({"id": key, "name": f"Customer {key}"})
    fields = {"op": "created", "key": str(key), "data": data, "modified_on": ""}
    entry_id: bytes = await redis.xadd(CUSTOMERS, fields)
    return entry_id.decode()


def consumer(redis: aioredis.Redis, group: str = "billing", **options: Any) -> Consumer:
    options.setdefault("block_ms", 50)
    options.setdefault("claim_idle_ms", 50)
    options.setdefault("max_deliveries", 1)
    return Consumer(redis, group, options.pop("name", "c1"), streams=[CUSTOMERS], **options)


async def bury(c: Consumer) -> None:
    """Read without acknowledging until the consumer dead-letters what it read."""
    assert await c.read()
    await asyncio.sleep(0.06)
    assert await c.read() == []


async def replay(redis: aioredis.Redis, group: str = "billing") -> list[int]:
    """Move every dead letter to its group's replay stream, as `syncd dead replay` does."""
    move = redis.register_script(MOVE_LUA)
    moved = []
    for entry_id, fields in await redis.xrange(KEYS.dead):
        stream, where = fields[b"stream"], KEYS.replay("crm.customers", group)
        moved.append(await move(keys=[KEYS.dead, where], args=[entry_id, stream, group]))
    return moved


async def test_a_replayed_event_comes_back_to_its_group_alone_as_it_was(
    redis: aioredis.Redis,
) -> None:
    first = await publish(redis, 1)
    audit = consumer(redis, "audit")
    handled = await audit.read()
    await audit.ack(*handled)
    billing = consumer(redis)
    await bury(billing)
    assert await replay(redis) == [1]
    assert await replay(redis) == []  # moved once: the dead stream no longer holds it

    (event,) = await billing.read()
    assert (event.stream, event.id, event.key, event.deliveries) == (CUSTOMERS, first, "1", 1)
    assert event.version == handled[0].version
    assert event.replay_id == (await redis.xrange(REPLAY))[0][0].decode()
    assert msgspec.structs.replace(event, replay_id=None) == handled[0]
    assert await billing.ack(event) == 1
    assert await redis.xlen(REPLAY) == 0
    assert await billing.read() == []
    assert await audit.read() == []  # the other group never sees it again


async def test_the_replay_stream_is_read_from_its_start_whatever_start_says(
    redis: aioredis.Redis,
) -> None:
    await publish(redis, 1)
    await bury(consumer(redis))
    await redis.delete(REPLAY)  # as if no consumer of the group had read it yet
    await replay(redis)
    later = consumer(redis, start="new", name="c2")
    assert [e.key for e in await later.read()] == ["1"]


async def test_failed_again_it_is_dead_lettered_under_its_own_names(
    redis: aioredis.Redis,
) -> None:
    first = await publish(redis, 1)
    billing = consumer(redis)
    await bury(billing)
    await replay(redis)
    with capture_logs() as logs:
        await bury(billing)
    ((_, fields),) = await redis.xrange(KEYS.dead)
    assert fields[b"stream"] == CUSTOMERS.encode()
    assert fields[b"entry_id"] == first.encode()
    assert (fields[b"replays"], fields[b"deliveries"], fields[b"key"]) == (b"1", b"2", b"1")
    assert await redis.xlen(REPLAY) == 0  # acknowledged with its copy, and deleted
    (line,) = [e for e in logs if e["event"] == "consumer_dead_lettered"]
    assert (line["entry_id"], line["stream"]) == (first, CUSTOMERS)
    assert line["replay_id"].endswith("-0")


async def test_a_lost_replay_group_loses_nothing(redis: aioredis.Redis) -> None:
    await publish(redis, 1)
    billing = consumer(redis, max_deliveries=5)
    await bury(consumer(redis, name="c0"))
    await replay(redis)
    assert [e.key for e in await billing.read()] == ["1"]  # failed: not acknowledged
    await redis.xgroup_destroy(REPLAY, "billing")
    with capture_logs() as logs:
        events = await billing.read()
    assert [(e.key, e.deliveries) for e in events] == [("1", 1)]
    assert not [e for e in logs if e["event"] == "consumer_pending_lost"]
    recreated = [e for e in logs if e["event"] == "consumer_group_recreated"]
    assert [(e["stream"], e["position"]) for e in recreated] == [(REPLAY, "0")]


async def test_an_outage_holds_replayed_events_without_counting_deliveries(
    redis: aioredis.Redis,
) -> None:
    await publish(redis, 1)
    await bury(consumer(redis, name="c0"))
    await replay(redis)
    seen: list[int] = []

    async def down(batch: list[Event]) -> list[Event]:
        seen.extend(e.deliveries for e in batch)
        return batch  # the handler's database is down

    billing = consumer(redis, max_deliveries=2, outage_after=1)
    stop = asyncio.Event()
    with capture_logs():
        task = asyncio.create_task(billing.run(down, stop=stop))
        await asyncio.sleep(1.5)
        stop.set()
        await task
    assert len(seen) >= 2
    assert set(seen) == {1}  # held and retried by the loop: never redelivered
    assert await redis.xlen(KEYS.dead) == 0
    assert await redis.xlen(REPLAY) == 1


@pytest.mark.parametrize("group", ["billing", "a:b", "{x}"])
def test_replay_stream_names(group: str) -> None:
    assert KEYS.replay("jpm.jobs", group) == f"st:{{{TENANT}}}:replay:jpm.jobs:{group}"
