"""Stream upkeep: configured consumer groups, retention, backpressure.

- Groups named in `[streams] groups` are created (from the stream's start) before the daemon
  publishes anything to a stream, so none of their events can be trimmed unread.
- Retention trims a stream by length or age, but never below what every configured group has
  acknowledged: the floor is, per group, the smaller of (last-delivered id + 1) and the oldest
  pending id; the trim point is the smallest floor over the groups.
- Backpressure pauses a feed while a configured group lags more than `max_lag` entries behind
  it, and pauses all polling while Redis' used memory is above `max_memory` x maxmemory. The
  cursor stays where it is, so pausing loses nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog

from syncd.redisconn import RedisClient, RedisCluster

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


async def ensure_groups(r: RedisClient, streams: list[str], groups: list[str]) -> None:
    """Create each configured group on each stream (from its start), if missing."""
    if not groups or not streams:
        return
    async with r.pipeline(transaction=False) as pipe:
        for stream in streams:
            for group in groups:
                pipe.xgroup_create(stream, group, id="0", mkstream=True)
        results = await pipe.execute(raise_on_error=False)
    for res in results:
        if isinstance(res, Exception) and "BUSYGROUP" not in str(res):
            raise res


async def group_states(
    r: RedisClient, stream: str, groups: list[str]
) -> tuple[int, list[GroupState] | None]:
    """The stream's length and the configured groups' states (None if one is missing)."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.xlen(stream)
        pipe.xinfo_groups(stream)
        length, infos = await pipe.execute(raise_on_error=False)
    if isinstance(length, Exception):
        raise length
    if isinstance(infos, Exception):
        return int(length), None
    by_name = {}
    for info in infos:
        name = info["name"].decode() if isinstance(info["name"], bytes) else info["name"]
        by_name[name] = info
    states = []
    for g in groups:
        info = by_name.get(g)
        if info is None:
            return int(length), None
        pending = int(info["pending"])
        oldest = None
        if pending:
            summary = await r.xpending(stream, g)
            if summary and summary.get("min"):
                oldest = parse_id(summary["min"])
        lag = info.get("lag")
        states.append(
            GroupState(
                name=g,
                last_delivered=parse_id(info["last-delivered-id"]),
                pending=pending,
                oldest_pending=oldest,
                lag=None if lag is None else int(lag),
            )
        )
    return int(length), states


async def trim(
    r: RedisClient,
    stream: str,
    groups: list[GroupState] | None,
    *,
    length: int,
    max_len: int,
    max_age: float,
    now: float | None = None,
) -> int:
    """Trim one stream by length/age within the groups' floor; returns entries removed."""
    length_cut = None
    if max_len and length > max_len:
        oldest_kept = await r.xrevrange(stream, count=max_len)
        if oldest_kept:
            length_cut = parse_id(oldest_kept[-1][0])
    age_cut = None
    if max_age:
        age_cut = (int(((now or time.time()) - max_age) * 1000), 0)
    point = trim_point(groups, length_cut=length_cut, age_cut=age_cut)
    if point is None:
        return 0
    return int(await r.xtrim(stream, minid=format_id(point), approximate=False))


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
    "ensure_groups",
    "group_states",
    "memory_pressure",
    "trim",
    "trim_point",
]
