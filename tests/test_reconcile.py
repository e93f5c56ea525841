"""Reconciliation passes: drift and deletes found, exactly once, without a false delete, on a
real Redis against the simulator (which deletes records), in process and as a killed CLI."""

from __future__ import annotations

import asyncio
import io
import json
import random
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from bench.common import to_toml
from syncd.cli.commands import CommandError, collect_status
from syncd.cli.reconcile import reconcile
from syncd.consumer import Event
from syncd.daemon import Daemon
from syncd.engine import index
from syncd.keys import Keys
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, settings, stream_events, truth
from tests.index_helpers import buckets, entries

FEED = "crm.customers"


async def mutate(sim_url: str, tenant: int, kind: str, count: int) -> list[str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{sim_url}/_sim/tenants/{tenant}/feeds/{FEED}/mutate",
            params={"count": str(count), "kind": kind},
        ) as resp,
    ):
        resp.raise_for_status()
        return [str(k) for k in (await resp.json())["keys"]]


async def run_pass(data: dict[str, Any], tenant: int) -> dict[str, Any]:
    out = io.StringIO()
    code = await reconcile(
        settings(data), tenant, FEED, share=1.0, out=out, progress=False, as_json=True
    )
    assert code == 0, out.getvalue()
    figures: dict[str, Any] = json.loads(out.getvalue())
    return figures


def ops(events: list[dict[str, bytes]], op: str) -> list[str]:
    return [e["key"].decode() for e in events if e["op"] == op.encode()]


async def test_a_pass_publishes_drift_and_exactly_the_deleted_keys(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant = 9101
    keys = Keys("st", tenant)
    async with run_simulator(tenants=[tenant], records=400, page_size=50, seed=3) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [FEED])
        assert await Daemon(settings(data), once=True).run() == 0
        first = len(await stream_events(redis, tenant, FEED))
        assert first == 400

        # Nothing deleted, nothing drifted: no event, every record seen.
        figures = await run_pass(data, tenant)
        assert (figures["seen"], figures["drift"], figures["deleted"]) == (400, 0, 0)
        assert len(await stream_events(redis, tenant, FEED)) == first

        # Records deleted upstream: one `deleted` event each, and their index entries go.
        gone = await mutate(sim.url, tenant, "delete", 9)
        figures = await run_pass(data, tenant)
        assert (figures["seen"], figures["drift"], figures["deleted"]) == (391, 0, 9)
        events = await stream_events(redis, tenant, FEED)
        deleted = [e for e in events[first:] if e["op"] == b"deleted"]
        assert sorted(e["key"].decode() for e in deleted) == sorted(gone)
        assert len(events) == first + 9
        assert all(e["data"] == b"" and e["modified_at"].endswith(b"Z") for e in deleted)
        # What a consumer makes of one: a deleted record, newer than every version before it.
        (entry_id, fields), *_ = await redis.xrevrange(keys.stream(FEED), count=1)
        event = Event.from_entry(
            keys.stream(FEED),
            entry_id.decode(),
            {k.decode(): v for k, v in fields.items()},
            tenant=tenant,
            feed=FEED,
            deliveries=1,
        )
        assert (event.deleted, event.json(), event.key in gone) == (True, None, True)
        created = next(
            e for e in events if e["op"] == b"created" and e["key"].decode() == event.key
        )
        assert event.version[0] > created["modified_at"].decode()
        live = {k.encode() for k in await truth(sim.url, tenant, FEED)}
        assert set(await entries(redis, keys, FEED)) == live
        meta = await redis.hgetall(keys.index(FEED))
        assert int(meta[b"count"]) == 391
        state = await redis.hgetall(keys.state)
        assert int(state[f"{FEED}:pass_deleted".encode()]) == 9
        (row,) = await collect_status(settings(data), redis)
        assert {k: row["last_pass"][k] for k in ("seen", "drift", "deleted")} == {
            "seen": 391,
            "drift": 0,
            "deleted": 9,
        }

        # Drift: the index lost two keys and holds another version of three (what a skipped
        # version or a lost write leaves): published again, counted as drift.
        found = await buckets(redis, keys, FEED)
        lost = [k for b in found.values() for k in b][:5]
        for key in lost[:2]:
            for n, bucket in found.items():
                if key in bucket:
                    await redis.hdel(keys.bucket(FEED, n), key)
        for key in lost[2:]:
            for n, bucket in found.items():
                if key in bucket:
                    await redis.hset(keys.bucket(FEED, n), key, b"\0" * 8 + bucket[key][8:])
        before = len(await stream_events(redis, tenant, FEED))
        figures = await run_pass(data, tenant)
        assert (figures["drift"], figures["deleted"]) == (5, 0)
        events = (await stream_events(redis, tenant, FEED))[before:]
        assert sorted(ops(events, "created")) == sorted(k.decode() for k in lost[:2])
        assert sorted(ops(events, "updated")) == sorted(k.decode() for k in lost[2:])

        # A deleted key that comes back is created again.
        assert await redis.xlen(keys.stream(FEED)) == before + 5


