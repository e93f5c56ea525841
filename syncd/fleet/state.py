"""What the fleet keeps in Redis, and reading it back: the small scripts that act on leases and
heartbeats (only for their holder), the heartbeat's shape, and the members and owners as
`syncd status` and every instance's round read them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from syncd.fleet.compare import Comparison, Profile, Published, agreement, compare
from syncd.keys import FleetKeys, Keys
from syncd.redis.conn import RedisClient

CHUNK = 2000  # commands per pipeline round trip

# The lease scripts. KEYS: the tenant's lease. ARGV: this process's holder value (name#token),
# the lease in ms, the instance name.
#
# ACQUIRE also takes a lease holding the bare instance name, written by 0.2.0: during an
# in-place upgrade that is this instance's previous life (a live process under the name would
# hold the name's heartbeat, and this one would be kept out of the fleet).
ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if not cur or cur == ARGV[3] then
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
# The name is held like a lease: a heartbeat is written only over one of the same process (the
# same token). Otherwise the script records the process kept out in the clash key and returns
# {0, the holder's heartbeat, its ms to live}.
_NAME_HELD = """
local prev = redis.call('GET', KEYS[2])
if prev then
  local ok, beat = pcall(cjson.decode, prev)
  if not ok or type(beat) ~= 'table' or beat['token'] ~= ARGV[4] then
    redis.call('SET', KEYS[5], ARGV[3], 'PX', ARGV[2])
    return {0, prev, redis.call('PTTL', KEYS[2])}
  end
end
"""
# KEYS: members, member, known, config, clash. ARGV: name, lease ms, heartbeat, token.
# Returns {1, previous heartbeat or ''}; {2, ...} when the known tenants or the configuration
# ran out (JOIN writes them again); {0, ...} when another process holds the name.
HEARTBEAT = (
    _NAME_HELD
    + """
if redis.call('EXISTS', KEYS[3]) == 0 or redis.call('EXISTS', KEYS[4]) == 0 then
  return {2, prev or ''}
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[2])
return {1, prev or ''}
"""
)
# KEYS: as HEARTBEAT. ARGV: as HEARTBEAT, then the configuration document, then tenant ids.
# Writes the known tenants and the configuration with the heartbeat that announces their
# digests, so nobody reads a stale set.
JOIN = (
    _NAME_HELD
    + """
