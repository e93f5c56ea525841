"""Replayed dead letters: events that `syncd dead replay` handed back to the consumer group
that failed them.

Redis cannot make an acknowledged entry pending again, and adding it to its event stream once
more would deliver it to every group of that stream. So each event stream has, per group, a
replay stream (`Keys.replay(feed, group)`, in the tenant's hash slot) that only that group
reads: a `Consumer` reads it with its group beside the event stream, from its beginning
whatever `start` says (everything in it is addressed to the group). An entry there is the dead
letter as it was buried: the event's fields, the burial's (`stream`, `entry_id`, `group`, ...)
and `replays`, how often it was handed back. The consumer turns it into the event it was, with
its own stream and entry id, so that `Event.version` places it among its key's versions as
before; only `Event.replay_id` tells it apart. Acknowledging it deletes it (one script), so a
replay stream holds only what the group has not handled yet; failing it `max_deliveries` times
dead-letters it again under its own names.

`MOVE_LUA` moves one entry from the dead stream to a replay stream, atomically and once.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import msgspec

from syncd.consumer import deadletter
from syncd.consumer.deadletter import BURIAL_FIELDS, Script
from syncd.consumer.events import Event, MalformedEvent, StreamRef, text
from syncd.keys import Keys
from syncd.redis.conn import RedisClient

ENTRY_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}")
"""A stream entry id, as XADD makes them."""

# Acknowledged entries are deleted: nothing else reads a replay stream, and what it holds is
# then exactly what the group has still to handle. KEYS: replay stream. ARGV: group, ids...
ACK_LUA = """
local acked = redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 2))
return acked
"""

# One dead letter to its group's replay stream, if it is still in the dead stream and is the
# dead letter of that event stream and group (an id names another entry once a deleted stream
# was written again). XADD comes first: a script is not rolled back, and an XADD that fails
# (out of memory, a wrong type) must leave the dead letter where it is. Atomic, so a replay
# repeated or racing another (or a purge) moves each entry once.
# KEYS: dead stream, replay stream. ARGV: dead entry id, event stream, group.
# Returns 1 (moved), 0 (not in the dead stream) or -1 (another stream's or group's).
MOVE_LUA = """
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return 0
end
local fields = found[1][2]
local stream, group, replays = nil, nil, nil
for i = 1, #fields, 2 do
  local name = fields[i]
  if name == 'stream' then
    stream = fields[i + 1]
  elseif name == 'group' then
    group = fields[i + 1]
  elseif name == 'replays' then
    replays = i + 1
  end
end
if stream ~= ARGV[2] or group ~= ARGV[3] then
  return -1
end
if replays then
  fields[replays] = tostring((tonumber(fields[replays]) or 0) + 1)