async def test_no_false_deletes_while_records_change_during_the_pass(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """The daemon polls and the API creates, updates and deletes records while the pass runs:
    only keys deleted upstream are reported deleted, each once, and the index ends holding
    exactly what the API holds."""
    tenant = 9102
    rng = random.Random(5)
    async with run_simulator(tenants=[tenant], records=600, page_size=40, seed=4) as sim:
        data = config_dict(
            redis_server.url, sim.url, sim.app_key, [tenant], [FEED], poll_interval=0.2
        )
        assert await Daemon(settings(data), once=True).run() == 0
        daemon = Daemon(settings(data))
        running = asyncio.create_task(daemon.run())
        stop = asyncio.Event()

        async def churn() -> None:
            while not stop.is_set():
                await mutate(sim.url, tenant, rng.choice(["update", "create", "delete"]), 3)
                await asyncio.sleep(0.01)

        churning = asyncio.create_task(churn())
        try:
            for _ in range(3):
                await run_pass(data, tenant)
        finally:
            stop.set()
            await churning
        # Let the daemon catch up with the last changes, then one quiet pass settles deletes
        # that happened after the last pass had seen their keys.
        await asyncio.sleep(1.0)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        await run_pass(data, tenant)
        ground = await sim_truth(sim.url, tenant)
        deleted_upstream = set(ground["deleted"])
        assert set(ground["deleted_at"]) == deleted_upstream
        events = await stream_events(redis, tenant, FEED)
        reported = ops(events, "deleted")
        assert len(reported) == len(set(reported)), "a key was reported deleted twice"
        assert set(reported) <= deleted_upstream, "a key still upstream was reported deleted"
        live = set(await truth(sim.url, tenant, FEED))
        assert {k.decode() for k in await entries(redis, Keys("st", tenant), FEED)} == live
        # Every key deleted upstream that syncd had published was reported.
        published = set(ops(events, "created"))
        assert published & deleted_upstream <= set(reported)


async def sim_truth(sim_url: str, tenant: int) -> Any:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{sim_url}/_sim/tenants/{tenant}/feeds/{FEED}/truth") as resp,
    ):
        resp.raise_for_status()
        return await resp.json()


async def test_a_pass_killed_again_and_again_reports_each_delete_once(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant = 9103
    rng = random.Random(9)
    async with run_simulator(tenants=[tenant], records=3000, page_size=100, seed=6) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [FEED])
        data["defaults"]["requests_per_second"] = 40.0
        assert await Daemon(settings(data), once=True).run() == 0
        gone = await mutate(sim.url, tenant, "delete", 120)
        # The pass's 30 pages at 10 requests/s take seconds: long enough to be killed twice.
        data["defaults"]["requests_per_second"] = 10.0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "syncd.toml"
            path.write_text(to_toml(data))
            argv = [sys.executable, "-m", "syncd", "reconcile", "--config", str(path)]
            argv += ["--tenant", str(tenant), "--share", "1", "--json"]
            kills = 0
            for _ in range(6):
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                await asyncio.sleep(rng.uniform(0.6, 1.6))
                if proc.returncode is not None:
                    break
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                kills += 1
            assert kills >= 2, "the pass ended before it could be killed"
            done = await asyncio.to_thread(subprocess.run, argv, capture_output=True, timeout=120)
            assert done.returncode == 0, done.stderr.decode()[-2000:]
    events = await stream_events(redis, tenant, FEED)
    reported = ops(events, "deleted")
    assert sorted(reported) == sorted(gone)
    assert len(events) == 3000 + len(gone)
    meta = await redis.hgetall(Keys("st", tenant).index(FEED))
    assert b"pass" not in meta
    assert int(meta[b"count"]) == 3000 - len(gone)
    assert int(meta[b"mark"]) != index.FIRST_MARK


