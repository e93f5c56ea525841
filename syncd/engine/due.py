"""What is due next: every tenant's feeds on two levels of due-time heaps, pure.

Each tenant orders its idle feeds by due time; a global heap orders tenants by the time they
can next send a request (earliest due feed, rate limiter, 429 pause). Hundreds of thousands of
feeds cost heap entries, not tasks. The clock is an argument: the scheduler passes `now` in
and gets back which feed to poll; tested without sockets in tests/test_scheduler_due.py.
"""

from __future__ import annotations

import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from syncd.catalogue import Feed
from syncd.config import TenantSettings
from syncd.engine.policy import first_delay
from syncd.engine.ratelimit import TokenBucket, default_burst

if TYPE_CHECKING:
    from syncd.servicetitan.auth import TokenProvider

# A feed paused by backpressure is looked at again this much later.
PAUSED_RECHECK_S = 1.0

FeedSpec = tuple[Feed, str | None, bool, float]  # feed, stored cursor, change detection, interval


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
    # Cursors this run of `hasMore: true` pages asked with, and its empty pages in a row.
    trail: tuple[str, ...] = ()
    empty_run: int = 0
    failed: bool = False  # --once gave up on it
    removed: bool = False
    running: bool = False
    paused: str | None = None  # backpressure: why this feed is not polled now
    last_ok: float | None = None  # unix time of the last applied page
    # `cursor` is known to be held by `[redis] wait_replicas` replicas (ignored without them):
    # until then the feed's next poll settles it instead of fetching past it.
    settled: bool = False
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
    tokens: TokenProvider = field(repr=False)  # carried for the poll, never used here
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


class Timetable:
    """Every scheduled tenant and feed, and when each can go next."""

    def __init__(
        self,
        *,
        once: bool = False,
        rng: random.Random | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.once = once
        self.rng = rng or random.Random()
        self.tenants: dict[int, TenantState] = {}
        self._ready: list[tuple[float, int, TenantState, int]] = []
        self._seq = itertools.count()
        # Told whenever a tenant enters the global heap: it may be due before the dispatcher
        # meant to look again.
        self._on_ready = on_ready

    # -- tenants and feeds ---------------------------------------------------------------

    def add_tenant(
        self,
        settings: TenantSettings,
        tokens: TokenProvider,
        feeds: Iterable[FeedSpec],
        now: float,
        delays: Mapping[str, float] | None = None,
    ) -> TenantState:
        """Schedule a tenant's feeds; `delays` says how long after now each is first due."""
        rate = settings.requests_per_second
        t = TenantState(settings, tokens, TokenBucket(rate, burst=default_burst(rate)))
        self.tenants[settings.id] = t
        for feed, cursor, detect, interval in feeds:
            fs = FeedState(t, feed, cursor, detect, interval)
            t.feeds[feed.name] = fs
            stored = delays.get(feed.name) if delays is not None else None
            delay = first_delay(cursor is not None, self.once, stored, interval, self.rng)
            self.push(fs, now + delay)
        return t

    def reconfigure_tenant(
        self, settings: TenantSettings, feeds: Iterable[FeedSpec], now: float
    ) -> tuple[list[str], list[str]]:
        """New settings and feed list; (added, removed) feed names. Polls under way finish;
        a removed feed is simply not scheduled again."""
        t = self.tenants[settings.id]
        t.settings = settings
        rate = settings.requests_per_second
        t.bucket.set_rate(rate, burst=default_burst(rate))
        wanted = {spec[0].name: spec for spec in feeds}
        removed = [name for name in t.feeds if name not in wanted]
        for name in removed:
            t.feeds.pop(name).removed = True
        added = []
        for name, (feed, cursor, detect, interval) in wanted.items():
            fs = t.feeds.get(name)
            if fs is None:
                fs = FeedState(t, feed, cursor, detect, interval)
                t.feeds[name] = fs
                added.append(name)
                self.push(fs, now)
            else:
                fs.change_detection, fs.poll_interval = detect, interval
        self.arm(t)
        return added, removed

    def retry_now(self, tenant: int, which: Callable[[FeedState], bool], now: float) -> None:
        """Make a tenant's idle feeds matching `which` due now."""
        t = self.tenants[tenant]
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
                    settled=fs.settled,
                    since=fs.since,
                )
                t.feeds[fs.name] = fresh  # ... and schedule its replacement now
                self.push(fresh, now)

    def remove_tenant(self, tenant: int) -> TenantState:
        """Stop scheduling a tenant; its polls under way finish."""
        t = self.tenants.pop(tenant)
        t.removed = True
        for fs in t.feeds.values():
            fs.removed = True
        return t

    def feeds(self) -> Iterator[FeedState]:
        for t in self.tenants.values():
            yield from t.feeds.values()

    # -- due times -----------------------------------------------------------------------

    def push(self, fs: FeedState, due: float) -> None:
        """The feed is due at `due`."""
        fs.due = due
        heapq.heappush(fs.tenant.heap, (due, next(self._seq), fs))
        self.arm(fs.tenant)

    def arm(self, t: TenantState) -> None:
        """(Re)enter a tenant in the global heap at its current ready time."""
        t.version += 1
        ready = t.ready_time()
        if ready is not None and not t.removed:
            heapq.heappush(self._ready, (ready, next(self._seq), t, t.version))
            if self._on_ready is not None:
                self._on_ready()

    def pop_ready(self, now: float) -> list[int]:
        """Tenants whose ready time has come, in that order (each leaves the global heap)."""
        out = []
        while self._ready and self._ready[0][0] <= now:
            _, _, t, version = heapq.heappop(self._ready)
            if version == t.version and not t.removed:
                out.append(t.id)
        return out

    def next_ready(self) -> float | None:
        """The earliest time a tenant may become ready (stale entries included: a hint)."""
        return self._ready[0][0] if self._ready else None

    def take(self, tenant: int, now: float) -> FeedState | None:
        """The feed of `tenant` to poll now (out of its heap, marked running), or None.

        None when the tenant is gone or no longer ready (it goes back to the global heap), when
        its next feed was removed (dropped) or is paused by backpressure (looked at again a
        little later), or when its rate limiter has no token yet (back until it has one).
        """
        t = self.tenants.get(tenant)
        if t is None or t.removed:
            return None
        ready = t.ready_time()
        if ready is None or ready > now:
            self.arm(t)
            return None
        fs = t.heap[0][2]
        # Removed and paused feeds leave the tenant's heap without costing a request token.
        if fs.removed or fs.paused is not None:
            heapq.heappop(t.heap)
            if fs.removed:
                self.arm(t)
            else:
                self.push(fs, now + PAUSED_RECHECK_S)
            return None
        wait = t.bucket.try_acquire(now)
        if wait > 0:
            t.next_token = now + wait
            self.arm(t)
            return None
        heapq.heappop(t.heap)
        t.inflight += 1
        fs.running = True
        self.arm(t)
        return fs

    def done(self, fs: FeedState) -> None:
        """A poll of `fs` ended (whatever became of the feed)."""
        fs.running = False
        fs.tenant.inflight -= 1
        self.arm(fs.tenant)
        current = self.tenants.get(fs.tenant.id)
        if current is not None and current is not fs.tenant:
            # The tenant was removed and added again while this poll ran: the new one's requests
            # in flight (counted by the pool) include this one, which may have held it back.
            self.arm(current)
