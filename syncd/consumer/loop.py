"""The loop behind `Consumer.run`: hand each batch to the handler, acknowledge what it handled,
hold the failed events through an outage of the handler's own dependencies, and ride out Redis
errors with backoff.

It drives a consumer only through the `Source` protocol below (`Consumer` is one), so reading,
group setup and acknowledging stay in `syncd.consumer.consumer`, and the decisions it makes
(`classify`, `failed_events`, `Backoff`) in `syncd.consumer.delivery`. `Consumer.stop` ends it
through `syncd.consumer.stopping`; the loop for one-event handlers (`syncd.consumer.each`)
shares its pieces (errors, keeping held events, timing a call).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, Protocol, TypeVar

import structlog
from redis.exceptions import RedisError

from syncd.consumer.delivery import (
    Backoff,
    UnknownResult,
    classify,
    failed_events,
    failure_reasons,
)
from syncd.consumer.events import Event, Failed
from syncd.consumer.events import text as _text
from syncd.consumer.metrics import ConsumerMetrics
from syncd.consumer.replay import pending_entry, pending_reasons
from syncd.consumer.stopping import Stopping, cancel, wait_any
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.consumer")

T = TypeVar("T")

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0


Failures = (
    Sequence[Event | Failed | str | bytes]
    | AbstractSet[Event | Failed | str | bytes]
    | Iterator[Event | Failed | str | bytes]
    | None
)
"""What a handler returns: None when every event of its batch was handled, else the events
that failed (or their entry ids, or `Failed(event, reason)`), in a list, tuple, set or
generator."""

Handler = Callable[[list[Event]], Awaitable[Failures]]
"""Called with a batch of events. Return None when all were handled, or the events (or their
ids) that failed: the others are acknowledged. An event failed for a reason of its own (a
record the database refuses) is returned as `Failed(event, reason)`: the reason goes with it
to the dead stream, and such failures do not count towards an outage. Raising fails the
batch; `Consumer.run` then calls the handler once per event to find the ones that fail. Any
other result (a dict such as `{event.id: reason}`, a str, bytes, a number, True) is refused at
run time: the whole batch counts as failed and an error (`consumer_handler_result_refused`)
names the type."""

Reasons = dict[tuple[str, str], str]


class Source(Protocol):
    """What the loop needs of a consumer: its settings, reading, acknowledging, and recreating
    a lost group."""

    redis: RedisClient
    prefix: str
    group: str
    consumer: str
    batch: int
    claim_idle_ms: int
    handler_timeout: float | None
    outage_after: int
    read_ahead: bool
    stopping: Stopping
    metrics: ConsumerMetrics | None

    @property
    def closed(self) -> bool: ...

    async def read(self) -> list[Event]: ...

    async def read_new(self, count: int) -> list[Event]: ...

    async def ack(self, *events: Event) -> int: ...

    async def refused(self, why: Reasons) -> None: ...

    async def recover_groups(self, exc: BaseException | None = None) -> None: ...


class CancelGuard:
    """Raises CancelledError once the task was asked to cancel, even when that request got lost.

    On Python 3.11 a cancellation that arrives while redis-py sends a command is dropped
    (its `send_packed_command` awaits `asyncio.wait_for`, which returns the finished send's
    result instead of raising), and the task would go on as if nothing was asked. The task's
    count of cancellation requests still says so.
    """

    def __init__(self) -> None:
        self.task = asyncio.current_task()
        self.baseline = self.task.cancelling() if self.task is not None else 0

    def check(self) -> None:
        if self.task is not None and self.task.cancelling() > self.baseline:
            raise asyncio.CancelledError


async def run(source: Source, handler: Handler, *, stop: asyncio.Event | None) -> None:
    """`Consumer.run`: see there for what it promises."""
    with source.stopping.running():
        await _run(source, handler, stop or asyncio.Event(), source.stopping)


async def _run(source: Source, handler: Handler, stop: asyncio.Event, halt: Stopping) -> None:
    state = _Rounds()
    guard = CancelGuard()
    # With read_ahead, the next batch, read while the handler works on this one. Once read, its
    # events are delivered: they are handled (after `stop` too) rather than left pending.
    ahead: asyncio.Task[list[Event]] | None = None
    try:
        while not source.closed and (not (stop.is_set() or halt.requested) or ahead is not None):
            guard.check()
            try:
                if state.held:
                    await wait_any((stop, halt.event), state.backoff.next())
                    if stop.is_set() or halt.requested:
                        break
                    held = state.held = await keep(source, state.held)
                    if ahead is not None:  # new events, read before the outage showed: the probe
                        # Taken first: a read ahead that failed must not be awaited again.
                        reading, ahead = ahead, None
                        got = await halt.interruptible(reading)
                    else:
                        probe = _probe(source) if len(held) < source.batch else _nothing()
                        got = await halt.interruptible(probe)
                    batch = held + (got or [])
                else:
                    # Consumer.stop cuts a blocked read short (None); what was read is handled.
                    next_read, ahead = ahead or source.read(), None
                    got = await halt.interruptible(next_read)
                    if got is None:
                        break
                    batch = got
                guard.check()
                if not batch:
                    continue
                if (
                    source.read_ahead
                    and not state.held
                    and not stop.is_set()
                    and not halt.requested
                ):
                    ahead = asyncio.create_task(source.read())
                ended, went_on = await halt.bounded(_round(source, handler, batch, state))
                if not ended:
                    log_cut(source, len(batch))
                    break
                if went_on:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await on_error(source, exc, state.backoff)
            guard.check()
            await wait_any((stop, halt.event), state.backoff.next())
    finally:
        if ahead is not None:  # cancelled, or stopped while holding: its events stay pending
            await cancel(ahead)


async def _nothing() -> list[Event]:
    return []


def log_cut(source: Source, events: int) -> None:
    """Handler calls still running at a stop's deadline were cancelled."""
    log.warning(
        "consumer_stop_cancelled_handler",
        group=source.group,
        consumer=source.consumer,
        events=events,
        effect="their events stay pending and come back after claim_idle_ms",
    )


