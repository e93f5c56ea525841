"""Checking at start that the Redis user may run every command syncd needs on its keys.

With a Redis ACL user restricted to syncd's key prefix and commands (the README gives the
`ACL SETUSER` line), a missing permission would otherwise show up only when the first page is
applied, as a retried error. The probe runs each command once in a form that passes the ACL
check but changes nothing (a stream that does not exist is not created, a probe field is removed
again), so a missing permission stops the daemon at start with Redis' own NOPERM message, which
names the command or the key.
"""

from __future__ import annotations

from typing import Any

import redis.exceptions

from syncd.keys import FleetKeys, Keys
from syncd.redis.conn import RedisClient, RedisCluster

# A tenant id no real tenant has: the probe's keys share its hash slot, like a tenant's do.
PROBE_TENANT = 0
# Commands without a key: on a cluster they go to every primary.
KEYLESS = frozenset({"PING", "INFO", "WAIT"})


class RedisPermissionError(Exception):
    """The Redis user lacks a permission syncd needs; the message names it."""


def _probes(keys: Keys) -> list[tuple[Any, ...]]:
    stream = keys.stream("syncd.acl-probe")
    return [
        ("PING",),
        ("INFO", "server"),
        ("HGETALL", keys.cursors),
        ("HGET", keys.cursors, "probe"),
        ("HMGET", keys.seen("syncd.acl-probe"), "probe"),
        ("HSET", keys.state, "syncd.acl-probe", "1"),
        ("HINCRBY", keys.state, "syncd.acl-probe", "0"),
        # The page script's dead-letter set; aimed at the hash above, it fails with WRONGTYPE
        # after the ACL check and adds nothing.
        ("SADD", keys.state, "probe"),
        # The index's scripts (its move from the layout before buckets, too).
        ("HSETNX", keys.state, "syncd.acl-probe", "1"),
        ("HLEN", keys.state),
        ("HSCAN", keys.state, "0", "COUNT", "1"),
        ("EXISTS", keys.cursors),
        ("HDEL", keys.state, "syncd.acl-probe"),
        ("XLEN", stream),
        ("XADD", stream, "NOMKSTREAM", "*", "probe", "1"),
        ("XTRIM", stream, "MAXLEN", "0"),
        ("XRANGE", stream, "-", "+", "COUNT", "1"),
        ("XREVRANGE", stream, "+", "-", "COUNT", "1"),
        ("SCRIPT", "EXISTS", "0" * 40),
        ("EVALSHA", "0" * 40, "1", keys.cursors),
        ("XINFO", "GROUPS", stream),
        ("XGROUP", "CREATE", stream, "syncd-acl-probe", "$"),
    ]


def _fleet_probes(keys: Keys, fleet: FleetKeys) -> list[tuple[Any, ...]]:
    """What the fleet runs (its scripts' commands are checked when they run, so each is probed
    itself): on the probe tenant's lease and a probe set, each left as it was."""
    probe = f"{fleet.base}:acl-probe"
    return [
        ("EVAL", "return 0", "1", keys.owner),
        ("GET", keys.owner),
        ("PTTL", keys.owner),
        ("PEXPIRE", keys.owner, "1"),
        ("SET", keys.owner, "syncd.acl-probe", "NX", "PX", "1"),
        ("DEL", keys.owner),
        ("EXISTS", fleet.members),
        ("SMEMBERS", fleet.members),
        ("SADD", probe, "syncd.acl-probe"),
        ("SREM", probe, "syncd.acl-probe"),
        ("INCR", probe),
        ("DEL", probe),
    ]


def probes(prefix: str, *, fleet: bool = False, wait: bool = False) -> list[tuple[Any, ...]]:
    """Every command syncd needs, in its harmless form, on keys under `prefix`; `fleet` and
    `wait` add what `[fleet] enabled` and `[redis] wait_replicas` need."""
    keys = Keys(prefix, PROBE_TENANT)
    found = _probes(keys)
    if fleet:
        found += _fleet_probes(keys, FleetKeys(prefix))
    if wait:
        found.append(("WAIT", "0", "1"))
    return found


async def refusal(client: RedisClient, command: tuple[Any, ...]) -> str | None:
    """Redis' NOPERM message when the user may not run `command` (a probe), else None."""
    options: dict[str, Any] = {}
    if isinstance(client, RedisCluster) and command[0] in KEYLESS:
        options["target_nodes"] = RedisCluster.PRIMARIES
    try:
        if command[0] == "SCRIPT":
            # The cluster client routes this two-word command only through its own method.
            await client.script_exists(*command[2:])
        else:
            await client.execute_command(*command, **options)
    except redis.exceptions.NoPermissionError as exc:
        return str(exc)
    except redis.exceptions.ResponseError:
        # NOSCRIPT, "no such key", "requires the key to exist": the ACL check passed.
        pass
    return None


async def check(
    client: RedisClient, prefix: str, *, fleet: bool = False, wait: bool = False
) -> None:
    """RedisPermissionError naming the first command (or key) the user may not use."""
    for command in probes(prefix, fleet=fleet, wait=wait):
        message = await refusal(client, command)
        if message is not None:
            raise RedisPermissionError(
                f"NOPERM: the Redis user may not run {' '.join(map(str, command[:2]))}: "
                f"{message} (see the README's ACL SETUSER line)"
            )
