"""The scheduler: polls every feed of every tenant through a bounded pool of workers.

Two levels of due-time heaps: each tenant orders its idle feeds by due time; a global heap
orders tenants by the time they can next send a request (earliest due feed, rate limiter,
429 pause). A single dispatcher moves tenants whose time has come into the worker pool's
queue (syncd.fairshare), which decides whose poll takes the next free worker; each poll runs
as a task of one task group. The dispatcher never waits on a tenant: when no worker is free,
it waits for one to come back. What an outcome does to a feed is decided in syncd.policy; this
module does the I/O and applies the decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import anyio
import anyio.abc
import structlog

from syncd.auth import TokenProvider
from syncd.catalogue import Feed
from syncd.client import ExportClient
from syncd.config import TenantSettings
from syncd.errors import (
    AuthFailed,
    BadRequest,
    FeedUnavailable,
    RateLimited,
    RedisFull,
    SyncError,
    TransientError,
)
from syncd.fairshare import Pool
from syncd.metrics import Metrics
from syncd.policy import (
    PARK_S,
    AfterPoll,
    FeedFacts,
    NoProgress,
    Outcome,
    Rules,
    after_poll,
    first_delay,
    next_due,
    once_finished,
    page_progress,
    rate_limit_pause,
    resume_delay,
)
from syncd.publisher import Publisher
from syncd.ratelimit import TokenBucket, default_burst
from syncd.redact import redact

log = structlog.get_logger("syncd.scheduler")

PAUSED_RECHECK_S = 1.0
# The dispatcher wakes at least this often, so that the watchdog sees it alive.
TICK_S = 1.0


@dataclass(eq=False)
class FeedState:
    """One (tenant, feed) pair: its cursor and when it is due."""

    tenant: TenantState = field(repr=False)
    feed: Feed = field(repr=False)
    cursor: str | None
    change_detection: bool
    poll_interval: float
    due: float = 0.0
    failures: int = 0
    drained: bool = False  # answered hasMore: false at least once since start
    stuck: bool = False  # in a no-progress episode (pages that do not move it on)
    failed: bool = False  # --once gave up on it
    removed: bool = False
    running: bool = False
    paused: str | None = None  # backpressure: why this feed is not polled now
    last_ok: float | None = None  # unix time of the last applied page
    # Until a first success, "seconds since success" counts from when the feed was scheduled,
    # so that a feed that never succeeds still shows (and alerts) in the metrics.
    since: float = field(default_factory=time.time)
    last_error: str | None = None

    @property
    def name(self) -> str:
        return self.feed.name


@dataclass(eq=False)
class TenantState:
    """A tenant's limits and its idle feeds ordered by due time."""

    settings: TenantSettings
    tokens: TokenProvider = field(repr=False)
    bucket: TokenBucket
    feeds: dict[str, FeedState] = field(default_factory=dict, repr=False)
    heap: list[tuple[float, int, FeedState]] = field(default_factory=list, repr=False)
    inflight: int = 0  # polls under way, each holding a worker
    paused_until: float = 0.0
    next_token: float = 0.0
    version: int = 0
    removed: bool = False

    @property
    def id(self) -> int:
        return self.settings.id

    def ready_time(self) -> float | None:
        """When this tenant can next send a request; None while nothing can go."""
        if not self.heap or self.inflight >= self.settings.max_in_flight:
            return None
        return max(self.heap[0][0], self.paused_until, self.next_token)


