"""A consumer group that vanished (destroyed, its stream deleted, a Redis restarted without
persistence), created again on each stream a consumer reads: where it starts
(`delivery.regroup_at` decides), what that replays or skips, and what it took with it.

Its pending list goes with the group: the entries this consumer held (failed, or not yet
acknowledged) on an event stream are not delivered again and are reported
(`consumer_pending_lost`). A replay stream loses nothing: acknowledging deletes its entries,
so what it holds is what the group has still to handle, and the group created again at its
beginning delivers all of it.

Also here: the script that removes a consumer's name from a group when it holds nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import structlog
from redis.exceptions import ResponseError

from syncd.consumer import trimmed
from syncd.consumer.delivery import regroup_at
from syncd.consumer.events import StreamRef
from syncd.consumer.events import fields_of as _fields
from syncd.consumer.held import Held
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.consumer")

# Deleting a consumer destroys its pending entries, so only an idle name is removed; the check
# and the delete are one script so that nothing is delivered to the name in between.
# KEYS: stream. ARGV: group, consumer.
FORGET_CONSUMER_LUA = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""


async def create(
    redis: RedisClient, group: str, streams: Mapping[str, StreamRef], start: str, prefix: str
) -> None:
    """Create `group` on each of `streams` where it is missing (the stream too): at `start`
    ("0" or "$"), a replay stream at its start (all it holds is addressed to the group)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream, ref in streams.items():
            pipe.xgroup_create(stream, group, id="0" if ref.origin else start, mkstream=True)
        replies = await pipe.execute(raise_on_error=False)
    created: list[StreamRef] = []
    for (stream, ref), reply in zip(streams.items(), replies, strict=True):
        if isinstance(reply, ResponseError) and str(reply).startswith("BUSYGROUP"):
            continue
        if isinstance(reply, Exception):
            raise reply
        if not ref.origin:
            log.info("consumer_group_created", stream=stream, group=group, start=start)
            created.append(ref)
    await trimmed.forget(redis, prefix, created, group)


async def recreate(
    redis: RedisClient,
    group: str,
    consumer: str,
    start: str,
    streams: Mapping[str, StreamRef],
    seen: Mapping[str, tuple[str, dict[str, bytes]]],
    held: Held,
    prefix: str,
) -> None:
    """Create `group` again on each of `streams` where it is missing, given the newest entry
    `consumer` was handed on each (`seen`, with its fields) and what it holds (`held`);
    `start` is the consumer's (`Consumer.recover_groups` says what each case does)."""
    async with redis.pipeline(transaction=False) as pipe:
        for stream in streams:
            pipe.xlen(stream)
            entry_id = seen[stream][0] if stream in seen else "-"
            pipe.xrange(stream, entry_id, entry_id, count=1)
        replies = await pipe.execute()
    for i, (stream, ref) in enumerate(streams.items()):
        length, entries = int(replies[2 * i]), replies[2 * i + 1]
        newest, newest_fields = seen.get(stream, (None, {}))
        still_there = bool(entries) and _fields(entries[0][1]) == newest_fields
        if ref.origin:  # a replay stream: all it holds comes again, nothing is lost
            newest, still_there, start_here = None, False, "beginning"
            held.keep_only(stream, set())
        else:
            start_here = start
        position, effect = regroup_at(newest, still_there, length, start_here)
        try:
            await redis.xgroup_create(stream, group, id=position, mkstream=True)
        except ResponseError as err:
            if not str(err).startswith("BUSYGROUP"):
                raise
            if ref.origin:
                continue
            # There all along, or created again by another consumer: what this one held
            # and the group no longer holds pending is lost.
            pending = await held.pending(redis, group, only=stream)
            if stream in pending:
                how = "created again by another consumer"
                held.report_lost(stream, group, consumer, how, pending[stream])
            continue
        if ref.origin and not length:
            continue  # an empty replay stream: nothing to say
        log.warning(
            "consumer_group_recreated",
            stream=stream,
            group=group,
            start=start_here,
            position=position,
            effect=effect,
        )
        if not ref.origin:
            held.report_lost(stream, group, consumer, f"created again at {position}")
            await trimmed.forget(redis, prefix, [ref], group)