class _Rounds:
    """What the loop carries from one round to the next."""

    def __init__(self) -> None:
        self.backoff = Backoff(_BACKOFF_MIN_S, _BACKOFF_MAX_S)
        self.held: list[Event] = []  # failed events retried here during a handler outage
        self.failed_rounds = 0


async def _round(source: Source, handler: Handler, batch: list[Event], state: _Rounds) -> bool:
    """Hand `batch` to the handler and acknowledge what it handled. True: go on at once (the
    batch was handled, or its events are held from now on); False: back off first."""
    failed, reasons = await _apply(source, handler, batch)
    done = [e for e in batch if e not in failed]
    await source.ack(*done)
    await source.refused(pending_reasons(failed, reasons, source.prefix, source.group))
    if source.metrics is not None:
        source.metrics.handled(source.group, done)
        source.metrics.failed(source.group, failed)
    # Events refused for reasons of their own say nothing of the handler's dependencies.
    own = all((e.stream, e.id) in reasons for e in failed)
    if done or not failed or own:
        if state.held and failed:
            log.warning("consumer_outage_over", group=source.group, poison=len(failed))
        state.held, state.failed_rounds = [], 0
        state.backoff.reset()
        return True
    state.failed_rounds += 1
    if state.failed_rounds < source.outage_after:
        return False
    if not state.held:
        log.error(
            "consumer_handler_outage",
            group=source.group,
            consumer=source.consumer,
            failed_rounds=state.failed_rounds,
            held=len(failed),
        )
    state.held = failed
    return True


async def on_error(source: Source, exc: Exception, backoff: Backoff) -> None:
    kind = classify(exc)
    if kind == "nogroup":
        try:
            await source.recover_groups(exc)
            return
        except Exception as again:
            exc, kind = again, classify(again)
    fields = {
        "group": source.group,
        "consumer": source.consumer,
        "error": f"{type(exc).__name__}: {exc}",
        "retry_in_s": backoff.delay,
    }
    if kind == "unavailable":
        log.warning("consumer_redis_unavailable", **fields)
    else:
        log.error("consumer_error", exc_info=exc, **fields)


async def _probe(source: Source) -> list[Event]:
    """One new event, to tell an outage from poison while events are held."""
    return await source.read_new(count=1)