async def test_the_daemon_runs_a_pass_every_reconcile_interval(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant = 9104
    async with run_simulator(tenants=[tenant], records=200, page_size=50, seed=8) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [tenant],
            [FEED, "jpm.jobs"],
            poll_interval=0.3,
        )
        data["feeds"] = {FEED: {"reconcile_interval": 1.0}}
        daemon = Daemon(settings(data))
        running = asyncio.create_task(daemon.run())
        try:
            state = Keys("st", tenant).state
            for _ in range(200):
                if await redis.hget(state, f"{FEED}:pass_finished"):
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("no pass completed")
            gone = await mutate(sim.url, tenant, "delete", 4)
            for _ in range(300):
                events = await stream_events(redis, tenant, FEED)
                if len(ops(events, "deleted")) >= 4:
                    break
                await asyncio.sleep(0.05)
            assert sorted(ops(events, "deleted")) == sorted(gone)
            # Only the feed with an interval is reconciled.
            assert await redis.hget(state, "jpm.jobs:pass_finished") is None
            m = daemon.metrics
            assert m.sample("syncd_feed_reconcile_deleted_total", {"feed": FEED}) == 4
            assert m.sample("syncd_feed_reconcile_passes_total", {"feed": FEED}) >= 2
            assert m.sample("syncd_feed_reconcile_interval_seconds", {"feed": FEED}) == 1.0
            live = len(await truth(sim.url, tenant, FEED))
            assert m.sample("syncd_feed_reconcile_seen_keys", {"feed": FEED}) == live
            oldest = m.sample("syncd_feed_oldest_reconcile_seconds", {"feed": FEED})
            assert oldest is not None
            assert 0 <= oldest < 30
            assert m.sample("syncd_feed_reconcile_passes_total", {"feed": "jpm.jobs"}) is None
        finally:
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running


async def test_reconcile_without_redis_says_so_without_a_traceback(
    redis_server: RedisServer,
) -> None:
    from syncd.testing.redis_server import free_port

    data = config_dict(
        f"redis://127.0.0.1:{free_port()}/0", "http://127.0.0.1:1", "k", [9105], [FEED]
    )
    out = io.StringIO()
    code = await reconcile(settings(data), 9105, FEED, share=1.0, out=out, progress=False)
    assert code == 1
    assert "pass not completed" in out.getvalue()
    assert "run again to resume" in out.getvalue()


async def test_a_tenant_s_feeds_without_change_detection_are_skipped_unless_named(
    redis: aioredis.Redis, redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    tenant = 9106
    async with run_simulator(tenants=[tenant], records=50, page_size=50, seed=5) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [FEED, "jpm.jobs"])
        data["feeds"] = {"jpm.jobs": {"change_detection": False}}
        assert await Daemon(settings(data), once=True).run() == 0
        out = io.StringIO()
        assert (
            await reconcile(settings(data), tenant, None, share=1.0, out=out, progress=False) == 0
        )
        assert "skipped jpm.jobs: change_detection is off" in capsys.readouterr().err
        assert await redis.hget(Keys("st", tenant).state, f"{FEED}:pass_finished")
        with pytest.raises(CommandError, match=r"jpm\.jobs: change_detection is off"):
            await reconcile(settings(data), tenant, "jpm.jobs", share=1.0, out=out, progress=False)
        # No feed left to reconcile: a failure, not a pass that did nothing.
        data["feeds"][FEED] = {"change_detection": False}
        with pytest.raises(CommandError, match="nothing to reconcile"):
            await reconcile(settings(data), tenant, None, share=1.0, out=out, progress=False)
