"""Connecting through Redis Sentinel: the client asks the sentinels where the primary is, and asks
again whenever the primary it talks to goes away or turns into a replica (a failover).

The primary's credentials, database and TLS come from `[redis] url` as usual (its host and port
are not used: the sentinels name the primary); the sentinels have their own credentials and TLS.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import (
    Sentinel,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from syncd.redis.fast import pack

__all__ = [
    "SentinelClient",
    "SentinelOptions",
    "connect_sentinel",
]


class FastSentinelConnection(SentinelManagedConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return pack(args) or super().pack_command(*args)


class FastSentinelSSLConnection(SentinelManagedSSLConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return pack(args) or super().pack_command(*args)


@dataclass(frozen=True)
class SentinelOptions:
    """Where the sentinels are and how to talk to them."""

    sentinels: tuple[tuple[str, int], ...]
    service: str = "mymaster"
    username: str | None = None
    password: str | None = None
    tls: bool = False  # TLS to the sentinels (the primary's TLS follows the URL's scheme)
    # redis-py TLS keyword arguments (CA file, client certificate) for sentinels and primary.
    tls_options: dict[str, Any] = field(default_factory=dict)


class SentinelClient(aioredis.Redis):
    """The primary's client; closing it closes the connections to the sentinels too."""

    sentinel_manager: Sentinel | None = None

    async def aclose(self, close_connection_pool: bool | None = None) -> None:
        await super().aclose(close_connection_pool)
        if self.sentinel_manager is not None:
            for s in self.sentinel_manager.sentinels:
                await s.aclose()


# Through a typed name: redis-py types Sentinel.__init__ from 8.x on, not before, and the code
# type-checks the same on every version pyproject.toml allows.
_new_sentinel: Callable[..., Sentinel] = Sentinel


def connect_sentinel(url: str, options: SentinelOptions, timeout: float) -> SentinelClient:
    """A client of the primary that `options.service` names, following failovers."""
    sentinel_kwargs: dict[str, Any] = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
    if options.username is not None:
        sentinel_kwargs["username"] = options.username
    if options.password is not None:
        sentinel_kwargs["password"] = options.password
    if options.tls:
        sentinel_kwargs["ssl"] = True
        sentinel_kwargs.update(options.tls_options)
    primary: dict[str, Any] = {
        k: v for k, v in parse_url(url).items() if k not in ("host", "port", "path")
    }
    tls = primary.pop("connection_class", None) is SSLConnection
    if tls:
        primary.update(options.tls_options)
    primary["connection_class"] = FastSentinelSSLConnection if tls else FastSentinelConnection
    sentinel = _new_sentinel(
        list(options.sentinels),
        sentinel_kwargs=sentinel_kwargs,
        socket_timeout=timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )
    client: SentinelClient = sentinel.master_for(
        options.service, redis_class=SentinelClient, **primary
    )
    client.sentinel_manager = sentinel
    return client
