"""The daemon as a real process: SIGKILL mid-backfill, graceful SIGTERM, what it logs."""

from __future__ import annotations

import asyncio
import random
import signal

import redis.asyncio as aioredis

from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import (
    DaemonProcess,
    assert_exactly_once,
    config_dict,
    stream_events,
    truth,
)

TENANTS = [6001, 6002, 6003]
FEEDS = [
    "crm.customers",
    "jpm.jobs",
    "customer-interactions.technician-ratings",
    "settings.employees",
]


async def wait_exit(daemon: DaemonProcess, timeout: float = 60.0) -> int:
    return await asyncio.to_thread(daemon.wait, timeout)


async def test_sigkill_at_random_moments_loses_and_duplicates_nothing(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    rng = random.Random(11)
    async with run_simulator(tenants=TENANTS, records=1500, page_size=30, seed=5) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, TENANTS, FEEDS)
        daemon = DaemonProcess(data)
        try:
            for kills in range(6):
                daemon.start()
                # Let it get somewhere first (imports take a moment), then kill it mid-page.
                while sum(
                    [await redis.xlen(f"st:{{{t}}}:{f}") for t in TENANTS for f in FEEDS]
                ) < 50 * (kills + 1):
                    await asyncio.sleep(0.02)
                await asyncio.sleep(rng.uniform(0.0, 0.4))
                daemon.signal(signal.SIGKILL)
                await wait_exit(daemon)
            total = sum([await redis.xlen(f"st:{{{t}}}:{f}") for t in TENANTS for f in FEEDS])
            assert 0 < total < 1500 * len(TENANTS) * len(FEEDS), "the kills came too late"
            daemon.start("--once")
            assert await wait_exit(daemon, 120) == 0, "\n".join(daemon.log_lines()[-20:])
            for t in TENANTS:
                for f in FEEDS:
                    records = await truth(sim.url, t, f)
                    assert_exactly_once(await stream_events(redis, t, f), records, where=f"{t}/{f}")
        finally:
            daemon.close()


async def test_sigterm_stops_gracefully_and_logs_no_secrets(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[7001, 7002], records=1200, page_size=20) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [7001, 7002],
            ["crm.customers"],
            requests_per_second=10.0,
        )
        daemon = DaemonProcess(data)
        try:
            daemon.start()
            while await redis.xlen("st:{7001}:crm.customers") < 40:
                await asyncio.sleep(0.02)
            daemon.signal(signal.SIGTERM)
            assert await wait_exit(daemon, 20) == 0
            events = daemon.events()
            names = [e["event"] for e in events]
            assert "shutdown_requested" in names
            assert names[-1] == "stopped"
            for e in events:
                if e["event"] in ("page_applied", "poll_failed", "feed_drained", "token_renewed"):
                    assert "tenant" in e, e
                if e["event"] in ("page_applied", "poll_failed", "feed_drained"):
                    assert "feed" in e, e
            text = daemon.log_path.read_text()
            for secret in ("secret-7001", "secret-7002", sim.app_key):
                assert secret not in text
            # Resuming continues from the stored cursor: the end state is exact.
            daemon.start("--once")
            assert await wait_exit(daemon, 120) == 0
            for t in (7001, 7002):
                records = await truth(sim.url, t, "crm.customers")
                assert_exactly_once(await stream_events(redis, t, "crm.customers"), records)
        finally:
            daemon.close()


async def test_once_exits_nonzero_when_a_feed_cannot_sync(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[8001], records=20, page_size=10) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [8001, 8002], ["crm.customers"])
        # Tenant 8002 is unknown to the simulator: its credentials are refused.
        daemon = DaemonProcess(data)
        try:
            daemon.start("--once")
            assert await wait_exit(daemon, 60) == 1
            failed = [e for e in daemon.events() if e["event"] == "feed_failed"]
            assert [(e["tenant"], e["feed"]) for e in failed] == [(8002, "crm.customers")]
            assert "invalid_client" in failed[0]["error"]
            assert await redis.xlen("st:{8001}:crm.customers") == 20
        finally:
            daemon.close()


async def test_two_instances_on_the_same_tenants_publish_each_change_once(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[6101, 6102], records=1200, page_size=30) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [6101, 6102], FEEDS[:2])
        first, second = DaemonProcess(data), DaemonProcess(data)
        try:
            first.start("--once")
            second.start("--once")
            assert await wait_exit(first, 120) == 0
            assert await wait_exit(second, 120) == 0
            refused = [
                e for d in (first, second) for e in d.events() if e["event"] == "cursor_moved"
            ]
            for t in (6101, 6102):
                for f in FEEDS[:2]:
                    records = await truth(sim.url, t, f)
                    assert_exactly_once(await stream_events(redis, t, f), records, where=f"{t}/{f}")
            # Both really raced: at least one page was refused by the fence.
            assert refused
        finally:
            first.close()
            second.close()