redis.call('DEL', KEYS[3])
for i = 6, #ARGV, 1000 do
  redis.call('SADD', KEYS[3], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('SADD', KEYS[3], 0)
redis.call('PEXPIRE', KEYS[3], ARGV[2])
redis.call('SET', KEYS[4], ARGV[5], 'PX', ARGV[2])
redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
redis.call('SADD', KEYS[1], ARGV[1])
return {1, prev or ''}
"""
)
# KEYS: members, member, known, config, clash, epoch. ARGV: name, token. Removes what this
# process wrote (the membership only while it still holds the name) and bumps the epoch.
LEAVE = """
local function mine(key)
  local v = redis.call('GET', key)
  if not v then return false end
  local ok, beat = pcall(cjson.decode, v)
  return ok and type(beat) == 'table' and beat['token'] == ARGV[2]
end
if mine(KEYS[2]) then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
  redis.call('SREM', KEYS[1], ARGV[1])
end
if mine(KEYS[5]) then
  redis.call('DEL', KEYS[5])
end
redis.call('INCR', KEYS[6])
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

    token: str  # random per process, its incarnation: part of every lease it holds
    known: str  # digest of the tenant ids its configuration lists
    tenants: int  # leases held
    renewed: float  # wall-clock time of this heartbeat
    host: str = ""
    pid: int = 0
    config: str = ""  # digest of its configuration document ("" from an older syncd)


def digest(tenants: Iterable[int]) -> str:
    return hashlib.sha1(",".join(map(str, sorted(tenants))).encode()).hexdigest()[:16]


def config_document(profiles: Mapping[int, Profile]) -> tuple[Published, bytes, str]:
    """The configuration an instance publishes, its document and the document's digest."""
    published = Published.of(profiles)
    doc = msgspec.json.encode(published, order="sorted")
    return published, doc, hashlib.sha1(doc).hexdigest()[:16]


def holder(instance: str, token: str) -> str:
    """A lease's value: the instance name and the incarnation (token) of the process."""
    return f"{instance}#{token}"


_HOLDER = re.compile(r"(.*)#([0-9a-f]{16})", re.S)


def parse_holder(value: bytes | str) -> tuple[str, str | None]:
    """(name, token) of a lease's value; an older syncd's lease holds the name alone."""
    s = text(value)
    m = _HOLDER.fullmatch(s)
    return (m[1], m[2]) if m else (s, None)


@dataclass
class Member:
    name: str
    heartbeat: Heartbeat
    known: frozenset[int]
    expires_in: float = 0.0  # seconds until its heartbeat runs out unless renewed
    # Its configuration, read only when the members' digests differ (`read_configs`); None: an
    # older syncd, or not read.
    published: Published | None = None
    clash: Heartbeat | None = None  # another live process under this name, kept out

    def holds(self, value: bytes | str) -> bool:
        """Whether a lease's value names this member (this process, not another by its name)."""
        name, token = parse_holder(value)
        return name == self.name and token in (None, self.heartbeat.token)


@dataclass
class Cache:
    """What was read by digest, so an unchanged configuration is read once (only the digests of
    the live members are kept), and the last comparison with what it was made from."""

    known: dict[str, frozenset[int]] = field(default_factory=dict)
    config: dict[str, Published] = field(default_factory=dict)
    compared: tuple[object, Comparison] | None = None


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def chunks(items: list[int], size: int) -> Iterable[list[int]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


async def read_members(
    redis: RedisClient, prefix: str, cache: Cache | None = None
) -> dict[str, Member]:
    """The live instances, their heartbeats and known tenants, and any process kept out under
    their name; prunes the ones gone. Their configurations are read by `compare_members`, only
    when their digests differ."""
    k = FleetKeys(prefix)
    cache = Cache() if cache is None else cache
    names = sorted(text(n) for n in await redis.smembers(k.members))
    if not names:
        return {}
    pipe = redis.pipeline(transaction=False)
    for n in names:  # GETs, not MGET: cluster pipelines refuse multi-key commands
        pipe.get(k.member(n))
        pipe.pttl(k.member(n))
        pipe.get(k.clash(n))
    replies = await pipe.execute()
    values, ttls, clashes = replies[::3], replies[1::3], replies[2::3]
    expires = dict(zip(names, ttls, strict=True))
    gone = [n for n, v in zip(names, values, strict=True) if v is None]
    if gone:
        await redis.eval(PRUNE, 1 + len(gone), k.members, *map(k.member, gone), *gone)
    beats = {
        n: msgspec.json.decode(v, type=Heartbeat)
        for n, v in zip(names, values, strict=True)
        if v is not None
    }
    others = {
        n: msgspec.json.decode(c, type=Heartbeat)
        for n, c in zip(names, clashes, strict=True)
        if c is not None and n in beats
    }
    known = await _read_known(redis, k, beats, cache)
    return {
        n: Member(
            n,
            b,
            known.get(n, frozenset()),
            max(0, expires[n]) / 1000,
            clash=others[n] if n in others and others[n].token != b.token else None,
        )
        for n, b in beats.items()
    }


async def _read_known(
    redis: RedisClient, k: FleetKeys, beats: dict[str, Heartbeat], cache: Cache
) -> dict[str, frozenset[int]]:
    live = {b.known for b in beats.values()}
    cache.known = {d: ts for d, ts in cache.known.items() if d in live}
    missing = [n for n, b in beats.items() if b.known not in cache.known]
    read: dict[str, frozenset[int]] = {}
    if missing:
        pipe = redis.pipeline(transaction=False)
        for n in missing:
            pipe.smembers(k.known(n))
        for n, ids in zip(missing, await pipe.execute(), strict=True):
            tenants = frozenset(int(i) for i in ids) - {0}
            if digest(tenants) == beats[n].known:
                cache.known[beats[n].known] = tenants
            else:  # rewritten since its heartbeat: use it this once, do not cache it
                read[n] = tenants
    return {n: cache.known.get(b.known, read.get(n, frozenset())) for n, b in beats.items()}


def agreeing(members: Mapping[str, Member]) -> Comparison | None:
    """The comparison when every member publishes the same configuration for the same tenants
    (by the digests in their heartbeats, nothing read); None when they may differ."""
    beats = [m.heartbeat for m in members.values()]
    if not all(b.config for b in beats) or len({(b.config, b.known) for b in beats}) > 1:
        return None
    if len({m.known for m in members.values()}) > 1:  # a set rewritten since its heartbeat
        return None
    return agreement({n: m.known for n, m in members.items()})


async def read_configs(
    redis: RedisClient, prefix: str, members: Mapping[str, Member], cache: Cache
) -> None:
    """Each member's configuration into `Member.published`: from the cache by the digest in its
    heartbeat, else read (and cached when it is the one the heartbeat announces). A member whose
    configuration cannot be read is left without one: compared by tenant ids only."""
    k = FleetKeys(prefix)
    live = {m.heartbeat.config for m in members.values() if m.heartbeat.config}
    cache.config = {d: p for d, p in cache.config.items() if d in live}
    missing = [n for n, m in members.items() if m.heartbeat.config in live - set(cache.config)]
    read: dict[str, Published] = {}
    if missing:
        pipe = redis.pipeline(transaction=False)
        for n in missing:
            pipe.get(k.config(n))
        for n, doc in zip(missing, await pipe.execute(), strict=True):
            if doc is None:
                continue
            try:
                published = msgspec.json.decode(doc, type=Published)
            except msgspec.DecodeError:
                continue  # not one this syncd can read: compared by tenant ids only
            if hashlib.sha1(doc).hexdigest()[:16] == members[n].heartbeat.config:
                cache.config[members[n].heartbeat.config] = published
            else:  # rewritten since its heartbeat: use it this once
                read[n] = published
    for n, m in members.items():
        m.published = cache.config.get(m.heartbeat.config, read.get(n))


async def compare_members(
    redis: RedisClient, prefix: str, members: Mapping[str, Member], cache: Cache | None = None
) -> Comparison:
    """How the members' configurations compare: from the digests in their heartbeats when those
    agree, else from the configurations, read only then. With a `cache`, each is read once per
    digest and the comparison is made again only when a member's tenants or digest moved."""
    cache = Cache() if cache is None else cache
    key = tuple((n, m.known, m.heartbeat.config) for n, m in sorted(members.items()))
    if cache.compared is not None and cache.compared[0] == key:
        return cache.compared[1]
    compared = agreeing(members)
    if compared is None:
        await read_configs(redis, prefix, members, cache)
        compared = comparison(members)
        if any(m.heartbeat.config and m.published is None for m in members.values()):
            cache.compared = None  # a configuration not read: again next time
            return compared
    cache.compared = (key, compared)
    return compared


async def read_holders(redis: RedisClient, prefix: str, tenants: list[int]) -> dict[int, str]:
    """tenant -> its lease's value (`<name>#<token>`), for the tenants that have one."""
    owners: dict[int, str] = {}
    for chunk in chunks(tenants, CHUNK):
        pipe = redis.pipeline(transaction=False)
        for t in chunk:
            pipe.get(Keys(prefix, t).owner)
        for t, v in zip(chunk, await pipe.execute(), strict=True):
            if v is not None:
                owners[t] = text(v)
    return owners


async def read_owners(redis: RedisClient, prefix: str, tenants: list[int]) -> dict[int, str]:
    """tenant -> the name of the instance holding its lease, for the tenants that have one."""
    holders = await read_holders(redis, prefix, tenants)
    return {t: parse_holder(v)[0] for t, v in holders.items()}


def live_owners(holders: Mapping[int, str], members: Mapping[str, Member]) -> dict[int, str]:
    """tenant -> the live member holding its lease; tenants whose lease is held by a process
    that is not the live member of its name (gone, or kept out) are left out."""
    out: dict[int, str] = {}
    for t, value in holders.items():
        name, _ = parse_holder(value)
        m = members.get(name)
        if m is not None and m.holds(value):
            out[t] = name
    return out


def comparison(members: Mapping[str, Member]) -> Comparison:
    """The members' configurations as read (`read_configs`) compared tenant by tenant (see
    `syncd.fleet.compare`)."""
    return compare(
        {n: m.known for n, m in members.items()}, {n: m.published for n, m in members.items()}
    )


def summary(
    members: dict[str, Member], owners: dict[int, str], compared: Comparison | None = None
) -> list[dict[str, Any]]:
    """One row per live instance: name, tenants owned, last renewal, its configuration's digest,
    a process kept out under its name, and the configuration differences it is part of (for
    `syncd status`)."""
    held: dict[str, int] = {}
    for owner in owners.values():
        held[owner] = held.get(owner, 0) + 1
    differences = compared.differences if compared is not None else []
    return [
        {
            "instance": name,
            "tenants": held.get(name, 0),
            "known": len(m.known),
            "renewed": m.heartbeat.renewed,
            "host": m.heartbeat.host,
            "pid": m.heartbeat.pid,
            "config": m.heartbeat.config or None,
            "name_clash": (None if m.clash is None else {"host": m.clash.host, "pid": m.clash.pid}),
            "differences": [d.describe() for d in differences if name in dict(d.values)],
        }
        for name, m in sorted(members.items())
    ]
