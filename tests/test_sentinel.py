"""Redis Sentinel: a primary, a replica and three real sentinels on free ports."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator

import pytest
import redis.exceptions

from syncd.config.addresses import parse_sentinels
from syncd.keys import Keys
from syncd.redis.sentinel import SentinelOptions, connect_sentinel
from syncd.testing.sentinel_server import SERVICE, SentinelServers
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import (
    DaemonProcess,
    assert_exactly_once,
    config_dict,
    stream_events,
    truth,
)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([], []),
        (["127.0.0.1:26379"], [("127.0.0.1", 26379)]),
        (["a:1", " b:2 "], [("a", 1), ("b", 2)]),
        (["[::1]:26379"], [("::1", 26379)]),
    ],
)
def test_parse_sentinels(entries: list[str], expected: list[tuple[str, int]]) -> None:
    assert parse_sentinels(entries) == expected


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["localhost"], r"\[0\]: expected 'host:port', got 'localhost'"),
        (["a:1", "b:x"], r"\[1\]: expected 'host:port', got 'b:x'"),
        ([":26379"], r"\[0\]"),
        (["a:70000"], r"\[0\]"),
    ],
)
def test_parse_sentinels_errors_name_the_entry(entries: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sentinels(entries)


@pytest.fixture
def sentinels() -> Iterator[SentinelServers]:
    servers = SentinelServers()
    servers.start()
    yield servers
    servers.stop()


async def test_follows_a_failover_and_keeps_what_was_replicated(
    sentinels: SentinelServers,
) -> None:
    options = SentinelOptions(tuple(parse_sentinels(sentinels.sentinels)), service=SERVICE)
    client = connect_sentinel(sentinels.url, options, timeout=5.0)
    try:
        first = await client.info("server")
        assert first["tcp_port"] == sentinels.primary.port
        for i in range(100):
            await client.set(f"k{i}", i)
        # WAIT on the connection that wrote: a pipeline keeps both on one connection.
        pipe = client.pipeline(transaction=False)
        pipe.set("last", "yes")
        pipe.execute_command("WAIT", 1, 5000)
        assert (await pipe.execute())[1] == 1
        old = await asyncio.to_thread(sentinels.kill_primary)
        new = await asyncio.to_thread(sentinels.wait_failover, old)
        assert new == sentinels.replica.port
        deadline = time.monotonic() + 60
        while True:
            try:
                info = await client.info("server")
                break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        assert info["tcp_port"] == new
        assert await client.get("last") == b"yes"
        assert await client.get("k99") == b"99"
        await client.set("after", 1)  # the promoted replica takes writes
        assert await client.get("after") == b"1"
    finally:
        await client.aclose()


TENANTS = [5101, 5102, 5103]
FEEDS = ["crm.customers", "jpm.jobs"]
RECORDS = 1200


async def test_daemon_follows_a_failover_and_stays_exactly_once(
    sentinels: SentinelServers,
) -> None:
    options = SentinelOptions(tuple(parse_sentinels(sentinels.sentinels)), service=SERVICE)
    client = connect_sentinel(sentinels.url, options, timeout=5.0)
    expected = len(TENANTS) * len(FEEDS) * RECORDS

    async def published() -> int:
        pipe = client.pipeline(transaction=False)
        for t in TENANTS:
            for f in FEEDS:
                pipe.xlen(Keys("st", t).stream(f))
        return sum(await pipe.execute())

    async with run_simulator(tenants=TENANTS, records=RECORDS, page_size=20, seed=8) as sim:
        data = config_dict(
            sentinels.url, sim.url, sim.app_key, TENANTS, FEEDS, requests_per_second=15.0
        )
        data["redis"].update(
            {"sentinels": sentinels.sentinels, "sentinel_service": SERVICE, "wait_replicas": 1}
        )
        daemon = DaemonProcess(data)
        try:
            daemon.start()
            while await published() < expected // 5:
                await asyncio.sleep(0.05)
            old = await asyncio.to_thread(sentinels.kill_primary)
            new = await asyncio.to_thread(sentinels.wait_failover, old)
            # WAIT 1 needs a replica: the old server comes back as one, as it would in production
            # (or a second replica takes over the role).
            await asyncio.to_thread(sentinels.revive_old_primary, new)
            deadline = time.monotonic() + 120
            while True:
                try:
                    if await published() >= expected:
                        break
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
                    pass
                assert time.monotonic() < deadline, "\n".join(daemon.log_lines()[-20:])
                await asyncio.sleep(0.2)
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 30) == 0
            events = [e["event"] for e in daemon.events()]
            assert "redis_unavailable" in events or "poll_failed" in events, "no failover seen"
            for t in TENANTS:
                for f in FEEDS:
                    got = await stream_events(client, t, f)
                    assert_exactly_once(got, await truth(sim.url, t, f), where=f"{t}/{f}")
        finally:
            daemon.close()
            await client.aclose()