else
  fields[#fields + 1] = 'replays'
  fields[#fields + 1] = '1'
end
redis.call('XADD', KEYS[2], '*', unpack(fields))
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


def replay_streams(
    streams: Mapping[str, StreamRef], prefix: str, group: str
) -> dict[str, StreamRef]:
    """Per event stream of `streams`, its replay stream for `group`, with the event stream
    as the ref's `origin`."""
    return {
        Keys(prefix, ref.tenant).replay(ref.feed, group): ref._replace(origin=name)
        for name, ref in streams.items()
    }


def event_fields(fields: Mapping[str, bytes]) -> dict[str, bytes]:
    """A dead letter's fields without its burial's: the event's own."""
    return {name: value for name, value in fields.items() if name not in BURIAL_FIELDS}


def _origin_id(ref: StreamRef, fields: Mapping[str, bytes]) -> str | None:
    """The event's own entry id, when the entry names its replay stream's event stream."""
    entry_id = text(fields.get("entry_id", b""))
    if text(fields.get("stream", b"")) != ref.origin or not ENTRY_ID.fullmatch(entry_id):
        return None
    return entry_id


def event_of(
    stream: str, ref: StreamRef, entry_id: str, fields: Mapping[str, bytes], deliveries: int
) -> Event:
    """The event that entry `entry_id` of a stream a consumer reads (`ref` its parsed name)
    holds: the entry itself on an event stream, the event it hands back on a replay stream.

    Raises MalformedEvent when the entry lacks a field every event carries, or a replay entry
    does not name its event stream and entry id.
    """
    if not ref.origin:
        return Event.from_entry(
            stream, entry_id, fields, tenant=ref.tenant, feed=ref.feed, deliveries=deliveries
        )
    origin_id = _origin_id(ref, fields)
    if origin_id is None:
        raise MalformedEvent(stream, entry_id, ["stream", "entry_id"])
    event = Event.from_entry(
        ref.origin,
        origin_id,
        event_fields(fields),
        tenant=ref.tenant,
        feed=ref.feed,
        deliveries=deliveries,
    )
    return msgspec.structs.replace(event, replay_id=entry_id)


def dead_copy(
    stream: str, ref: StreamRef, entry_id: str, fields: Mapping[str, bytes]
) -> tuple[str, str, dict[str, bytes]]:
    """What a replay entry dead-lettered again names and copies: the event's own stream,
    entry id and fields, with `replays`; the replay entry itself when it does not name them."""
    origin_id = _origin_id(ref, fields)
    if origin_id is None:
        return stream, entry_id, dict(fields)
    copied = event_fields(fields)
    if "replays" in fields:
        copied["replays"] = fields["replays"]
    return ref.origin, origin_id, copied


def pending_entry(event: Event, prefix: str, group: str) -> tuple[str, str]:
    """The stream and entry id under which `event` is pending in `group`: its own, or its
    replay stream's when it was handed back (`Event.replay_id`)."""
    if event.replay_id is None:
        return event.stream, event.id
    return Keys(prefix, event.tenant).replay(event.feed, group), event.replay_id


async def ack(script: Script, stream: str, group: str, entry_ids: list[str]) -> int:
    """Acknowledge and delete entries of a replay stream; returns how many were pending."""
    return int(await script(keys=[stream], args=[group, *entry_ids]))


def pending_reasons(
    events: Iterable[Event], reasons: Mapping[tuple[str, str], str], prefix: str, group: str
) -> dict[tuple[str, str], str]:
    """`reasons` ((event stream, entry id) -> reason) keyed by where each of `events` is
    pending (`pending_entry`): a replayed event's replay stream and entry there."""
    return {
        pending_entry(event, prefix, group): reasons[event.stream, event.id]
        for event in events
        if (event.stream, event.id) in reasons
    }


def pending_by_stream(
    events: Iterable[Event], prefix: str, group: str
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Where `events` are pending (see `pending_entry`): entry ids per event stream, and per
    replay stream for those handed back."""
    ids: dict[str, list[str]] = {}
    replayed: dict[str, list[str]] = {}
    for event in events:
        if event.replay_id is None:
            ids.setdefault(event.stream, []).append(event.id)
        else:
            stream, entry_id = pending_entry(event, prefix, group)
            replayed.setdefault(stream, []).append(entry_id)
    return ids, replayed


async def ack_events(
    redis: RedisClient,
    script: Script,
    group: str,
    ids: dict[str, list[str]],
    replayed: dict[str, list[str]],
) -> int:
    """Acknowledge entries in `group`, as `pending_by_stream` gives them; returns how many
    were still pending."""
    acked = 0
    for stream, entry_ids in replayed.items():  # rare: one script per replay stream
        acked += await ack(script, stream, group, entry_ids)
    if not ids:
        return acked
    async with redis.pipeline(transaction=False) as pipe:
        for stream, entry_ids in ids.items():
            pipe.xack(stream, group, *entry_ids)
        return acked + sum(int(n) for n in await pipe.execute())


async def bury(
    script: Script,
    stream: str,
    ref: StreamRef,
    entry_id: str,
    fields: dict[str, bytes],
    *,
    group: str,
    consumer: str,
    reason: str,
    deliveries: int,
    detail: str = "",
) -> bool:
    """`deadletter.bury` for an entry of an event stream or of a replay stream: the copy of a
    replayed one names the event's own stream and entry id. Returns whether it was copied."""
    named, named_id, copied = stream, entry_id, fields
    if ref.origin:
        named, named_id, copied = dead_copy(stream, ref, entry_id, fields)
    return await deadletter.bury(
        script,
        named,
        ref,
        named_id,
        copied,
        group=group,
        consumer=consumer,
        reason=reason,
        deliveries=deliveries,
        detail=detail,
        replayed=(stream, entry_id) if ref.origin else None,
    )
