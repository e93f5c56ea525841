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


async def _metric(port: int, name: str) -> float | None:
    """A gauge's value on a daemon's /metrics; None before it serves or exports it."""
    try:
        async with (
            aiohttp.ClientSession() as s,
            s.get(f"http://127.0.0.1:{port}/metrics") as resp,
        ):
            text = await resp.text()
    except aiohttp.ClientConnectionError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_a_feed_only_one_instance_lists_is_delivered_for_every_tenant(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """A rolling change that adds jpm.jobs, half done: a lists crm.customers, b also jpm.jobs.
    The difference is reported by name and every tenant's jpm.jobs events arrive (b polls
    them all), exactly once."""
    tenants = [9301, 9302, 9303, 9304]
    async with run_simulator(tenants=tenants, records=40, page_size=20) as sim:
        old = config_dict(redis_server.url, sim.url, sim.app_key, tenants, ["crm.customers"])
        old["fleet"] = {"enabled": True, "lease": LEASE}
        new = {**old, "tenants": config_dict("", "", "", tenants, FEEDS)["tenants"]}
        port = free_port()
        a = DaemonProcess({**old, "ops": {"listen": f"127.0.0.1:{port}"}}, "--instance", "a")
        b = DaemonProcess(new, "--instance", "b")
        try:
            a.start()

            async def a_owns_all() -> bool:
                return set((await read_owners(redis, "st", tenants)).values()) == {"a"}

            await until(a_owns_all, 60, "a polls every tenant")
            b.start()

            async def delivered() -> bool:
                for t in tenants:
                    if int(await redis.xlen(f"st:{{{t}}}:jpm.jobs")) < 40:
                        return False
                return True

            await until(delivered, 60, "jpm.jobs delivered for every tenant")

            async def reported() -> bool:
                return await _metric(port, "syncd_fleet_config_disagreements") == len(tenants)

            await until(reported, 30, "a's /metrics counts the tenants whose feeds differ")
            assert await _metric(port, "syncd_fleet_feeds_unpolled") == 0
            assert set((await read_owners(redis, "st", tenants)).values()) == {"b"}
            for d in (a, b):
                d.signal(signal.SIGTERM)
                assert await asyncio.to_thread(d.wait, 30) == 0
            disagree = [e for e in a.events() if e["event"] == "fleet_config_disagrees"]
            assert disagree, "the feed only b lists was not reported"
            assert disagree[0]["differences"] == [
                {
                    "feed": "jpm.jobs",
                    "listed_by": ["b"],
                    "missing_from": ["a"],
                    "tenants": 4,
                    "sample": tenants,
                }
            ]
        finally:
            a.close()
            b.close()
        for t in tenants:
            for f in FEEDS:
                events = await stream_events(redis, t, f)
                records = await truth(sim.url, t, f)
                assert_exactly_once(events, records, where=f"{t}/{f}")


async def test_two_processes_under_one_name_poll_each_tenant_once(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """Two processes started as `--instance twin` (cloned hosts): the second polls nothing
    while the first lives, both say so, and it takes over when the first stops."""
    tenants = [9401, 9402, 9403, 9404]
    # Polled every second once drained: a second poller would show in the simulator's stats.
    async with run_simulator(tenants=tenants, records=400, page_size=10, seed=5) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            tenants,
            ["crm.customers"],
            requests_per_second=4.0,
            poll_interval=1.0,
        )
        data["fleet"] = {"enabled": True, "lease": LEASE}
        port = free_port()
        first = DaemonProcess(data, "--instance", "twin")
        second = DaemonProcess(
            {**data, "ops": {"listen": f"127.0.0.1:{port}"}}, "--instance", "twin"
        )
        try:
            first.start()

            async def first_owns_all() -> bool:
                return set((await read_owners(redis, "st", tenants)).values()) == {"twin"}

            await until(first_owns_all, 60, "the first twin polls every tenant")
            second.start()

            async def clash_seen() -> bool:
                return await _metric(port, "syncd_fleet_instance_name_clash") == 1

            await until(clash_seen, 30, "the second twin reports the clash")
            await asyncio.sleep(2 * LEASE)  # two lease periods of both running
            assert overlaps(await sim_stats(sim.url)) == {}, "two processes polled one tenant"
            assert [e for e in first.events() if e["event"] == "fleet_instance_name_clash"]
            assert [e for e in second.events() if e["event"] == "fleet_instance_name_clash"]

            # The first stops: the second takes over and finishes the backfill.
            first.signal(signal.SIGTERM)
            assert await asyncio.to_thread(first.wait, 30) == 0

            async def synced() -> bool:
                return all([await _xlen(redis, t, 400) for t in tenants])

            await until(synced, 120, "the second twin finished the backfill")
            assert await _metric(port, "syncd_fleet_instance_name_clash") == 0
            second.signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0
            assert overlaps(await sim_stats(sim.url)) == {}
        finally:
            first.close()
            second.close()
        for t in tenants:
            events = await stream_events(redis, t, "crm.customers")
            assert_exactly_once(events, await truth(sim.url, t, "crm.customers"), where=str(t))
