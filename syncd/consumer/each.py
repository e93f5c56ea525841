"""The loop behind `Consumer.run_each`: one event per handler call, up to `concurrency` calls
at once, never two events of one key at once and a key's events in stream order (decided by
`syncd.consumer.keyed`), each event acknowledged once its call succeeded.

Reading goes on while calls run, while fewer than `batch` events wait for theirs. Failures take
the way they take under `run` (`syncd.consumer.loop`, whose pieces this reuses): a failed event
stays pending and comes back after `claim_idle_ms`, to the dead stream after `max_deliveries`;
`Failed(event, reason)` gives the reason its dead letter carries. When `outage_after` calls in a
row fail (`Failed` not counted), the handler's dependencies look down: reading stops, and the
failed events are retried here with growing pauses, kept claimed without raising their delivery
count, along with one new event; the first success ends the outage.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Literal, Protocol

import structlog

from syncd.consumer.delivery import Backoff
from syncd.consumer.events import Event, Failed
from syncd.consumer.keyed import KeyedQueue
from syncd.consumer.loop import (
    CancelGuard,
    Source,
    keep,
    keep_while_handled,
    log_cut,
    log_failure,
    on_error,
    timed,
)
from syncd.consumer.replay import pending_entry
from syncd.consumer.stopping import cancel, wait_any

log = structlog.get_logger("syncd.consumer")

EventHandler = Callable[[Event], Awaitable[Failed | None]]
"""Called with one event. Return None when it was handled (it is then acknowledged), or
`Failed(event, reason)` for an event refused for a reason of its own (a record the database
refuses): the reason goes with it to the dead stream, and such failures do not count towards
an outage. Raising (or timing out) fails the event. Any other result fails it too, and an error
(`consumer_handler_result_refused`) names its type."""

Outcome = Literal["handled", "refused", "failed"]

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0


class EachSource(Source, Protocol):
    """A `Source` that also says how many calls may run at once."""

    concurrency: int


async def run_each(source: EachSource, handler: EventHandler) -> None:
    """`Consumer.run_each`: see there for what it promises."""
    with source.stopping.running():
        await _Each(source, handler).run()


class _Each:
    def __init__(self, source: EachSource, handler: EventHandler) -> None:
        self.source = source
        self.handler = handler
        self.queue = KeyedQueue(source.concurrency)
        self.calls: dict[asyncio.Task[Outcome], Event] = {}
        self.reader: asyncio.Task[list[Event]] | None = None
        self.read_backoff = Backoff(_BACKOFF_MIN_S, _BACKOFF_MAX_S)
        self.backoff = Backoff(_BACKOFF_MIN_S, _BACKOFF_MAX_S)
        # Failed since the last success (`Failed` left out): held through an outage.
        self.failing: list[Event] = []
        self.outage = False
        self.retrying = False  # in an outage: the held events (and a probe) are being retried

    async def run(self) -> None:
        # While calls run longer than `claim_idle_ms` (or events wait that long for theirs),
        # their events are kept from the group's other consumers; not the failed events: they
        # are to come back after claim_idle_ms.
        keeper = asyncio.create_task(
            keep_while_handled(
                self.source, lambda: [*self.calls.values(), *self.queue.waiting_events()]
            )
        )
        try:
            await self._loop()
            await self._drain()
        finally:
            await cancel(keeper)

    async def _loop(self) -> None:
        halt = self.source.stopping
        guard = CancelGuard()
        try:
            while not self.source.closed and not halt.requested:
                guard.check()
                if self.outage and not self.retrying and not self.calls:
                    await self._retry()
                    continue
                if not self.outage or self.retrying:
                    for event in self.queue.start():
                        self.calls[asyncio.create_task(self._call(event))] = event
                if self.retrying and not self.calls:
                    self.retrying = False  # every retried event failed again
                    continue
                if (
                    self.reader is None
                    and not self.outage
                    and self.queue.waiting < self.source.batch
                ):
                    self.reader = asyncio.create_task(self._read())
                running = [*self.calls, *([self.reader] if self.reader is not None else [])]
                await wait_any((halt.event,), tasks=running)
                self._collect()
        except BaseException:
            for task in [*self.calls, *([self.reader] if self.reader is not None else [])]:
                await cancel(task)
            raise

    async def _drain(self) -> None:
        """Stop reading at once; let the calls running finish until the stop's deadline, then
        cancel them: their events stay pending. Events waiting for a call stay pending too."""
        if self.reader is not None:
            await cancel(self.reader)
        await self.source.stopping.until_deadline(self.calls)
        cut = [task for task in self.calls if not task.done()]
        for task in cut:
            await cancel(task)
        if cut:
            log_cut(self.source, len(cut))

    async def _read(self) -> list[Event]:
        try:
            events = await self.source.read()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await on_error(self.source, exc, self.read_backoff)
            await wait_any((self.source.stopping.event,), self.read_backoff.next())
            return []
        self.read_backoff.reset()
        return events

    def _collect(self) -> None:
        if self.reader is not None and self.reader.done():
            events, self.reader = self.reader.result(), None
            self.queue.add(events)
        for task in [task for task in self.calls if task.done()]:
            event = self.calls.pop(task)
            self.queue.finish(event)
            self._outcome(event, task.result())

    def _outcome(self, event: Event, outcome: Outcome) -> None:
        if outcome == "handled":
            if self.outage:
                log.warning(
                    "consumer_outage_over", group=self.source.group, poison=len(self.failing)
                )
            self.failing, self.outage, self.retrying = [], False, False
            self.backoff.reset()
        elif outcome == "failed":
            self.failing.append(event)
            if not self.outage and len(self.failing) >= self.source.outage_after:
                self.outage = True
                log.error(
                    "consumer_handler_outage",
                    group=self.source.group,
                    consumer=self.source.consumer,
                    failed_calls=len(self.failing),
                    held=len(self.failing),
                )

    async def _retry(self) -> None:
        """One retry in an outage: after a pause, the held events and those waiting (kept
        claimed, their delivery count left alone), and one new event while fewer than `batch`
        are held, all handed to the handler again."""
        source = self.source
        await wait_any((source.stopping.event,), self.backoff.next())
        if source.stopping.requested:
            return
        waiting = self.queue.waiting_events()
        try:
            mine = await keep(source, [*self.failing, *waiting])
            self.queue.remove(keep=mine)
            held = [e for e in mine if e in self.failing]
            probe: list[Event] = []
            if len(held) + self.queue.waiting < source.batch:
                probe = await source.stopping.interruptible(source.read_new(1)) or []
        except Exception as exc:
            await on_error(source, exc, self.read_backoff)
            return
        self.failing = []  # those failing again come back to it
        self.queue.add([*held, *probe])
        self.retrying = True

    async def _call(self, event: Event) -> Outcome:
        """Hand `event` to the handler and acknowledge it when the handler succeeded."""
        source = self.source
        started = time.monotonic()
        try:
            result = await timed(source, self.handler(event))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log_failure(source, exc, event)
            return self._failed(event, "failed")
        finally:
            if source.metrics is not None:
                source.metrics.observe(source.group, time.monotonic() - started)
        if result is None:
            return await self._ack(event)
        if isinstance(result, Failed) and (result.stream, result.id) == (event.stream, event.id):
            where = pending_entry(event, source.prefix, source.group)
            await source.refused({where: result.reason})
            return self._failed(event, "refused")
        kind = type(result).__name__
        log.error(
            "consumer_handler_result_refused",
            group=source.group,
            consumer=source.consumer,
            result_type=kind,
            events=1,
            error=f"the handler returned a {kind}: return None when the event was handled, "
            "or Failed(event, reason) naming it",
            effect="the event is not acknowledged",
        )
        return self._failed(event, "failed")

    def _failed(self, event: Event, outcome: Outcome) -> Outcome:
        if self.source.metrics is not None:
            self.source.metrics.failed(self.source.group, [event])
        return outcome

    async def _ack(self, event: Event) -> Outcome:
        source = self.source
        try:
            await source.ack(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning(
                "consumer_ack_failed",
                group=source.group,
                stream=event.stream,
                entry_id=event.id,
                error=f"{type(exc).__name__}: {exc}",
                effect="handled, still pending: it comes back after claim_idle_ms",
            )
            return "handled"
        if source.metrics is not None:
            source.metrics.handled(source.group, [event])
        return "handled"
