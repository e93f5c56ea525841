"""Retention against a real Redis: its cost in network bytes, groups nobody configured, idle
consumer names; and the pure rules of backpressure (hysteresis) and of a memory pause."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.engine import upkeep
from syncd.keys import Keys

STREAM = Keys("st", 77).stream("crm.customers")


async def fill(r: aioredis.Redis, count: int, size: int = 200) -> list[bytes]:
    ids: list[bytes] = []
    payload = b"x" * size
    for start in range(0, count, 1000):
        async with r.pipeline(transaction=False) as pipe:
            for key in range(start, min(count, start + 1000)):
                pipe.xadd(STREAM, {"op": "created", "key": str(key), "data": payload})
            ids.extend(await pipe.execute())
    return ids


async def output_bytes(r: aioredis.Redis) -> int:
    return int((await r.info("stats"))["total_net_output_bytes"])


async def test_a_check_sends_nothing_of_the_retained_stream(redis: aioredis.Redis) -> None:
    ids = await fill(redis, 5_100)
    await redis.xgroup_create(STREAM, "g", id=ids[-1])  # has read everything
    state = await upkeep.stream_state(redis, STREAM, ["g"])

    before = await output_bytes(redis)
    result = await upkeep.trim(redis, STREAM, state, configured=["g"], max_len=5_000, max_age=0)
    sent = await output_bytes(redis) - before

    assert result.removed == 100
    assert [i for i, _ in await redis.xrange(STREAM, count=1)] == [ids[100]]
    # 5,000 retained entries of 200+ bytes would be over 1 MB; a check sends a few replies.
    assert sent < 20_000, sent


@pytest.mark.parametrize("protect_unlisted", [True, False])
async def test_groups_nobody_configured(redis: aioredis.Redis, protect_unlisted: bool) -> None:
    ids = await fill(redis, 300, size=10)
    await redis.xgroup_create(STREAM, "configured", id=ids[-1])
    await redis.xgroup_create(STREAM, "adhoc", id="0")
    await redis.xreadgroup("adhoc", "c", {STREAM: ">"}, count=120)  # 120 pending, 180 unread
    await redis.xack(STREAM, "adhoc", *ids[:100])  # 20 of them still pending
    state = await upkeep.stream_state(redis, STREAM, ["configured"])

    with capture_logs() as logs:
        result = await upkeep.trim(
            redis,
            STREAM,
            state,
            configured=["configured"],
            protect_unlisted=protect_unlisted,
            max_len=50,
            max_age=0,
        )

    warnings = [e for e in logs if e["event"] == "retention_outran_group"]
    if protect_unlisted:
        # Kept like a configured group's: everything from its oldest pending entry on.
        assert result.removed == 100
        assert not warnings
    else:
        assert result.removed == 250
        assert result.lost == {"adhoc": (130, 20)}
        (line,) = warnings
        assert (line["group"], line["unread_lost"], line["pending_lost"]) == ("adhoc", 130, 20)
    assert await redis.xlen(STREAM) == 300 - result.removed


async def test_idle_consumer_names_are_removed(redis: aioredis.Redis) -> None:
    ids = await fill(redis, 3, size=10)
    await redis.xgroup_create(STREAM, "g", id="0")
    await redis.xreadgroup("g", "crashed-with-work", {STREAM: ">"}, count=1)
    await redis.xreadgroup("g", "finished", {STREAM: ">"}, count=1)
    await redis.xack(STREAM, "g", ids[1])
    await asyncio.sleep(0.3)
    await redis.xreadgroup("g", "active", {STREAM: ">"}, count=1)
    await redis.xack(STREAM, "g", ids[2])

    removed = await upkeep.forget_idle_consumers(redis, STREAM, ["g"], idle_s=0.25)

    assert removed == [("g", "finished")]
    names = {c["name"].decode() for c in await redis.xinfo_consumers(STREAM, "g")}
    assert names == {"crashed-with-work", "active"}  # pending work keeps a name


@pytest.mark.parametrize(
    ("current", "behind", "expected"),
    [
        (None, {"g": 100}, None),
        (None, {"g": 101}, "group g has 101 unacknowledged events"),
        ("paused", {"g": 99}, "paused"),  # below max_lag, above the resume mark: still paused
        ("paused", {"g": 51}, "paused"),
        ("paused", {"g": 50}, None),  # at the resume mark: resumed
        (None, {"g": 60}, None),  # between the marks, not paused: stays polling
        (None, {"a": 10, "b": 500}, "group b has 500 unacknowledged events"),
        (None, {}, None),
    ],
)
def test_pause_hysteresis(current: str | None, behind: dict[str, int], expected: str | None):
    reason = upkeep.pause_reason(current, behind, max_lag=100, resume_lag=50)
    if expected is None or reason is None:
        assert reason == expected
    else:
        assert reason.startswith(expected)


def test_pause_off_without_max_lag() -> None:
    assert upkeep.pause_reason("paused", {"g": 10**6}, max_lag=0, resume_lag=0) is None


def test_memory_advice_says_what_would_free_memory() -> None:
    holders = [
        upkeep.Holder("st:{1}:crm.customers", "billing", 5_000),
        upkeep.Holder("st:{1}:jpm.jobs", "old-app", 90_000),
    ]
    text = upkeep.memory_advice(950 * 2**20, 1000 * 2**20, 0.9, holders, retention=False)
    assert text.startswith("Redis uses 950 MB of maxmemory 1000 MB (pause above 90%)")
    assert "group old-app (90000 unacknowledged on st:{1}:jpm.jobs), group billing" in text
    assert "set [streams] max_len or max_age" in text
    assert "raise Redis maxmemory" in text
    text = upkeep.memory_advice(950 * 2**20, 1000 * 2**20, 0.9, [], retention=True)
    assert "max_len" not in text
    assert "raise Redis maxmemory" in text


def test_split_groups_and_outrun() -> None:
    a = upkeep.GroupState("a", last_delivered=(10, 0), pending=0, oldest_pending=None, lag=0)
    b = upkeep.GroupState("b", last_delivered=(5, 0), pending=0, oldest_pending=None, lag=3)
    state = upkeep.StreamState(10, [a, b], [])
    assert upkeep.split_groups(state, ["a"], True) == ([a, b], [])
    assert upkeep.split_groups(state, ["a"], False) == ([a], [b])
    missing = upkeep.StreamState(10, [a, b], ["c"])
    assert upkeep.split_groups(missing, ["a", "c"], False) == (None, [])
    assert upkeep.outrun([b], (5, 1)) == []  # its floor: everything up to 5-0 read
    assert upkeep.outrun([b], (6, 0)) == [b]
    assert upkeep.outrun([b], None) == []
