"""Connecting to Redis: one server, or a Redis Cluster (`[redis] cluster = true`).

Every call syncd makes touches the keys of one tenant only, and those share a hash slot
(the tenant id is a hash tag), so the page script and the pipelines work on a cluster too.

The connections pack commands with hiredis' C packer (`fast`).
"""

from __future__ import annotations

import inspect
from typing import Any, TypeAlias, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
    parse_url,
)

from syncd.config import RedisConfig
from syncd.redis.fast import FastConnection, FastSSLConnection, FastUnixConnection

RedisClient: TypeAlias = aioredis.Redis | RedisCluster

__all__ = ["RedisClient", "RedisCluster", "connect", "socket_timeout_s", "tls_options"]


_FAST: dict[type[Any], type[Any]] = {
    Connection: FastConnection,
    SSLConnection: FastSSLConnection,
    UnixDomainSocketConnection: FastUnixConnection,
}


def tls_options(cfg: RedisConfig) -> dict[str, Any]:
    """redis-py's TLS keyword arguments for the configured CA file, client certificate and key."""
    options: dict[str, Any] = {}
    if cfg.tls_ca_file:
        options["ssl_ca_certs"] = cfg.tls_ca_file
    if cfg.tls_cert_file:
        options["ssl_certfile"] = cfg.tls_cert_file
        options["ssl_keyfile"] = cfg.tls_key_file
    return options


def connect(cfg: RedisConfig, sentinel_password: str | None = None) -> RedisClient:
    """A client for the configured URL (redis://, rediss://, unix://), a cluster client, or a
    client of the primary the configured sentinels name."""
    if cfg.sentinels:
        from syncd.config.addresses import parse_sentinels
        from syncd.redis.sentinel import SentinelOptions, connect_sentinel

        sentinel = SentinelOptions(
            tuple(parse_sentinels(cfg.sentinels)),
            service=cfg.sentinel_service,
            username=cfg.sentinel_username,
            password=sentinel_password,
            tls=cfg.sentinel_tls,
            tls_options=tls_options(cfg),
        )
        return connect_sentinel(cfg.url, sentinel, cfg.timeout)
    if cfg.cluster:
        extra: dict[str, Any] = tls_options(cfg)
        if cfg.url.startswith("redis://"):
            extra["connection_class"] = FastConnection
        return RedisCluster.from_url(
            cfg.url, socket_timeout=cfg.timeout, socket_connect_timeout=5.0, **extra
        )
    options: dict[str, Any] = {
        "socket_timeout": cfg.timeout,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
    }
    options.update(parse_url(cfg.url))
    if options.get("connection_class") is SSLConnection:
        options.update(tls_options(cfg))
    plain = options.get("connection_class", Connection)
    options["connection_class"] = _FAST.get(plain, plain)
    # from_pool: closing the client closes the pool (and its connections) too.
    return aioredis.Redis.from_pool(ConnectionPool(**options))


def socket_timeout_s(redis: RedisClient) -> float | None:
    """The read timeout the client's connections get (redis-py 8 defaults it to 5 s)."""
    if not isinstance(redis, aioredis.Redis):
        # A cluster client keeps the connection settings of its nodes.
        value = getattr(redis, "connection_kwargs", {}).get("socket_timeout")
        return float(value) if isinstance(value, int | float) else None
    pool = redis.connection_pool
    if "socket_timeout" in pool.connection_kwargs:
        return cast("float | None", pool.connection_kwargs["socket_timeout"])
    # Not given explicitly (from_url): the connection class's default applies.
    for cls in pool.connection_class.__mro__:
        if "__init__" in vars(cls):
            param = inspect.signature(vars(cls)["__init__"]).parameters.get("socket_timeout")
            if param is not None and isinstance(param.default, int | float):
                return float(param.default)
    return None
