"""Stream upkeep: consumer groups, retention, idle consumer names, backpressure.

- Groups named in `[streams] groups` are created (from the stream's start) before the daemon
  publishes anything to a stream, so none of their events can be trimmed unread.
- Retention trims a stream by length or age, but never below what the protected groups have
  acknowledged: the floor is, per group, the smaller of (last-delivered id + 1) and the oldest
  pending id; the trim point is the smallest floor over the groups. Protected are the
  configured groups and, unless `[streams] protect_unlisted = false`, every other group found
  on the stream. Trimming costs O(entries trimmed): the oldest entry kept by length is found by
  a script inside Redis, and nothing of the retained stream crosses the network.
- Consumer names with nothing pending that were idle longer than `consumer_idle` are removed.
- Backpressure pauses a feed while a configured group lags more than `max_lag` entries behind
  it, until it is back to `resume_lag` or fewer, and pauses all polling while Redis' used memory
  is above `max_memory` x maxmemory. The cursor stays where it is, so pausing loses nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog

from syncd.keys import Keys
from syncd.redis.conn import RedisClient, RedisCluster

log = structlog.get_logger("syncd.upkeep")

StreamId = tuple[int, int]
ZERO: StreamId = (0, 0)


def parse_id(value: Any) -> StreamId:
    text = value.decode() if isinstance(value, bytes) else str(value)
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def format_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def next_id(sid: StreamId) -> StreamId:
    return sid[0], sid[1] + 1


@dataclass(frozen=True, slots=True)
class GroupState:
    """What one consumer group has and has not acknowledged on one stream."""

    name: str
    last_delivered: StreamId
    pending: int
    oldest_pending: StreamId | None
    lag: int | None  # entries not yet delivered (None: Redis cannot tell)

    def floor(self) -> StreamId:
        """Entries below this id are acknowledged by this group."""
        after_delivered = next_id(self.last_delivered)
        if self.oldest_pending is not None:
            return min(after_delivered, self.oldest_pending)
        return after_delivered

    def unacknowledged(self, length: int) -> int:
        """Entries the group has yet to acknowledge: pending plus not yet delivered."""
        lag = self.lag if self.lag is not None else length
        return self.pending + lag


def trim_point(
    groups: list[GroupState] | None,
    *,
    length_cut: StreamId | None,
    age_cut: StreamId | None,
) -> StreamId | None:
    """The MINID to trim at (entries below it go), or None for no trim (pure).

    `groups` None means a configured group is missing: nothing may be trimmed.
    """
    wanted = max((c for c in (length_cut, age_cut) if c is not None), default=None)
    if wanted is None or groups is None:
        return None
    for g in groups:
        wanted = min(wanted, g.floor())
    return wanted if wanted > ZERO else None


async def ensure_groups(r: RedisClient, keys: Keys, feeds: list[str], groups: list[str]) -> None:
    """Create each configured group on each feed's stream (from its start), if missing; a
    group created anew has missed nothing yet (`Keys.missed`)."""
    if not groups or not feeds:
        return
    pairs = [(feed, group) for feed in feeds for group in groups]
    async with r.pipeline(transaction=False) as pipe:
        for feed, group in pairs:
            pipe.xgroup_create(keys.stream(feed), group, id="0", mkstream=True)
        results = await pipe.execute(raise_on_error=False)
    for res in results:
        if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
            raise res
    created = [Keys.missed_field(f, g) for (f, g), res in zip(pairs, results, strict=True)
               if not isinstance(res, Exception)]  # fmt: skip
    if created:
        await r.hdel(keys.missed, *created)


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream's length and every consumer group on it."""

    length: int
    groups: list[GroupState]
    missing: list[str]  # configured groups not on the stream

    def group(self, name: str) -> GroupState | None:
        return next((g for g in self.groups if g.name == name), None)


def split_groups(
    state: StreamState, configured: list[str], protect_unlisted: bool
) -> tuple[list[GroupState] | None, list[GroupState]]:
    """(the groups retention must not outrun, or None when a configured group is missing;
    the groups it may outrun) (pure)."""
    if state.missing:
        return None, []
    protected = [g for g in state.groups if protect_unlisted or g.name in configured]
    return protected, [g for g in state.groups if g not in protected]