async def keep(source: Source, held: list[Event]) -> list[Event]:
    """Reset the idle time of held events so that no one takes them over; XCLAIM with
    JUSTID leaves their delivery count alone. Returns those still ours."""
    kept: list[Event] = []
    # Where each is pending: a replayed event in its replay stream.
    where = [(e, *pending_entry(e, source.prefix, source.group)) for e in held]
    for stream in dict.fromkeys(s for _, s, _ in where):
        ids: list[Any] = [entry_id for _, s, entry_id in where if s == stream]
        claimed = await source.redis.xclaim(
            stream, source.group, source.consumer, 0, ids, justid=True
        )
        mine = {_text(i) for i in claimed if isinstance(i, bytes | str)}
        kept.extend(e for e, s, entry_id in where if s == stream and entry_id in mine)
    return kept


async def keep_while_handled(source: Source, held: Callable[[], list[Event]]) -> None:
    """While a handler works on events (longer than `claim_idle_ms`: it waits out an outage
    of its own dependencies, say), keep those `held()` names from the group's other consumers:
    every third of `claim_idle_ms` their idle time starts again (`keep`: the delivery count
    stays). A consumer that dies stops keeping them, and they are taken over as before."""
    while True:
        await asyncio.sleep(source.claim_idle_ms / 3000)
        events = held()
        if events:
            with contextlib.suppress(RedisError):
                await keep(source, events)


async def _failures(
    source: Source, handler: Handler, batch: list[Event]
) -> tuple[list[Event], Reasons]:
    result = await _call(source, handler, batch)
    if isinstance(result, Iterator):
        result = list(result)  # read once, for the failures and their reasons
    return failed_events(batch, result), failure_reasons(result)


async def _apply(
    source: Source, handler: Handler, batch: list[Event]
) -> tuple[list[Event], Reasons]:
    """The events of `batch` the handler failed, and the reasons it gave for some of them."""
    try:
        return await _failures(source, handler, batch)
    except UnknownResult as exc:
        # Not an error of some event but of the handler's code: calling it per event would
        # only repeat it. The whole batch stays pending.
        log_refused(source, exc, batch)
        return list(batch), {}
    except Exception as exc:
        if len(batch) == 1:
            log_failure(source, exc, batch[0])
            return list(batch), {}
        log.warning(
            "consumer_batch_failed",
            group=source.group,
            events=len(batch),
            error=f"{type(exc).__name__}: {exc}",
            retry="one event at a time",
        )
    failed: list[Event] = []
    reasons: Reasons = {}
    for event in batch:
        try:
            one, why = await _failures(source, handler, [event])
        except UnknownResult as exc:
            log_refused(source, exc, [event])
            one, why = [event], {}
        except Exception as exc:
            log_failure(source, exc, event)
            one, why = [event], {}
        failed.extend(one)
        reasons.update(why)
    return failed, reasons


async def _call(source: Source, handler: Handler, batch: list[Event]) -> Failures:
    started = time.monotonic()
    keeper = asyncio.create_task(keep_while_handled(source, lambda: batch))
    try:
        return await timed(source, handler(batch))
    finally:
        keeper.cancel()
        await asyncio.gather(keeper, return_exceptions=True)
        if source.metrics is not None:
            source.metrics.observe(source.group, time.monotonic() - started)


async def timed(source: Source, call: Awaitable[T]) -> T:
    """A handler's call, failed with TimeoutError past `handler_timeout`."""
    if source.handler_timeout is None:
        return await call
    try:
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns normally when it is
        # cancelled in the loop turn in which the awaited call completes, dropping the
        # cancellation.
        async with asyncio.timeout(source.handler_timeout):
            return await call
    except TimeoutError:
        raise TimeoutError(f"handler took more than {source.handler_timeout}s") from None


def log_refused(source: Source, exc: UnknownResult, batch: list[Event]) -> None:
    log.error(
        "consumer_handler_result_refused",
        group=source.group,
        consumer=source.consumer,
        result_type=exc.kind,
        events=len(batch),
        error=str(exc),
        effect="nothing of the batch is acknowledged",
    )


def log_failure(source: Source, exc: Exception, event: Event) -> None:
    log.error(
        "consumer_handler_failed",
        exc_info=exc,
        group=source.group,
        consumer=source.consumer,
        stream=event.stream,
        entry_id=event.id,
        deliveries=event.deliveries,
    )
