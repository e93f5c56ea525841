"""Fetching a feed's next page while its page is applied.

A page answered with `hasMore: true` names the cursor of the next one: that page can be fetched,
checked and decoded while Redis applies this one, so that the daemon's work and Redis's overlap
within one feed (a backfill of a single big feed otherwise alternates between them). Nothing
about the fence changes: the page fetched ahead is applied by the feed's next poll, and only if
that poll asks for exactly the cursor it was fetched from (the page before it was applied);
otherwise it is dropped unread. A page fetched ahead costs the request token its poll would
have taken (given back when the poll uses it) and holds a worker while it is fetched.

`may_fetch_ahead` decides (a pure function, tested by a table); `FetchAhead` holds the pages
fetched ahead, at most `AHEAD_MAX` at once across every tenant (each one page of memory);
`FetchingAhead`, a part of the Scheduler (one of its bases), starts them.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from syncd.engine.due import FeedState, Timetable
from syncd.engine.fairshare import Pool
from syncd.engine.publisher import Publisher
from syncd.errors import RateLimited
from syncd.servicetitan.client import ExportClient
from syncd.servicetitan.page import Page

log = structlog.get_logger("syncd.scheduler")

# Pages fetched ahead at once, across every tenant: each is held (its bytes, its records) until
# its feed's next poll takes it.
AHEAD_MAX = 4
# How long a shutdown waits for the fetches ahead it cancelled to end.
CLOSE_WITHIN_S = 5.0


@dataclass(frozen=True, slots=True)
class AheadFacts:
    """What `may_fetch_ahead` looks at, once a page was fetched and before it is applied."""

    has_more: bool
    next_cursor: str  # the page's continueFrom ("" when it gave none)
    replicas_waited: bool  # `[redis] wait_replicas`: nothing is fetched past a settled cursor
    stopping: bool
    held: bool  # polling is held (Redis unreachable or full, replicas behind)
    tenant_paused: bool  # a 429's wait is not over
    feed_paused: bool  # removed, or held back by backpressure
    outstanding: int  # pages fetched ahead and not taken yet
    # The pool lets the tenant have a worker now (below max_in_flight, its share or what it
    # may borrow, no other tenant waiting for one).
    worker_spare: bool


def may_fetch_ahead(f: AheadFacts, limit: int = AHEAD_MAX) -> bool:
    """Whether to fetch the next page now (a token permitting, which is taken last)."""
    return (
        f.has_more
        and f.next_cursor != ""
        and not f.replicas_waited
        and not f.stopping
        and not f.held
        and not f.tenant_paused
        and not f.feed_paused
        and f.outstanding < limit
        and f.worker_spare
    )


@dataclass(slots=True)
class _Ahead:
    cursor: str
    task: asyncio.Task[Page | None]


class FetchAhead:
    """The pages fetched ahead, one at most per feed."""

    def __init__(self) -> None:
        self._pages: dict[FeedState, _Ahead] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def start(
        self,
        fs: FeedState,
        cursor: str,
        fetch: Callable[[], Awaitable[Page | None]],
        ended: Callable[[], None],
    ) -> None:
        """Fetch `fs`'s page after `cursor` now (`fetch`: None when it failed, and the poll
        fetches it itself), for its next poll; `ended` is called once the fetch is over, whatever
        became of it (cancelled before it began too)."""
        self.drop(fs)

        done = False

        def end() -> None:
            nonlocal done
            if not done:
                done = True
                ended()

        async def run() -> Page | None:
            try:
                return await fetch()
            finally:
                # At once, not in a callback of the task's: a poll taking the page may run
                # before those, and must find the worker back already.
                end()

        task = asyncio.ensure_future(run())
        task.add_done_callback(lambda finished: _ended(finished, end))  # cancelled unstarted
        self._pages[fs] = _Ahead(cursor, task)

    def take(self, fs: FeedState, cursor: str | None) -> asyncio.Task[Page | None] | None:
        """The page fetched ahead for `fs` if it was fetched from `cursor`, else None (and
        whatever was fetched ahead from another cursor is dropped)."""
        ahead = self._pages.pop(fs, None)
        if ahead is None:
            return None
        if ahead.cursor != cursor:
            ahead.task.cancel()
            return None
        return ahead.task

    def drop_unless(self, fs: FeedState, cursor: str | None) -> None:
        """Once a poll of `fs` ended: drop its page fetched ahead unless it is the one after
        `cursor` (None: in any case). A page that will not be applied holds no memory, nor a
        place among the AHEAD_MAX."""
        ahead = self._pages.get(fs)
        if ahead is not None and ahead.cursor != cursor:
            self.drop(fs)

    def drop(self, fs: FeedState) -> None:
        ahead = self._pages.pop(fs, None)
        if ahead is not None:
            ahead.task.cancel()

    def forget_tenant(self, tenant: int) -> None:
        """Drop the pages of a tenant removed or reconfigured (its credentials, its feeds, its
        `include_recent_changes` may have changed since they were fetched)."""
        for fs in [fs for fs in self._pages if fs.tenant.id == tenant]:
            self.drop(fs)

    async def close(self) -> None:
        """Cancel every fetch under way and drop every page held."""
        tasks = [ahead.task for ahead in self._pages.values()]
        self._pages.clear()
        for task in tasks:
            task.cancel()
        if tasks:  # bounded: a cancellation lost inside a request must not hold a shutdown
            await asyncio.wait(tasks, timeout=CLOSE_WITHIN_S)


def _ended(task: asyncio.Task[Page | None], ended: Callable[[], None]) -> None:
    # Dropped unread, its failure is nobody's: retrieved here, not reported as lost.
    if not task.cancelled():
        task.exception()
    ended()


class FetchingAhead(abc.ABC):
    """The scheduler's pages fetched ahead: when one starts, what its end gives back."""

    # Provided by the Scheduler.
    client: ExportClient
    publisher: Publisher
    timetable: Timetable
    pool: Pool
    clock: Callable[[], float]
    _ahead: FetchAhead
    _wake: asyncio.Event

    @property
    @abc.abstractmethod
    def stopping(self) -> bool:
        """Whether the scheduler stops taking new work: the Scheduler defines it."""

    @property
    @abc.abstractmethod
    def held(self) -> bool:
        """Whether all polling is held: `Holds` defines it."""

    @abc.abstractmethod
    def _rate_limited(self, fs: FeedState, exc: RateLimited, flog: structlog.BoundLogger) -> float:
        """Pause the feed's tenant after a 429: the Scheduler defines it."""

    def _fetch(self, fs: FeedState, cursor: str | None) -> Awaitable[Page]:
        t = fs.tenant
        return self.client.fetch(
            t.tokens, fs.feed, cursor, include_recent_changes=t.settings.include_recent_changes
        )

    def _fetch_ahead(self, fs: FeedState, page: Page) -> None:
        """Fetch the page after `page` while `page` is applied, when that may be done now."""
        t = fs.tenant
        facts = AheadFacts(
            has_more=page.has_more,
            next_cursor=page.continue_from,
            replicas_waited=self.publisher.waits,
            stopping=self.stopping,
            held=self.held,
            tenant_paused=t.paused_until > self.clock(),
            feed_paused=fs.removed or t.removed or fs.paused is not None,
            outstanding=len(self._ahead),
            worker_spare=self.pool.spare_for(t.id),
        )
        if not may_fetch_ahead(facts) or t.bucket.try_acquire(self.clock()) > 0:
            return
        cursor = page.continue_from
        self.pool.started(t.id)

        async def fetch() -> Page | None:
            try:
                return await self._fetch(fs, cursor)
            except RateLimited as exc:
                # The tenant waits now, whatever becomes of the page.
                self._rate_limited(fs, exc, log.bind(tenant=t.id, feed=fs.name))
                return None
            except Exception:
                return None  # the poll asks again, and meets what failed itself

        def ended() -> None:
            self.pool.finished(t.id)
            # The worker is free again: the tenant (the one now, if it was added again) may be
            # ready for a poll the pool held back meanwhile.
            current = self.timetable.tenants.get(t.id)
            if current is not None:
                self.timetable.arm(current)
            self._wake.set()

        self._ahead.start(fs, cursor, fetch, ended)
