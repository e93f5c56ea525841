"""Consumer.run under real faults: Redis restarts, failovers, lost replicas, destroyed groups,
poison events, an outage of the handler's own dependencies, a handler that never returns."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis
from redis.exceptions import (
    ClusterDownError,
    ConnectionError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from structlog.testing import capture_logs

from syncd.consumer import Consumer, Event, is_newer_or_same
from syncd.consumer.delivery import (
    Backoff,
    UnknownResult,
    classify,
    entry_order,
    error_code,
    failed_events,
)
from syncd.testing.redis_server import running
from tests.test_consumer import CUSTOMERS, KEYS, publish


async def until(
    check: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 30
) -> None:
    """Poll `check` until it holds; fail naming `what` after a generous deadline."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def make(client: aioredis.Redis, name: str = "c1", **options: Any) -> Consumer:
    options.setdefault("streams", [CUSTOMERS])
    options.setdefault("block_ms", 50)
    return Consumer(client, "billing", name, **options)


class Runner:
    """Consumer.run as a task, with the keys its handler saw."""

    def __init__(self, consumer: Consumer, handler: Callable[[list[Event]], Awaitable[object]]):
        self.stop = asyncio.Event()
        self.task = asyncio.create_task(consumer.run(handler, stop=self.stop))

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)  # re-raises whatever escaped run()

    def alive(self) -> bool:
        if self.task.done():
            self.task.result()  # raise what ended it
            raise AssertionError("run() returned before stop")
        return True


# -- what an error means ----------------------------------------------------------------


PIPELINE_NOGROUP_TUPLE = (
    "Command # 1 (XAUTOCLAIM st:{1}:crm.customers billing c1 20 0-0 COUNT 100) of pipeline "
    "caused error: (\"NOGROUP No such key 'st:{1}:crm.customers' or consumer group 'billing'\",)"
)
PIPELINE_NOGROUP = (
    "Command # 1 (XAUTOCLAIM st:{1}:crm.customers billing c1 60000 0-0 COUNT 100) of pipeline "
    "caused error: NOGROUP No such key 'st:{1}:crm.customers' or consumer group 'billing'"
)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (ResponseError(PIPELINE_NOGROUP), "nogroup"),
        (ResponseError(PIPELINE_NOGROUP_TUPLE), "nogroup"),
        (ResponseError("NOGROUP No such key 'x' or consumer group 'g'"), "nogroup"),
        (ReadOnlyError("You can't write against a read only replica."), "unavailable"),
        (ResponseError("READONLY You can't write against a read only replica."), "unavailable"),
        (TryAgainError("Multiple keys request during rehashing of slot"), "unavailable"),
        (ResponseError("TRYAGAIN Multiple keys request during rehashing"), "unavailable"),
        (ClusterDownError("The cluster is down"), "unavailable"),
        (ResponseError("CLUSTERDOWN Hash slot not served"), "unavailable"),
        (ResponseError("NOREPLICAS Not enough good replicas to write."), "unavailable"),
        (ResponseError("LOADING Redis is loading the dataset in memory"), "unavailable"),
        (ResponseError("MASTERDOWN Link with MASTER is down"), "unavailable"),
        (ResponseError("OOM command not allowed when used memory > 'maxmemory'."), "unavailable"),
        (ConnectionError("Connection refused"), "unavailable"),
        (
            ResponseError(
                "UNBLOCKED force unblock from blocking operation, instance state changed "
                "(master -> replica?)"
            ),
            "unavailable",
        ),
        (ResponseError("ERR unknown command 'XAUTOCLAIM'"), "error"),
        (ResponseError("WRONGTYPE Operation against a key holding the wrong kind"), "error"),
        (ValueError("something else"), "error"),
    ],
)
def test_error_classification(exc: Exception, kind: str) -> None:
    assert classify(exc) == kind


def test_error_code() -> None:
    assert error_code(ResponseError(PIPELINE_NOGROUP)) == "NOGROUP"
    assert error_code(ResponseError("ERR bad")) == "ERR"
    assert error_code(ConnectionError("Error 111 connecting")) == ""


def test_failed_events_and_backoff() -> None:
    batch = [
        Event(CUSTOMERS, f"1-{i}", 1, "crm.customers", "created", str(i), b"{}", None, 1)
        for i in range(3)
    ]
    assert failed_events(batch, None) == []
    with pytest.raises(UnknownResult):
        failed_events(batch, 3)  # not a collection: says nothing of which events failed
    assert failed_events(batch, [batch[1]]) == [batch[1]]
    assert failed_events(batch, [b"1-2", "1-2"]) == [batch[2]]
    assert failed_events(batch, (e for e in batch if e.key != "1")) == [batch[0], batch[2]]
    with pytest.raises(ValueError, match="not events of its batch"):
        failed_events(batch, ["1-2", "9-9"])  # 9-9 is no event of this batch
    assert failed_events(batch, (batch[0], batch[2])) == [batch[0], batch[2]]
    backoff = Backoff(0.5, 2.0)
    assert [backoff.next() for _ in range(4)] == [0.5, 1.0, 2.0, 2.0]
    backoff.reset()
    assert backoff.next() == 0.5