class Scheduler:
    """Polls every feed of every tenant; publishes each page through the publisher."""

    def __init__(
        self,
        client: ExportClient,
        publisher: Publisher,
        *,
        workers: int = 64,
        once: bool = False,
        once_max_failures: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 300.0,
        jitter: float = 0.1,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.client = client
        self.publisher = publisher
        self.workers = workers
        self.once = once
        self.rules = Rules(once, once_max_failures, backoff_base, backoff_max, jitter)
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.tenants: dict[int, TenantState] = {}
        self.pool = Pool(workers)
        self._ready: list[tuple[float, int, TenantState, int]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # a poll ended, or force(): drain() looks again
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._tasks: anyio.abc.TaskGroup | None = None
        self.redis_ok = asyncio.Event()
        self.redis_ok.set()
        # Redis memory near maxmemory (or an OOM answer): nothing is polled until it has room.
        self.memory_full = False
        self.crashed = False
        self._active: set[FeedState] = set()
        self._probing = False
        self.last_progress = time.monotonic()
        self.pages = 0

    # -- tenants and feeds -------------------------------------------------------------

    def add_tenant(
        self,
        settings: TenantSettings,
        tokens: TokenProvider,
        feeds: Iterable[tuple[Feed, str | None, bool, float]],
        delays: Mapping[str, float] | None = None,
    ) -> TenantState:
        """Start scheduling a tenant: feeds as (feed, stored cursor, change detection, interval);
        `delays` says how long after now a feed is first due (see resume_delay)."""
        rate = settings.requests_per_second
        t = TenantState(settings, tokens, TokenBucket(rate, burst=default_burst(rate)))
        self.tenants[settings.id] = t
        self.pool.add(settings.id, settings.max_in_flight)
        now = self.clock()
        for feed, cursor, detect, interval in feeds:
            fs = FeedState(t, feed, cursor, detect, interval)
            t.feeds[feed.name] = fs
            stored = delays.get(feed.name) if delays is not None else None
            self._push(
                fs, now + first_delay(cursor is not None, self.once, stored, interval, self.rng)
            )
        return t

    def reconfigure_tenant(
        self,
        settings: TenantSettings,
        feeds: Iterable[tuple[Feed, str | None, bool, float]],
    ) -> tuple[list[str], list[str]]:
        """Apply a tenant's new settings and feed list; returns (added, removed) feed names.

        Polls under way finish; a removed feed is simply not scheduled again.
        """
        t = self.tenants[settings.id]
        t.settings = settings
        rate = settings.requests_per_second
        t.bucket.set_rate(rate, burst=default_burst(rate))
        self.pool.add(settings.id, settings.max_in_flight)
        wanted = {
            feed.name: (feed, cursor, detect, interval) for feed, cursor, detect, interval in feeds
        }
        removed = [name for name in t.feeds if name not in wanted]
        for name in removed:
            t.feeds.pop(name).removed = True
        added = []
        now = self.clock()
        for name, (feed, cursor, detect, interval) in wanted.items():
            fs = t.feeds.get(name)
            if fs is None:
                fs = FeedState(t, feed, cursor, detect, interval)
                t.feeds[name] = fs
                added.append(name)
                self._push(fs, now)
            else:
                fs.change_detection, fs.poll_interval = detect, interval
        self._arm(t)
        return added, removed

    def retry_now(self, tenant: int, which: Callable[[FeedState], bool]) -> None:
        """Make a tenant's idle feeds matching `which` due now (e.g. after new credentials)."""
        t = self.tenants[tenant]
        now = self.clock()
        for fs in list(t.feeds.values()):
            if not fs.running and not fs.removed and which(fs) and fs.due > now:
                fs.removed = True  # retire the queued heap entry ...
                fresh = FeedState(
                    t,
                    fs.feed,
                    fs.cursor,
                    fs.change_detection,
                    fs.poll_interval,
                    drained=fs.drained,
                    last_ok=fs.last_ok,
                    since=fs.since,
                )
                t.feeds[fs.name] = fresh  # ... and schedule its replacement now
                self._push(fresh, now)

    def remove_tenant(self, tenant: int) -> None:
        """Stop scheduling a tenant; its polls under way finish."""
        t = self.tenants.pop(tenant)
        t.removed = True
        self.pool.remove(tenant)
        for fs in t.feeds.values():
            fs.removed = True
        if self.metrics is not None:
            self.metrics.forget_tenant(tenant)
        self._wake.set()

    def _push(self, fs: FeedState, due: float) -> None:
        fs.due = due
        heapq.heappush(fs.tenant.heap, (due, next(self._seq), fs))
        self._arm(fs.tenant)

    def _arm(self, t: TenantState) -> None:
        """(Re)enter a tenant in the global heap at its current ready time."""
        t.version += 1
        ready = t.ready_time()
        if ready is not None and not t.removed:
            heapq.heappush(self._ready, (ready, next(self._seq), t, t.version))
            self._wake.set()

    # -- the loop ----------------------------------------------------------------------

    async def run(self, grace: float = 30.0) -> None:
        """Dispatch until stop() (or, with once=True, until every feed drained or failed);
        then let running polls finish for up to `grace` seconds (or until force())."""
        self._check_once()
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                try:
                    await self._dispatch()
                except Exception as exc:
                    # The dispatcher must never end on its own: if it does, stop everything.
                    log.error("scheduler_task_crashed", error=f"{type(exc).__name__}: {exc}")
                    self.crashed = True
                    self.force()
                if not await self.drain(grace):
                    log.warning("shutdown_grace_expired", grace_s=grace)
                # Polls still running (and the Redis probe) are cancelled here.
                tasks.cancel_scope.cancel()
        finally:
            self._tasks = None

    def stop(self) -> None:
        """Stop taking new work; polls under way may finish (see run())."""
        self._stopping.set()
        self._wake.set()

    def force(self) -> None:
        """Stop waiting for polls under way: the next step cancels them."""
        self._forced.set()
        self._changed.set()
        self.stop()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def running_polls(self) -> int:
        """Polls under way, including those of feeds or tenants removed meanwhile."""
        return len(self._active)

    async def drain(self, grace: float) -> bool:
        """Wait up to `grace` seconds for running polls to finish; True if they did."""
        with anyio.move_on_after(grace):
            while self._active and not self._forced.is_set():
                self._changed.clear()
                await self._changed.wait()
        return not self._active

    async def _dispatch(self) -> None:
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()
            if not self.redis_ok.is_set() or self.memory_full:
                # Waiting on Redis is not being stuck: keep ticking for the watchdog.
                await self._sleep(TICK_S / 2)
                continue
            now = self.clock()
            while self._ready and self._ready[0][0] <= now:
                _, _, t, version = heapq.heappop(self._ready)
                if version == t.version and not t.removed:
                    self.pool.want(t.id)
            if self._serve(now):
                # Let the polls just started (and everything else) run before the next one.
                await asyncio.sleep(0)
                continue
            timeout = (self._ready[0][0] - now) if self._ready else TICK_S
            await self._sleep(min(max(timeout, 0.0), TICK_S))

    async def _sleep(self, timeout: float) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout=timeout)

    def _serve(self, now: float) -> bool:
        """Start the poll of whichever tenant the pool serves next; False when none may."""
        tid = self.pool.next()
        if tid is None:
            return False
        t = self.tenants.get(tid)
        if t is None or t.removed:
            return True
        ready = t.ready_time()
        if ready is None or ready > now:
            self._arm(t)  # changed since it queued up: back to the heap
            return True
        fs = t.heap[0][2]
        # Removed and paused feeds leave the tenant's heap without costing a request token.
        if fs.removed or fs.paused is not None:
            heapq.heappop(t.heap)
            if fs.removed:
                self._arm(t)
            else:
                # Backpressure: look again a little later; the cursor stays where it is.
                self._push(fs, now + PAUSED_RECHECK_S)
            return True
        wait = t.bucket.try_acquire(now)
        if wait > 0:
            t.next_token = now + wait
            self._arm(t)
            return True
        heapq.heappop(t.heap)
        self.pool.started(t.id)
        t.inflight += 1
        fs.running = True
        self._active.add(fs)
        self._arm(t)
        if self.metrics is not None:
            self.metrics.lateness(now - fs.due)
        assert self._tasks is not None
        self._tasks.start_soon(self._run_poll, fs)
        return True

    async def _run_poll(self, fs: FeedState) -> None:
        t = fs.tenant
        try:
            await self._poll(fs)
        except Exception:
            # A bug in one poll must not end the others; the feed backs off.
            log.exception("poll_crashed", tenant=t.id, feed=fs.name)
            self._after(fs, Outcome("error"), error="internal error (see log)")
        finally:
            fs.running = False
            self._active.discard(fs)
            self.pool.finished(t.id)
            t.inflight -= 1
            self._arm(t)
            self._wake.set()
            self._changed.set()
            self._check_once()

    # -- one poll ----------------------------------------------------------------------

    async def _poll(self, fs: FeedState) -> None:
        t = fs.tenant
        flog = log.bind(tenant=t.id, feed=fs.name)
        expected = fs.cursor
        sent = expected if expected is not None else t.settings.start
        fetched = False
        try:
            page = await self.client.fetch(
                t.tokens, fs.feed, sent, include_recent_changes=t.settings.include_recent_changes
            )
            fetched = True
            stall = page_progress(sent, page.has_more, page.fetched, page.continue_from)
            if stall is not None:
                # Not applied: nothing to resume from, or a cursor that would be asked again.
                self._no_progress(fs, stall, flog)
                return
            applied = await self.publisher.apply(
                t.id, fs.name, expected, page, change_detection=fs.change_detection
            )
        except RateLimited as exc:
            now = self.clock()
            t.paused_until, wait = rate_limit_pause(
                t.paused_until, now, exc.retry_after, fs.failures, self.rules, self.rng
            )
            if exc.where == "api":
                t.bucket.throttled(now)
            self._arm(t)
            flog.warning("rate_limited", retry_after_s=exc.retry_after, where=exc.where)
            if self.metrics is not None:
                self.metrics.rate_limited(t.id, wait)
            self._after(fs, Outcome("rate_limited", wait), error=str(exc))
            return
        except FeedUnavailable as exc:
            flog.error("feed_parked", status=exc.status, detail=exc.detail, retry_in_s=PARK_S)
            self._after(fs, Outcome("parked"), error=str(exc))
            return
        except AuthFailed as exc:
            flog.error("auth_failed", error=str(exc))
            self._after(fs, Outcome("auth"), error=str(exc))
            return
        except BadRequest as exc:
            flog.error("bad_request", errors=exc.detail, cursor_set=expected is not None)
            self._after(fs, Outcome("error"), error=str(exc))
            return
        except RedisFull as exc:
            if not self.memory_full:
                flog.warning("backpressure_memory", error=str(exc))
            self.memory_full = True
            self._after(fs, Outcome("memory"))
            return
        except TransientError as exc:
            if fetched:
                self._redis_trouble(str(exc))
            flog.warning("poll_failed", error=str(exc), failures=fs.failures + 1)
            self._after(fs, Outcome("error"), error=str(exc))
            return
        self.last_progress = time.monotonic()
        self.pages += 1
        if not applied.applied:
            # Another instance (or a restarted Redis) holds a different cursor: adopt it.
            flog.info("cursor_moved", stored=applied.stored is not None)
            fs.cursor = applied.stored
            self._after(fs, Outcome("refused"))
            return
        fs.cursor = page.continue_from
        fs.last_ok = time.time()
        records = page.fetched
        if self.metrics is not None:
            self.metrics.page(
                t.id, fs.name, records, applied.published, applied.unchanged, page.fetch_s
            )
            if applied.dead:
                self.metrics.dead_letter(t.id, fs.name, applied.dead)
        if applied.dead:
            flog.warning("records_dead_lettered", records=applied.dead)
        if records or applied.published:
            flog.debug(
                "page_applied",
                records=records,
                published=applied.published,
                unchanged=applied.unchanged,
                has_more=page.has_more,
                fetch_s=round(page.fetch_s, 3),
            )
        decision = self._after(fs, Outcome("more" if page.has_more else "page"))
        if decision.episode == "ended":
            flog.info("feed_progress_resumed")
        if decision.newly_drained:
            flog.info("feed_drained")

    def _no_progress(self, fs: FeedState, stall: NoProgress, flog: structlog.BoundLogger) -> None:
        what = "no continueFrom" if stall.cursor_missing else "the same continueFrom"
        error = f"no progress: hasMore {str(stall.has_more).lower()}, {what}"
        decision = self._after(fs, Outcome("no_progress"), error=error)
        if decision.episode == "started":
            flog.warning(
                "feed_no_progress",
                has_more=stall.has_more,
                records=stall.records,
                cursor_repeated=stall.cursor_repeated,
                cursor_missing=stall.cursor_missing,
                retry_in_s=None if decision.due is None else round(decision.due - self.clock(), 3),
            )

    def _after(self, fs: FeedState, outcome: Outcome, *, error: str | None = None) -> AfterPoll:
        """Apply a poll's outcome to its feed (syncd.policy decides) and reschedule it."""
        facts = FeedFacts(fs.failures, fs.drained, fs.stuck, fs.poll_interval)
        d = after_poll(facts, outcome, self.clock(), self.rules, self.rng)
        fs.failures, fs.drained, fs.stuck = d.failures, d.drained, d.stuck
        if d.failed:
            fs.failed = True
        if d.error and error is not None:
            fs.last_error = error = redact(error)  # stored in Redis, shown by `status`
            self._spawn(self._record_error, fs.tenant.id, fs.name, error)
        if d.due is not None and not (fs.removed or fs.tenant.removed):
            self._push(fs, d.due)
        return d

    async def _record_error(self, tenant: int, feed: str, error: str) -> None:
        try:
            await self.publisher.record_error(tenant, feed, error)
        except Exception as exc:  # best effort: the log has the error already
            log.debug("record_error_failed", error=type(exc).__name__)

    def _spawn(self, fn: Callable[..., object], *args: object) -> None:
        if self._tasks is not None:
            self._tasks.start_soon(fn, *args)  # type: ignore[arg-type]

    def _check_once(self) -> None:
        if not self.once:
            return
        feeds = (
            (fs.drained, fs.failed, fs.running)
            for t in self.tenants.values()
            for fs in t.feeds.values()
        )
        if once_finished(feeds) and not self._active:
            self.stop()

    @property
    def failed_feeds(self) -> list[FeedState]:
        return [fs for t in self.tenants.values() for fs in t.feeds.values() if fs.failed]

    def set_memory_full(self, full: bool) -> None:
        """Pause (or resume) all polling for Redis memory."""
        self.memory_full = full
        self._wake.set()

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


__all__ = [
    "FeedState",
    "Outcome",
    "Scheduler",
    "SyncError",
    "TenantState",
    "next_due",
    "resume_delay",
]
