"""`Consumer.run_each` against a real Redis: up to `concurrency` one-event handler calls at once,
never two of one key at once nor out of stream order; acknowledgement, redelivery, dead letters
and an outage as under `run`."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Consumer, Event, EventHandler, Failed
from tests.test_consumer import CUSTOMERS, JOBS, KEYS, pending_ids, publish
from tests.test_consumer_faults import dead_keys, until


def make(client: aioredis.Redis, name: str = "c1", **options: Any) -> Consumer:
    options.setdefault("streams", [CUSTOMERS, JOBS])
    options.setdefault("block_ms", 50)
    return Consumer(client, "billing", name, **options)


class Each:
    """`run_each` as a task."""

    def __init__(self, consumer: Consumer, handler: EventHandler) -> None:
        self.consumer = consumer
        self.task = asyncio.create_task(consumer.run_each(handler))

    async def finish(self) -> None:
        await asyncio.wait_for(self.consumer.stop(), 30)
        await asyncio.wait_for(self.task, 30)  # re-raises whatever escaped run_each


async def publish_versions(client: aioredis.Redis, keys: int, versions: int) -> list[str]:
    """Every key's versions, interleaved (v1 of every key, then v2...), in two streams; the
    version is in the record."""
    ids = []
    for version in range(1, versions + 1):
        for key in range(keys):
            stream = (CUSTOMERS, JOBS)[key % 2]
            data = msgspec.json.encode({"id": key, "version": version})
            fields = {"op": "updated", "key": str(key), "data": data, "modified_on": ""}
            entry_id = await client.xadd(stream, fields)
            ids.append(entry_id.decode())
    return ids


async def test_calls_run_side_by_side_but_never_two_of_one_key_nor_out_of_order(
    redis: aioredis.Redis,
) -> None:
    keys, versions, concurrency = 24, 5, 6
    await publish_versions(redis, keys, versions)
    rng = random.Random(21)
    log: list[tuple[str, tuple[str, str], int]] = []  # ("start" | "end", key, version)
    running: set[tuple[str, str]] = set()
    peak = 0

    async def handler(event: Event) -> None:
        nonlocal peak
        key = (event.stream, event.key)
        assert key not in running, f"two calls for {key} at once"
        running.add(key)
        peak = max(peak, len(running))
        version = event.json()["version"]
        log.append(("start", key, version))
        await asyncio.sleep(rng.uniform(0, 0.02))
        log.append(("end", key, version))
        running.discard(key)

    runner = Each(make(redis, concurrency=concurrency, batch=20), handler)
    await until(lambda: len(log) == 2 * keys * versions, "every event handled")
    await runner.finish()

    per_key: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    for what, key, version in log:
        per_key[key].append((what, version))
    assert len(per_key) == keys
    for calls in per_key.values():
        # start v1, end v1, start v2, end v2...: no overlap and stream order, once each.
        assert calls == [(w, v) for v in range(1, versions + 1) for w in ("start", "end")]
    # Concurrency reached N, and never more: at every instant of the log.
    depth, deepest = 0, 0
    for what, _, _ in log:
        depth += 1 if what == "start" else -1
        deepest = max(deepest, depth)
    assert deepest == peak == concurrency
    for stream in (CUSTOMERS, JOBS):
        assert await pending_ids(redis, stream, "billing") == {}


async def test_an_event_is_acknowledged_only_once_its_call_succeeded(
    redis: aioredis.Redis,
) -> None:
    entry_id = await publish(redis, CUSTOMERS, 1)
    release = asyncio.Event()
    calls: list[int] = []

    async def handler(event: Event) -> None:
        calls.append(event.deliveries)
        if len(calls) == 1:
            raise RuntimeError("the database said no")
        await release.wait()

    runner = Each(make(redis, claim_idle_ms=200), handler)
    await until(lambda: len(calls) == 2, "the event delivered again after it failed")
    # Failed once, now in its second call: still pending, its delivery counted.
    assert await pending_ids(redis, CUSTOMERS, "billing") == {entry_id: "c1"}
    assert calls == [1, 2]
    release.set()
    await until(
        lambda: _no_pending(redis), "the event acknowledged once its call succeeded", timeout=10
    )
    await runner.finish()
    assert await dead_keys(redis) == []


async def _no_pending(client: aioredis.Redis) -> bool:
    return await pending_ids(client, CUSTOMERS, "billing") == {}


async def test_a_failing_event_goes_to_the_dead_stream_with_its_reason_and_its_key_goes_on(
    redis: aioredis.Redis,
) -> None:
    poison = await publish(redis, CUSTOMERS, 7)
    await publish(redis, CUSTOMERS, 7, op="updated")
    for key in range(3):
        await publish(redis, CUSTOMERS, key)
    handled: list[str] = []

    async def handler(event: Event) -> Failed | None:
        if event.id == poison:
            return Failed(event, "value out of range")
        handled.append(event.id)
        return None

    runner = Each(make(redis, claim_idle_ms=100, max_deliveries=2, concurrency=3), handler)
    await until(lambda: _dead(redis), "the poison event dead-lettered")
    await until(lambda: len(handled) == 4, "the others handled")
    await runner.finish()
    (letter,) = await redis.xrange(KEYS.dead)
    fields = letter[1]
    assert (fields[b"entry_id"].decode(), fields[b"reason"], fields[b"detail"]) == (
        poison,
        b"max_deliveries",
        b"value out of range",
    )
    assert poison not in handled
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


async def _dead(client: aioredis.Redis) -> bool:
    return await client.xlen(KEYS.dead) == 1


async def test_an_outage_holds_the_failed_events_instead_of_burying_them(
    redis: aioredis.Redis,
) -> None:
    down = True
    handled: set[str] = set()
    failures = 0

    async def handler(event: Event) -> None:
        nonlocal failures
        if down:
            failures += 1
            raise ConnectionRefusedError("the downstream database is down")
        handled.add(event.key)

    for key in range(8):
        await publish(redis, CUSTOMERS, key)
    consumer = make(redis, claim_idle_ms=100, max_deliveries=2, outage_after=2, concurrency=2)
    with capture_logs() as logs:
        runner = Each(consumer, handler)
        await until(lambda: failures >= 8, "several retries in the outage")
        down = False
        await until(lambda: len(handled) == 8, "every event once the outage is over")
        await runner.finish()
    names = [entry["event"] for entry in logs]
    assert "consumer_handler_outage" in names
    assert "consumer_outage_over" in names
    # Far more failures than max_deliveries allows, yet nothing buried: held, not redelivered.
    assert await dead_keys(redis) == []
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


@pytest.mark.parametrize("result", [True, "ok", {"id": "reason"}])
async def test_a_result_that_is_not_none_nor_failed_acknowledges_nothing(
    redis: aioredis.Redis, result: object
) -> None:
    entry_id = await publish(redis, CUSTOMERS, 1)
    calls = 0

    async def handler(event: Event) -> Any:
        nonlocal calls
        calls += 1
        return result

    with capture_logs() as logs:
        runner = Each(make(redis), handler)
        await until(lambda: calls == 1, "the call")
        await runner.finish()
    (refused,) = [e for e in logs if e["event"] == "consumer_handler_result_refused"]
    assert refused["result_type"] == type(result).__name__
    assert await pending_ids(redis, CUSTOMERS, "billing") == {entry_id: "c1"}


async def test_concurrency_must_be_positive(redis: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        make(redis, concurrency=0)


async def test_a_call_slower_than_claim_idle_keeps_its_event(redis: aioredis.Redis) -> None:
    """While a one-event call runs for several times `claim_idle_ms` (and another event of its
    key waits for it), the consumer keeps both: their delivery count stays at one (no
    consumer takes them over, this one included), none reaches the dead stream however low
    `max_deliveries` is, and another consumer of the group gets neither."""
    await publish_versions(redis, 1, 2)
    started = asyncio.Event()
    handled: list[tuple[str, int]] = []
    deliveries: list[int] = []

    async def slow(event: Event) -> None:
        started.set()
        await asyncio.sleep(0.8)  # 8 x claim_idle_ms
        pending = await redis.xpending_range(CUSTOMERS, "billing", "-", "+", 10)
        deliveries.extend(p["times_delivered"] for p in pending)
        handled.append(("slow", msgspec.json.decode(event.data)["version"]))

    async def other(event: Event) -> None:
        handled.append(("other", msgspec.json.decode(event.data)["version"]))

    first = Each(make(redis, "c1", claim_idle_ms=100, max_deliveries=2), slow)
    await asyncio.wait_for(started.wait(), 10)
    second = Each(make(redis, "c2", claim_idle_ms=100, max_deliveries=2), other)
    await until(lambda: len(handled) == 2, "the slow calls to finish")
    await second.finish()
    await first.finish()
    assert handled == [("slow", 1), ("slow", 2)]
    assert deliveries == [1, 1, 1]  # both events while the first ran, the second's alone
    assert await dead_keys(redis) == []
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0