@pytest.mark.parametrize(
    ("incoming", "stored", "apply"),
    [
        ("2024-05-01T12:00:01Z", "2024-05-01T12:00:00Z", True),
        ("2024-05-01T12:00:00Z", "2024-05-01T12:00:00Z", True),  # the same version again
        ("2024-05-01T11:59:59Z", "2024-05-01T12:00:00Z", False),
        ("2024-05-01T12:00:00.5Z", "2024-05-01T12:00:00Z", True),
        ("2024-05-01T12:00:00.1234567Z", "2024-05-01T12:00:00.5Z", False),
        ("2024-05-01T12:00:00.50Z", "2024-05-01T12:00:00.5Z", True),
        ("2024-05-01T12:00:00Z", None, True),  # nothing stored yet
        (None, "2024-05-01T12:00:00Z", True),  # cannot be ordered by time
    ],
)
def test_newer_or_same_rule(incoming: str | None, stored: str | None, apply: bool) -> None:
    assert is_newer_or_same(incoming, stored) is apply


def test_entry_order() -> None:
    assert entry_order("1714564800123-10") > entry_order("1714564800123-9")
    assert entry_order("1714564800124-0") > entry_order("1714564800123-99")


def test_block_ms_must_be_positive_and_timeout_sane(redis: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="block_ms"):
        make(redis, block_ms=0)
    with pytest.raises(ValueError, match="handler_timeout"):
        make(redis, handler_timeout=0)


# -- Redis faults -----------------------------------------------------------------------


async def test_run_survives_a_restart_that_loses_the_group_while_reclaiming() -> None:
    # NOGROUP inside the XAUTOCLAIM pipeline used to escape run(): reclaim runs on every read
    # here (a tiny claim idle time), so the first read after the restart hits it.
    with running() as server:
        client = aioredis.Redis.from_url(server.url)
        keys: list[str] = []

        async def handler(batch: list[Event]) -> None:
            keys.extend(e.key for e in batch)

        try:
            await publish(client, CUSTOMERS, 1)
            runner = Runner(make(client, claim_idle_ms=20), handler)
            with capture_logs() as logs:
                await until(lambda: keys == ["1"], "the first event")
                server.restart()  # nothing persisted: the stream and its group are gone
                await until(
                    lambda: any(e["event"] == "consumer_redis_unavailable" for e in logs),
                    "the outage to be noticed",
                )
                await publish(client, CUSTOMERS, 2)
                await until(lambda: (keys == ["1", "2"]) and runner.alive(), "event 2")
                await runner.finish()
            names = {e["event"] for e in logs}
            assert {"consumer_group_missing", "consumer_group_recreated"} <= names
        finally:
            await client.aclose()


async def test_run_survives_a_failover_readonly_and_lost_replicas() -> None:
    # The consumer's server is demoted to a replica (READONLY on every read: it is a write
    # command), promoted again, then refuses writes for want of replicas (NOREPLICAS).
    with running() as other, running() as server:
        client = aioredis.Redis.from_url(server.url)
        keys: list[str] = []

        async def handler(batch: list[Event]) -> None:
            keys.extend(e.key for e in batch)

        try:
            await publish(client, CUSTOMERS, 1)
            runner = Runner(make(client), handler)
            with capture_logs() as logs:
                await until(lambda: keys == ["1"], "the first event")
                await client.execute_command("REPLICAOF", "127.0.0.1", str(other.port))
                await until(
                    lambda: any("ReadOnlyError" in e.get("error", "") for e in logs), "READONLY"
                )
                runner.alive()
                await client.execute_command("REPLICAOF", "NO", "ONE")
                await client.config_set("min-replicas-to-write", "1")
                await until(
                    lambda: any("NOREPLICAS" in e.get("error", "") for e in logs), "NOREPLICAS"
                )
                await client.config_set("min-replicas-to-write", "0")
                # The promoted server holds the other one's (empty) data set: the group is
                # created again after the newest event this consumer got.
                await publish(client, CUSTOMERS, 2)
                await until(lambda: (keys == ["1", "2"]) and runner.alive(), "event 2")
                await runner.finish()
        finally:
            await client.aclose()


