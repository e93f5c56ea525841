"""How a consumer settles the entries it was handed: acknowledged once handled, noted with the
handler's reason when failed (here and for the group, `syncd.consumer.reasons`), or copied to
the dead stream (`syncd.consumer.deadletter`) when malformed or delivered too often."""

from __future__ import annotations

from collections.abc import Mapping

from syncd.consumer import replay
from syncd.consumer.deadletter import DEAD_LETTER_LUA
from syncd.consumer.events import Event, StreamRef
from syncd.consumer.held import Held
from syncd.consumer.metrics import ConsumerMetrics
from syncd.consumer.reasons import Reasons
from syncd.redis.conn import RedisClient


class Settle:
    """One consumer's acknowledgements, refusals and burials (its `Held` kept in step)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        group: str,
        consumer: str,
        reading: Mapping[str, StreamRef],
        held: Held,
        metrics: ConsumerMetrics | None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.group = group
        self.consumer = consumer
        self.reading = reading
        self.held = held
        self.metrics = metrics
        self.reasons = Reasons(redis, prefix, group, reading)
        self._dead_letter = redis.register_script(DEAD_LETTER_LUA)
        self._ack_replayed = redis.register_script(replay.ACK_LUA)

    async def ack(self, events: tuple[Event, ...]) -> int:
        """Acknowledge `events`; how many were still pending."""
        ids, replayed = replay.pending_by_stream(events, self.prefix, self.group)
        noted = [
            (stream, entry_id)
            for where in (ids, replayed)
            for stream, entry_ids in where.items()
            for entry_id in self.held.drop_all(stream, entry_ids)
        ]
        acked = await replay.ack_events(self.redis, self._ack_replayed, self.group, ids, replayed)
        if noted:  # failed before, with a reason: kept in Redis too
            await self.reasons.forget(noted)
        return acked

    async def refused(self, why: Mapping[tuple[str, str], str]) -> None:
        """Note why the handler failed held entries, here and for the group."""
        self.held.refused(why)
        await self.reasons.keep(why)

    async def bury(
        self,
        stream: str,
        entry_id: str,
        fields: dict[str, bytes],
        reason: str,
        deliveries: int,
        detail: str = "",
    ) -> None:
        """Dead-letter a pending entry with `reason` and `detail` (else the reason noted)."""
        noted = self.held.drop(stream, entry_id)
        ref = self.reading[stream]
        buried = await replay.bury(
            self._dead_letter,
            stream,
            ref,
            entry_id,
            fields,
            group=self.group,
            consumer=self.consumer,
            reason=reason,
            deliveries=deliveries,
            detail=detail or noted,
        )
        if buried and self.metrics is not None:
            self.metrics.dead_lettered(self.group, ref.feed, reason)
        if buried and reason == "max_deliveries":  # a reason kept for it is of no more use
            where = [(stream, entry_id)]
            await self.reasons.forget(where)
