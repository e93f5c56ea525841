"""Redis settings that break syncd's promises, read once at start.

- `maxmemory-policy allkeys-*` lets Redis evict any key under memory pressure: a cursor (the feed
  starts over: duplicates), a fingerprint (an unchanged record published again) or a whole stream
  (events lost). syncd refuses to start on it unless `[redis] allow_eviction = true`. With
  `noeviction` Redis refuses writes instead, which syncd pauses on (`[streams] max_memory`); the
  `volatile-*` policies only evict keys with an expiry, and syncd sets none.
- No persistence at all (no AOF, no RDB save point): a restart of Redis loses every cursor and
  stream; syncd then starts every feed over. A warning, not a refusal: a cache-like deployment
  may mean it.
- `CONFIG GET` refused (an ACL, a managed Redis): nothing can be checked; a warning, and on.

On a Redis Cluster every primary is checked: each holds a share of the tenants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import redis.exceptions

from syncd.redis.conn import RedisClient, RedisCluster

SETTINGS = ("maxmemory-policy", "appendonly", "save")


@dataclass(frozen=True, slots=True)
class NodeSettings:
    """What `CONFIG GET` said on one node (values None: it would not say)."""

    node: str
    policy: str | None = None
    appendonly: str | None = None
    save: str | None = None
    error: str | None = None  # CONFIG GET refused


@dataclass(slots=True)
class Assessment:
    refusals: list[str] = field(default_factory=list)  # reasons not to start
    evicting: list[str] = field(default_factory=list)  # nodes that may evict (allowed)
    unpersisted: list[str] = field(default_factory=list)  # nodes without AOF or RDB
    unreadable: dict[str, str] = field(default_factory=dict)  # node -> why CONFIG GET failed

    @property
    def persistence(self) -> str | None:
        """The sentence /readyz shows while a node saves nothing, else None."""
        if not self.unpersisted:
            return None
        return (
            f"none on {', '.join(self.unpersisted)}: no AOF and no RDB save points, so a Redis "
            "restart loses every cursor and stream (set appendonly yes or a save schedule)"
        )


def assess(nodes: list[NodeSettings], *, allow_eviction: bool) -> Assessment:
    """Judge the settings of every node (pure)."""
    out = Assessment()
    for n in nodes:
        if n.error is not None:
            out.unreadable[n.node] = n.error
            continue
        if n.policy is not None and n.policy.startswith("allkeys-"):
            if allow_eviction:
                out.evicting.append(n.node)
            else:
                out.refusals.append(
                    f"redis {n.node}: maxmemory-policy is {n.policy}, so Redis may evict cursors, "
                    "fingerprints or whole streams (duplicate or lost events); set "
                    "maxmemory-policy to noeviction (or a volatile-* policy), or set "
                    "[redis] allow_eviction = true to accept that"
                )
        no_aof = n.appendonly is not None and n.appendonly.lower() != "yes"
        no_rdb = n.save is not None and not n.save.strip()
        if no_aof and no_rdb:
            out.unpersisted.append(n.node)
    return out


async def read_version(r: RedisClient) -> str:
    """The server's `redis_version` (on a cluster, of the node that answers INFO first)."""
    info = await r.info("server")
    if isinstance(r, RedisCluster):
        info = next(iter(info.values())) if info and "redis_version" not in info else info
    return str(info.get("redis_version", "0"))


def version_tuple(text: str) -> tuple[int, ...]:
    """ "7.0.15" -> (7, 0): the major and minor numbers syncd's requirements name."""
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


async def read_settings(r: RedisClient) -> list[NodeSettings]:
    """The relevant settings of every primary. Connection errors propagate (the caller waits
    for Redis); a refused CONFIG GET becomes the node's `error`."""
    if isinstance(r, RedisCluster):
        await r.initialize()
        out = []
        for node in r.get_primaries():
            out.append(await _read(r, node.name, {"target_nodes": node}))
        return out
    kwargs = r.connection_pool.connection_kwargs
    name = kwargs.get("path") or f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    return [await _read(r, str(name), {})]


async def _read(r: RedisClient, node: str, target: dict[str, object]) -> NodeSettings:
    values: dict[str, str] = {}
    try:
        for name in SETTINGS:
            reply = await r.config_get(name, **target)
            for key, value in reply.items():
                k = key.decode() if isinstance(key, bytes) else str(key)
                values[k] = value.decode() if isinstance(value, bytes) else str(value)
    except redis.exceptions.ResponseError as exc:  # NoPermissionError, unknown command
        return NodeSettings(node, error=f"{type(exc).__name__}: {exc}")
    return NodeSettings(
        node,
        policy=values.get("maxmemory-policy"),
        appendonly=values.get("appendonly"),
        save=values.get("save"),
    )