@pytest.mark.parametrize("start", ["beginning", "new"])
async def test_destroyed_group_does_not_replay_what_this_consumer_handled(
    redis: aioredis.Redis, start: Any
) -> None:
    keys: list[str] = []

    async def handler(batch: list[Event]) -> None:
        keys.extend(e.key for e in batch)

    for key in (1, 2, 3):
        await publish(redis, CUSTOMERS, key)
    runner = Runner(make(redis, start=start), handler)
    expected = ["1", "2", "3"] if start == "beginning" else []
    with capture_logs() as logs:
        if start == "new":
            await until(
                lambda: any(e["event"] == "consumer_group_created" for e in logs), "the group"
            )
            for key in (1, 2, 3):
                await publish(redis, CUSTOMERS, key)
            expected = ["1", "2", "3"]
        await until(lambda: keys == expected, "the first events")
        await redis.xgroup_destroy(CUSTOMERS, "billing")
        await until(
            lambda: any(e["event"] == "consumer_group_recreated" for e in logs),
            "the group to be created again",
        )
        await publish(redis, CUSTOMERS, 4)
        await until(lambda: (keys[-1:] == ["4"]) and runner.alive(), "event 4")
        await runner.finish()
    assert keys == [*expected, "4"]  # nothing handled before came again
    (line,) = [e for e in logs if e["event"] == "consumer_group_recreated"]
    assert line["effect"] == "resumes after the newest event this consumer was handed"


async def test_recreated_group_says_what_it_replays_or_skips(redis: aioredis.Redis) -> None:
    for key in (1, 2, 3):
        await publish(redis, CUSTOMERS, key)
    await redis.xgroup_create(CUSTOMERS, "billing", id="$")
    await redis.xgroup_destroy(CUSTOMERS, "billing")
    fresh = make(redis, "fresh", start="beginning")
    fresh._groups_ready = True  # it believes the group exists, as after a loss under its feet
    with capture_logs() as logs:
        events = await fresh.read()
    assert [e.key for e in events] == ["1", "2", "3"]
    (line,) = [e for e in logs if e["event"] == "consumer_group_recreated"]
    assert line["effect"] == "replays the 3 entries the stream holds"

    await redis.xgroup_destroy(CUSTOMERS, "billing")
    skipper = make(redis, "skipper", start="new")
    skipper._groups_ready = True
    with capture_logs() as logs:
        assert await skipper.read() == []
    (line,) = [e for e in logs if e["event"] == "consumer_group_recreated"]
    assert line["effect"] == "skips what was added while the group was missing"


# -- per event, outages, timeouts -------------------------------------------------------


async def dead_keys(client: aioredis.Redis) -> list[str]:
    return [f[b"key"].decode() for _, f in await client.xrange(KEYS.dead)]


@pytest.mark.parametrize("report", ["raise", "return"])
async def test_only_the_poison_event_is_dead_lettered(redis: aioredis.Redis, report: str) -> None:
    handled: list[str] = []

    async def handler(batch: list[Event]) -> list[Event]:
        bad = [e for e in batch if e.key == "3"]
        if bad and report == "raise":
            raise RuntimeError("cannot apply record 3")
        handled.extend(e.key for e in batch if e.key != "3")
        return bad

    for key in range(1, 6):
        await publish(redis, CUSTOMERS, key)
    runner = Runner(make(redis, claim_idle_ms=100, max_deliveries=2), handler)
    await until(lambda: len(set(handled)) == 4, "the good events")
    await until(lambda: _dead_is(redis, ["3"]), "the poison event in the dead stream")
    await runner.finish()
    assert sorted(set(handled)) == ["1", "2", "4", "5"]
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0


async def _dead_is(client: aioredis.Redis, keys: list[str]) -> bool:
    return await dead_keys(client) == keys


async def test_handler_outage_stops_reading_and_burns_no_delivery_counts(
    redis: aioredis.Redis,
) -> None:
    down = True
    calls = 0
    handled: set[str] = set()

    async def handler(batch: list[Event]) -> None:
        nonlocal calls
        calls += 1
        if down:
            raise ConnectionRefusedError("the downstream database is down")
        handled.update(e.key for e in batch)

    for key in range(20):
        await publish(redis, CUSTOMERS, key)
    c = make(redis, batch=5, outage_after=2, claim_idle_ms=1500, max_deliveries=2)
    with capture_logs() as logs:
        runner = Runner(c, handler)
        await until(
            lambda: any(e["event"] == "consumer_handler_outage" for e in logs),
            "the outage to be noticed",
        )
        seen = calls
        # Each retry: the batch, then each of its five events alone; pauses of 1, 2 and 4 s.
        await until(lambda: calls >= seen + 3 * 6, "three more retries of the held events")
        # Two rounds of five were read, then no more; none was delivered twice, although the
        # claim idle time passed many times over.
        (group,) = await redis.xinfo_groups(CUSTOMERS)
        assert (group["entries-read"], group["pending"], group["lag"]) == (10, 10, 10)
        rows = await redis.xpending_range(CUSTOMERS, "billing", "-", "+", 100)
        assert {row["times_delivered"] for row in rows} == {1}
        down = False
        await until(lambda: len(handled) == 20, "every event once the outage is over")
        await runner.finish()
    assert await dead_keys(redis) == []