def outrun(unprotected: list[GroupState], point: StreamId | None) -> list[GroupState]:
    """The unprotected groups a trim at `point` takes unacknowledged events from (pure)."""
    if point is None:
        return []
    return [g for g in unprotected if g.floor() < point]


def pause_reason(
    current: str | None, behind: dict[str, int], max_lag: int, resume_lag: int
) -> str | None:
    """Why a feed is paused after this check, None when it may be polled (pure).

    Pauses when a group has more than `max_lag` unacknowledged events and resumes only at
    `resume_lag` or fewer, so a group hovering near `max_lag` does not flap. A pause keeps its
    first reason (the one logged and recorded) while it lasts.
    """
    if not max_lag or not behind:
        return None
    worst = max(behind, key=lambda name: behind[name])
    if current is not None and behind[worst] > resume_lag:
        return current
    if behind[worst] > max_lag:
        return (
            f"group {worst} has {behind[worst]} unacknowledged events "
            f"(pauses above {max_lag}, resumes at {resume_lag} or fewer)"
        )
    return None


@dataclass(frozen=True, slots=True)
class Holder:
    """A group holding unacknowledged events on a stream: what keeps memory from shrinking."""

    stream: str
    group: str
    unacknowledged: int


def memory_advice(
    used: int, limit: int, ratio: float, holders: list[Holder], retention: bool
) -> str:
    """What a memory pause is and what would end it, for logs, `status` and /readyz (pure)."""
    mb = 1024 * 1024
    text = (
        f"Redis uses {used / mb:.0f} MB of maxmemory {limit / mb:.0f} MB "
        f"(pause above {ratio:.0%}); to free memory:"
    )
    steps = []
    top = sorted(holders, key=lambda h: -h.unacknowledged)[:3]
    if top:
        named = ", ".join(
            f"group {h.group} ({h.unacknowledged} unacknowledged on {h.stream})" for h in top
        )
        steps.append(f"let these acknowledge their events, or destroy unused groups: {named}")
    if not retention:
        steps.append("set [streams] max_len or max_age (no retention is configured)")
    steps.append("or raise Redis maxmemory")
    return f"{text} {'; '.join(steps)}"


# The id of the n-th oldest entry, found inside Redis: only the id crosses the network.
# KEYS: stream. ARGV: n.
_NTH_ID_LUA = """
local e = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', ARGV[1])
if #e == 0 then return false end
return e[#e][1]
"""

# How many entries lie in a range. KEYS: stream. ARGV: start, end (XRANGE syntax).
_COUNT_LUA = "return #redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[2])"

# Remove consumer names with nothing pending, idle for at least ARGV[2] ms; check and delete
# in one script, so that nothing is delivered to a name in between. KEYS: stream. ARGV: group.
_FORGET_IDLE_LUA = """
local removed = {}
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if tonumber(f['pending']) == 0 and tonumber(f['idle']) >= tonumber(ARGV[2]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    table.insert(removed, f['name'])
  end
end
return removed
"""

# At most this many entries go per stream and check: a first check on a long stream does not
# block Redis for long; the next checks carry on.
MAX_TRIM_PER_CHECK = 100_000


