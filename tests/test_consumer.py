"""syncd.consumer against a real Redis: groups, acks, takeover of stale entries, dead letters."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd import catalogue
from syncd.consumer import Consumer, Event, Subscription
from syncd.keys import Keys
from syncd.testing.redis_server import RedisServer, running

TENANT = 123456
KEYS = Keys("st", TENANT)
CUSTOMERS = KEYS.stream("crm.customers")
JOBS = KEYS.stream("jpm.jobs")


async def publish(
    redis: aioredis.Redis,
    stream: str,
    key: int,
    *,
    op: str = "created",
    modified_on: str = "2024-05-01T12:00:00Z",
    **extra: str,
) -> str:
    """XADD one event the way the daemon does; returns the entry id."""
    data = msgspec.json.encode({"id": key, "name": f"Customer {key}", "active": True})
    fields = {"op": op, "key": str(key), "data": data, "modified_on": modified_on, **extra}
    entry_id = await redis.xadd(stream, fields)
    return entry_id if isinstance(entry_id, str) else entry_id.decode()


async def pending_ids(redis: aioredis.Redis, stream: str, group: str) -> dict[str, str]:
    """Pending entry id -> owning consumer."""
    rows = await redis.xpending_range(stream, group, "-", "+", 100)
    return {row["message_id"].decode(): row["consumer"].decode() for row in rows}


def consumer(redis: aioredis.Redis, name: str = "c1", **options: Any) -> Consumer:
    options.setdefault("streams", [CUSTOMERS])
    options.setdefault("block_ms", 50)
    return Consumer(redis, "billing", name, **options)


class Customer(msgspec.Struct):
    id: int
    name: str
    active: bool


async def test_group_created_on_missing_stream_reads_from_beginning(
    redis: aioredis.Redis,
) -> None:
    first = await publish(redis, CUSTOMERS, 1)
    second = await publish(redis, CUSTOMERS, 2, op="updated")
    c = consumer(redis, streams=[CUSTOMERS, JOBS])

    with capture_logs() as logs:
        events = await c.read()

    assert [(e.id, e.op, e.key, e.deliveries) for e in events] == [
        (first, "created", "1", 1),
        (second, "updated", "2", 1),
    ]
    assert await redis.exists(JOBS) == 1  # MKSTREAM: the daemon has not written it yet
    groups = await redis.xinfo_groups(JOBS)
    assert [g["name"] for g in groups] == [b"billing"]
    created = [e["stream"] for e in logs if e["event"] == "consumer_group_created"]
    assert created == [CUSTOMERS, JOBS]


async def test_existing_group_is_reused(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, 1)
    a = consumer(redis, "a")
    assert len(await a.read()) == 1
    b = consumer(redis, "b")

    with capture_logs() as logs:
        assert await b.read() == []  # BUSYGROUP tolerated; the group kept its position

    assert not [e for e in logs if e["event"] == "consumer_group_created"]


async def test_start_new_skips_what_is_already_there(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, 1)
    c = consumer(redis, start="new")
    assert await c.read() == []
    later = await publish(redis, CUSTOMERS, 2)
    assert [e.id for e in await c.read()] == [later]


async def test_typed_event_and_unknown_fields(redis: aioredis.Redis) -> None:
    entry_id = await publish(redis, CUSTOMERS, 7, modified_on="", trace="abc", schema="v9")
    (event,) = await consumer(redis).read()

    assert event == Event(
        stream=CUSTOMERS,
        id=entry_id,
        tenant=TENANT,
        feed="crm.customers",
        op="created",
        key="7",
        data=b'{"id":7,"name":"Customer 7","active":true}',
        modified_on=None,
        deliveries=1,
    )
    assert event.json() == {"id": 7, "name": "Customer 7", "active": True}
    assert event.decode(Customer) == Customer(id=7, name="Customer 7", active=True)


async def test_explicit_ack(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, 1)
    await publish(redis, JOBS, 2)
    c = consumer(redis, streams=[CUSTOMERS, JOBS])
    events = await c.read()
    assert len(events) == 2

    assert await c.ack(*events) == 2
    assert await c.ack_all(events) == 0  # already acknowledged
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}
    assert await pending_ids(redis, JOBS, "billing") == {}


async def test_run_acks_each_batch_after_the_handler(redis: aioredis.Redis) -> None:
    for key in range(5):
        await publish(redis, CUSTOMERS, key)
    c = consumer(redis, batch=2)
    stop = asyncio.Event()
    seen: list[list[str]] = []

    async def handler(batch: list[Event]) -> None:
        # At-least-once: while the handler works, its batch is still pending.
        pending = await pending_ids(redis, CUSTOMERS, "billing")
        assert set(pending) == {e.id for e in batch}
        seen.append([e.key for e in batch])
        if sum(map(len, seen)) == 5:
            stop.set()

    await asyncio.wait_for(c.run(handler, stop=stop), 5)

    assert seen == [["0", "1"], ["2", "3"], ["4"]]
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


async def test_run_leaves_a_failed_batch_pending_and_gets_it_again(
    redis: aioredis.Redis,
) -> None:
    entry_id = await publish(redis, CUSTOMERS, 1)
    c = consumer(redis, claim_idle_ms=100)
    stop = asyncio.Event()
    deliveries: list[int] = []

    async def handler(batch: list[Event]) -> None:
        deliveries.extend(e.deliveries for e in batch)
        if len(deliveries) == 1:
            raise RuntimeError("downstream is down")
        stop.set()

    with capture_logs() as logs:
        await asyncio.wait_for(c.run(handler, stop=stop), 5)

    assert deliveries == [1, 2]
    failed = [e for e in logs if e["event"] == "consumer_handler_failed"]
    assert len(failed) == 1
    assert failed[0]["entry_id"] == entry_id
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


async def test_killed_consumer_is_taken_over_after_idle_time(redis: aioredis.Redis) -> None:
    ids = [await publish(redis, CUSTOMERS, key) for key in range(3)]
    doomed = consumer(redis, "doomed", claim_idle_ms=200)
    assert [e.id for e in await doomed.read()] == ids  # read, then "killed": never acked
    survivor = consumer(redis, "survivor", claim_idle_ms=200)

    assert await survivor.read() == []  # not idle long enough yet
    await asyncio.sleep(0.25)
    with capture_logs() as logs:
        events = await survivor.read()

    assert [(e.id, e.key, e.deliveries) for e in events] == [
        (ids[0], "0", 2),
        (ids[1], "1", 2),
        (ids[2], "2", 2),
    ]
    assert await pending_ids(redis, CUSTOMERS, "billing") == dict.fromkeys(ids, "survivor")
    assert [e["entries"] for e in logs if e["event"] == "consumer_reclaimed"] == [3]
    assert await survivor.ack(*events) == 3
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


async def test_poison_event_goes_to_the_dead_stream(redis: aioredis.Redis) -> None:
    poison = await publish(redis, CUSTOMERS, 666, trace="t-1")
    c = consumer(redis, claim_idle_ms=100, max_deliveries=2)

    deliveries = []
    with capture_logs() as logs:
        for _ in range(3):  # never acknowledged: delivered, retried, then buried
            deliveries.append([e.deliveries for e in await c.read()])
            await asyncio.sleep(0.12)

    assert deliveries == [[1], [2], []]
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}
    ((_, fields),) = await redis.xrange(KEYS.dead)
    assert fields == {
        b"feed": b"crm.customers",
        b"reason": b"max_deliveries",
        b"stream": CUSTOMERS.encode(),
        b"entry_id": poison.encode(),
        b"group": b"billing",
        b"consumer": b"c1",
        b"deliveries": b"3",
        b"op": b"created",
        b"key": b"666",
        b"data": b'{"id":666,"name":"Customer 666","active":true}',
        b"modified_on": b"2024-05-01T12:00:00Z",
        b"trace": b"t-1",
    }
    buried = [e for e in logs if e["event"] == "consumer_dead_lettered"]
    assert [(e["entry_id"], e["deliveries"]) for e in buried] == [(poison, 3)]


async def test_poison_event_is_not_acknowledged_when_the_copy_fails(
    redis: aioredis.Redis,
) -> None:
    poison = await publish(redis, CUSTOMERS, 666)
    await redis.set(KEYS.dead, "not a stream")  # makes XADD to the dead stream fail
    c = consumer(redis, claim_idle_ms=50, max_deliveries=1)
    assert len(await c.read()) == 1
    await asyncio.sleep(0.06)

    with capture_logs() as logs:
        assert await c.read() == []

    assert [e["event"] for e in logs if e["log_level"] == "error"] == [
        "consumer_dead_letter_failed"
    ]
    assert await pending_ids(redis, CUSTOMERS, "billing") == {poison: "c1"}

    await redis.delete(KEYS.dead)
    await asyncio.sleep(0.06)
    assert await c.read() == []
    assert [fields[b"entry_id"] for _, fields in await redis.xrange(KEYS.dead)] == [poison.encode()]
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


async def test_malformed_entry_is_dead_lettered(redis: aioredis.Redis) -> None:
    bad = (await redis.xadd(CUSTOMERS, {"op": "created", "key": "1"})).decode()
    good = await publish(redis, CUSTOMERS, 2)

    assert [e.id for e in await consumer(redis).read()] == [good]

    ((_, fields),) = await redis.xrange(KEYS.dead)
    assert fields[b"reason"] == b"malformed"
    assert fields[b"entry_id"] == bad.encode()
    assert b"data" in fields[b"detail"]
    assert await pending_ids(redis, CUSTOMERS, "billing") == {good: "c1"}


async def test_trimmed_pending_entries_are_dropped_quietly(redis: aioredis.Redis) -> None:
    for key in range(3):
        await publish(redis, CUSTOMERS, key)
    assert len(await consumer(redis, "doomed").read()) == 3
    await redis.xtrim(CUSTOMERS, maxlen=0)
    await asyncio.sleep(0.06)

    with capture_logs() as logs:
        assert await consumer(redis, "survivor", claim_idle_ms=50).read() == []

    assert [e["entries"] for e in logs if e["event"] == "consumer_pending_trimmed"] == [3]
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


@pytest.mark.parametrize("start", ["beginning", "new"])
async def test_group_recreated_when_the_stream_vanishes(
    redis: aioredis.Redis, start: Literal["beginning", "new"]
) -> None:
    c = consumer(redis, streams=CUSTOMERS, start=start)
    assert await c.read() == []
    first = await publish(redis, CUSTOMERS, 1)
    assert [e.id for e in await c.read()] == [first]
    await redis.delete(CUSTOMERS)
    await redis.xadd(CUSTOMERS, {"x": "1"}, id="1-1")  # ids of a new stream may be lower
    await redis.xdel(CUSTOMERS, "1-1")  # as after a restart of a Redis without persistence
    after = [await publish(redis, CUSTOMERS, key) for key in (2, 3)]

    with capture_logs() as logs:
        events = await c.read()

    # The new stream does not hold what this consumer got: all of it is news, even for "new".
    assert [e.id for e in events] == after
    names = [e["event"] for e in logs]
    assert "consumer_group_missing" in names
    (recreated,) = [e for e in logs if e["event"] == "consumer_group_recreated"]
    assert (recreated["position"], recreated["effect"]) == (
        "0",
        "a new stream: its 2 entries are all news",
    )


async def test_run_carries_on_through_a_redis_restart() -> None:
    # A server of its own: restarting the session's server would pull it from under others.
    with running() as server:
        client = aioredis.Redis.from_url(server.url)
        try:
            await publish(client, CUSTOMERS, 1)
            c = consumer(client)
            stop = asyncio.Event()
            keys: list[str] = []

            async def handler(batch: list[Event]) -> None:
                keys.extend(e.key for e in batch)
                if len(keys) > 1:
                    stop.set()
                    return
                # Down for a while (the acknowledgement and the next reads fail), then back
                # with nothing: groups included, as nothing is saved.
                server.stop(keep_data=True)
                background.append(asyncio.create_task(come_back()))

            async def come_back() -> None:
                await asyncio.sleep(0.5)
                await asyncio.to_thread(server.start)
                writer = aioredis.Redis.from_url(server.url)
                try:
                    await publish(writer, CUSTOMERS, 2)
                finally:
                    await writer.aclose()

            background: list[asyncio.Task[None]] = []

            with capture_logs() as logs:
                await asyncio.wait_for(c.run(handler, stop=stop), 20)
            await asyncio.gather(*background)

            assert keys == ["1", "2"]
            seen = {e["event"] for e in logs}
            assert {"consumer_redis_unavailable", "consumer_group_missing"} <= seen
        finally:
            await client.aclose()


async def test_subscriptions(redis: aioredis.Redis) -> None:
    everything = consumer(redis, streams=Subscription(TENANT))
    assert everything.streams == [KEYS.stream(feed) for feed in catalogue.feeds()]
    some = consumer(redis, streams=[Subscription(TENANT, ["jpm.jobs"]), Subscription(7)])
    assert some.streams[0] == JOBS
    assert len(some.streams) == 1 + len(catalogue.feeds())

    entry_id = await publish(redis, KEYS.stream("settings.technicians"), 5)
    (event,) = await everything.read()
    assert (event.id, event.tenant, event.feed) == (entry_id, TENANT, "settings.technicians")


@pytest.mark.parametrize(
    "streams",
    [["crm.customers"], ["st:{abc}:crm.customers"], [KEYS.stream("crm.nope")], [KEYS.dead], []],
)
def test_rejects_streams_that_are_not_event_streams(
    redis: aioredis.Redis, streams: list[str]
) -> None:
    with pytest.raises(ValueError, match="stream"):
        consumer(redis, streams=streams)


def test_rejects_unknown_feeds() -> None:
    with pytest.raises(ValueError, match=r"unknown feed.*crm\.customer$"):
        Subscription(TENANT, ["crm.customers", "crm.customer"])


async def test_iteration_and_close(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, 1)
    busy = consumer(redis, "busy")
    await busy.read()  # keeps a pending entry: its name must survive close()

    await publish(redis, CUSTOMERS, 2)
    batches = []
    async with consumer(redis, "idle") as c:
        async for batch in c:
            batches.append([e.key for e in batch])
            await c.ack(*batch)
            await c.close()
    await busy.close()

    assert batches == [["2"]]
    names = [row["name"] for row in await redis.xinfo_consumers(CUSTOMERS, "billing")]
    assert names == [b"busy"]
    with pytest.raises(RuntimeError, match="closed"):
        await c.read()


def _library_default_timeout_ms() -> int:
    """The block time under redis-py's own default read timeout: redis-py 8 gives connections
    5 s (so 4 s of block), older versions none (the full 5 s of block)."""
    from redis.asyncio.connection import AbstractConnection

    default = inspect.signature(AbstractConnection.__init__).parameters["socket_timeout"].default
    return 5000 if default is None else int(default * 800)


@pytest.mark.parametrize(
    ("options", "block_ms"),
    # {}: from_url leaves the socket timeout to redis-py's default (see above).
    [({}, None), ({"socket_timeout": 1}, 800), ({"socket_timeout": None}, 5000)],
)
async def test_blocking_reads_stay_under_the_socket_timeout(
    redis_server: RedisServer, options: dict[str, Any], block_ms: int | None
) -> None:
    client = aioredis.Redis.from_url(redis_server.url, **options)
    expected = _library_default_timeout_ms() if block_ms is None else block_ms
    try:
        assert Consumer(client, "g", "c", streams=CUSTOMERS).block_ms == expected
    finally:
        await client.aclose()


@pytest.fixture(params=[{"decode_responses": True}, {"protocol": 3}], ids=["decoded", "resp3"])
async def other_client(
    redis_server: RedisServer, request: pytest.FixtureRequest
) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, **request.param)
    await client.flushall()
    yield client
    await client.aclose()


async def test_client_modes(other_client: aioredis.Redis) -> None:
    await publish(other_client, CUSTOMERS, 1)
    doomed = consumer(other_client, "doomed", claim_idle_ms=50)
    (first,) = await doomed.read()
    await asyncio.sleep(0.06)
    (again,) = await consumer(other_client, "survivor", claim_idle_ms=50).read()

    assert first.data == again.data == b'{"id":1,"name":"Customer 1","active":true}'
    assert (first.deliveries, again.deliveries) == (1, 2)
