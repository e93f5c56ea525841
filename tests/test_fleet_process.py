"""A fleet of real daemon processes sharing thirty tenants on one Redis, the simulator mutating
records meanwhile: balance, SIGKILL takeover, SIGTERM handover, exactly once at the end, and
never two instances polling one tenant at once."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import signal
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from bench.common import to_toml
from syncd.fleet.state import read_members, read_owners
from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import (
    DaemonProcess,
    assert_exactly_once,
    config_dict,
    latest_by_key,
    mutate,
    sim_stats,
    stream_events,
    truth,
)

TENANTS = list(range(9101, 9131))
FEEDS = ["crm.customers", "jpm.jobs"]
LEASE = 3.0


def fleet_config(redis_url: str, sim: Any) -> dict[str, Any]:
    data = config_dict(
        redis_url, sim.url, sim.app_key, TENANTS, FEEDS, requests_per_second=4.0, poll_interval=1.0
    )
    data["fleet"] = {"enabled": True, "lease": LEASE}
    return data


async def owners(r: aioredis.Redis) -> dict[int, str]:
    return await read_owners(r, "st", TENANTS)


async def until(cond: Any, timeout: float, what: str) -> float:
    """Poll an async condition; seconds it took."""
    started = time.monotonic()
    while not await cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(0.1)
    return time.monotonic() - started


async def mutate_meanwhile(sim_url: str) -> None:
    """Records keep changing while the fleet syncs, as they do in a live account."""
    rng = random.Random(3)
    while True:
        await mutate(sim_url, rng.choice(TENANTS), rng.choice(FEEDS), 3)
        await asyncio.sleep(0.1)


def overlaps(stats: dict[str, Any]) -> dict[str, float]:
    """Per tenant, how long two access tokens (two processes) polled it at the same time."""
    out = {}
    for tenant, s in stats["tenants"].items():
        spans = [(p["first"], p["last"]) for p in s["pollers"]]
        total = sum(
            max(0.0, min(a[1], b[1]) - max(a[0], b[0])) for a, b in itertools.combinations(spans, 2)
        )
        if total > 0:
            out[tenant] = total
    return out


@pytest.mark.timeout(300)
async def test_three_instances_share_thirty_tenants_through_kill_and_stop(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    # 150 pages a feed at 4 requests/s a tenant: the backfill outlasts the kill and the stop.
    async with run_simulator(tenants=TENANTS, records=1500, page_size=10, seed=12) as sim:
        data = fleet_config(redis_server.url, sim)
        daemons = {name: DaemonProcess(data, "--instance", name) for name in "abc"}
        mutations = asyncio.create_task(mutate_meanwhile(sim.url))
        try:
            for d in daemons.values():
                d.start()

            async def balanced() -> bool:
                per = Counter((await owners(redis)).values())
                return sorted(per.values()) == [10, 10, 10] and set(per) == {"a", "b", "c"}

            await until(balanced, 60, "three instances with ten tenants each")

            # SIGKILL one mid-backfill: its tenants go to the others once its leases run out.
            more = [
                await redis.hget(f"st:{{{t}}}:state", f"{f}:more") for t in TENANTS for f in FEEDS
            ]
            assert b"1" in more or None in more, "the backfill finished too early"
            lost = {t for t, o in (await owners(redis)).items() if o == "b"}
            daemons["b"].signal(signal.SIGKILL)
            killed = time.monotonic()
            await asyncio.to_thread(daemons["b"].wait, 10)

            async def taken_over() -> bool:
                now = await owners(redis)
                return all(now.get(t) in ("a", "c") for t in lost)

            took = await until(taken_over, LEASE + 30, "b's tenants taken over")
            assert took <= LEASE + 5, f"takeover after SIGKILL took {took:.1f}s"
            assert time.monotonic() - killed >= LEASE * 2 / 3  # not before its leases could run out
            assert "b" not in await read_members(redis, "st")

            # SIGTERM another: it hands its tenants over at once, after its in-flight pages.
            handed = {t for t, o in (await owners(redis)).items() if o == "c"}
            daemons["c"].signal(signal.SIGTERM)

            async def handed_over() -> bool:
                now = await owners(redis)
                return all(now.get(t) == "a" for t in handed)

            took = await until(handed_over, 30, "c's tenants handed to a")
            assert took <= 5, f"handover after SIGTERM took {took:.1f}s"
            assert await asyncio.to_thread(daemons["c"].wait, 30) == 0
            names = [e["event"] for e in daemons["c"].events()]
            assert "fleet_left" in names

            # The last one stops too; one pass finishes whatever the backfill had left.
            mutations.cancel()
            daemons["a"].signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemons["a"].wait, 30) == 0
            stats = await sim_stats(sim.url)
            assert overlaps(stats) == {}, "two instances polled one tenant at once"
        finally:
            mutations.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mutations
            for d in daemons.values():
                d.close()
        rest = {**data, "fleet": {"enabled": False}}
        rest["defaults"] = {**data["defaults"], "requests_per_second": 60.0}
        once = DaemonProcess(rest)
        try:
            once.start("--once")
            assert await asyncio.to_thread(once.wait, 120) == 0, "\n".join(once.log_lines()[-20:])
        finally:
            once.close()
        for t in TENANTS:
            for f in FEEDS:
                events = await stream_events(redis, t, f)
                records = await truth(sim.url, t, f)
                assert_exactly_once(events, records, where=f"{t}/{f}")
                assert latest_by_key(events) == records


async def test_reload_adds_and_removes_tenants_for_the_fleet(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A tenant added to one instance's configuration is polled by the fleet at once (only that
    instance knows it, which is reported); removed from it again, nobody polls it."""
    tenants = [9201, 9202, 9203, 9204, 9205]
    async with run_simulator(tenants=tenants, records=40, page_size=20) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, tenants[:4], ["crm.customers"])
        data["fleet"] = {"enabled": True, "lease": LEASE}
        port = free_port()
        a = DaemonProcess({**data, "ops": {"listen": f"127.0.0.1:{port}"}}, "--instance", "a")
        b = DaemonProcess(data, "--instance", "b")
        try:
            a.start()
            b.start()

            async def split(n: int) -> bool:
                per = Counter((await read_owners(redis, "st", tenants)).values())
                return sum(per.values()) == n and set(per) == {"a", "b"}

            await until(lambda: split(4), 60, "two instances share four tenants")

            async def gauges() -> bool:
                """a's /metrics: two members, as many tenants as its leases say."""
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"http://127.0.0.1:{port}/metrics") as resp,
                ):
                    text = await resp.text()
                mine = sum(
                    1 for o in (await read_owners(redis, "st", tenants)).values() if o == "a"
                )
                return (
                    "syncd_fleet_members 2" in text and f"syncd_fleet_tenants_owned {mine}" in text
                )

            await until(gauges, 30, "the fleet gauges on /metrics")
            more = config_dict(redis_server.url, sim.url, sim.app_key, tenants, ["crm.customers"])
            more["fleet"] = data["fleet"]
            a.config_path.write_text(to_toml(more))
            a.signal(signal.SIGHUP)

            async def added() -> bool:
                return (await read_owners(redis, "st", [9205])).get(9205) == "a"

            await until(added, 30, "the new tenant polled by the instance that knows it")
            await until(lambda: _xlen(redis, 9205, 40), 30, "the new tenant synced")
            a.config_path.write_text(to_toml(data))
            a.signal(signal.SIGHUP)

            async def removed() -> bool:
                return 9205 not in await read_owners(redis, "st", [9205])

            await until(removed, 30, "the removed tenant released")
            for d in (a, b):
                d.signal(signal.SIGTERM)
                assert await asyncio.to_thread(d.wait, 30) == 0
            disagree = [e for e in a.events() if e["event"] == "fleet_config_disagrees"]
            assert disagree, "the tenant only a knows was not reported"
            assert disagree[0]["missing_from"] == {"9205": ["b"]}
        finally:
            a.close()
            b.close()


async def _xlen(r: aioredis.Redis, tenant: int, n: int) -> bool:
    return int(await r.xlen(f"st:{{{tenant}}}:crm.customers")) >= n
