"""The scheduler: which feed to poll next, under each tenant's limits, with a bounded pool.

Two levels of due-time heaps: each tenant orders its idle feeds by due time; a global heap
orders tenants by the time they can next send a request (earliest due feed, rate limiter,
429 pause). A single dispatcher hands ready feeds to a fixed pool of workers, so hundreds of
thousands of feeds cost heap entries, not tasks, and one tenant's backlog or 429 storm never
holds a worker that another tenant could use.
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
from syncd.metrics import Metrics
from syncd.publisher import Publisher
from syncd.ratelimit import (
    PARK_S,
    STARTUP_SPREAD_S,
    Outcome,
    TokenBucket,
    backoff,
    default_burst,
    next_due,
    resume_delay,
)
from syncd.redact import redact

log = structlog.get_logger("syncd.scheduler")

PAUSED_RECHECK_S = 1.0


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
    inflight: int = 0
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
        self.once_max_failures = once_max_failures
        self.backoff_base, self.backoff_max, self.jitter = backoff_base, backoff_max, jitter
        self.metrics = metrics
        self.clock = clock
        self.rng = rng or random.Random()
        self.tenants: dict[int, TenantState] = {}
        self._ready: list[tuple[float, int, TenantState, int]] = []
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue[FeedState] = asyncio.Queue(maxsize=1)
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.redis_ok = asyncio.Event()
        self.redis_ok.set()
        # Redis memory near maxmemory (or an OOM answer): nothing is polled until it has room.
        self.memory_full = False
        self.crashed = False
        self._active: set[FeedState] = set()
        self._probe: asyncio.Task[None] | None = None
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
        now = self.clock()
        for feed, cursor, detect, interval in feeds:
            fs = FeedState(t, feed, cursor, detect, interval)
            t.feeds[feed.name] = fs
            # New feeds backfill at once; resumed ones spread out so that a restart of a
            # daemon with many drained feeds does not fire them all in the same second.
            if cursor is None or self.once:
                delay = 0.0
            elif delays is not None and feed.name in delays:
                delay = delays[feed.name]
            else:
                delay = self.rng.uniform(0, min(interval, STARTUP_SPREAD_S))
            self._push(fs, now + delay)
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
        for fs in t.feeds.values():
            fs.removed = True
        if self.metrics is not None:
            self.metrics.forget_tenant(tenant)

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

    # -- the loops ---------------------------------------------------------------------

    async def run(self, grace: float = 30.0) -> None:
        """Dispatch until stop() (or, with once=True, until every feed drained or failed);
        then let running polls finish for up to `grace` seconds (or until force())."""
        workers = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        dispatcher = asyncio.create_task(self._dispatch())
        for task in (dispatcher, *workers):
            task.add_done_callback(self._task_ended)
        self._check_once()
        try:
            await self._stopping.wait()
            dispatcher.cancel()
            await asyncio.gather(dispatcher, return_exceptions=True)
            if not await self.drain(grace):
                log.warning("shutdown_grace_expired", grace_s=grace)
        finally:
            dispatcher.cancel()
            for w in workers:
                w.cancel()
            await asyncio.gather(dispatcher, *workers, return_exceptions=True)
            if self._probe is not None:
                self._probe.cancel()

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        """A dispatcher or worker must never end on its own: if one does, stop everything."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("scheduler_task_crashed", error=f"{type(exc).__name__}: {exc}")
            self.crashed = True
            self.force()

    def stop(self) -> None:
        """Stop taking new work; polls under way may finish (see run())."""
        self._stopping.set()

    def force(self) -> None:
        """Stop waiting for polls under way: the next step cancels them."""
        self._stopping.set()
        self._forced.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def running_polls(self) -> int:
        """Polls under way, including those of feeds or tenants removed meanwhile."""
        return len(self._active)

    async def drain(self, grace: float) -> bool:
        """Wait up to `grace` seconds for running polls to finish; True if they did."""
        deadline = time.monotonic() + grace
        while self.running_polls():
            if self._forced.is_set() or time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def _dispatch(self) -> None:
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()
            if not self.redis_ok.is_set() or self.memory_full:
                # Waiting on Redis is not being stuck: keep ticking for the watchdog.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                self._wake.clear()
                continue
            now = self.clock()
            if not self._ready or self._ready[0][0] > now:
                timeout = (self._ready[0][0] - now) if self._ready else 1.0
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=min(max(timeout, 0), 1.0))
                continue
            _, _, t, version = heapq.heappop(self._ready)
            if version != t.version or t.removed:
                continue
            # Removed and paused feeds leave the tenant's heap without costing a request token.
            fs = t.heap[0][2]
            if fs.removed or fs.paused is not None:
                heapq.heappop(t.heap)
                if fs.removed:
                    self._arm(t)
                else:
                    # Backpressure: look again a little later; the cursor stays where it is.
                    self._push(fs, now + PAUSED_RECHECK_S)
                continue
            wait = t.bucket.try_acquire(now)
            if wait > 0:
                t.next_token = now + wait
                self._arm(t)
                continue
            heapq.heappop(t.heap)
            t.inflight += 1
            fs.running = True
            self._active.add(fs)
            self._arm(t)
            if self.metrics is not None:
                self.metrics.lateness(now - fs.due)
            await self._hand_over(fs)

    async def _hand_over(self, fs: FeedState) -> None:
        """Queue a feed for the workers; while they are all busy (slow API), keep ticking."""
        try:
            while True:
                try:
                    await asyncio.wait_for(self._queue.put(fs), timeout=1.0)
                    return
                except TimeoutError:
                    self.last_progress = time.monotonic()
        except asyncio.CancelledError:
            # Shutdown while waiting: the feed was never polled.
            fs.running = False
            self._active.discard(fs)
            fs.tenant.inflight -= 1
            raise

    async def _worker(self) -> None:
        while True:
            fs = await self._queue.get()
            if self._stopping.is_set() or fs.removed or fs.tenant.removed:
                # Handed over just before shutdown or removal: not started, so not polled.
                fs.running = False
                self._active.discard(fs)
                fs.tenant.inflight -= 1
                self._arm(fs.tenant)
                self._check_once()
                continue
            try:
                await self._poll(fs)
            except Exception:
                # A bug in one poll must not kill the worker; the feed backs off.
                log.exception("poll_crashed", tenant=fs.tenant.id, feed=fs.name)
                self._after(fs, Outcome("error"), error="internal error (see log)")

    async def _poll(self, fs: FeedState) -> None:
        t = fs.tenant
        flog = log.bind(tenant=t.id, feed=fs.name)
        expected = fs.cursor
        released = False
        try:
            page = await self.client.fetch(
                t.tokens,
                fs.feed,
                expected if expected is not None else t.settings.start,
                include_recent_changes=t.settings.include_recent_changes,
            )
            t.inflight -= 1
            released = True
            self._arm(t)
            applied = await self.publisher.apply(
                t.id, fs.name, expected, page, change_detection=fs.change_detection
            )
        except RateLimited as exc:
            now = self.clock()
            wait = exc.retry_after
            if wait is None or wait <= 0:
                # No usable wait announced: back off rather than retry at full speed.
                wait = backoff(
                    fs.failures + 1,
                    base=self.backoff_base,
                    cap=self.backoff_max,
                    jitter=self.jitter,
                    rng=self.rng,
                )
            t.paused_until = max(t.paused_until, now + wait)
            if exc.where == "api":
                t.bucket.throttled(now)
            self._arm(t)
            flog.warning("rate_limited", retry_after_s=exc.retry_after, where=exc.where)
            if self.metrics is not None:
                self.metrics.rate_limited(t.id, wait)
            # Other apps may share the tenant's budget: 429s alone never fail a --once run.
            self._after(fs, Outcome("rate_limited", wait), error=str(exc), counts=False)
            return
        except FeedUnavailable as exc:
            flog.error("feed_parked", status=exc.status, detail=exc.detail, retry_in_s=PARK_S)
            self._after(fs, Outcome("parked"), error=str(exc), fatal=True)
            return
        except AuthFailed as exc:
            flog.error("auth_failed", error=str(exc))
            self._after(fs, Outcome("auth"), error=str(exc), fatal=True)
            return
        except BadRequest as exc:
            flog.error("bad_request", errors=exc.detail, cursor_set=expected is not None)
            self._after(fs, Outcome("error"), error=str(exc))
            return
        except RedisFull as exc:
            if not self.memory_full:
                flog.warning("backpressure_memory", error=str(exc))
            self.memory_full = True
            self._after(fs, Outcome("refused"))
            return
        except TransientError as exc:
            if released:
                self._redis_trouble(str(exc))
            flog.warning("poll_failed", error=str(exc), failures=fs.failures + 1)
            self._after(fs, Outcome("error"), error=str(exc))
            return
        finally:
            if not released:
                t.inflight -= 1
                self._arm(t)
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
        fetched = page.fetched
        if self.metrics is not None:
            self.metrics.page(
                t.id, fs.name, fetched, applied.published, applied.unchanged, page.fetch_s
            )
            if applied.dead:
                self.metrics.dead_letter(t.id, fs.name, applied.dead)
            if applied.stale:
                self.metrics.stale_records(t.id, fs.name, applied.stale)
        if applied.dead:
            flog.warning("records_dead_lettered", records=applied.dead)
        if fetched or applied.published:
            flog.debug(
                "page_applied",
                records=fetched,
                published=applied.published,
                unchanged=applied.unchanged,
                has_more=page.has_more,
                fetch_s=round(page.fetch_s, 3),
            )
        if not page.has_more and not fs.drained:
            fs.drained = True
            flog.info("feed_drained")
        self._after(fs, Outcome("more" if page.has_more else "page"))

    def _after(
        self,
        fs: FeedState,
        outcome: Outcome,
        *,
        error: str | None = None,
        fatal: bool = False,
        counts: bool = True,
    ) -> None:
        """Reschedule a feed after a poll, or retire it (--once, removed)."""
        fs.running = False
        self._active.discard(fs)
        if error is None:
            fs.failures = 0
        else:
            fs.failures += 1
            fs.last_error = error = redact(error)  # stored in Redis, shown by `status`
            if self.once and counts and (fatal or fs.failures >= self.once_max_failures):
                fs.failed = True
            task = asyncio.get_running_loop().create_task(
                self.publisher.record_error(fs.tenant.id, fs.name, error)
            )
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        if fs.removed or fs.tenant.removed or fs.failed:
            self._check_once()
            return
        if self.once and fs.drained:
            self._check_once()
            return
        due = next_due(
            outcome,
            self.clock(),
            poll_interval=fs.poll_interval,
            failures=fs.failures,
            backoff_base=self.backoff_base,
            backoff_max=self.backoff_max,
            jitter=self.jitter,
            rng=self.rng,
        )
        self._push(fs, due)

    def _check_once(self) -> None:
        if not self.once:
            return
        for t in self.tenants.values():
            for fs in t.feeds.values():
                if not (fs.drained or fs.failed) or fs.running:
                    return
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
        self._probe = asyncio.get_running_loop().create_task(self._probe_redis())

    async def _probe_redis(self) -> None:
        delay = 0.2
        while True:
            try:
                if await self.publisher.ping():
                    break
            except Exception as exc:
                log.debug("redis_probe_failed", error=type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
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
