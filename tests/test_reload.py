"""Reload: every feed starts through one path that creates the configured groups; a reload is
prepared in full before it is applied, so a failure leaves the running configuration as it was;
a removed tenant leaves no metric series behind, even with a page in flight."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from syncd import config
from syncd.daemon import Daemon
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import DaemonProcess, config_dict, sim_stats, to_toml, truth

CUSTOMERS, JOBS = "crm.customers", "jpm.jobs"


async def wait_for(
    predicate: Callable[[], bool | Awaitable[bool]], what: str, timeout: float = 30.0
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        ok = predicate()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def write_config(path: Path, data: dict[str, Any]) -> None:
    path.write_text(to_toml(data))


@contextlib.asynccontextmanager
async def running_daemon(data: dict[str, Any], path: Path) -> AsyncIterator[Daemon]:
    """A daemon in this process, reloadable from `path`, stopped (exit 0) at the end."""
    write_config(path, data)
    daemon = Daemon(config.load_settings(path, environ={}), config_path=str(path), environ={})
    task = asyncio.create_task(daemon.run())
    try:
        await wait_for(lambda: daemon.live or task.done(), "the daemon to start")
        assert not task.done(), task.result()
        yield daemon
    finally:
        if daemon.scheduler is not None:
            daemon.scheduler.stop()
        assert await asyncio.wait_for(task, 60) == 0


def tenant(tid: int, feeds: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": tid, "client_id": f"client-{tid}", "client_secret": f"secret-{tid}"} | {
        "feeds": feeds,
        **extra,
    }


def scheduled(daemon: Daemon) -> dict[int, list[str]]:
    assert daemon.scheduler is not None
    return {tid: sorted(t.feeds) for tid, t in daemon.scheduler.tenants.items()}


def has_length(r: aioredis.Redis, stream: str, n: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return bool(await r.xlen(stream) == n)

    return check


async def group_names(r: aioredis.Redis, stream: str) -> set[str]:
    return {g["name"].decode() for g in await r.xinfo_groups(stream)}


async def test_feeds_added_by_reload_get_groups_before_their_first_event(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with run_simulator(tenants=[9601, 9602], records=100, page_size=20) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9601], [CUSTOMERS])
        data["defaults"]["poll_interval"] = 0.3
        data["streams"] = {"groups": ["g1", "g2"]}
        async with running_daemon(data, tmp_path / "syncd.toml") as daemon:
            first = "st:{9601}:" + CUSTOMERS
            await wait_for(has_length(redis, first, 100), "tenant 9601's backfill")
            # A feed added to a running tenant, and a new tenant.
            data["tenants"] = [tenant(9601, [CUSTOMERS, JOBS]), tenant(9602, [CUSTOMERS])]
            write_config(tmp_path / "syncd.toml", data)
            assert await daemon.reload()
            new = ["st:{9601}:" + JOBS, "st:{9602}:" + CUSTOMERS]
            # The groups are there as the reload returns, before any poll of the new feeds.
            for stream in new:
                assert await group_names(redis, stream) == {"g1", "g2"}, stream
            for stream in new:
                await wait_for(has_length(redis, stream, 100), f"backfill of {stream}")
            for stream in [first, *new]:
                for g in await redis.xinfo_groups(stream):
                    # Every event is still ahead of each group: none went out before it.
                    assert g["last-delivered-id"] == b"0-0", stream
                    assert g["lag"] == 100, stream
            assert scheduled(daemon) == {9601: [CUSTOMERS, JOBS], 9602: [CUSTOMERS]}


async def test_failed_reload_changes_nothing_and_the_next_applies_in_full(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    path = tmp_path / "syncd.toml"
    async with run_simulator(tenants=[9611, 9612, 9613], records=60, page_size=20) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9611], [CUSTOMERS])
        data["defaults"]["poll_interval"] = 0.3
        data["streams"] = {"groups": ["g1"]}
        async with running_daemon(data, path) as daemon:
            await wait_for(
                has_length(redis, "st:{9611}:" + CUSTOMERS, 60), "tenant 9611's backfill"
            )
            before, settings = scheduled(daemon), daemon.settings
            assert before == {9611: [CUSTOMERS]}
            wanted = [
                tenant(9611, [CUSTOMERS, JOBS], requests_per_second=5.0),
                tenant(9612, [CUSTOMERS]),
                tenant(9613, [CUSTOMERS]),
            ]

            # 1. A secret file that cannot be read: rejected while loading.
            unreadable = [*wanted[:2], tenant(9613, [CUSTOMERS])]
            del unreadable[2]["client_secret"]
            unreadable[2]["client_secret_file"] = str(tmp_path / "missing")
            write_config(path, {**data, "tenants": unreadable})
            assert not await daemon.reload()

            # 2. Redis refuses to create the last new tenant's group: the first two tenants are
            # prepared by then (their groups exist), and still nothing of it is applied.
            await redis.set("st:{9613}:" + CUSTOMERS, "not a stream")
            write_config(path, {**data, "tenants": wanted})
            assert not await daemon.reload()
            assert await group_names(redis, "st:{9612}:" + CUSTOMERS) == {"g1"}
            for _ in range(2):
                assert scheduled(daemon) == before
                assert daemon.settings is settings
                assert daemon.scheduler is not None
                t = daemon.scheduler.tenants[9611]
                assert t.settings.requests_per_second == 60.0
                await asyncio.sleep(0.5)  # and nothing of it shows up later either
            assert daemon.reloaded == 0
            assert await redis.xlen("st:{9612}:" + CUSTOMERS) == 0

            # 3. Once Redis can take it, the same file applies in full.
            await redis.delete("st:{9613}:" + CUSTOMERS)
            assert await daemon.reload()
            assert daemon.reloaded == 1
            assert scheduled(daemon) == {
                9611: [CUSTOMERS, JOBS],
                9612: [CUSTOMERS],
                9613: [CUSTOMERS],
            }
            assert daemon.scheduler.tenants[9611].settings.requests_per_second == 5.0
            for tid, feed in [(9611, JOBS), (9612, CUSTOMERS), (9613, CUSTOMERS)]:
                stream = f"st:{{{tid}}}:{feed}"
                await wait_for(has_length(redis, stream, 60), f"backfill of {stream}")
                assert await group_names(redis, stream) == {"g1"}


async def test_removed_tenant_with_a_page_in_flight_leaves_no_series(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    # Every request takes 0.4 to 1.2 s, so a poll of the removed tenant is under way.
    async with run_simulator(
        tenants=[9621, 9622], records=400, page_size=10, fault_latency=800.0
    ) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9621, 9622], [CUSTOMERS])
        async with running_daemon(data, tmp_path / "syncd.toml") as daemon:
            sched = daemon.scheduler
            assert sched is not None
            gone = sched.tenants[9621]
            feed = gone.feeds[CUSTOMERS]

            def series_of_9621() -> bool:
                return 'tenant="9621"' in daemon.metrics.render().decode()

            # Its series exist, and a page of it is being fetched right now.
            await wait_for(
                lambda: series_of_9621() and feed.running and feed.cursor is not None,
                "tenant 9621 in the middle of its backfill",
            )
            data["tenants"] = [tenant(9622, [CUSTOMERS])]
            write_config(tmp_path / "syncd.toml", data)
            assert await daemon.reload()
            assert feed.running, "the test needs the removed tenant's page still in flight"
            assert not series_of_9621()
            await wait_for(lambda: not feed.running, "the page in flight to end")
            pages = daemon.metrics.sample("syncd_tenant_pages_total", {"tenant": "9622"})
            await wait_for(
                lambda: (
                    (daemon.metrics.sample("syncd_tenant_pages_total", {"tenant": "9622"}) or 0)
                    > (pages or 0)
                ),
                "another page of the remaining tenant",
            )
            text = (await daemon.metrics.render_async()).decode()
            assert 'tenant="9621"' not in text
            assert 'tenant="9622"' in text


def test_forgotten_tenant_records_nothing_until_tracked_again() -> None:
    from syncd.ops.metrics import Metrics

    m = Metrics()
    m.forget_tenant(1)  # never seen: nothing to remove, on every prometheus-client allowed
    m.request(2, 200)
    m.page(2, CUSTOMERS, 10, 10, 0, 0.1)
    m.forget_tenant(2)  # no 429, no token renewal, no pause recorded: those series never existed
    for record in (
        lambda: m.request(2, 429),
        lambda: m.page(2, CUSTOMERS, 1, 1, 0, 0.1),
        lambda: m.rate_limited(2, 1.0),
        lambda: m.token_renewed(2),
        lambda: m.dead_letter(2, CUSTOMERS),
        lambda: m.set_feeds_paused(2, 1),
    ):
        record()  # what was in flight when the tenant was removed
    assert 'tenant="2"' not in m.render().decode()
    m.track_tenant(2)  # configured again
    m.page(2, CUSTOMERS, 3, 3, 0, 0.1)
    assert m.sample("syncd_tenant_pages_total", {"tenant": "2"}) == 1


async def test_sighup_to_a_daemon_process_creates_groups_of_an_added_feed(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[9631], records=40, page_size=20) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9631], [CUSTOMERS])
        data["streams"] = {"groups": ["billing"]}
        daemon = DaemonProcess(data)
        try:
            daemon.start()
            await wait_for(has_length(redis, "st:{9631}:" + CUSTOMERS, 40), "first backfill")
            data["tenants"] = [tenant(9631, [CUSTOMERS, JOBS])]
            write_config(daemon.config_path, data)
            daemon.signal(signal.SIGHUP)
            jobs = "st:{9631}:" + JOBS
            await wait_for(has_length(redis, jobs, 40), "the added feed's backfill")
            (group,) = await redis.xinfo_groups(jobs)
            assert (group["name"], group["last-delivered-id"], group["lag"]) == (
                b"billing",
                b"0-0",
                40,
            )
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 30) == 0
        finally:
            daemon.close()


async def test_tenant_removed_and_added_again_while_its_polls_hang(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Its old polls still hold every request it may have in flight when it comes back; once
    they end, the tenant as configured again polls and syncs (it is not left waiting for ever)."""
    tid, other = 7501, 7502
    feeds = [CUSTOMERS, JOBS]
    async with run_simulator(
        tenants=[tid, other], records=30, page_size=10, tenant_quirks={tid: {"hang": 1.0}}
    ) as sim:
        tenants = [tid, other]
        data = config_dict(redis_server.url, sim.url, sim.app_key, tenants, feeds, max_in_flight=2)
        data["servicetitan"]["request_timeout"] = 2.0
        path = tmp_path / "syncd.toml"
        async with running_daemon(data, path) as daemon:

            async def hanging() -> bool:
                stats = (await sim_stats(sim.url))["tenants"].get(str(tid), {})
                return int(stats.get("in_flight", 0)) >= 2

            await wait_for(hanging, "both polls to hang")
            write_config(path, {**data, "tenants": data["tenants"][1:]})
            assert await daemon.reload()
            assert list(scheduled(daemon)) == [other]
            write_config(path, data)
            assert await daemon.reload()
            assert scheduled(daemon) == {tid: sorted(feeds), other: sorted(feeds)}
            sim.set_quirks(tid, hang=0.0)
            for feed in feeds:
                records = await truth(sim.url, tid, feed)
                stream = f"st:{{{tid}}}:{feed}"
                await wait_for(has_length(redis, stream, len(records)), f"{feed} synced", 60)
