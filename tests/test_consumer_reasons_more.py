"""The reasons kept in Redis (syncd.consumer.reasons) in the flows where one could leak (its
field never deleted), go with the wrong entry, or be lost: an entry trimmed while pending, a
replayed event, a dead letter Redis refuses for lack of memory."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Event, Failed
from syncd.consumer.replay import MOVE_LUA
from tests.test_consumer import CUSTOMERS, KEYS, publish
from tests.test_consumer_faults import Runner, make, until
from tests.test_consumer_reasons import (
    REASON,
    REASONS,
    dead_letter_from_c2,
    fail_once_with_a_reason,
)

REPLAY = KEYS.replay("crm.customers", "billing")


async def test_reason_of_an_entry_trimmed_while_pending_is_not_left_behind(
    redis: aioredis.Redis,
) -> None:
    """Retention trims an entry a handler refused while it is still pending: XAUTOCLAIM reports
    it deleted and the consumer drops it (consumer_pending_trimmed), but its reason stays in
    the group's hash forever (every later write refreshes the hash's week)."""
    await fail_once_with_a_reason(redis)  # key 2 pending, its reason kept
    third = (await redis.xrange(CUSTOMERS))[2][0]
    await redis.xtrim(CUSTOMERS, minid=third, approximate=False)  # retention: entries 1 and 2 gone
    second = make(redis, "c2", claim_idle_ms=50)
    await asyncio.sleep(0.1)
    with capture_logs() as logs:
        assert await second.read() == []
    assert [e for e in logs if e["event"] == "consumer_pending_trimmed"]
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0  # nothing left to settle
    assert await redis.hgetall(REASONS) == {}  # ...yet its reason is kept


async def _replayed_and_refused(redis: aioredis.Redis) -> str:
    """Key 1 dead-lettered, handed back to the group (`syncd dead replay`), then refused with
    REASON by consumer c1, which stops: the replay entry stays pending under c1. Returns the
    replay entry's id."""
    origin = await publish(redis, CUSTOMERS, 1)
    c0 = make(redis, "c0", claim_idle_ms=50, max_deliveries=1)
    assert await c0.read()
    await asyncio.sleep(0.06)
    assert await c0.read() == []  # dead-lettered
    await c0.close()
    ((dead_id, _),) = await redis.xrange(KEYS.dead)
    move = redis.register_script(MOVE_LUA)
    assert await move(keys=[KEYS.dead, REPLAY], args=[dead_id, CUSTOMERS, "billing"]) == 1
    ((replay_id, _),) = await redis.xrange(REPLAY)

    async def refuse(batch: list[Event]) -> list[Failed]:
        return [Failed(e, REASON) for e in batch if e.replay_id is not None]

    c1 = make(redis, "c1", claim_idle_ms=60_000)
    runner = Runner(c1, refuse)
    await until(lambda: redis.hlen(REASONS), "the reason kept in Redis")
    await runner.finish()
    await c1.close()
    assert origin != replay_id.decode()
    return replay_id.decode()


async def test_a_replayed_events_reason_reaches_its_dead_letter_from_another_consumer(
    redis: aioredis.Redis,
) -> None:
    replay_id = await _replayed_and_refused(redis)
    # The reason is kept under the event's own stream and entry id, which is no longer pending
    # in the group; the entry pending is the replay stream's.
    assert await redis.hkeys(REASONS) == [KEYS.reason_field(REPLAY, replay_id).encode()]


async def test_a_replayed_event_handled_by_another_consumer_leaves_no_reason(
    redis: aioredis.Redis,
) -> None:
    await _replayed_and_refused(redis)
    handled: list[Event] = []

    async def handle(batch: list[Event]) -> None:
        handled.extend(batch)

    c2 = make(redis, "c2", claim_idle_ms=100)
    runner = Runner(c2, handle)
    await until(lambda: bool(handled), "the replayed event handled by c2")
    await runner.finish()
    assert await redis.xlen(REPLAY) == 0  # acknowledged (and deleted): settled
    assert await redis.hgetall(REASONS) == {}  # ...yet its reason is kept


async def test_a_replayed_event_failed_again_is_dead_lettered_with_its_reason(
    redis: aioredis.Redis,
) -> None:
    await _replayed_and_refused(redis)

    async def fail_without_a_reason(batch: list[Event]) -> list[Event]:
        return list(batch)

    dead = await dead_letter_from_c2(redis, fail_without_a_reason)
    assert dead[b"reason"] == b"max_deliveries"
    assert dead.get(b"detail") == REASON.encode()
    assert await redis.hgetall(REASONS) == {}


async def test_a_dead_letter_refused_for_lack_of_memory_keeps_the_reason(
    redis: aioredis.Redis,
) -> None:
    """The dead-letter script fails (Redis out of memory: XADD refused): the entry stays
    pending and is buried on a later pass, but Settle.bury deleted the kept reason anyway, so
    the dead letter finally written lacks it."""
    await fail_once_with_a_reason(redis)
    second = make(redis, "c2", claim_idle_ms=50, max_deliveries=1)
    await second.ensure_groups()
    await asyncio.sleep(0.1)
    policy = (await redis.config_get("maxmemory-policy"))["maxmemory-policy"]
    await redis.config_set("maxmemory-policy", "noeviction")
    await redis.config_set("maxmemory", 1)  # every write that needs memory: OOM
    try:
        with capture_logs() as logs:
            assert await second.read() == []
    finally:
        await redis.config_set("maxmemory", 0)
        await redis.config_set("maxmemory-policy", policy)
    assert [e for e in logs if e["event"] == "consumer_dead_letter_failed"]
    assert await redis.xlen(KEYS.dead) == 0  # not buried: still pending
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 1
    assert await redis.hlen(REASONS) == 1  # still to be buried: its reason must stay
    await asyncio.sleep(0.1)
    assert await second.read() == []  # buried now that Redis has memory again
    ((_, dead),) = await redis.xrange(KEYS.dead)
    assert dead[b"key"] == b"2"
    assert dead.get(b"detail") == REASON.encode()
