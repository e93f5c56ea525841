"""Redis settings read at start: an evicting Redis is refused, one that saves nothing is a
warning (at start and in /readyz), a Redis that will not say is a warning too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.daemon import EXIT_CONFIG, Daemon
from syncd.redis.checks import NodeSettings, assess
from syncd.testing.redis_server import RedisClusterServers, RedisServer, free_port, running
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, settings, to_toml

FEED = "crm.customers"
SAVES = ["--save", "3600 1"]


def test_assess_table() -> None:
    def node(policy: str, aof: str = "no", save: str = "") -> NodeSettings:
        return NodeSettings("n:1", policy=policy, appendonly=aof, save=save)

    cases: list[tuple[NodeSettings, bool, tuple[bool, bool, bool]]] = [
        # settings, allow_eviction -> (refused, warned of eviction, unpersisted)
        (node("noeviction", "yes"), False, (False, False, False)),
        (node("volatile-lru", save="3600 1"), False, (False, False, False)),
        (node("allkeys-lru", "yes"), False, (True, False, False)),
        (node("allkeys-random", "yes"), True, (False, True, False)),
        (node("allkeys-lfu"), False, (True, False, True)),
        (node("noeviction"), False, (False, False, True)),
        (NodeSettings("n:1", error="NoPermissionError"), False, (False, False, False)),
    ]
    for settings_, allow, (refused, evicting, unpersisted) in cases:
        found = assess([settings_], allow_eviction=allow)
        assert (bool(found.refusals), bool(found.evicting), bool(found.unpersisted)) == (
            refused,
            evicting,
            unpersisted,
        ), settings_
        assert (found.persistence is not None) == unpersisted
    refusal = assess([node("allkeys-lru")], allow_eviction=False).refusals[0]
    assert "maxmemory-policy is allkeys-lru" in refusal
    assert "noeviction" in refusal
    assert "allow_eviction" in refusal
    unreadable = assess([NodeSettings("n:1", error="NOPERM")], allow_eviction=False)
    assert unreadable.unreadable == {"n:1": "NOPERM"}


def run_once(data: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(data))
    return subprocess.run(
        [sys.executable, "-m", "syncd", "run", "--once", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=90,
    )


async def test_allkeys_policy_is_refused_unless_allowed(tmp_path: Path) -> None:
    with running(["--appendonly", "yes", "--maxmemory-policy", "allkeys-lru"]) as server:
        async with run_simulator(tenants=[9701], records=20, page_size=10) as sim:
            data = config_dict(server.url, sim.url, sim.app_key, [9701], [FEED])
            res = await asyncio.to_thread(run_once, data, tmp_path)
            assert res.returncode == EXIT_CONFIG == 2, res.stderr
            assert "maxmemory-policy is allkeys-lru" in res.stderr
            assert "set maxmemory-policy to noeviction (or a volatile-* policy)" in res.stderr
            client = aioredis.Redis.from_url(server.url)
            try:
                assert await client.dbsize() == 0, "nothing may be written before the refusal"
                data["redis"]["allow_eviction"] = True
                with capture_logs() as logs:
                    assert await Daemon(settings(data), once=True).run() == 0
                assert await client.xlen("st:{9701}:" + FEED) == 20
            finally:
                await client.aclose()
            events = {e["event"]: e for e in logs}
            assert events["redis_may_evict"]["nodes"] == [f"127.0.0.1:{server.port}"]
            assert "redis_no_persistence" not in events  # appendonly yes


async def test_no_persistence_warns_at_start_and_in_readiness(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    # The session's server runs with --save "" and --appendonly no.
    async with run_simulator(tenants=[9711], records=20, page_size=10) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9711], [FEED])
        port = free_port()
        data["ops"] = {"listen": f"127.0.0.1:{port}"}
        daemon = Daemon(settings(data))
        with capture_logs() as logs:
            task = asyncio.create_task(daemon.run())
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not daemon.live:
                    assert not task.done(), "the daemon stopped"
                    assert loop.time() < deadline, "the daemon did not start"
                    await asyncio.sleep(0.05)
                async with (
                    aiohttp.ClientSession() as http,
                    http.get(f"http://127.0.0.1:{port}/readyz") as resp,
                ):
                    status, details = resp.status, await resp.json()
            finally:
                assert daemon.scheduler is not None
                daemon.scheduler.stop()
                assert await asyncio.wait_for(task, 30) == 0
    assert status == 200, details
    assert details["status"] == "ok"
    assert "no AOF and no RDB save points" in str(details["redis_persistence"])
    (warning,) = [e for e in logs if e["event"] == "redis_no_persistence"]
    assert warning["nodes"] == [f"127.0.0.1:{redis_server.port}"]
    assert warning["log_level"] == "warning"

    # With a save point there is nothing to say.
    with running(["--appendonly", "no", *SAVES]) as saving:
        async with run_simulator(tenants=[9712], records=20, page_size=10) as sim:
            data = config_dict(saving.url, sim.url, sim.app_key, [9712], [FEED])
            daemon = Daemon(settings(data), once=True)
            with capture_logs() as logs:
                assert await daemon.run() == 0
            assert not [e for e in logs if e["event"].startswith("redis_")]
            assert daemon.redis_persistence is None  # what /readyz would state


async def test_config_get_not_permitted_warns_and_carries_on() -> None:
    with running(["--appendonly", "no", "--maxmemory-policy", "allkeys-lru"]) as server:
        admin = aioredis.Redis.from_url(server.url)
        try:
            # As on a managed Redis: everything but CONFIG.
            await admin.execute_command("ACL", "SETUSER", "default", "-config")
            async with run_simulator(tenants=[9721], records=20, page_size=10) as sim:
                data = config_dict(server.url, sim.url, sim.app_key, [9721], [FEED])
                with capture_logs() as logs:
                    assert await Daemon(settings(data), once=True).run() == 0
            assert await admin.xlen("st:{9721}:" + FEED) == 20
        finally:
            await admin.aclose()
    (warning,) = [e for e in logs if e["event"] == "redis_settings_unreadable"]
    assert "NoPermission" in warning["error"] or "NOPERM" in warning["error"]
    assert warning["node"] == f"127.0.0.1:{server.port}"


async def test_every_cluster_primary_is_checked(cluster: RedisClusterServers) -> None:
    last = cluster.servers[-1]
    node = aioredis.Redis.from_url(last.url)
    try:
        await node.config_set("maxmemory-policy", "allkeys-lfu")
        async with run_simulator(tenants=[9731], records=20, page_size=10) as sim:
            data = config_dict(cluster.url, sim.url, sim.app_key, [9731], [FEED])
            data["redis"]["cluster"] = True
            with capture_logs() as logs:
                assert await Daemon(settings(data), once=True).run() == EXIT_CONFIG
    finally:
        await node.config_set("maxmemory-policy", "noeviction")
        await node.aclose()
    (refused,) = [e for e in logs if e["event"] == "redis_settings_refused"]
    assert f"redis 127.0.0.1:{last.port}: maxmemory-policy is allkeys-lfu" in refused["error"]
    assert not [e for e in logs if e["event"] == "tenant_added"]  # refused before any start
