"""Events a group can never read: trimmed from its stream before the group was handed them.

Retention never trims past a group syncd knows of, but an unlisted group under `protect_unlisted
= false`, an `XTRIM` by hand or a Redis restored from an older backup leaves a gap between
entries the group was handed. Redis counts what a group read (`entries-read`; a trimmed entry it
jumped over is not counted) and what a stream was ever given (`entries-added`): what the group
neither read nor can still read was trimmed unread. That is known exactly where the group's
position is before the first entry the stream holds (all it holds is still to read) or at its
last (nothing is), and only where Redis can tell what the group read (not after a group was set
to an arbitrary id). Only trims are seen: syncd deletes no single entry from an event stream.
Not seen either: what was trimmed before the group was created (Redis counts such a group as
having read from the first entry ever added; telling it the group read nothing, ENTRIESREAD 0,
is not kept through AOF or replication, which would then report a gap that is not there).

Each gap is said once, consumers of a group sharing what was said in the tenant's `missed`
hash (`Keys.missed`): `consumer_events_missed` (a warning naming the group, tenant, feed, how
many events and where) and, with metrics, `syncd_consumer_events_missed_total`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import RedisError

from syncd.consumer.delivery import entry_order
from syncd.consumer.events import StreamRef, text
from syncd.consumer.metrics import ConsumerMetrics
from syncd.keys import Keys
from syncd.redis.conn import RedisClient

__all__ = ["Missed", "TrimWatch", "gap", "missed"]

log = structlog.get_logger("syncd.consumer")


@dataclass(frozen=True, slots=True)
class Missed:
    """`count` events of `stream` that a group was never handed, newly found (`total`: all
    the group ever missed there); its position `after` and the first entry the stream holds
    (`first`, "" when it holds none) when they were found."""

    stream: str
    ref: StreamRef
    field: str
    count: int
    total: int
    after: str
    first: str


def gap(stream_info: Any, group_info: Any) -> tuple[int, str, str] | None:
    """(how many, the group's position, the stream's first entry) of the events a group's
    `XINFO GROUPS` entry and its stream's `XINFO STREAM` say the group will never read, or None
    when none or Redis cannot tell now."""
    read = _get(group_info, "entries-read")
    added = _get(stream_info, "entries-added")
    length = _get(stream_info, "length")
    if not all(type(v) is int for v in (read, added, length)):
        return None
    after = text(_get(group_info, "last-delivered-id") or b"0-0")
    last = text(_get(stream_info, "last-generated-id") or b"0-0")
    first_entry = _get(stream_info, "first-entry")
    first = text(first_entry[0]) if first_entry else ""
    if not first or entry_order(after) < entry_order(first):
        still = length  # everything the stream holds (if anything) is still to read
    elif entry_order(after) >= entry_order(last):
        still = 0  # caught up
    else:
        return None  # somewhere in between: how many it still holds ahead is not known here
    gone = added - read - still
    return (gone, after, first) if gone > 0 else None


def _get(info: Any, name: str) -> Any:
    """A field of an XINFO reply, its name as text or bytes (RESP2 or RESP3 replies)."""
    if not isinstance(info, dict):
        return None
    return info[name] if name in info else info.get(name.encode())


async def missed(
    redis: RedisClient, prefix: str, group: str, streams: Mapping[str, StreamRef]
) -> list[Missed]:
    """What `group` missed on `streams` that was not said before. A stream or group that is
    not there, an ACL refusing a command or a Redis that cannot answer now: nothing found."""
    fields = {s: Keys.missed_field(ref.feed, group) for s, ref in streams.items()}
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for stream, ref in streams.items():
                pipe.xinfo_stream(stream)
                pipe.xinfo_groups(stream)
                pipe.hget(Keys(prefix, ref.tenant).missed, fields[stream])
            replies = await pipe.execute(raise_on_error=False)
    except RedisError:
        return []
    found = []
    for i, (stream, ref) in enumerate(streams.items()):
        info, groups, said = replies[3 * i : 3 * i + 3]
        if not isinstance(info, dict) or not isinstance(groups, list):
            continue
        said_text = text(said) if isinstance(said, bytes | str) else ""
        before = int(said_text) if said_text.isdigit() else 0
        for g in groups:
            if text(_get(g, "name") or b"") != group or (hole := gap(info, g)) is None:
                continue
            total, after, first = hole
            if total > before:
                found.append(
                    Missed(stream, ref, fields[stream], total - before, total, after, first)
                )
    return found


async def forget(redis: RedisClient, prefix: str, refs: list[StreamRef], group: str) -> None:
    """A group created anew on these streams has missed nothing yet: what was said of an
    earlier one there goes (best effort: a field left over only hides gaps as large as it)."""
    if not refs:
        return
    with contextlib.suppress(RedisError):
        async with redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.hdel(Keys(prefix, ref.tenant).missed, Keys.missed_field(ref.feed, group))
            await pipe.execute()


class TrimWatch:
    """Looks for what one group missed now and then; says and counts what is new."""

    def __init__(self, prefix: str, group: str, metrics: ConsumerMetrics | None) -> None:
        self.prefix = prefix
        self.group = group
        self.metrics = metrics
        # What this process said, per field: where Redis could not note it (out of memory, an
        # ACL without HSET), a gap is still said once here.
        self._said: dict[tuple[int, str], int] = {}

    async def check(self, redis: RedisClient, streams: Mapping[str, StreamRef]) -> list[Missed]:
        """Look on `streams`; what is new is logged, counted, noted in Redis and returned."""
        found = []
        for m in await missed(redis, self.prefix, self.group, streams):
            said = self._said.get((m.ref.tenant, m.field), 0)
            if m.total <= said:
                continue
            if said > m.total - m.count:  # said here, not noted in Redis: only the rest is new
                m = dataclasses.replace(m, count=m.total - said)
            self._said[(m.ref.tenant, m.field)] = m.total
            found.append(m)
        for m in found:
            log.warning(
                "consumer_events_missed",
                group=self.group,
                tenant=m.ref.tenant,
                feed=m.ref.feed,
                missed=m.count,
                missed_in_all=m.total,
                after_id=m.after,
                first_held_id=m.first or None,
                action=(
                    "these events were trimmed before the group read them: their records "
                    "reach it only when published again (docs/consumers.md, Events missed)"
                ),
            )
            if self.metrics is not None:
                self.metrics.missed(self.group, m.ref.feed, m.count)
            with contextlib.suppress(RedisError):  # else said again next time
                await redis.hset(Keys(self.prefix, m.ref.tenant).missed, m.field, m.total)
        return found
