"""`[redis] wait_replicas`: a page counts as done once enough replicas have it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd import catalogue
from syncd.daemon import Daemon
from syncd.engine.publisher import Publisher
from syncd.errors import ReplicasBehind
from syncd.keys import Keys
from syncd.servicetitan.client import decode_page
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import RunningSimulator, run_simulator
from tests.engine_helpers import (
    assert_exactly_once,
    config_dict,
    settings,
    stream_events,
    truth,
)

FEED = catalogue.feed("crm.customers")


@pytest.fixture
def replicated() -> Iterator[tuple[RedisServer, RedisServer]]:
    primary = RedisServer(extra_args=["--appendonly", "no", "--repl-diskless-sync-delay", "0"])
    primary.start()
    replica = RedisServer(
        extra_args=["--appendonly", "no", "--replicaof", "127.0.0.1", str(primary.port)]
    )
    replica.start()
    yield primary, replica
    replica.stop()
    primary.stop()


@pytest.fixture
async def client(replicated: tuple[RedisServer, RedisServer]) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(replicated[0].url)
    deadline = time.monotonic() + 30
    while (await c.info("replication")).get("slave0", {}).get("state") != "online":
        assert time.monotonic() < deadline, "the replica did not come online"
        await asyncio.sleep(0.05)
    yield c
    await c.aclose()


def page(n: int, cursor: str) -> bytes:
    data = ",".join(f'{{"id": {i}, "modifiedOn": "2024-01-01T00:00:00Z"}}' for i in range(n))
    return f'{{"hasMore": true, "continueFrom": "{cursor}", "data": [{data}]}}'.encode()


async def test_a_page_is_done_once_the_replica_has_it(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    _, replica = replicated
    pub = Publisher(client, "st", wait_replicas=1, wait_timeout=2.0)
    first = await pub.apply(1, FEED.name, None, decode_page(page(50, "c1"), FEED))
    assert (first.applied, first.published) == (True, 50)
    # The replica answers with what it has: the page arrived with its cursor.
    on_replica = aioredis.Redis.from_url(replica.url)
    try:
        assert await on_replica.xlen("st:{1}:crm.customers") == 50
        assert await on_replica.hget("st:{1}:cursors", FEED.name) == b"c1"
    finally:
        await on_replica.aclose()

    replica.stop()
    second = decode_page(page(60, "c2"), FEED)
    with pytest.raises(ReplicasBehind, match="only 0 of 1 replicas acknowledged the page"):
        await pub.apply(1, FEED.name, "c1", second)
    # Applied on the primary, not counted done: a retry finds the cursor moved and adds
    # nothing, so the page is not published twice; nor does it adopt the moved cursor, which
    # no replica holds.
    assert await client.xlen("st:{1}:crm.customers") == 60
    with pytest.raises(ReplicasBehind, match="acknowledged the stored cursor"):
        await pub.apply(1, FEED.name, "c1", second)
    assert await client.xlen("st:{1}:crm.customers") == 60


async def test_without_waiting_nothing_changes(client: aioredis.Redis) -> None:
    pub = Publisher(client, "st")
    applied = await pub.apply(2, FEED.name, None, decode_page(page(5, "c1"), FEED))
    assert (applied.applied, applied.published) == (True, 5)


def freeze(server: RedisServer) -> None:
    """Stop the server (SIGSTOP): still connected, answering nothing."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGCONT)


@contextlib.contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """The server stopped (SIGSTOP) for the block."""
    freeze(server)
    try:
        yield
    finally:
        thaw(server)