async def test_a_lone_poison_event_does_not_hold_up_the_rest(redis: aioredis.Redis) -> None:
    handled: list[str] = []

    async def handler(batch: list[Event]) -> None:
        if any(e.key == "1" for e in batch):
            raise RuntimeError("record 1 is broken")
        handled.extend(e.key for e in batch)

    await publish(redis, CUSTOMERS, 1)
    with capture_logs() as logs:
        runner = Runner(make(redis, outage_after=1, claim_idle_ms=200, max_deliveries=2), handler)
        await until(
            lambda: any(e["event"] == "consumer_handler_outage" for e in logs),
            "the lone failure to look like an outage",
        )
        for key in (2, 3):
            await publish(redis, CUSTOMERS, key)
        await until(lambda: handled == ["2", "3"], "the events after it")
        # Alone, it looks like an outage and is held; each event after it that succeeds tells
        # them apart again, and it goes the normal way: to the dead stream.
        key = 4
        while not await _dead_is(redis, ["1"]):
            assert key < 40, "the poison event never reached the dead stream"
            await publish(redis, CUSTOMERS, key)
            await until(lambda k=str(key): handled[-1] == k, f"event {key}")
            await asyncio.sleep(0.3)  # beyond the claim idle time: it may come back now
            key += 1
        assert handled == [str(k) for k in range(2, key)]
        await runner.finish()


async def test_a_handler_that_never_returns_times_out(redis: aioredis.Redis) -> None:
    handled: list[str] = []

    async def handler(batch: list[Event]) -> None:
        if any(e.key == "1" for e in batch):
            await asyncio.Event().wait()  # hangs forever
        handled.extend(e.key for e in batch)

    for key in (1, 2):
        await publish(redis, CUSTOMERS, key)
    runner = Runner(make(redis, handler_timeout=0.2, claim_idle_ms=100, max_deliveries=1), handler)
    await until(lambda: handled == ["2"], "the event after the hanging one")
    await until(lambda: _dead_is(redis, ["1"]), "the hanging event in the dead stream")
    await runner.finish()


async def test_dead_letter_script_is_idempotent(redis: aioredis.Redis) -> None:
    entry_id = await publish(redis, CUSTOMERS, 1)
    c = make(redis)
    (event,) = await c.read()
    fields = {"op": b"created", "key": b"1", "data": b"{}"}
    await c._settle.bury(CUSTOMERS, entry_id, fields, "max_deliveries", 6)
    await c._settle.bury(CUSTOMERS, entry_id, fields, "max_deliveries", 6)  # a retried call
    assert await dead_keys(redis) == ["1"]
    assert event.key == "1"


# -- the documented way to apply events ---------------------------------------------------


class Row(msgspec.Struct):
    data: bytes
    modified_on: str | None


async def test_newest_version_wins_under_redelivery(redis: aioredis.Redis) -> None:
    # v1 fails, v2 is handled, v1 comes again: the README's rule keeps v2; a plain upsert by
    # key would end at v1.
    table: dict[str, Row] = {}
    naive: dict[str, bytes] = {}
    fail_once = {"v1"}

    def apply(event: Event) -> None:  # as in the README
        stored = table.get(event.key)
        if is_newer_or_same(event.modified_on, stored.modified_on if stored else None):
            table[event.key] = Row(event.data, event.modified_on)

    async def handler(batch: list[Event]) -> list[Event]:
        failed = []
        for event in batch:
            version = event.json()["name"]
            if version in fail_once:
                fail_once.discard(version)
                failed.append(event)
                continue
            apply(event)
            naive[event.key] = event.data
        return failed

    async def version(name: str, modified_on: str) -> None:
        data = msgspec.json.encode({"id": 7, "name": name})
        fields = {"op": "updated", "key": "7", "data": data, "modified_on": modified_on}
        await redis.xadd(CUSTOMERS, fields)

    await version("v1", "2024-05-01T12:00:00Z")
    await version("v2", "2024-05-01T12:05:00Z")
    c = make(redis, batch=1, claim_idle_ms=200)
    for _ in range(2):  # v1 (fails), then v2
        batch = await c.read()
        await c.ack(*[e for e in batch if e not in await handler(batch)])
    await asyncio.sleep(0.3)
    (again,) = await c.read()
    assert (again.json()["name"], again.deliveries) == ("v1", 2)
    await c.ack(*[e for e in [again] if e not in await handler([again])])

    assert msgspec.json.decode(table["7"].data)["name"] == "v2"
    assert msgspec.json.decode(naive["7"])["name"] == "v1"
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0
