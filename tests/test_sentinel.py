"""Redis Sentinel: a primary, a replica and three real sentinels on free ports."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis.exceptions

from syncd.sentinel import SentinelOptions, connect_sentinel, parse_sentinels
from syncd.sentinelserver import SERVICE, SentinelServers


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
