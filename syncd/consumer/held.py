"""What one consumer holds: the entries it was handed and has not acknowledged (nor
dead-lettered) yet, per stream, which are the events its handler failed once `run` has
acknowledged the others, with the reason the handler gave for each (`Failed`), which the dead
stream gets should the entry end there.

Redis keeps them in the group's pending list, and a group that vanishes (destroyed, its stream
deleted, a Redis restarted without persistence) takes them with it: the group created again
never delivers them. Only the consumer still knows them, so it says which they were
(`consumer_pending_lost`). Entries another consumer took over are forgotten along the way.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog

from syncd.consumer.delivery import entry_order
from syncd.consumer.events import text
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.consumer")

# Entry ids a `consumer_pending_lost` line names (it gives the count of all).
LOST_IDS_SHOWN = 20
# Looking up which held entries are still pending: rows asked beyond their number, for the
# other entries pending in the same range.
_SLACK = 100


class Held:
    """Per stream, the ids of the entries handed out and not yet acknowledged, oldest first,
    each with the reason its handler last failed it for ("" for none given)."""

    def __init__(self, streams: Iterable[str]) -> None:
        self._ids: dict[str, dict[str, str]] = {stream: {} for stream in streams}

    def add(self, stream: str, entry_id: str) -> None:
        self._ids[stream].setdefault(entry_id, "")

    def of(self, stream: str) -> dict[str, str]:
        """The entries held on `stream` (entry id -> reason), to add to in place."""
        return self._ids[stream]

    def refused(self, reasons: Mapping[tuple[str, str], str]) -> None:
        """Note why the handler failed these held entries ((stream, entry id) -> reason)."""
        for (stream, entry_id), reason in reasons.items():
            held = self._ids.get(stream)
            if held is not None and entry_id in held:
                held[entry_id] = reason

    def drop(self, stream: str, entry_id: str) -> str:
        """Forget an entry; returns the reason noted for it ("" for none)."""
        return self._ids[stream].pop(entry_id, "") if stream in self._ids else ""

    def drop_all(self, stream: str, entry_ids: Iterable[str]) -> list[str]:
        """Forget entries of `stream`; returns those a reason was noted for."""
        held = self._ids.get(stream)
        if held is None:
            return []
        return [entry_id for entry_id in entry_ids if held.pop(entry_id, "")]

    def ids(self, stream: str) -> list[str]:
        return list(self._ids[stream])

    def keep_only(self, stream: str, pending: set[str]) -> list[str]:
        """Keep those of `stream` that are in `pending`; returns the others."""
        held = self._ids[stream]
        gone = [entry_id for entry_id in held if entry_id not in pending]
        self._ids[stream] = {i: reason for i, reason in held.items() if i in pending}
        return gone

    async def pending(
        self, redis: RedisClient, group: str, consumer: str | None = None, *, only: str = ""
    ) -> dict[str, set[str]]:
        """Per stream (`only` that one, when given), which held ids are pending in `group`
        (for `consumer`, when given). A stream is left out when the answer did not fit in one
        reply, or when nothing is held there."""
        asked = {
            stream: sorted(ids, key=entry_order)
            for stream, ids in self._ids.items()
            if ids and only in ("", stream)
        }
        if not asked:
            return {}
        async with redis.pipeline(transaction=False) as pipe:
            for stream, ids in asked.items():
                pipe.xpending_range(stream, group, ids[0], ids[-1], len(ids) + _SLACK, consumer)
            replies = await pipe.execute()
        found: dict[str, set[str]] = {}
        for (stream, ids), rows in zip(asked.items(), replies, strict=True):
            if len(rows) < len(ids) + _SLACK:
                found[stream] = {text(row["message_id"]) for row in rows}
        return found

    async def forget_taken_over(self, redis: RedisClient, group: str, consumer: str) -> None:
        """Forget what is no longer pending for `consumer`: taken over by another consumer of
        the group (or acknowledged by it)."""
        for stream, pending in (await self.pending(redis, group, consumer)).items():
            self.keep_only(stream, pending)

    def report_lost(
        self, stream: str, group: str, consumer: str, how: str, pending: set[str] | None = None
    ) -> list[str]:
        """Log (at error) which held entries of `stream` vanished with the group's pending
        list: all of them, or those not in `pending`. Returns their ids; they are forgotten."""
        lost = self.keep_only(stream, pending or set())
        if lost:
            log.error(
                "consumer_pending_lost",
                stream=stream,
                group=group,
                consumer=consumer,
                group_was=how,
                events=len(lost),
                ids=lost[:LOST_IDS_SHOWN],
                effect="the group will not deliver them again; handle them by id from the "
                "stream if it still holds them",
            )
        return lost
