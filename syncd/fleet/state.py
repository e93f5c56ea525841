"""What the fleet keeps in Redis, and reading it back: the small scripts that act on leases and
heartbeats (only for their holder), the heartbeat's shape, and the members and owners as
`syncd status` and every instance's round read them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from syncd.keys import FleetKeys, Keys
from syncd.redis.conn import RedisClient

CHUNK = 2000  # commands per pipeline round trip

ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"""
RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: members, member, known. ARGV: name, lease ms, heartbeat. Returns {known exists, previous}.
HEARTBEAT = """
local prev = redis.call('GET', KEYS[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
local has = redis.call('PEXPIRE', KEYS[3], ARGV[2])
return {has, prev}
"""
# KEYS: known. ARGV: lease ms, tenant ids...
KNOWN = """
redis.call('DEL', KEYS[1])
for i = 2, #ARGV, 1000 do
  redis.call('SADD', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('SADD', KEYS[1], 0)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
# KEYS: members, then the member keys of ARGV's names: drop those whose heartbeat expired.
PRUNE = """
for i, name in ipairs(ARGV) do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    redis.call('SREM', KEYS[1], name)
  end
end
return 1
"""


class Heartbeat(msgspec.Struct, frozen=True):
    """What an instance tells the fleet about itself, refreshed every renewal."""

    token: str  # random per process: two live processes under one name show up
    known: str  # digest of the tenant ids its configuration lists
    tenants: int  # leases held
    renewed: float  # wall-clock time of this heartbeat
    host: str = ""
    pid: int = 0


def digest(tenants: Iterable[int]) -> str:
    return hashlib.sha1(",".join(map(str, sorted(tenants))).encode()).hexdigest()[:16]


@dataclass
class Member:
    name: str
    heartbeat: Heartbeat
    known: frozenset[int]
    expires_in: float = 0.0  # seconds until its heartbeat runs out unless renewed


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def read_members(
    redis: RedisClient, prefix: str, cache: dict[str, frozenset[int]] | None = None
) -> dict[str, Member]:
    """The live instances, their heartbeats and known tenants; prunes the ones gone."""
    k = FleetKeys(prefix)
    cache = {} if cache is None else cache
    names = sorted(text(n) for n in await redis.smembers(k.members))
    if not names:
        return {}
    pipe = redis.pipeline(transaction=False)
    for n in names:  # GETs, not MGET: cluster pipelines refuse multi-key commands
        pipe.get(k.member(n))
        pipe.pttl(k.member(n))
    replies = await pipe.execute()
    values, ttls = replies[::2], replies[1::2]
    expires = dict(zip(names, ttls, strict=True))
    gone = [n for n, v in zip(names, values, strict=True) if v is None]
    if gone:
        await redis.eval(PRUNE, 1 + len(gone), k.members, *map(k.member, gone), *gone)
    beats = {
        n: msgspec.json.decode(v, type=Heartbeat)
        for n, v in zip(names, values, strict=True)
        if v is not None
    }
    missing = [n for n, b in beats.items() if b.known not in cache]
    read: dict[str, frozenset[int]] = {}
    if missing:
        pipe = redis.pipeline(transaction=False)
        for n in missing:
            pipe.smembers(k.known(n))
        for n, ids in zip(missing, await pipe.execute(), strict=True):
            tenants = frozenset(int(i) for i in ids) - {0}
            if digest(tenants) == beats[n].known:
                cache[beats[n].known] = tenants
            else:  # rewritten since its heartbeat: use it this once, do not cache it
                read[n] = tenants
    return {
        n: Member(n, b, cache.get(b.known, read.get(n, frozenset())), max(0, expires[n]) / 1000)
        for n, b in beats.items()
    }


async def read_owners(redis: RedisClient, prefix: str, tenants: list[int]) -> dict[int, str]:
    """tenant -> the instance holding its lease, for the tenants that have one."""
    owners: dict[int, str] = {}
    for chunk in chunks(tenants, CHUNK):
        pipe = redis.pipeline(transaction=False)
        for t in chunk:
            pipe.get(Keys(prefix, t).owner)
        for t, v in zip(chunk, await pipe.execute(), strict=True):
            if v is not None:
                owners[t] = text(v)
    return owners


def summary(members: dict[str, Member], owners: dict[int, str]) -> list[dict[str, Any]]:
    """One row per live instance: name, tenants owned, last renewal (for `syncd status`)."""
    held: dict[str, int] = {}
    for owner in owners.values():
        held[owner] = held.get(owner, 0) + 1
    return [
        {
            "instance": name,
            "tenants": held.get(name, 0),
            "known": len(m.known),
            "renewed": m.heartbeat.renewed,
            "host": m.heartbeat.host,
            "pid": m.heartbeat.pid,
        }
        for name, m in sorted(members.items())
    ]
