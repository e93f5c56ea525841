"""Why a handler failed an event (`Failed(event, reason)`), kept in Redis beside the group's
pending entries: the event comes back after `claim_idle_ms` to whichever consumer of the group
takes it over (another process, another worker of the mirror), and the one that finally
dead-letters it gives the reason as the dead letter's `detail`.

A reason is kept per group and pending entry (`Keys.reasons`, `Keys.reason_field`), written
when the handler fails the event, read when a consumer takes over entries delivered before,
and deleted when the entry is acknowledged or dead-lettered; a group's hash expires a week
after its last write, which takes the reasons of entries nobody finished along with it.
Keeping one is best effort: a Redis that refuses the write (out of memory, an ACL) leaves the
reason with the consumer that noted it, as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import structlog
from redis.exceptions import RedisError, ResponseError

from syncd.consumer.events import StreamRef, text
from syncd.keys import Keys
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.consumer")

KEEP_MS = 7 * 86_400 * 1000
# A reason longer than this is cut (a handler's exception text, say).
MAX_CHARS = 2000

Where = tuple[str, str]
"""A pending entry: the stream it is pending in, its entry id."""


class Reasons:
    """The reasons kept for one group's pending entries of the streams in `refs`."""

    def __init__(
        self, redis: RedisClient, prefix: str, group: str, refs: Mapping[str, StreamRef]
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.group = group
        self.refs = refs

    def _by_key(self, entries: Iterable[Where]) -> dict[str, list[tuple[Where, str]]]:
        """Entries grouped by the hash their reasons are in: key -> [(entry, field)]."""
        out: dict[str, list[tuple[Where, str]]] = {}
        for stream, entry_id in entries:
            keys = Keys(self.prefix, self.refs[stream].tenant)
            field = keys.reason_field(stream, entry_id)
            out.setdefault(keys.reasons(self.group), []).append(((stream, entry_id), field))
        return out

    async def keep(self, reasons: Mapping[Where, str]) -> None:
        """Keep the reasons given for failed entries (empty ones are not kept)."""
        given = {where: reason[:MAX_CHARS] for where, reason in reasons.items() if reason}
        if not given:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, fields in self._by_key(given).items():
                    pipe.hset(key, mapping={field: given[where] for where, field in fields})
                    pipe.pexpire(key, KEEP_MS)
                await pipe.execute()
        except RedisError as exc:
            self._failed("keeping", len(given), exc)

    async def lookup(self, entries: Iterable[Where]) -> dict[Where, str]:
        """The reasons kept for `entries` (those with none left out)."""
        by_key = self._by_key(entries)
        if not by_key:
            return {}
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, fields in by_key.items():
                    pipe.hmget(key, [field for _, field in fields])
                replies = await pipe.execute()
        except ResponseError as exc:  # the key of another type, an ACL: read on without them
            self._failed("reading", sum(len(f) for f in by_key.values()), exc)
            return {}
        found: dict[Where, str] = {}
        for fields, values in zip(by_key.values(), replies, strict=True):
            for (where, _), value in zip(fields, values, strict=True):
                if value:
                    found[where] = text(value)
        return found

    async def forget(self, entries: Iterable[Where]) -> None:
        """Delete the reasons kept for `entries` (acknowledged, dead-lettered, trimmed); a
        Redis error leaves them to expire with their hash."""
        by_key = self._by_key(entries)
        if not by_key:
            return
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key, fields in by_key.items():
                    pipe.hdel(key, *[field for _, field in fields])
                await pipe.execute()
        except RedisError:
            pass

    def _failed(self, doing: str, events: int, exc: RedisError) -> None:
        log.warning(
            "consumer_reasons_failed",
            doing=doing,
            group=self.group,
            events=events,
            error=f"{type(exc).__name__}: {exc}",
            effect="events dead-lettered by another consumer of the group than the one that "
            "failed them lack the reason",
        )