async def test_a_moved_cursor_is_reported_only_once_replicas_hold_it(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    """The fence refuses a page because another instance (or this one, before its WAIT failed)
    moved the cursor: the moved cursor is reported, to be adopted, only once the replica has it."""
    _, replica = replicated
    # A short wait where the replica is frozen, a patient one where it must answer.
    one = Publisher(client, "st", wait_replicas=1, wait_timeout=0.3)
    other = Publisher(client, "st", wait_replicas=1, wait_timeout=0.3)
    patient = Publisher(client, "st", wait_replicas=1, wait_timeout=10.0)
    await patient.apply(3, FEED.name, None, decode_page(page(10, "c1"), FEED))
    with frozen(replica):
        with pytest.raises(ReplicasBehind, match="the page"):
            await one.apply(3, FEED.name, "c1", decode_page(page(20, "c2"), FEED))
        # Same page, another instance: fenced, and the cursor it found is not on the replica.
        with pytest.raises(ReplicasBehind, match="the stored cursor"):
            await other.apply(3, FEED.name, "c1", decode_page(page(20, "c2"), FEED))
        with pytest.raises(ReplicasBehind, match="the stored cursor"):
            await other.settle(3, FEED.name)
        assert await client.xlen("st:{3}:crm.customers") == 20
    refused = await patient.apply(3, FEED.name, "c1", decode_page(page(20, "c2"), FEED))
    assert (refused.applied, refused.stored) == (False, "c2")
    assert await client.xlen("st:{3}:crm.customers") == 20


async def test_settle_returns_the_stored_cursor_once_replicas_hold_it(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    _, replica = replicated
    pub = Publisher(client, "st", wait_replicas=1, wait_timeout=0.3)
    patient = Publisher(client, "st", wait_replicas=1, wait_timeout=10.0)
    assert await patient.settle(4, FEED.name) is None  # nothing stored yet
    await patient.apply(4, FEED.name, None, decode_page(page(5, "c1"), FEED))
    with frozen(replica):
        with pytest.raises(ReplicasBehind):
            await pub.apply(4, FEED.name, "c1", decode_page(page(7, "c2"), FEED))
        # A fresh connection that only read would have nothing of its own to wait for: the
        # settle writes first, so its WAIT covers the cursor the failed page stored.
        with pytest.raises(ReplicasBehind, match="only 0 of 1 replicas"):
            await pub.settle(4, FEED.name)
    assert await patient.settle(4, FEED.name) == "c2"
    on_replica = aioredis.Redis.from_url(replica.url)
    try:
        assert await on_replica.hget("st:{4}:cursors", FEED.name) == b"c2"
        assert await on_replica.xlen("st:{4}:crm.customers") == 7
    finally:
        await on_replica.aclose()


# -- the daemon against a frozen replica ---------------------------------------------------

TENANT = 8101


def events_named(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def wait_failed(logs: Sequence[Mapping[str, Any]], since: int = 0) -> bool:
    """Whether a WAIT came back short in `logs[since:]` (the event, or a poll failure)."""
    return any("replicas acknowledged" in str(e.get("error", "")) for e in logs[since:])


async def until(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def held_config(primary: RedisServer, sim: RunningSimulator) -> dict[str, Any]:
    """wait_replicas = 1 with a short wait (a second); a tenant slow enough (5 pages a
    second) that the backfill is still under way when the replica freezes."""
    data = config_dict(
        primary.url, sim.url, sim.app_key, [TENANT], [FEED.name], requests_per_second=5.0
    )
    data["redis"].update(wait_replicas=1, wait_timeout=1.0)
    data["engine"].update(backoff_base=0.05, backoff_max=0.5)
    return data


def requests_of(sim: RunningSimulator) -> int:
    """Export requests the simulator has answered for the tenant."""
    return int(sim.state.stats_json()["tenants"].get(str(TENANT), {}).get("requests", 0))


async def state_of(client: aioredis.Redis) -> tuple[int, Any]:
    """The primary's stream length and stored cursor of the feed."""
    stream, cursors = Keys("st", TENANT).stream(FEED.name), Keys("st", TENANT).cursors
    return await client.xlen(stream), await client.hget(cursors, FEED.name)


async def assert_replicated_exactly_once(
    client: aioredis.Redis, replica: RedisServer, sim: RunningSimulator
) -> None:
    records = await truth(sim.url, TENANT, FEED.name)
    events = await stream_events(client, TENANT, FEED.name)
    assert_exactly_once(events, records)
    on_replica = aioredis.Redis.from_url(replica.url)
    try:
        assert await client.wait(1, 5000) == 1
        assert await stream_events(on_replica, TENANT, FEED.name) == events
    finally:
        await on_replica.aclose()


async def test_progress_stops_while_the_replica_is_frozen_and_resumes_after(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    """After the first WAIT that comes back short, the primary's stream and the feed's cursor
    stay where they are, however long the replica is gone: the page is not fetched again and
    the cursor its script stored is not adopted. Once the replica answers, the feed goes on
    and ends exactly once, on the replica too."""
    primary, replica = replicated
    async with run_simulator(tenants=[TENANT], records=800, page_size=20) as sim:
        daemon = Daemon(settings(held_config(primary, sim)))
        with capture_logs() as logs:
            task = asyncio.create_task(daemon.run())
            try:

                async def some_pages() -> bool:
                    return (await state_of(client))[0] >= 100

                await until(some_pages, "the backfill did not start")
                mark = len(logs)
                with frozen(replica):
                    await until(
                        lambda: asyncio.sleep(0, result=wait_failed(logs, mark)), "no WAIT failed"
                    )
                    held = await state_of(client)
                    requests = requests_of(sim)
                    await asyncio.sleep(4.0)  # 4 x wait_timeout, 20 pages at the tenant's rate
                    assert await state_of(client) == held
                    assert requests_of(sim) == requests
                    assert daemon._engine_status().replicas_behind
                    [behind] = events_named(logs[mark:], "replicas_behind")
                    assert (behind["tenant"], behind["feed"]) == (TENANT, FEED.name)
                    assert (behind["acked"], behind["wanted"]) == (0, 1)
                records = await truth(sim.url, TENANT, FEED.name)

                async def synced() -> bool:
                    return (await state_of(client))[0] == len(records)

                await until(synced, "the feed did not resume")
                assert events_named(logs, "replicas_caught_up")
                assert not daemon._engine_status().replicas_behind
            finally:
                assert daemon.scheduler is not None
                daemon.scheduler.stop()
                assert await asyncio.wait_for(task, 30) == 0
        await assert_replicated_exactly_once(client, replica, sim)


async def stop(daemon: Daemon, task: asyncio.Task[int]) -> None:
    """Stop a daemon started as `task`; it must exit 0."""
    if daemon.scheduler is None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return
    daemon.scheduler.stop()
    assert await asyncio.wait_for(task, 30) == 0


async def test_a_cursor_read_at_start_is_not_fetched_past_before_replicas_hold_it(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    """A daemon stops while its last page waits for a frozen replica; the next one reads the
    cursor that page stored and fetches nothing past it until the replica has it."""
    primary, replica = replicated
    async with run_simulator(tenants=[TENANT], records=800, page_size=20) as sim:
        data = held_config(primary, sim)
        first, second = Daemon(settings(data)), Daemon(settings(data))
        try:
            with capture_logs() as logs:
                task = asyncio.create_task(first.run())
                try:

                    async def some_pages() -> bool:
                        return (await state_of(client))[0] >= 100

                    await until(some_pages, "the backfill did not start")
                    mark = len(logs)
                    freeze(replica)
                    await until(
                        lambda: asyncio.sleep(0, result=wait_failed(logs, mark)), "no WAIT failed"
                    )
                finally:
                    await stop(first, task)
            held = await state_of(client)
            requests = requests_of(sim)
            with capture_logs() as logs:
                task = asyncio.create_task(second.run())
                try:
                    await until(
                        lambda: asyncio.sleep(0, result=bool(events_named(logs, "started"))),
                        "the second daemon did not start",
                    )
                    await asyncio.sleep(4.0)  # 4 x wait_timeout, 20 pages at the tenant's rate
                    assert await state_of(client) == held
                    assert requests_of(sim) == requests
                    [behind] = events_named(logs, "replicas_behind")
                    assert "the stored cursor" in behind["error"]
                except BaseException:
                    await stop(second, task)
                    raise
        finally:
            thaw(replica)
        try:
            records = await truth(sim.url, TENANT, FEED.name)

            async def synced() -> bool:
                return (await state_of(client))[0] == len(records)

            await until(synced, "the feed did not resume")
        finally:
            await stop(second, task)
        await assert_replicated_exactly_once(client, replica, sim)
