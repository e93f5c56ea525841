"""Shared fixtures: a real Redis server for the session, started on a free port; PostgreSQL
(a private server, or the machine's) with a throwaway database per test that asks for one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

from syncd.testing import postgres_server
from syncd.testing.postgres_server import Postgres
from syncd.testing.redis_server import RedisClusterServers, RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server process for the whole test session."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """A client on an emptied database of the session's server."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterServers]:
    """A 3-node Redis Cluster for the tests of one module."""
    servers = RedisClusterServers(3)
    servers.start()
    yield servers
    servers.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A private PostgreSQL for the session where the machine has initdb, else the server on
    127.0.0.1:5432 (see syncd.testing.postgres_server)."""
    server = postgres_server.start()
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres: Postgres) -> Iterator[str]:
    """The URL of an empty database of this test's own, dropped afterwards."""
    name = postgres.create_database()
    yield postgres.url(name)
    postgres.drop_database(name)
