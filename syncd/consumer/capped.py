"""Taking entries from several streams of one consumer group, at most N in all: stale ones
(XAUTOCLAIM, one stream after the other) and new ones (the oldest first).

For new ones XREADGROUP cannot do that alone: its COUNT applies to each stream, so one call
over k streams may hand out up to k times N entries, and those beyond N would stay pending
under the name of a consumer that never meant to take them (`syncd tail --count N`). So look
first, without taking anything, at what follows each stream's group position, share N out
among the streams by entry id, then read from each stream its share. When nothing follows,
wait with XREAD, which takes nothing either."""

from __future__ import annotations

from typing import Any, NamedTuple

import structlog
from redis.exceptions import ResponseError

from syncd.consumer.delivery import shares_of
from syncd.consumer.events import RawEntry, fields_of, raw_stream_reply, text
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.consumer")

Entries = list[tuple[str, list[RawEntry]]]


class Claimed(NamedTuple):
    """What one XAUTOCLAIM pass took over: entries as (stream, entry id, fields), entries
    trimmed while pending as (stream, entry id), and whether the scan reached every stream's
    end."""

    entries: list[tuple[str, str, dict[str, bytes]]]
    trimmed: list[tuple[str, str]]
    complete: bool


async def autoclaim(
    redis: RedisClient,
    cursors: dict[str, str],
    group: str,
    consumer: str,
    min_idle_ms: int,
    batch: int,
    limit: int | None,
) -> Claimed:
    """Take over entries idle for `min_idle_ms` in the streams of `cursors` (stream -> where
    its last scan stopped, moved on here): up to `batch` entries of each stream, in one round
    trip; with `limit`, no more than that in all, one stream after the other (streams after
    the limit is reached left out, and the scan then incomplete)."""
    replies = await _autoclaim(redis, cursors, group, consumer, min_idle_ms, batch, limit)
    complete = len(replies) == len(cursors)
    entries: list[tuple[str, str, dict[str, bytes]]] = []
    trimmed: list[tuple[str, str]] = []
    for stream, reply in replies:
        cursor, taken, deleted = text(reply[0]), reply[1], reply[2] if len(reply) > 2 else []
        cursors[stream] = cursor
        complete = complete and cursor == "0-0"
        if deleted:
            # Trimmed before anyone acknowledged them: Redis already dropped them from the
            # pending list, and there is no payload left to deliver or dead-letter.
            log.warning(
                "consumer_pending_trimmed", stream=stream, group=group, entries=len(deleted)
            )
            trimmed.extend((stream, text(entry_id)) for entry_id in deleted)
        entries.extend((stream, text(eid), fields_of(f)) for eid, f in taken if f is not None)
    return Claimed(entries, trimmed, complete)


async def deliveries(
    redis: RedisClient, group: str, consumer: str, entries: list[tuple[str, str, Any]]
) -> list[int | None]:
    """How often each of `entries` (stream, entry id, ...) was delivered, None for one no
    longer pending for `consumer`. XAUTOCLAIM does not say; XPENDING does, and the count cannot
    move until the entries `consumer` now owns go idle again."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream, entry_id, _ in entries:
            pipe.xpending_range(stream, group, entry_id, entry_id, 1, consumer)
        pending = await pipe.execute()
    return [int(info[0]["times_delivered"]) if info else None for info in pending]


async def _autoclaim(
    redis: RedisClient,
    cursors: dict[str, str],
    group: str,
    consumer: str,
    min_idle_ms: int,
    batch: int,
    limit: int | None,
) -> list[tuple[str, Any]]:
    if limit is None:
        async with redis.pipeline(transaction=False) as pipe:
            for stream, cursor in cursors.items():
                pipe.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=batch)
            return list(zip(cursors, await pipe.execute(), strict=True))
    replies: list[tuple[str, Any]] = []
    for stream, cursor in cursors.items():
        if limit < 1:
            break
        count = min(batch, limit)
        reply = await redis.xautoclaim(stream, group, consumer, min_idle_ms, cursor, count=count)
        replies.append((stream, reply))
        limit -= sum(1 for _, fields in reply[1] if fields is not None)
    return replies


async def read_new(
    redis: RedisClient,
    streams: list[str],
    group: str,
    consumer: str,
    limit: int,
    *,
    block_ms: int | None,
) -> Entries:
    """Up to `limit` entries never delivered to `group`, from all `streams` together: handed
    to `consumer` (XREADGROUP), as (stream, [(entry id, fields)]) pairs. With `block_ms`,
    waits that long for one when none is there."""
    positions, shares = await _shares(redis, streams, group, limit)
    if not shares and block_ms is not None:
        # Typed loosely: redis-py's stubs for XREAD's streams differ between its versions.
        where: dict[Any, Any] = dict(positions)
        await redis.xread(where, count=1, block=block_ms)
        positions, shares = await _shares(redis, streams, group, limit)
    if not shares:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for stream, count in shares.items():
            pipe.xreadgroup(group, consumer, {stream: ">"}, count=count)
        replies = await pipe.execute()
    return [pair for reply in replies for pair in raw_stream_reply(reply)]


async def _shares(
    redis: RedisClient, streams: list[str], group: str, limit: int
) -> tuple[dict[str, str], dict[str, int]]:
    """Each stream's group position, and how many of the `limit` oldest entries past the
    positions fall to each stream (streams with none left out)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xinfo_groups(stream)
        infos = await pipe.execute(raise_on_error=False)
    positions: dict[str, str] = {}
    for stream, groups in zip(streams, infos, strict=True):
        for info in groups if isinstance(groups, list) else []:
            if _name(info) == group:
                positions[stream] = text(info["last-delivered-id"])
        if stream not in positions:
            # What XREADGROUP would say: the group (or its stream) is gone.
            raise ResponseError(f"NOGROUP No such key '{stream}' or consumer group '{group}'")
    async with redis.pipeline(transaction=False) as pipe:
        for stream, position in positions.items():
            pipe.xrange(stream, "(" + position, "+", count=limit)
        heads = await pipe.execute()
    ids = {
        stream: [text(entry_id) for entry_id, _ in entries]
        for stream, entries in zip(positions, heads, strict=True)
    }
    return positions, shares_of(ids, limit)


def _name(info: Any) -> str:
    value = info.get("name", b"") if isinstance(info, dict) else b""
    return text(value) if isinstance(value, bytes | str) else ""
