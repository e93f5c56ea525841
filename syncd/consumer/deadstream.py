"""A tenant's dead stream as the operator's tools (`syncd dead`) read it: what an entry is,
which entries a selection takes, which can be handed back to a group, and reading, handing
back and deleting them.

The stream holds two kinds of entries. The daemon writes a *record* it could not turn into an
event (no usable key, not a JSON object): `feed`, `reason`, `data`. A consumer group writes an
*event* it gave up on (`syncd.consumer.deadletter`): the event's fields and the burial's
(`stream`, `entry_id`, `group`, `consumer`, `deliveries`, maybe `detail`, and `replays` once it
was handed back). Only events can be handed back (`syncd.consumer.replay`): a record never was
one, and no group ever got it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from typing import Any, Literal

import msgspec

from syncd.consumer.deadletter import Script
from syncd.consumer.events import fields_of, parse_stream, text
from syncd.consumer.replay import ENTRY_ID
from syncd.keys import Keys
from syncd.redis.conn import RedisClient

__all__ = [
    "DeadLetter",
    "Selection",
    "delete",
    "hand_back",
    "read",
    "read_ids",
    "replay_stream",
    "unreplayable",
]

# Entries read per XRANGE while scanning the stream.
_PAGE = 500
# Entries deleted per XDEL.
_DELETE_CHUNK = 1000

Kind = Literal["record", "event"]


class DeadLetter(msgspec.Struct, frozen=True):
    """One entry of a dead stream: its id and every field as stored."""

    id: str
    fields: dict[str, bytes]

    def get(self, name: str) -> str | None:
        """A field as text (None: absent)."""
        value = self.fields.get(name)
        return None if value is None else text(value)

    @property
    def kind(self) -> Kind:
        """`event` when a consumer group buried it (it names its stream, entry id and group),
        `record` when the daemon did."""
        named = all(name in self.fields for name in ("stream", "entry_id", "group"))
        return "event" if named else "record"

    @property
    def feed(self) -> str:
        return self.get("feed") or ""

    @property
    def reason(self) -> str:
        return self.get("reason") or ""

    @property
    def group(self) -> str | None:
        """The group that gave up on it (None for a record)."""
        return self.get("group") if self.kind == "event" else None

    @property
    def time_ms(self) -> int:
        """When it was dead-lettered, in ms since the epoch (its entry id's first part)."""
        return int(self.id.partition("-")[0])

    def number(self, name: str) -> int | None:
        """A field holding a count (`deliveries`, `replays`) as an int, None when absent or
        not a number."""
        value = self.get(name)
        return int(value) if value is not None and value.isdigit() else None


class Selection(msgspec.Struct, frozen=True):
    """Which dead letters a command takes: all of these that are given must hold."""

    feed: str | None = None
    group: str | None = None  # events of that group only (records have none)
    reason: str | None = None  # the reason, or its first words ("record has no key")
    since_ms: int | None = None  # dead-lettered at or after this instant

    def matches(self, letter: DeadLetter) -> bool:
        """Whether `letter` is selected."""
        reason = letter.reason
        return (
            (self.feed is None or letter.feed == self.feed)
            and (self.group is None or letter.group == self.group)
            and (
                self.reason is None or reason == self.reason or reason.startswith(self.reason + " ")
            )
            and (self.since_ms is None or letter.time_ms >= self.since_ms)
        )


def unreplayable(letter: DeadLetter, prefix: str, tenant: int) -> str | None:
    """Why `letter` cannot be handed back to a group, or None when it can."""
    if letter.kind == "record":
        return (
            f"{letter.id} is a record the daemon could not turn into an event "
            f"({letter.feed}: {letter.reason}): no group ever got it, so there is none to hand "
            "it back to. It is published once ServiceTitan sends it in a usable form; "
            f"`syncd dead purge --id {letter.id}` removes it"
        )
    stream = letter.get("stream") or ""
    try:
        ref = parse_stream(stream, prefix)
    except ValueError:
        ref = None
    if ref is None or ref.tenant != tenant:
        return f"{letter.id} names {stream!r}, which is not an event stream of tenant {tenant}"
    if not ENTRY_ID.fullmatch(letter.get("entry_id") or ""):
        return f"{letter.id} names no valid entry id of {stream}"
    missing = [name for name in ("op", "key", "data") if name not in letter.fields]
    if missing:
        return (
            f"{letter.id} lacks {', '.join(missing)}: handed back, it would only be "
            "dead-lettered again as malformed"
        )
    return None


def replay_stream(letter: DeadLetter, prefix: str) -> str:
    """The replay stream a replayable `letter` goes to: its event stream's, for its group."""
    ref = parse_stream(letter.get("stream") or "", prefix)
    return Keys(prefix, ref.tenant).replay(ref.feed, letter.group or "")


async def read(
    redis: RedisClient, dead: str, selection: Selection, limit: int | None = None
) -> AsyncIterator[DeadLetter]:
    """The selected entries of dead stream `dead`, oldest first, at most `limit`."""
    start = f"{selection.since_ms}-0" if selection.since_ms is not None else "-"
    found = 0
    while limit is None or found < limit:
        entries: list[Any] = list(await redis.xrange(dead, min=start, max="+", count=_PAGE) or [])
        for entry_id, fields in entries:
            letter = DeadLetter(text(entry_id), fields_of(fields))
            if selection.matches(letter):
                yield letter
                found += 1
                if limit is not None and found >= limit:
                    return
        if len(entries) < _PAGE:
            return
        start = "(" + text(entries[-1][0])


async def read_ids(redis: RedisClient, dead: str, ids: Iterable[str]) -> dict[str, DeadLetter]:
    """The entries of dead stream `dead` with these ids; those it does not hold left out."""
    wanted = list(dict.fromkeys(ids))
    async with redis.pipeline(transaction=False) as pipe:
        for entry_id in wanted:
            pipe.xrange(dead, min=entry_id, max=entry_id, count=1)
        replies = await pipe.execute()
    return {
        entry_id: DeadLetter(entry_id, fields_of(entries[0][1]))
        for entry_id, entries in zip(wanted, replies, strict=True)
        if entries
    }


async def hand_back(script: Script, dead: str, letter: DeadLetter, prefix: str) -> int:
    """Move a replayable `letter` to its group's replay stream (`replay.MOVE_LUA`
    registered as `script`): 1 when moved, 0 when the dead stream no longer holds it
    (replayed or purged meanwhile), -1 when its id now names another entry."""
    stream, group = letter.get("stream") or "", letter.group or ""
    replay = replay_stream(letter, prefix)
    return int(await script(keys=[dead, replay], args=[letter.id, stream, group]))


async def delete_each(redis: RedisClient, dead: str, ids: Iterable[str]) -> list[str]:
    """Delete entries of dead stream `dead`; returns those it held (one XDEL each, pipelined)."""
    wanted = list(dict.fromkeys(ids))
    held: list[str] = []
    for at in range(0, len(wanted), _DELETE_CHUNK):
        chunk = wanted[at : at + _DELETE_CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for entry_id in chunk:
                pipe.xdel(dead, entry_id)
            replies = await pipe.execute()
        held.extend(i for i, n in zip(chunk, replies, strict=True) if int(n))
    return held


async def delete(redis: RedisClient, dead: str, ids: Iterable[str]) -> int:
    """Delete entries of dead stream `dead`; returns how many it held."""
    wanted = list(dict.fromkeys(ids))
    deleted = 0
    for at in range(0, len(wanted), _DELETE_CHUNK):
        deleted += int(await redis.xdel(dead, *wanted[at : at + _DELETE_CHUNK]))
    return deleted
