"""Read syncd's change events from Redis streams through consumer groups.

Delivery is **at least once**. An entry stays in the group's pending list until it is
acknowledged; if its consumer dies (or its handler fails) before acknowledging, another consumer
of the group (or the same one) takes it over with XAUTOCLAIM once it has been idle for
`claim_idle_ms`, and it is delivered again with a higher `Event.deliveries`. So a handler may see
an event more than once and must be idempotent: apply records by `key`, and compare
versions rather than counting events: apply an event only when its `Event.version`
(`modified_at`, then the entry id) is newer than or equal to the stored one.
Acknowledge only after the effect is durable; `Consumer.run` does exactly that, per event.

An entry delivered more than `max_deliveries` times is treated as poison: it is copied to the
tenant's dead stream (`reason=max_deliveries`, with the original fields) and only then
acknowledged, both in one server-side script, so it is never dropped without its copy (and a
retried script copies nothing twice). Entries that lack the fields every event carries go the
same way with `reason=malformed`.

Redis 7.0 or later is required (XAUTOCLAIM reporting entries deleted by trimming). One consumer
reads all its streams with a single XREADGROUP, so streams of several tenants in one consumer
need a single Redis server; on a Redis Cluster, run one consumer per tenant.

This module holds `Consumer`: its settings, group setup and recovery, reading (taking stale
entries over, reading new ones) and acknowledging. The loop behind `Consumer.run` is in
`syncd.consumer.loop`, the one behind `run_each` in `syncd.consumer.each`, a graceful stop in
`syncd.consumer.stopping`, the dead-letter script in `syncd.consumer.deadletter`, and the replay
streams (dead letters `syncd dead replay` hands back) in `syncd.consumer.replay`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from typing import Literal

import structlog
from redis.exceptions import AuthenticationError, RedisError

from syncd.consumer import capped, each, loop, regroup, replay, trimmed
from syncd.consumer.delivery import classify, entry_order
from syncd.consumer.each import EventHandler
from syncd.consumer.events import (
    Event,
    MalformedEvent,
    RawEntry,
    Subscription,
    event_of_raw,
    fields_of,
    parse_stream,
    raw_stream_reply,
    text,
)
from syncd.consumer.held import Held
from syncd.consumer.loop import Handler
from syncd.consumer.metrics import ConsumerMetrics, sample_lag
from syncd.consumer.settle import Settle
from syncd.consumer.stopping import Stopping
from syncd.keys import DEFAULT_PREFIX
from syncd.redis.conn import RedisClient, socket_timeout_s

Start = Literal["beginning", "new"]

log = structlog.get_logger("syncd.consumer")

_GROUP_START: dict[str, str] = {"beginning": "0", "new": "$"}
# How often a consumer looks for events trimmed before its group read them (three commands a
# stream it reads, pipelined), the first time before its first read.
TRIM_CHECK_S = 60.0


class Consumer:
    """One named member of a consumer group reading syncd event streams.

    `streams` takes stream names (`st:{123}:crm.customers`), `Subscription`s, or a mix. The group
    is created on each stream when missing, positioned at the stream's beginning or, with
    `start="new"`, at its end; an existing group keeps its position. `batch` caps the entries
    read per stream per call. After `claim_idle_ms` other consumers take over the events of a
    consumer that stopped working on them (`run` and `run_each` keep the events their handler
    works on, or that wait for a call, however long it takes); `handler_timeout`
    (seconds) bounds each handler call in `run`, a call that takes longer fails its events.
    `block_ms` (at least 1) is capped at 80% of the client's socket timeout, so that waiting
    for events never trips it. After `outage_after` rounds in a row in which the handler
    failed every event, `run` takes the handler's dependencies for down (see `run`). With
    `read_ahead`, `run` reads the next batch while the handler works on one. `concurrency` is
    how many one-event handler calls `run_each` makes at once. With `metrics`, the consumer
    counts what it does there (see `ConsumerMetrics`). Beside each stream it reads the group's
    replay stream, from its beginning: the dead letters `syncd dead replay` handed back to the
    group (`Event.replay_id` set).
    """

    def __init__(
        self,
        redis: RedisClient,
        group: str,
        consumer: str,
        *,
        streams: Iterable[str | Subscription] | str | Subscription,
        prefix: str = DEFAULT_PREFIX,
        start: Start = "beginning",
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        batch: int = 100,
        block_ms: int = 5_000,
        handler_timeout: float | None = None,
        outage_after: int = 3,
        read_ahead: bool = False,
        concurrency: int = 1,
        metrics: ConsumerMetrics | None = None,
    ) -> None:
        if not group or not consumer:
            raise ValueError("group and consumer names must not be empty")
        if start not in _GROUP_START:
            raise ValueError(f"start must be 'beginning' or 'new', not {start!r}")
        if min(claim_idle_ms, max_deliveries, batch, block_ms, outage_after, concurrency) < 1:
            raise ValueError(
                "claim_idle_ms, max_deliveries, batch, block_ms, outage_after and concurrency "
                "must be >= 1"
            )
        if handler_timeout is not None and handler_timeout <= 0:
            raise ValueError("handler_timeout must be > 0 seconds (or None: no limit)")
        items = [streams] if isinstance(streams, str | Subscription) else list(streams)
        names: list[str] = []
        for item in items:
            names.extend(item.streams(prefix) if isinstance(item, Subscription) else [item])
        if not names:
            raise ValueError("a consumer needs at least one stream")
        self.redis = redis
        self.group = group
        self.consumer = consumer
        self.prefix = prefix
        self.start: Start = start
        self.claim_idle_ms = claim_idle_ms
        self.max_deliveries = max_deliveries
        self.batch = batch
        self.handler_timeout = handler_timeout
        self.outage_after = outage_after
        self.read_ahead = read_ahead
        self.concurrency = concurrency
        self.metrics = metrics
        self.stopping = Stopping()
        self._lag_due = 0.0
        self._trims = trimmed.TrimWatch(prefix, group, metrics)
        self._trims_due = 0.0
        timeout_s = socket_timeout_s(redis)
        self.block_ms = block_ms if timeout_s is None else min(block_ms, int(timeout_s * 800) or 1)
        self._streams = {name: parse_stream(name, prefix) for name in names}
        # What is read: the event streams and, beside each, its replay stream for the group.
        self._reading = {**self._streams, **replay.replay_streams(self._streams, prefix, group)}
        self._cursors = dict.fromkeys(self._reading, "0-0")
        # Per stream, the newest entry this consumer was handed: where a lost group resumes.
        # With its fields: after a restart a new entry may reuse the id.
        self._seen: dict[str, tuple[str, dict[str, bytes]]] = {}
        # The entries handed out and not acknowledged yet: what a lost group takes with it.
        self._held = Held(self._reading)
        self._reclaim_due = 0.0
        self._groups_ready = False
        self._closed = False
        self._settle = Settle(redis, prefix, group, consumer, self._reading, self._held, metrics)
        self._forget = redis.register_script(regroup.FORGET_CONSUMER_LUA)

    @property
    def streams(self) -> list[str]:
        """The event stream names this consumer reads (and beside each, its replay stream)."""
        return list(self._streams)

    @property
    def closed(self) -> bool:
        """Whether close() was called."""
        return self._closed

    async def ensure_groups(self) -> None:
        """Create the group on every stream where it is missing (the stream too, if need be)."""
        await self._create_groups(_GROUP_START[self.start])

    async def _create_groups(self, start: str) -> None:
        await regroup.create(self.redis, self.group, self._reading, start, self.prefix)
        self._groups_ready = True

    async def read(self, limit: int | None = None) -> list[Event]:
        """The next events: stale ones taken over from other consumers first, then new ones.

        Blocks up to `block_ms` when there is nothing to take over and nothing new. Poison and
        malformed entries are dead-lettered and not returned. An empty list means nothing came.
        Without `limit`, up to `batch` entries per stream are taken; with it, at most `limit`
        in all (the oldest first), so that nothing beyond it is left pending under this
        consumer's name.
        """
        if self._closed:
            raise RuntimeError("consumer is closed")
        if limit is not None and limit < 1:
            raise ValueError("limit must be >= 1 (or None)")
        if not self._groups_ready:
            await self.ensure_groups()
        try:
            return await self._read(limit)
        except RedisError as exc:
            if classify(exc) != "nogroup":
                raise
            await self.recover_groups(exc)
            return await self._read(limit)

    async def recover_groups(self, exc: BaseException | None = None) -> None:
        """Create the group again where it vanished (deleted stream, destroyed group, a Redis
        restarted without persistence), and say in a log line what that replays or skips.

        Where the stream still holds the newest event this consumer was handed, the group
        resumes after it: nothing this consumer handled comes again (events other consumers of
        the group handled after it may). Where the stream no longer holds it (a new stream),
        everything it holds is news: the group starts at its beginning. On a stream where this
        consumer got nothing yet, it starts where `start` says: the stream's beginning
        (everything it holds comes again, however often it was acknowledged before) or its end
        (what was added while the group was missing is skipped). A replay stream starts at its
        beginning: what it holds is what the group has not handled yet.
        """
        log.warning("consumer_group_missing", group=self.group, error=str(exc or ""))
        await regroup.recreate(
            self.redis,
            self.group,
            self.consumer,
            self.start,
            self._reading,
            self._seen,
            self._held,
            self.prefix,
        )
        self._cursors = dict.fromkeys(self._reading, "0-0")
        self._groups_ready = True

    async def _read(self, limit: int | None) -> list[Event]:
        if time.monotonic() >= self._trims_due:
            self._trims_due = time.monotonic() + TRIM_CHECK_S
            await self._trims.check(self.redis, self._streams)
        if self.metrics is not None and time.monotonic() >= self._lag_due:
            self._lag_due = time.monotonic() + self.metrics.lag_interval
            feeds = {stream: ref.feed for stream, ref in self._reading.items()}
            await sample_lag(self.redis, self.group, feeds, self.metrics)
        events: list[Event] = []
        if time.monotonic() >= self._reclaim_due:
            events.extend(await self._reclaim(limit))
        if limit is None:
            events.extend(await self._read_new(block=not events))
        elif len(events) < limit:
            events.extend(await self._read_new_at_most(limit - len(events), block=not events))
        return events

    async def _reclaim(self, limit: int | None) -> list[Event]:
        """Take over stale entries (`claim_idle_ms`); dead-letter those delivered too often."""
        claim = await capped.autoclaim(
            self.redis,
            self._cursors,
            self.group,
            self.consumer,
            self.claim_idle_ms,
            self.batch,
            limit,
        )
        for stream, entry_id in claim.trimmed:
            self._held.drop(stream, entry_id)
        if claim.trimmed:  # gone: any reason kept for them is of no more use
            await self._settle.reasons.forget(claim.trimmed)
        # Between scans, wait long enough for entries to become stale; keep going while the last
        # scan stopped early because it hit `batch` (or `limit`).
        self._reclaim_due = time.monotonic() + (self.claim_idle_ms / 2000 if claim.complete else 0)
        if claim.complete:
            await self._held.forget_taken_over(self.redis, self.group, self.consumer)
        if not claim.entries:
            return []
        counts = await capped.deliveries(self.redis, self.group, self.consumer, claim.entries)
        # Why a consumer of the group failed those delivered before, when it said.
        again = [(s, i) for (s, i, _), n in zip(claim.entries, counts, strict=True) if n and n > 1]
        said = await self._settle.reasons.lookup(again)
        events: list[Event] = []
        for (stream, entry_id, fields), deliveries in zip(claim.entries, counts, strict=True):
            if deliveries is None:
                self._held.drop(stream, entry_id)
                continue  # its previous owner acknowledged it after all: it is done
            reason = said.get((stream, entry_id), "")
            if deliveries > self.max_deliveries:
                await self._settle.bury(
                    stream, entry_id, fields, "max_deliveries", deliveries, reason
                )
                continue
            event = await self._event(stream, entry_id, fields, deliveries)
            if event is not None:
                events.append(event)
                if reason:
                    self._held.refused({(stream, entry_id): reason})
        log.info(
            "consumer_reclaimed",
            group=self.group,
            consumer=self.consumer,
            entries=len(claim.entries),
            events=len(events),
        )
        return events

    async def _read_new(self, *, block: bool, count: int | None = None) -> list[Event]:
        reply = await self.redis.xreadgroup(
            self.group,
            self.consumer,
            dict.fromkeys(self._reading, ">"),
            count=count or self.batch,
            block=self.block_ms if block else None,
        )
        return await self._new_events(raw_stream_reply(reply))

    async def _new_events(self, entries: Iterable[tuple[str, list[RawEntry]]]) -> list[Event]:
        events: list[Event] = []
        for stream, items in entries:
            if not items:
                continue
            # New entries come in stream order, after all the group delivered before.
            self._seen[stream] = (text(items[-1][0]), fields_of(items[-1][1]))
            ref = self._reading[stream]
            tenant, feed, held = ref.tenant, ref.feed, self._held.of(stream)
            for entry_id, raw in items:
                event = None if ref.origin else event_of_raw(stream, entry_id, raw, tenant, feed)
                if event is None:
                    event = await self._event(stream, text(entry_id), fields_of(raw), 1, seen=False)
                    if event is None:
                        continue
                else:
                    held.setdefault(event.id, "")
                events.append(event)
        return events

    async def _read_new_at_most(self, limit: int, *, block: bool) -> list[Event]:
        block_ms = self.block_ms if block else None
        entries = await capped.read_new(
            self.redis, list(self._reading), self.group, self.consumer, limit, block_ms=block_ms
        )
        events = await self._new_events(entries)
        events.sort(key=lambda event: entry_order(event.id))  # across feeds, in time order
        return events

    async def _event(
        self,
        stream: str,
        entry_id: str,
        fields: dict[str, bytes],
        deliveries: int,
        seen: bool = True,
    ) -> Event | None:
        ref = self._reading[stream]
        newest = self._seen.get(stream)
        fresh = newest is None or entry_order(entry_id) > entry_order(newest[0])
        if seen and not ref.origin and fresh:
            self._seen[stream] = (entry_id, fields)
        try:
            event = replay.event_of(stream, ref, entry_id, fields, deliveries)
        except MalformedEvent as exc:
            await self._settle.bury(stream, entry_id, fields, "malformed", deliveries, str(exc))
            return None
        self._held.add(stream, entry_id)
        return event

    async def refused(self, why: Mapping[tuple[str, str], str]) -> None:
        """Note why the handler failed events it holds ((stream, entry id) -> reason, where
        each is pending: `replay.pending_entry`), here and in Redis for the group
        (`syncd.consumer.reasons`): should they reach the dead stream, by whichever consumer of
        the group, the reason goes with them (`detail`)."""
        await self._settle.refused(why)

    async def ack(self, *events: Event) -> int:
        """Acknowledge events in this consumer's group; returns how many were still pending."""
        return await self._settle.ack(events)

    async def hold(self, events: Iterable[Event]) -> list[Event]:
        """Keep events this consumer was handed from being taken over while its handler still
        works on them (longer than `claim_idle_ms`): their idle time starts again (XCLAIM
        JUSTID: their delivery count stays). Returns those still its own."""
        return await loop.keep(self, list(events))

    async def ack_all(self, batch: Iterable[Event]) -> int:
        """Acknowledge every event of a batch; returns how many were still pending."""
        return await self.ack(*batch)

    def __aiter__(self) -> Consumer:
        return self

    async def __anext__(self) -> list[Event]:
        """The next non-empty batch, unacknowledged; iteration ends when the consumer is closed."""
        while not self._closed:
            batch = await self.read()
            if batch:
                return batch
        raise StopAsyncIteration

    async def run(self, handler: Handler, *, stop: asyncio.Event | None = None) -> None:
        """Hand events to `handler` and acknowledge each one it handled, until `stop` is set or
        `stop()` is called.

        Per event, not per batch: the handler returns the events that failed (or raises, and is
        then called once per event of the batch). Failed events stay pending and come back
        after `claim_idle_ms`; one that keeps failing ends in the dead stream after
        `max_deliveries`, while the events around it go on.

        When the handler fails every event `outage_after` rounds in a row, its own
        dependencies look down: `run` stops reading new events and retries the failed ones
        itself with growing pauses (up to 30 s), keeping them claimed without raising their
        delivery count, so an outage does not push good events into the dead stream. Each
        retry also tries one new event (while fewer than `batch` are held): when it succeeds,
        the held ones are poison after all and go back to normal redelivery.

        Redis errors (restarts, failovers, resharding, a destroyed group) are logged and
        retried with backoff; a lost group is created again (see `recover_groups`). Nothing
        ends the loop but `stop`, `stop()`, `close()` or cancellation. The `stop` event is
        checked between rounds, so stopping by it takes up to `block_ms` plus the handler's
        time; `stop()` cuts a blocked read short and bounds the handler's time.

        With `read_ahead`, the next batch is read while the handler works on one (batches
        still come one at a time, in order, each acknowledged after its call); a batch read
        ahead is handled after `stop` too, and is the first probe when an outage begins.
        """
        await loop.run(self, handler, stop=stop)

    async def run_each(self, handler: EventHandler) -> None:
        """Hand events to `handler` one at a time, up to `concurrency` calls at once, and
        acknowledge each event once its call returned None, until `stop()` or `close()`.

        Never two calls for one key at once, and a key's events in stream order (a key is a
        record key in one stream); events of different keys run side by side. Reading goes on
        while fewer than `batch` events wait for a call; they are pending under this consumer's
        name, which keeps them, and those of its calls, from the group's other consumers (every
        third of `claim_idle_ms`, their delivery count left alone). Failures take the way they
        take under `run`: a failed event (raised, timed out after `handler_timeout`, or
        returned as `Failed(event, reason)`) comes back after `claim_idle_ms`, to the dead
        stream after `max_deliveries`; `outage_after` failed calls in a row (`Failed` not
        counted) hold the failed events through an outage of the handler's dependencies.
        Redis errors are logged and retried with backoff.
        """
        await each.run_each(self, handler)

    async def stop(self, deadline: float | None = 30.0) -> None:
        """Stop `run` or `run_each` gracefully and return once it returned.

        Reading stops at once, a read blocked in XREADGROUP included. Handler calls in flight
        get `deadline` seconds (None: as long as they take) to finish and have their events
        acknowledged; those still running then are cancelled, and their events stay pending
        and come back after `claim_idle_ms`, as do events read and not handed out yet. Nothing
        is lost. Calling it again may shorten the deadline. The consumer stays stopped: `run`
        and `run_each` return at once from then on. A handler that stops its own consumer
        starts this as a task: awaited there, it would wait for that very call.
        """
        self.stopping.request(deadline)
        await self.stopping.stopped()

    async def read_new(self, count: int) -> list[Event]:
        """Up to `count` events never delivered to the group, without waiting."""
        if not self._groups_ready:
            await self.ensure_groups()
        try:
            return await self._read_new(block=False, count=count)
        except RedisError as exc:
            if classify(exc) != "nogroup":
                raise
            await self.recover_groups(exc)
            return []

    async def close(self) -> None:
        """Stop iterating, and drop this consumer's name from groups where nothing is pending.

        The Redis client belongs to the caller and stays open. Names still holding pending
        entries are kept, so that those entries can be taken over.
        """
        if self._closed:
            return
        self._closed = True
        if not self._groups_ready:
            return
        try:
            # One call per stream: on a cluster the streams may live on different nodes.
            for stream in self._reading:
                await self._forget(keys=[stream], args=[self.group, self.consumer])
        except RedisError as exc:
            log.warning("consumer_close_failed", group=self.group, error=str(exc))

    async def __aenter__(self) -> Consumer:
        """Create the groups where missing. A Redis that cannot answer now (down, restarting,
        failing over) is no error here: it is logged (`consumer_redis_unavailable`) and the
        first read creates them, which `run` retries with backoff until `stop`. Refused
        credentials and other errors raise."""
        try:
            await self.ensure_groups()
        except Exception as exc:
            if classify(exc) != "unavailable" or isinstance(exc, AuthenticationError):
                raise
            error = f"{type(exc).__name__}: {exc}"
            log.warning("consumer_redis_unavailable", group=self.group, error=error)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
