"""Holding all polling while Redis cannot take pages: unreachable, near maxmemory, or with
fewer replicas acknowledging than `[redis] wait_replicas` asks for. The scheduler's dispatcher
starts no poll while a hold lasts; a probe (or the upkeep loop, for memory) ends it.

These holds make syncd efficient (no pages fetched that could not be stored, or made safe);
they never make it correct: the fence, and with wait_replicas each feed settling its own
cursor before it fetches past it, do. A part of the Scheduler (`Holds` is one of its bases).
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import Callable

import structlog

from syncd.engine.due import FeedState, Timetable
from syncd.engine.policy import Rules, replicas_given_up
from syncd.engine.publisher import Publisher
from syncd.errors import ReplicasBehind
from syncd.ops.metrics import Metrics

log = structlog.get_logger("syncd.scheduler")


class Holds(abc.ABC):
    """The scheduler's holds on all polling, and the probes that end them."""

    # Provided by the Scheduler.
    publisher: Publisher
    metrics: Metrics | None
    timetable: Timetable
    rules: Rules
    clock: Callable[[], float]
    _wake: asyncio.Event

    @abc.abstractmethod
    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        """Start `fn(*args)` in the scheduler's task group: the Scheduler defines it (the
        probes below run there); Holds alone has no task group to start them in."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop taking new work: the Scheduler defines it (a --once run that gives up on the
        replicas ends with it)."""

    def _init_holds(self) -> None:
        self.redis_ok = asyncio.Event()
        self.redis_ok.set()
        self._probing = False
        # Redis memory near maxmemory (or an OOM answer): nothing is polled until it has room.
        self.memory_full = False
        # Fewer than `[redis] wait_replicas` replicas answered: nothing new is fetched until
        # they do (a probe waits for them). Each feed's own cursor is settled regardless.
        self.replicas_ok = asyncio.Event()
        self.replicas_ok.set()
        self._replicas_probing = False
        self._held: set[FeedState] = set()  # feeds whose WAIT failed while polling is held
        self._held_since = 0.0
        self._held_s = 0.0  # seconds held for replicas, holds that ended

    @property
    def held(self) -> bool:
        """Whether all polling is held (no new poll starts)."""
        return not self.redis_ok.is_set() or self.memory_full or not self.replicas_ok.is_set()

    def set_memory_full(self, full: bool) -> None:
        """Pause (or resume) all polling for Redis memory."""
        self.memory_full = full
        self._wake.set()

    # -- replicas behind -------------------------------------------------------------

    def replicas_behind_seconds(self) -> float:
        """Seconds all polling has been held for replicas behind since start, the hold under
        way included: replicas that answer now and then end each hold soon, so its share of
        time, not whether one lasts, tells how much they block."""
        held = self._held_s
        if not self.replicas_ok.is_set():
            held += time.monotonic() - self._held_since
        return held

    def _replicas_behind(self, fs: FeedState) -> None:
        """Hold all polling until the replicas answer: every feed writes to the same primary,
        so pages fetched now could not be made safe either. Safety does not rest on this
        hold: each feed settles its own cursor before it fetches past it."""
        self._held.add(fs)
        if not self.replicas_ok.is_set():
            return
        self.replicas_ok.clear()
        self._held_since = time.monotonic()
        if not self._replicas_probing:
            self._replicas_probing = True
            self._spawn(self._probe_replicas, fs.tenant.id, fs.name)

    async def _probe_replicas(self, tenant: int, feed: str) -> None:
        delay = 0.2
        attempts = 0
        try:
            while True:
                try:
                    await self.publisher.settle(tenant, feed)
                    break
                except Exception as exc:  # ReplicasBehind after its WAIT, or Redis down
                    log.debug("replicas_probe_failed", error=type(exc).__name__)
                    attempts += 1
                    if replicas_given_up(self.rules, attempts):
                        self._give_up_on_replicas(exc, attempts)
                        return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._replicas_probing = False
        held, self._held = self._held, set()
        held_s = time.monotonic() - self._held_since
        log.info("replicas_caught_up", held_s=round(held_s, 3), feeds_held=len(held))
        self._held_s += held_s
        self.replicas_ok.set()
        # The feeds held settle (and go on) at once rather than after their backoff.
        now = self.clock()
        for tid in {fs.tenant.id for fs in held if not fs.tenant.removed}:
            self.timetable.retry_now(tid, held.__contains__, now)
        self._wake.set()

    def _give_up_on_replicas(self, exc: Exception, attempts: int) -> None:
        """A --once run whose replicas did not catch up: every feed not drained fails, saying
        so (nothing past its stored cursor may be fetched), and the run ends."""
        acked: int | None = None
        wanted: int | None = None
        if isinstance(exc, ReplicasBehind):
            error = f"the replicas did not catch up: {exc}, {attempts} times in a row"
            acked, wanted = exc.acked, exc.wanted
        else:
            error = f"the replicas did not catch up: {attempts} settles in a row failed: {exc}"
        failed = 0
        for fs in self.timetable.feeds():
            if not (fs.drained or fs.failed):
                fs.failed, fs.last_error = True, error
                failed += 1
        log.error(
            "replicas_given_up",
            acked=acked,
            wanted=wanted,
            attempts=attempts,
            held_s=round(time.monotonic() - self._held_since, 3),
            feeds_failed=failed,
        )
        self.stop()

    # -- Redis outages -----------------------------------------------------------------

    def _redis_trouble(self, error: str) -> None:
        """Pause polling until Redis answers again: fetching pages we cannot store is waste."""
        if self.metrics is not None:
            self.metrics.redis_error()
        if not self.redis_ok.is_set():
            return
        self.redis_ok.clear()
        log.error("redis_unavailable", error=error)
        if not self._probing:
            self._probing = True
            self._spawn(self._probe_redis)

    async def _probe_redis(self) -> None:
        delay = 0.2
        try:
            while True:
                try:
                    if await self.publisher.ping():
                        break
                except Exception as exc:
                    log.debug("redis_probe_failed", error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        finally:
            self._probing = False
        log.info("redis_available")
        self.redis_ok.set()
        self._wake.set()
