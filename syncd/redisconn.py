"""Connecting to Redis: one server, or a Redis Cluster (`[redis] cluster = true`).

Every call syncd makes touches the keys of one tenant only, and those share a hash slot
(the tenant id is a hash tag), so the page script and the pipelines work on a cluster too.
"""

from __future__ import annotations

from typing import TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from syncd.config import RedisConfig

RedisClient: TypeAlias = aioredis.Redis | RedisCluster

__all__ = ["RedisClient", "RedisCluster", "connect"]


def connect(cfg: RedisConfig) -> RedisClient:
    """A client for the configured URL (redis://, rediss://, unix://), or a cluster client."""
    if cfg.cluster:
        return RedisCluster.from_url(
            cfg.url, socket_timeout=cfg.timeout, socket_connect_timeout=5.0
        )
    return aioredis.Redis.from_url(
        cfg.url,
        socket_timeout=cfg.timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )
