"""Retention and backpressure: trimming keeps what groups have not acknowledged; a stalled group
or a full Redis pauses polling without losing or duplicating an event."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter

import redis.asyncio as aioredis

from syncd.consumer import Consumer, Subscription
from syncd.daemon import Daemon
from syncd.engine import upkeep
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import DaemonProcess, config_dict, settings, truth

FEED = "crm.customers"


async def test_trim_point_table() -> None:
    g = upkeep.GroupState("a", last_delivered=(100, 5), pending=0, oldest_pending=None, lag=0)
    p = upkeep.GroupState("b", last_delivered=(100, 5), pending=2, oldest_pending=(90, 0), lag=0)
    assert upkeep.trim_point([g], length_cut=(200, 0), age_cut=None) == (100, 6)
    assert upkeep.trim_point([g, p], length_cut=(200, 0), age_cut=None) == (90, 0)
    assert upkeep.trim_point([g], length_cut=(50, 0), age_cut=(60, 0)) == (60, 0)
    assert upkeep.trim_point([], length_cut=(50, 0), age_cut=None) == (50, 0)
    assert upkeep.trim_point(None, length_cut=(50, 0), age_cut=None) is None
    assert upkeep.trim_point([g], length_cut=None, age_cut=None) is None


async def test_groups_created_before_publishing_and_trim_keeps_unacknowledged(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[9501], records=300, page_size=50) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9501], [FEED])
        data["streams"] = {"groups": ["g1", "g2"]}
        assert await Daemon(settings(data), once=True).run() == 0
    stream = "st:{9501}:" + FEED
    infos = {i["name"].decode(): i for i in await redis.xinfo_groups(stream)}
    assert set(infos) == {"g1", "g2"}
    # Created before the first event: every event is still ahead of both groups.
    assert all(i["last-delivered-id"] == b"0-0" and i["lag"] == 300 for i in infos.values())

    ids = [entry_id for entry_id, _ in await redis.xrange(stream)]
    await redis.xreadgroup("g1", "c", {stream: ">"}, count=200)
    await redis.xack(stream, "g1", *ids[:200])
    await redis.xreadgroup("g2", "c", {stream: ">"}, count=100)
    await redis.xack(stream, "g2", *ids[:80])
    state = await upkeep.stream_state(redis, stream, ["g1", "g2"])
    assert state.length == 300
    result = await upkeep.trim(redis, stream, state, configured=["g1", "g2"], max_len=50, max_age=0)
    assert result.removed == 80
    remaining = [entry_id for entry_id, _ in await redis.xrange(stream)]
    assert remaining == ids[80:]
    # Once both groups acknowledged everything, the length limit applies in full.
    await redis.xreadgroup("g1", "c", {stream: ">"})
    await redis.xreadgroup("g2", "c", {stream: ">"})
    await redis.xack(stream, "g1", *ids)
    await redis.xack(stream, "g2", *ids)
    state = await upkeep.stream_state(redis, stream, ["g1", "g2"])
    result = await upkeep.trim(redis, stream, state, configured=["g1", "g2"], max_len=50, max_age=0)
    assert result.removed == 170
    assert [e for e, _ in await redis.xrange(stream)] == ids[-50:]
    # A configured group that does not exist blocks trimming altogether.
    state = await upkeep.stream_state(redis, stream, ["g1", "missing"])
    assert state.missing == ["missing"]
    result = await upkeep.trim(
        redis, stream, state, configured=["g1", "missing"], max_len=10, max_age=0
    )
    assert result.removed == 0


async def consume_all(
    r: aioredis.Redis, tenant: int, expected: int, timeout: float
) -> Counter[str]:
    """Read and acknowledge as group g until `expected` distinct keys were seen."""
    seen: Counter[str] = Counter()
    consumer = Consumer(r, "g", "reader", streams=[Subscription(tenant, [FEED])], block_ms=200)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while len(seen) < expected:
        assert loop.time() < deadline, f"consumed {len(seen)} of {expected}"
        batch = await consumer.read()
        seen.update(e.key for e in batch if e.op == "created")
        await consumer.ack(*batch)
    await consumer.close()
    return seen


async def run_paused_backfill(
    server: RedisServer, tenant: int, records: int, streams: dict[str, object], rps: float = 60.0
) -> None:
    r = aioredis.Redis.from_url(server.url)
    async with run_simulator(tenants=[tenant], records=records, page_size=50) as sim:
        data = config_dict(
            server.url, sim.url, sim.app_key, [tenant], [FEED], requests_per_second=rps
        )
        data["streams"] = {"groups": ["g"], "check_interval": 0.2, **streams}
        daemon = DaemonProcess(data)
        try:
            daemon.start()
            stream = f"st:{{{tenant}}}:{FEED}"
            # The group stalls: the backfill must stop short and say so.
            while not any(e["event"].startswith("backpressure_") for e in daemon.events()):
                await asyncio.sleep(0.1)
            # Pages already fetched when the pause began still land: wait until the stream
            # stops growing (for a whole second), then it must have stopped short.
            before, loop = -1, asyncio.get_running_loop()
            deadline = loop.time() + 30
            while (now := await r.xlen(stream)) != before:
                assert loop.time() < deadline, "the stream kept growing during the pause"
                before = now
                await asyncio.sleep(1.0)
            assert before < records
            memory = [e for e in daemon.events() if e["event"] == "backpressure_memory"]
            if memory:
                # What would free memory: in the log and in the state `syncd status` shows.
                assert "group g (" in memory[0]["advice"]
                assert "maxmemory" in memory[0]["advice"]
                recorded = await r.hget(f"st:{{{tenant}}}:state", "memory_paused")
                assert recorded is not None
                assert b"group g (" in recorded
            # The group catches up: the backfill completes, every event exactly once.
            seen = await consume_all(r, tenant, records, timeout=60)
            assert set(seen) == set(await truth(sim.url, tenant, FEED))
            assert max(seen.values()) == 1
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 20) == 0
            names = [e["event"] for e in daemon.events()]
            assert "poll_failed" not in names
        finally:
            print("\n".join(daemon.log_lines()[-30:]))
            daemon.close()
            await r.aclose()


async def test_stalled_group_pauses_backfill_until_it_catches_up() -> None:
    server = RedisServer()
    server.start()
    try:
        await run_paused_backfill(server, 9601, 6000, {"max_lag": 300, "max_len": 100}, rps=20.0)
    finally:
        server.stop()


async def test_tiny_maxmemory_pauses_backfill_until_trimmed() -> None:
    server = RedisServer()
    server.start()
    r = aioredis.Redis.from_url(server.url)
    try:
        used = int((await r.info("memory"))["used_memory"])
        await r.config_set("maxmemory", str(used + 4_000_000))
        await run_paused_backfill(server, 9701, 6000, {"max_memory": 0.8, "max_len": 100}, rps=20.0)
    finally:
        await r.aclose()
        server.stop()
