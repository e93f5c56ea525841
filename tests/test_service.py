"""Running as a service: sd_notify, reload on SIGHUP, ops endpoints, operator commands."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import (
    DaemonProcess,
    assert_exactly_once,
    config_dict,
    sim_stats,
    stream_events,
    to_toml,
    truth,
)


async def wait_for(predicate, timeout: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def test_notify_socket_sees_ready_watchdog_reloading_stopping(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[9101], records=50, page_size=10) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9101], ["crm.customers"])
        daemon = DaemonProcess(data)
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "notify.sock")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(path)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()

            async def recv() -> str:
                return (await asyncio.wait_for(loop.sock_recv(sock, 4096), 15)).decode()

            try:
                daemon.start(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "600000"})
                messages = [await recv()]
                while "READY=1" not in messages[-1]:
                    messages.append(await recv())
                pings = 0
                while pings < 3:
                    msg = await recv()
                    pings += "WATCHDOG=1" in msg
                daemon.signal(signal.SIGHUP)
                seen = ""
                while "READY=1" not in seen.split("RELOADING=1", 1)[-1]:
                    seen += await recv() + "\n"
                assert "RELOADING=1" in seen
                assert "MONOTONIC_USEC=" in seen
                daemon.signal(signal.SIGTERM)
                rest = ""
                while "STOPPING=1" not in rest:
                    rest += await recv()
                assert await asyncio.to_thread(daemon.wait, 20) == 0
            finally:
                sock.close()
                daemon.close()


async def test_sighup_adds_and_removes_tenants_and_rejects_bad_config(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[9201, 9202], records=200, page_size=20) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [9201],
            ["crm.customers"],
            poll_interval=0.3,
        )
        daemon = DaemonProcess(data)
        try:
            daemon.start()

            async def first_done() -> bool:
                return await redis.xlen("st:{9201}:crm.customers") == 200

            await wait_for(first_done, what="tenant 9201 backfill")
            # An invalid configuration is logged and ignored.
            daemon.config_path.write_text(to_toml(data).replace("[defaults]", "[defaultz]"))
            daemon.signal(signal.SIGHUP)

            async def rejected() -> bool:
                return any(e["event"] == "reload_rejected" for e in daemon.events())

            await wait_for(rejected, what="reload_rejected")
            rejected_event = next(e for e in daemon.events() if e["event"] == "reload_rejected")
            assert "defaultz: unknown key" in rejected_event["error"]
            # Swap tenants: 9202 added with two feeds, 9201 removed.
            new = config_dict(
                redis_server.url,
                sim.url,
                sim.app_key,
                [9202],
                ["crm.customers", "jpm.jobs"],
                poll_interval=0.3,
            )
            daemon.config_path.write_text(to_toml(new))
            daemon.signal(signal.SIGHUP)

            async def second_done() -> bool:
                return [
                    await redis.xlen(f"st:{{9202}}:{f}") for f in ("crm.customers", "jpm.jobs")
                ] == [200, 200]

            await wait_for(second_done, what="tenant 9202 backfill after reload")
            before = (await sim_stats(sim.url))["tenants"]["9201"]["requests"]
            await asyncio.sleep(1.5)
            after = (await sim_stats(sim.url))["tenants"]["9201"]["requests"]
            assert after == before, "a removed tenant is still polled"
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 20) == 0
            names = [e["event"] for e in daemon.events()]
            assert "tenant_removed" in names
            assert "reloaded" in names
            assert await redis.xlen("st:{9201}:crm.customers") == 200
        finally:
            daemon.close()


async def test_ops_endpoints(redis: aioredis.Redis, redis_server: RedisServer) -> None:
    async with run_simulator(tenants=[9301], records=60, page_size=20) as sim:
        port = free_port()
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9301, 9302], ["crm.customers"])
        data["ops"] = {"listen": f"127.0.0.1:{port}", "readiness_interval": 0.2}
        daemon = DaemonProcess(data)
        base = f"http://127.0.0.1:{port}"
        try:
            daemon.start()
            async with aiohttp.ClientSession() as s:

                async def up() -> bool:
                    try:
                        async with s.get(base + "/metrics") as resp:
                            text = await resp.text()
                    except aiohttp.ClientError:
                        return False
                    line = 'syncd_tenant_records_published_total{tenant="9301"} 60'
                    return re.search(re.escape(line) + r"(\.0)?$", text, re.M) is not None

                await wait_for(up, what="metrics with the published records")
                async with s.get(base + "/metrics") as resp:
                    text = await resp.text()
                assert 'syncd_requests_total{status="2xx",tenant="9301"}' in text
                assert 'syncd_tenant_seconds_since_success{tenant="9302"}' in text
                assert "secret-9301" not in text
                assert sim.app_key not in text
                async with s.get(base + "/healthz") as resp:
                    assert resp.status == 200
                    assert (await resp.json())["status"] == "ok"
                # Tenant 9302 is unknown to the simulator: its credentials are refused. Readiness
                # is checked in the background, so the answer may lag a moment behind.
                body: dict[str, object] = {}

                async def not_ready() -> bool:
                    nonlocal body
                    async with s.get(base + "/readyz") as resp:
                        body = await resp.json()
                        return resp.status == 503 and "tenants_failing_auth" in body

                await wait_for(not_ready, what="/readyz reporting tenant 9302")
                assert "9302" in body["tenants_failing_auth"]  # type: ignore[operator]
                assert body["redis"] == "ok"
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 20) == 0
        finally:
            daemon.close()


def syncd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args], capture_output=True, text=True, timeout=120
    )


async def test_status_reset_cursor_and_backfill(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    feeds = ["crm.customers", "jpm.jobs"]
    async with run_simulator(tenants=[9401], records=120, page_size=30) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9401], feeds)
        daemon = DaemonProcess(data)
        try:
            daemon.start("--once")
            assert await asyncio.to_thread(daemon.wait, 60) == 0
            cfg = str(daemon.config_path)
            res = await asyncio.to_thread(syncd, "status", "--config", cfg, "--json")
            assert res.returncode == 0, res.stderr
            rows = {r["feed"]: r for r in json.loads(res.stdout)}
            assert set(rows) == set(feeds)
            assert rows["crm.customers"]["stream_length"] == 120
            assert rows["crm.customers"]["cursor"]
            assert rows["crm.customers"]["last_success"]
            table = await asyncio.to_thread(syncd, "status", "--config", cfg)
            assert "crm.customers" in table.stdout
            assert "events" in table.stdout

            res = await asyncio.to_thread(
                syncd, "reset-cursor", "--config", cfg, "--tenant", "9401", "--feed", "jpm.jobs"
            )
            assert res.returncode == 0
            assert "cursor removed" in res.stdout
            assert await redis.hget("st:{9401}:cursors", "jpm.jobs") is None

            res = await asyncio.to_thread(syncd, "backfill", "--config", cfg, "--tenant", "9401")
            assert res.returncode == 0, res.stderr
            # Every record comes again (more with includeRecentChanges overlaps): none is news.
            m = re.search(r"(\d+) records fetched, 0 published, (\d+) unchanged", res.stdout)
            assert m, res.stdout
            assert int(m.group(1)) == int(m.group(2)) >= 240
            for f in feeds:
                records = await truth(sim.url, 9401, f)
                assert_exactly_once(await stream_events(redis, 9401, f), records)
            res = await asyncio.to_thread(syncd, "backfill", "--config", cfg, "--tenant", "1")
            assert res.returncode == 1
            assert "tenant 1 is not in" in res.stderr
        finally:
            daemon.close()


def test_help_documents_exit_codes() -> None:
    res = syncd("--help")
    assert res.returncode == 0
    assert "exit codes" in res.stdout
    assert "2  invalid configuration" in res.stdout


async def test_tail_command_prints_json_lines_and_acknowledges(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[9501], records=30, page_size=10) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9501], ["crm.customers"])
        daemon = DaemonProcess(data)
        try:
            daemon.start("--once")
            assert await asyncio.to_thread(daemon.wait, 60) == 0
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "syncd",
                "tail",
                "--config",
                str(daemon.config_path),
                "--tenant",
                "9501",
                "--feed",
                "crm.customers",
                "--group",
                "audit",
                "--from-start",
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            lines = [
                json.loads(await asyncio.wait_for(proc.stdout.readline(), 20)) for _ in range(30)
            ]
            proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
            records = await truth(sim.url, 9501, "crm.customers")
            assert {line["key"] for line in lines} == set(records)
            assert all(line["data"] == records[line["key"]] for line in lines)
            assert {line["op"] for line in lines} == {"created"}
            groups = await redis.xinfo_groups("st:{9501}:crm.customers")
            assert [(g["name"], g["pending"]) for g in groups] == [(b"audit", 0)]
        finally:
            daemon.close()