async def stream_state(r: RedisClient, stream: str, configured: list[str]) -> StreamState:
    """The stream's length and groups; configured groups it lacks are listed as missing."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        length, infos = await pipe.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    if isinstance(infos, Exception):
        if "no such key" not in str(infos).lower():
            raise infos
        infos = []
    states = []
    for info in infos:
        name = info["name"].decode() if isinstance(info["name"], bytes) else str(info["name"])
        pending = int(info["pending"])
        oldest = None
        if pending:
            summary = await r.xpending(stream, name)
            if summary and summary.get("min"):
                oldest = parse_id(summary["min"])
        lag = info.get("lag")
        states.append(
            GroupState(
                name=name,
                last_delivered=parse_id(info["last-delivered-id"]),
                pending=pending,
                oldest_pending=oldest,
                lag=None if lag is None else int(lag),
            )
        )
    names = {g.name for g in states}
    return StreamState(int(length), states, [g for g in configured if g not in names])


async def group_states(
    r: RedisClient, stream: str, groups: list[str]
) -> tuple[int, list[GroupState] | None]:
    """The stream's length and the named groups' states (None if one is missing)."""
    state = await stream_state(r, stream, groups)
    if state.missing:
        return state.length, None
    return state.length, [g for g in state.groups if g.name in groups]


@dataclass(frozen=True, slots=True)
class TrimResult:
    removed: int
    lost: dict[str, tuple[int, int]]  # unprotected group -> (unread, pending) events trimmed


async def trim(
    r: RedisClient,
    stream: str,
    state: StreamState,
    *,
    configured: list[str],
    protect_unlisted: bool = True,
    max_len: int,
    max_age: float,
    now: float | None = None,
) -> TrimResult:
    """Trim one stream by length/age within the protected groups' floor.

    Unprotected groups (`protect_unlisted = false`) that lose unacknowledged events are
    logged as a warning, with how many.
    """
    protected, unprotected = split_groups(state, configured, protect_unlisted)
    length_cut = None
    if max_len and state.length > max_len:
        excess = min(state.length - max_len, MAX_TRIM_PER_CHECK)
        if protected is not None:
            nth = r.register_script(_NTH_ID_LUA)
            oldest_kept = await nth(keys=[stream], args=[excess + 1])
            if oldest_kept:
                length_cut = parse_id(oldest_kept)
    age_cut = None
    if max_age:
        age_cut = (int(((now or time.time()) - max_age) * 1000), 0)
    point = trim_point(protected, length_cut=length_cut, age_cut=age_cut)
    if point is None:
        return TrimResult(0, {})
    lost: dict[str, tuple[int, int]] = {}
    count = r.register_script(_COUNT_LUA)
    for g in outrun(unprotected, point):
        start = "(" + format_id(g.last_delivered)
        unread = int(await count(keys=[stream], args=[start, "(" + format_id(point)]))
        pending = 0
        if g.pending:
            rows = await r.xpending_range(stream, g.name, "-", "(" + format_id(point), 100_000)
            pending = len(rows)
        lost[g.name] = (unread, pending)
    removed = int(await r.xtrim(stream, minid=format_id(point), approximate=False))
    for name, (unread, pending) in lost.items():
        log.warning(
            "retention_outran_group",
            stream=stream,
            group=name,
            unread_lost=unread,
            pending_lost=pending,
            hint="list the group in [streams] groups or set protect_unlisted = true to keep them",
        )
    return TrimResult(removed, lost)


def sweep_interval(consumer_idle: float) -> float:
    """Seconds between two sweeps of idle consumer names: often enough that a name outlives
    `consumer_idle` by a fraction of it, at most every 10 minutes (pure)."""
    return min(max(consumer_idle / 4, 1.0), 600.0)


async def forget_idle_consumers(
    r: RedisClient, stream: str, groups: list[str], idle_s: float
) -> list[tuple[str, str]]:
    """Remove consumer names with nothing pending, idle for `idle_s`; (group, name) removed."""
    forget = r.register_script(_FORGET_IDLE_LUA)
    removed = []
    for group in groups:
        names = await forget(keys=[stream], args=[group, int(idle_s * 1000)])
        for name in names or ():
            text = name.decode() if isinstance(name, bytes) else str(name)
            removed.append((group, text))
            log.info("consumer_name_removed", stream=stream, group=group, consumer=text)
    return removed


async def memory_pressure(r: RedisClient, ratio: float) -> tuple[bool, int, int]:
    """(over the limit?, used_memory, maxmemory) of the fullest server (every primary of a
    cluster). No maxmemory: never over."""
    if isinstance(r, RedisCluster):
        replies = await r.info("memory", target_nodes=RedisCluster.PRIMARIES)
        infos = list(replies.values()) if "used_memory" not in replies else [replies]
    else:
        infos = [await r.info("memory")]
    worst = (False, 0, 0)
    worst_share = -1.0
    for info in infos:
        used, limit = int(info.get("used_memory", 0)), int(info.get("maxmemory", 0))
        share = used / limit if limit else 0.0
        if share > worst_share:
            worst, worst_share = ((limit > 0 and used >= ratio * limit), used, limit), share
    return worst


__all__ = [
    "GroupState",
    "Holder",
    "StreamState",
    "TrimResult",
    "ensure_groups",
    "forget_idle_consumers",
    "group_states",
    "memory_advice",
    "memory_pressure",
    "outrun",
    "pause_reason",
    "split_groups",
    "stream_state",
    "sweep_interval",
    "trim",
    "trim_point",
]
