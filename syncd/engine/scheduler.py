"""The scheduler: polls every feed of every tenant through a bounded pool of workers.

The I/O shell around three pure parts: `due` (what is due next), `fairshare` (whose
poll takes the next free worker) and syncd.engine.policy (what a poll's outcome does to its feed and
tenant). A single dispatcher moves tenants whose time has come into the pool's queue and starts
each poll the pool allows as a task of one task group; it never waits on a tenant: with no
worker free, it waits for one to come back; while polling is held (syncd.engine.holds: Redis
unreachable or full, replicas behind) it starts nothing. Shutdown stops the dispatcher, gives
running polls a grace period, then cancels the task group.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterable, Mapping

import anyio
import anyio.abc
import structlog

from syncd.config import TenantSettings
from syncd.engine.ahead import FetchAhead, FetchingAhead
from syncd.engine.due import FeedSpec, FeedState, TenantState, Timetable
from syncd.engine.fairshare import Pool
from syncd.engine.holds import Holds
from syncd.engine.policy import (
    PARK_S,
    AfterPoll,
    FeedFacts,
    NoProgress,
    Outcome,
    Rules,
    after_poll,
    follow,
    next_due,
    once_finished,
    page_progress,
    rate_limit_pause,
    resume_delay,
    settle_first,
)
from syncd.engine.publisher import Publisher
from syncd.errors import (
    AuthFailed,
    BadRequest,
    FeedUnavailable,
    RateLimited,
    RedisFull,
    ReplicasBehind,
    SyncError,
    TransientError,
)
from syncd.ops.metrics import Metrics
from syncd.redact import redact
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.client import ExportClient

log = structlog.get_logger("syncd.scheduler")

# The dispatcher wakes at least this often, so that the watchdog sees it alive.
TICK_S = 1.0


class Scheduler(Holds, FetchingAhead):
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
        self._wake = asyncio.Event()
        self.timetable = Timetable(once=once, rng=self.rng, on_ready=self._wake.set)
        self.pool = Pool(workers)
        self._changed = asyncio.Event()  # a poll ended, or force(): drain() looks again
        self._stopping = asyncio.Event()
        self._forced = asyncio.Event()
        self._tasks: anyio.abc.TaskGroup | None = None
        self._init_holds()
        self.crashed = False
        self._active: set[FeedState] = set()
        self._ahead = FetchAhead()
        self.last_progress = time.monotonic()
        self.pages = 0

    # -- tenants and feeds -------------------------------------------------------------

    @property
    def tenants(self) -> dict[int, TenantState]:
        return self.timetable.tenants

    def add_tenant(
        self,
        settings: TenantSettings,
        tokens: TokenProvider,
        feeds: Iterable[FeedSpec],
        delays: Mapping[str, float] | None = None,
    ) -> TenantState:
        """Start scheduling a tenant: feeds as (feed, stored cursor, change detection, interval);
        `delays` says how long after now a feed is first due (see resume_delay)."""
        self.pool.add(settings.id, settings.max_in_flight)
        t = self.timetable.add_tenant(settings, tokens, feeds, self.clock(), delays)
        self._wake.set()
        return t

    def reconfigure_tenant(
        self, settings: TenantSettings, feeds: Iterable[FeedSpec]
    ) -> tuple[list[str], list[str]]:
        """Apply a tenant's new settings and feed list; returns (added, removed) feed names."""
        self.pool.add(settings.id, settings.max_in_flight)
        changes = self.timetable.reconfigure_tenant(settings, feeds, self.clock())
        self._ahead.forget_tenant(settings.id)
        self._wake.set()
        return changes

    def retry_now(self, tenant: int, which: Callable[[FeedState], bool]) -> None:
        """Make a tenant's idle feeds matching `which` due now (e.g. after new credentials)."""
        self.timetable.retry_now(tenant, which, self.clock())
        self._wake.set()

    def remove_tenant(self, tenant: int) -> None:
        """Stop scheduling a tenant; its polls under way finish."""
        self.timetable.remove_tenant(tenant)
        self._ahead.forget_tenant(tenant)
        self.pool.remove(tenant)
        if self.metrics is not None:
            self.metrics.forget_tenant(tenant)
        self._wake.set()

    # -- the loop ----------------------------------------------------------------------

    async def run(self, grace: float = 30.0) -> None:
        """Dispatch until stop() (or, with once=True, until every feed drained or failed);
        then let running polls finish for up to `grace` seconds (or until force())."""
        self._check_once()
        try:
            async with anyio.create_task_group() as tasks:
                self._tasks = tasks
                await self._dispatch()
                if not await self.drain(grace):
                    log.warning("shutdown_grace_expired", grace_s=grace)
                # Polls still running (and the Redis probe) are cancelled here.
                tasks.cancel_scope.cancel()
        except Exception as exc:
            # Neither the dispatcher nor a poll may end on an error (polls catch their own): if
            # one does, the task group has cancelled the rest; the daemon exits with an error.
            while isinstance(exc, ExceptionGroup) and exc.exceptions:
                exc = exc.exceptions[0]
            log.error("scheduler_task_crashed", error=f"{type(exc).__name__}: {exc}")
            self.crashed = True
            self._stopping.set()
        finally:
            self._tasks = None
            await self._ahead.close()

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

    async def until_stopped(self) -> None:
        """Return once stop() (or force()) was called."""
        await self._stopping.wait()

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
        tt, pool = self.timetable, self.pool
        while not self._stopping.is_set():
            self.last_progress = time.monotonic()
            if self.held:
                # Waiting on Redis is not being stuck: keep ticking for the watchdog.
                await self._sleep(TICK_S / 2)
                continue
            now = self.clock()
            for tid in tt.pop_ready(now):
                pool.want(tid)
            chosen = pool.next()
            if chosen is not None:
                fs = tt.take(chosen, now)
                if fs is not None:
                    self._start(fs, now)
                    # Let the polls just started (and everything else) run before the next.
                    await asyncio.sleep(0)
                continue
            ready = tt.next_ready()
            await self._sleep(TICK_S if ready is None else min(max(ready - now, 0.0), TICK_S))

    async def _sleep(self, timeout: float) -> None:
        self._wake.clear()
        # Not asyncio.wait_for: on Python 3.11 it returns, swallowing a cancellation, when the
        # wake comes in the same step as the cancel (a poll ending as the daemon is cancelled).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    def _start(self, fs: FeedState, now: float) -> None:
        self.pool.started(fs.tenant.id)
        self._active.add(fs)
        if self.metrics is not None:
            self.metrics.lateness(now - fs.due)
        assert self._tasks is not None
        self._tasks.start_soon(self._run_poll, fs)

    async def _run_poll(self, fs: FeedState) -> None:
        try:
            await self._poll(fs)
        except Exception:
            # A bug in one poll must not end the others; the feed backs off.
            log.exception("poll_crashed", tenant=fs.tenant.id, feed=fs.name)
            try:
                self._after(fs, Outcome("error"), error="internal error (see log)")
            except Exception:
                # Even deciding what comes next failed: try the feed again after the longest
                # backoff rather than lose it or stop every other tenant with it.
                log.exception("poll_reschedule_failed", tenant=fs.tenant.id, feed=fs.name)
                if not (fs.removed or fs.tenant.removed):
                    self.timetable.push(fs, self.clock() + self.rules.backoff_max)
        finally:
            # A page fetched ahead goes on only after a poll that moved the feed to its cursor.
            self._ahead.drop_unless(fs, fs.cursor if fs.failures == 0 else None)
            self._active.discard(fs)
            self.pool.finished(fs.tenant.id)
            self.timetable.done(fs)
            self._wake.set()
            self._changed.set()
            self._check_once()

    # -- one poll ----------------------------------------------------------------------

    async def _poll(self, fs: FeedState) -> None:
        t = fs.tenant
        flog = log.bind(tenant=t.id, feed=fs.name)
        at_redis = False  # a TransientError now is Redis' (else the API's)
        try:
            if settle_first(self.publisher.waits, fs.settled):
                # Nothing past the stored cursor is fetched before replicas hold it.
                at_redis = True
                stored = await self.publisher.settle(t.id, fs.name)
                if stored != fs.cursor:
                    # The page whose WAIT failed, or another instance's: adopted now.
                    fs.cursor = stored
                    fs.trail, fs.empty_run = (), 0
                fs.settled, at_redis = True, False
            expected = fs.cursor
            sent = expected if expected is not None else t.settings.start
            task = self._ahead.take(fs, sent)
            ahead = None if task is None else await task
            if ahead is not None:
                # Fetched while the page before was applied, on a token of its own.
                t.bucket.give_back(self.clock())
                page = ahead
            else:
                page = await self._fetch(fs, sent)
            at_redis = True
            stall = page_progress(sent, page.has_more, page.fetched, page.continue_from, fs.trail)
            if stall is not None:
                # Not applied: nothing to resume from, or a cursor that would be asked again.
                self._no_progress(fs, stall, flog)
                return
            self._fetch_ahead(fs, page)
            applied = await self.publisher.apply(
                t.id, fs.name, expected, page, change_detection=fs.change_detection
            )
        except RateLimited as exc:
            wait = self._rate_limited(fs, exc, flog)
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
        except ReplicasBehind as exc:
            # Applied on the primary perhaps, not done: the feed stays where replicas are known
            # to be and settles its stored cursor before it fetches again. Held, not failing:
            # the hold's probe decides when the replicas have had their chance (--once).
            fs.settled = False
            flog.warning("replicas_behind", acked=exc.acked, wanted=exc.wanted, error=str(exc))
            self._replicas_behind(fs)
            self._after(fs, Outcome("replicas"), error=str(exc))
            return
        except TransientError as exc:
            if at_redis:
                self._redis_trouble(str(exc))
            flog.warning("poll_failed", error=str(exc), failures=fs.failures + 1)
            self._after(fs, Outcome("error"), error=str(exc))
            return
        self.last_progress = time.monotonic()
        self.pages += 1
        # With wait_replicas, both answers are held by the replicas (see Publisher.apply).
        fs.settled = True
        if not applied.applied:
            # Another instance (or a restarted Redis) holds a different cursor: adopt it.
            flog.info("cursor_moved", stored=applied.stored is not None)
            fs.cursor = applied.stored
            fs.trail, fs.empty_run = (), 0
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
            if applied.stale:
                self.metrics.stale_records(t.id, fs.name, applied.stale)
        if applied.dead:
            flog.warning("records_dead_lettered", records=applied.dead)
        if records or applied.published:
            flog.debug(
                "page_applied",
                records=records,
                published=applied.published,
                unchanged=applied.unchanged,
                has_more=page.has_more,
                fetched_ahead=ahead is not None,
                fetch_s=round(page.fetch_s, 3),
            )
        fs.trail, fs.empty_run, endless = follow(
            fs.trail, fs.empty_run, sent, page.has_more, records
        )
        if endless is not None:
            # Applied (the cursor moved on), yet nothing came for too long: back off.
            self._no_progress(fs, endless, flog)
            return
        decision = self._after(fs, Outcome("more" if page.has_more else "page"))
        if decision.episode == "ended":
            flog.info("feed_progress_resumed")
        if decision.newly_drained:
            flog.info("feed_drained")

    def _rate_limited(self, fs: FeedState, exc: RateLimited, flog: structlog.BoundLogger) -> float:
        """A 429 (or Redis' BUSY) pauses the feed's tenant: the wait."""
        t = fs.tenant
        now = self.clock()
        t.paused_until, wait = rate_limit_pause(
            t.paused_until, now, exc.retry_after, fs.failures, self.rules, self.rng
        )
        if exc.where == "api":
            t.bucket.throttled(now)
        self.timetable.arm(t)
        flog.warning("rate_limited", retry_after_s=exc.retry_after, where=exc.where)
        if self.metrics is not None:
            self.metrics.rate_limited(t.id, wait)
        return wait

    def _no_progress(self, fs: FeedState, stall: NoProgress, flog: structlog.BoundLogger) -> None:
        if stall.empty_pages:
            what = f"{stall.empty_pages} pages in a row without a record"
        elif stall.cursor_missing:
            what = "no continueFrom"
        else:
            what = "a continueFrom asked with before"
        error = f"no progress: hasMore {str(stall.has_more).lower()}, {what}"
        decision = self._after(fs, Outcome("no_progress"), error=error)
        if decision.episode == "started":
            flog.warning(
                "feed_no_progress",
                has_more=stall.has_more,
                records=stall.records,
                cursor_repeated=stall.cursor_repeated,
                cursor_missing=stall.cursor_missing,
                empty_pages=stall.empty_pages,
                retry_in_s=None if decision.due is None else round(decision.due - self.clock(), 3),
            )

    def _after(self, fs: FeedState, outcome: Outcome, *, error: str | None = None) -> AfterPoll:
        """Apply a poll's outcome to its feed (syncd.engine.policy decides) and reschedule it."""
        facts = FeedFacts(fs.failures, fs.drained, fs.stuck, fs.poll_interval)
        d = after_poll(facts, outcome, self.clock(), self.rules, self.rng)
        fs.failures, fs.drained, fs.stuck = d.failures, d.drained, d.stuck
        if d.failed:
            fs.failed = True
        if d.error and error is not None:
            fs.last_error = error = redact(error)  # stored in Redis, shown by `status`
            self._spawn(self._record_error, fs.tenant.id, fs.name, error)
        if d.due is not None and not (fs.removed or fs.tenant.removed):
            self.timetable.push(fs, d.due)
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
        feeds = ((fs.drained, fs.failed, fs.running) for fs in self.timetable.feeds())
        if once_finished(feeds) and not self._active:
            self.stop()

    @property
    def failed_feeds(self) -> list[FeedState]:
        return [fs for fs in self.timetable.feeds() if fs.failed]


__all__ = [
    "FeedState",
    "Outcome",
    "Scheduler",
    "SyncError",
    "TenantState",
    "next_due",
    "resume_delay",
]
