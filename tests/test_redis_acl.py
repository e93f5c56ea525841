"""A Redis ACL user restricted to syncd's key prefix and commands: the README's `ACL SETUSER`
line, applied as written, lets the daemon, `syncd tail`, `syncd status` and the consumer work;
a missing permission stops the daemon at start with an error naming it.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
import redis.exceptions

from syncd.consumer import Consumer, Event, Subscription
from syncd.daemon import EXIT_CONFIG
from syncd.fleet.state import parse_holder
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import DaemonProcess, config_dict

README = Path(__file__).resolve().parent.parent / "README.md"
PASSWORD = "acl-test-password-91"
USER = "syncd"


def readme_acl_line() -> list[str]:
    """The README's ACL SETUSER command as words, with this test's password."""
    lines = [
        ln.strip() for ln in README.read_text().splitlines() if ln.strip().startswith("ACL SETUSER")
    ]
    assert len(lines) == 1, f"expected one ACL SETUSER line in the README, found {len(lines)}"
    words = lines[0].split()
    assert words[2] == USER
    return [PASSWORD.join(w.split("CHANGE-ME")) if "CHANGE-ME" in w else w for w in words]


def acl_url(server: RedisServer) -> str:
    return f"redis://{USER}:{PASSWORD}@127.0.0.1:{server.port}/0"


@pytest.fixture
async def admin(redis: aioredis.Redis) -> AsyncIterator[aioredis.Redis]:
    """The default (unrestricted) user, with the README's syncd user created."""
    await redis.execute_command(*readme_acl_line())
    yield redis
    await redis.execute_command("ACL", "DELUSER", USER)


def test_readme_line_restricts_keys_and_commands() -> None:
    words = readme_acl_line()
    assert "~st:*" in words
    assert "resetkeys" in words
    assert "-@all" in words
    assert not {"allkeys", "allcommands", "+@all", "~*", "nopass"} & set(words)


async def test_restricted_user_cannot_leave_its_prefix(
    admin: aioredis.Redis, redis_server: RedisServer
) -> None:
    client = aioredis.Redis.from_url(acl_url(redis_server))
    try:
        with pytest.raises(redis.exceptions.NoPermissionError, match="keys"):
            await client.hset("other:{1}:cursors", "f", "v")
        with pytest.raises(redis.exceptions.NoPermissionError, match="flushall"):
            await client.execute_command("FLUSHALL")
    finally:
        await client.aclose()


async def test_daemon_tail_status_and_consumer_under_the_acl_user(
    admin: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant, feed = 9701, "crm.customers"
    async with run_simulator(tenants=[tenant], records=40, page_size=10) as sim:
        data = config_dict(acl_url(redis_server), sim.url, sim.app_key, [tenant], [feed])
        data["streams"] = {"groups": ["billing"], "max_len": 1000}
        daemon = DaemonProcess(data)
        try:
            daemon.start("--once")
            code = await asyncio.to_thread(daemon.wait, 120)
            assert code == 0, "\n".join(daemon.log_lines()[-20:])
            assert await admin.xlen(f"st:{{{tenant}}}:{feed}") == 40

            cfg = str(daemon.config_path)
            status = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "syncd", "status", "--config", cfg, "--json"],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            assert status.returncode == 0, status.stderr
            assert PASSWORD not in status.stdout + status.stderr

            tail = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "syncd", "tail", "--config", cfg, "--tenant", str(tenant),
                "--from-start", "--group", "audit",
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            try:
                assert tail.stdout is not None
                async with asyncio.timeout(60):
                    lines = [await tail.stdout.readline() for _ in range(40)]
                assert all(b'"key"' in ln for ln in lines), lines[:3]
            finally:
                tail.terminate()
                _, err = await asyncio.wait_for(tail.communicate(), 30)
            assert b"NOPERM" not in err
            assert PASSWORD.encode() not in err
        finally:
            daemon.close()

    client = aioredis.Redis.from_url(acl_url(redis_server))
    got: list[Event] = []
    stop = asyncio.Event()

    async def handle(batch: list[Event]) -> None:
        got.extend(batch)
        if len(got) >= 40:
            stop.set()

    try:
        streams = [Subscription(tenant, [feed])]
        async with Consumer(client, "billing", "billing-1", streams=streams) as consumer:
            await asyncio.wait_for(consumer.run(handle, stop=stop), timeout=60)
    finally:
        await client.aclose()
    assert len({e.key for e in got}) == 40


@pytest.mark.parametrize("revoke", ["-evalsha", "-xadd", "-info", "~other:*"])
async def test_missing_permission_stops_the_daemon_naming_it(
    admin: aioredis.Redis, redis_server: RedisServer, revoke: str
) -> None:
    if revoke.startswith("~"):
        await admin.execute_command("ACL", "SETUSER", USER, "resetkeys", revoke)
    else:
        await admin.execute_command("ACL", "SETUSER", USER, revoke)
    async with run_simulator(tenants=[9702], records=10, page_size=10) as sim:
        data = config_dict(acl_url(redis_server), sim.url, sim.app_key, [9702], ["crm.customers"])
        daemon = DaemonProcess(data)
        try:
            daemon.start()  # not --once: it must stop by itself, not wait forever
            code = await asyncio.to_thread(daemon.wait, 120)
            assert code == EXIT_CONFIG
            denied = [e for e in daemon.events() if e["event"] == "redis_permission_denied"]
            assert len(denied) == 1, daemon.log_lines()[-10:]
            error = denied[0]["error"]
            assert "NOPERM" in error
            name = revoke.lstrip("-~").split(":")[0]
            if name != "other":
                assert re.search(rf"\b{name}\b", error, re.I), error
            else:
                assert "key" in error.lower(), error
            text = "\n".join(daemon.log_lines())
            assert PASSWORD not in text
            assert "Traceback" not in text
        finally:
            daemon.close()


async def test_a_fleet_member_under_the_acl_user(
    admin: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant, feed = 9703, "crm.customers"
    async with run_simulator(tenants=[tenant], records=30, page_size=10) as sim:
        data = config_dict(acl_url(redis_server), sim.url, sim.app_key, [tenant], [feed])
        data["fleet"] = {"enabled": True, "lease": 3.0}
        daemon = DaemonProcess(data, "--instance", "acl")
        try:
            daemon.start()
            async with asyncio.timeout(60):
                while await admin.xlen(f"st:{{{tenant}}}:{feed}") < 30:
                    await asyncio.sleep(0.05)
            owner = await admin.get(f"st:{{{tenant}}}:owner")
            assert owner is not None
            assert parse_holder(owner)[0] == "acl"
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 30) == 0
            text = "\n".join(daemon.log_lines())
            assert "NOPERM" not in text
            assert await admin.get(f"st:{{{tenant}}}:owner") is None  # handed back
        finally:
            daemon.close()

    await admin.execute_command("ACL", "SETUSER", USER, "-eval")
    async with run_simulator(tenants=[tenant], records=10, page_size=10) as sim:
        data = config_dict(acl_url(redis_server), sim.url, sim.app_key, [tenant], [feed])
        data["fleet"] = {"enabled": True}
        daemon = DaemonProcess(data)
        try:
            daemon.start()
            assert await asyncio.to_thread(daemon.wait, 120) == EXIT_CONFIG
            denied = [e for e in daemon.events() if e["event"] == "redis_permission_denied"]
            assert len(denied) == 1
            assert re.search(r"\beval\b", denied[0]["error"], re.I), denied[0]["error"]
        finally:
            daemon.close()
