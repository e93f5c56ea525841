"""Events trimmed from a stream before a group read them: found, counted and said once
(`syncd.consumer.trimmed`), against a real Redis in each reply shape; nothing said where the
group missed nothing."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Consumer, ConsumerMetrics
from syncd.consumer.trimmed import gap
from syncd.testing.redis_server import RedisServer
from tests.test_consumer import CUSTOMERS, KEYS, publish

GROUP = "billing"


def stream(added: Any, length: Any, first: str | None, last: str = "15-0") -> dict[str, Any]:
    return {
        "entries-added": added,
        "length": length,
        "first-entry": None if first is None else (first.encode(), {}),
        "last-generated-id": last.encode(),
    }


def group(read: Any, last: str) -> dict[str, Any]:
    return {"name": GROUP.encode(), "entries-read": read, "last-delivered-id": last.encode()}


@pytest.mark.parametrize(
    ("info", "g", "expected"),
    [
        # Read 5 of 15, the stream trimmed to its last 2: 8 never read.
        (stream(15, 2, "14-0"), group(5, "5-0"), (8, "5-0", "14-0")),
        # The same once the group read on past the gap: it jumped over 8 entries.
        (stream(15, 2, "14-0"), group(7, "15-0"), (8, "15-0", "14-0")),
        # ... and while it is half-way through what is left: not known now.
        (stream(15, 2, "14-0"), group(6, "14-0"), None),
        # Everything read before the trim: nothing missed.
        (stream(15, 2, "14-0"), group(15, "15-0"), None),
        # The last entry handed out was itself trimmed afterwards: nothing missed.
        (stream(15, 2, "14-0"), group(13, "13-0"), None),
        # Nothing trimmed, the group half-way: not known (and nothing to know).
        (stream(15, 15, "1-0"), group(5, "5-0"), None),
        # A group created after the stream's start was trimmed, at its beginning.
        (stream(10, 4, "7-0", "10-0"), group(0, "0-0"), (6, "0-0", "7-0")),
        # Everything trimmed, some of it unread.
        (stream(10, 0, None, "10-0"), group(6, "6-0"), (4, "6-0", "")),
        # Redis cannot tell what the group read (set to an id by hand): nothing said.
        (stream(15, 2, "14-0"), group(None, "5-0"), None),
        # RESP3 shapes: names as bytes.
        (
            {
                b"entries-added": 15,
                b"length": 2,
                b"first-entry": [b"14-0", {}],
                b"last-generated-id": b"15-0",
            },
            {b"name": b"billing", b"entries-read": 5, b"last-delivered-id": b"5-0"},
            (8, "5-0", "14-0"),
        ),
    ],
)
def test_gap(info: dict[Any, Any], g: dict[Any, Any], expected: Any) -> None:
    assert gap(info, g) == expected


@pytest.fixture(params=[{}, {"decode_responses": True}, {"protocol": 3}], ids=str)
async def client(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> Any:  # AsyncIterator[aioredis.Redis]
    r = aioredis.Redis.from_url(redis_server.url, **request.param)
    await r.flushall()
    yield r
    await r.aclose()


async def test_a_trim_past_the_group_is_said_once_and_counted(client: aioredis.Redis) -> None:
    for key in range(5):
        await publish(client, CUSTOMERS, key)
    metrics = ConsumerMetrics()
    first = Consumer(client, GROUP, "a", streams=CUSTOMERS, metrics=metrics)
    with capture_logs() as logs:
        events = await first.read()
        assert len(events) == 5
        await first.ack_all(events)
        for key in range(5, 15):
            await publish(client, CUSTOMERS, key)
        await client.xtrim(CUSTOMERS, maxlen=2, approximate=False)
        second = Consumer(client, GROUP, "b", streams=CUSTOMERS, metrics=metrics)
        rest = await second.read()
        await second.ack_all(rest)
        # Another consumer of the group, and later ones, find the gap said already.
        again = Consumer(client, GROUP, "c", streams=CUSTOMERS, metrics=metrics, block_ms=1)
        assert await again.read() == []
        # Trimmed again while the group reads on: the 3 new ones it missed are said.
        for key in range(15, 20):
            await publish(client, CUSTOMERS, key)
        await client.xtrim(CUSTOMERS, maxlen=2, approximate=False)
        await again.ack_all(await again.read())  # caught up: the gap is known exactly
        later = Consumer(client, GROUP, "d", streams=CUSTOMERS, metrics=metrics, block_ms=1)
        assert await later.read() == []
    assert [e.key for e in rest] == ["13", "14"]
    said = [e for e in logs if e["event"] == "consumer_events_missed"]
    assert [e["missed"] for e in said] == [8, 3], said
    assert (said[0]["tenant"], said[0]["feed"]) == (KEYS.tenant, "crm.customers")
    assert said[0]["log_level"] == "warning"
    assert metrics.value("syncd_consumer_events_missed_total", feed="crm.customers") == 11
    assert await client.hget(KEYS.missed, f"crm.customers:{GROUP}") in (b"11", "11")


async def test_a_trim_of_what_was_read_says_nothing(client: aioredis.Redis) -> None:
    for key in range(6):
        await publish(client, CUSTOMERS, key)
    c = Consumer(client, GROUP, "a", streams=CUSTOMERS, metrics=ConsumerMetrics())
    with capture_logs() as logs:
        await c.ack_all(await c.read())
        await client.xtrim(CUSTOMERS, maxlen=0, approximate=False)
        await publish(client, CUSTOMERS, 7)
        later = Consumer(client, GROUP, "b", streams=CUSTOMERS)
        assert [e.key for e in await later.read()] == ["7"]
    assert not [e for e in logs if e["event"] == "consumer_events_missed"]


async def test_a_stream_created_again_has_its_own_gaps(client: aioredis.Redis) -> None:
    async def gap_of_8(name: str) -> None:
        for key in range(5):
            await publish(client, CUSTOMERS, key)
        first = Consumer(client, GROUP, name, streams=CUSTOMERS, block_ms=1)
        await first.ack_all(await first.read())
        for key in range(5, 15):
            await publish(client, CUSTOMERS, key)
        await client.xtrim(CUSTOMERS, maxlen=2, approximate=False)
        await Consumer(client, GROUP, name + "2", streams=CUSTOMERS, block_ms=1).read()

    with capture_logs() as logs:
        await gap_of_8("a")
        await client.delete(CUSTOMERS)  # the stream and its group gone: all of it anew
        await gap_of_8("b")
    said = [e for e in logs if e["event"] == "consumer_events_missed"]
    assert [e["missed"] for e in said] == [8, 8]


async def test_a_gap_redis_cannot_note_is_said_once_all_the_same(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A consumer whose Redis user may not write the `missed` hash (or a Redis out of memory)
    says each gap once in its process, not at every look."""
    for key in range(5):
        await publish(redis, CUSTOMERS, key)
    first = Consumer(redis, GROUP, "a", streams=CUSTOMERS, block_ms=1)
    await first.ack_all(await first.read())
    for key in range(5, 15):
        await publish(redis, CUSTOMERS, key)
    await redis.xtrim(CUSTOMERS, maxlen=2, approximate=False)
    await redis.execute_command(
        "ACL", "SETUSER", "nohset", "on", ">pw", "~*", "+@all", "-hset", "-hget"
    )
    limited = aioredis.Redis.from_url(redis_server.url, username="nohset", password="pw")
    try:
        metrics = ConsumerMetrics()
        c = Consumer(limited, GROUP, "b", streams=CUSTOMERS, metrics=metrics, block_ms=1)
        refs = c._streams
        with capture_logs() as logs:
            for _ in range(3):
                await c._trims.check(limited, refs)
        said = [e for e in logs if e["event"] == "consumer_events_missed"]
        assert [e["missed"] for e in said] == [8]
        assert metrics.value("syncd_consumer_events_missed_total") == 8
    finally:
        await limited.aclose()
        await redis.execute_command("ACL", "DELUSER", "nohset")
