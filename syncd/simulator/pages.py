"""Export pages: choose the entries, render the body once, reuse it while it is still right.

A cached page stays valid while no entry it covers has gone stale and, for a page that
reached the end of what was visible (`hasMore: false`), while that end has not moved. Both are
cheap to check on each hit, so warm pages are served as stored bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from syncd.simulator.cache import SizedCache
from syncd.simulator.cursor import CursorCodec
from syncd.simulator.data import ActiveFilter, Entry, FeedLog
from syncd.simulator.offschema import RecordStyle

_YIELD_EVERY_S = 0.005  # rendering a big page hands the loop back this often


@dataclass(slots=True)
class Page:
    """One rendered export response body and what it was built from."""

    body: bytes
    start: int
    end: int
    count: int
    has_more: bool
    limit: int  # end of the visible log when rendered
    stale_mark: int  # how much of the log's stale list this page has been checked against
    keyless: tuple[int, ...] = ()  # indexes of the keyless records it holds


PageKey = tuple[int, int, int, bool, str, RecordStyle | None]


@dataclass(frozen=True, slots=True)
class _Plan:
    """The entries a page will hold, chosen before any of them is rendered."""

    key: PageKey
    entries: list[Entry]
    start: int
    end: int
    limit: int
    stale_mark: int


class Pager:
    """Builds and caches export pages for every feed log of a simulator."""

    def __init__(
        self,
        codec: CursorCodec,
        page_size: int,
        recent_delay_s: float,
        cache: SizedCache[Page],
    ) -> None:
        self.codec = codec
        self.page_size = page_size
        self.delay_ticks = int(recent_delay_s * 10_000_000)
        self.cache = cache

    def limit(self, log: FeedLog, recent: bool, now_ticks: int) -> int:
        """End of the part of the log a request may see."""
        if recent:
            return len(log.log)
        return log.visible_end(now_ticks, self.delay_ticks)

    def cached(
        self,
        log: FeedLog,
        start: int,
        recent: bool,
        active: ActiveFilter,
        now_ticks: int,
        style: RecordStyle | None = None,
    ) -> Page | None:
        """The stored page for this request if it is still exactly what would be rendered."""
        key: PageKey = (log.tenant, log.feed_no, start, recent, active, style)
        page = self.cache.get(key)
        if page is None:
            return None
        if _still_valid(log, page, self.limit(log, recent, now_ticks)):
            return page
        self.cache.discard(key)
        return None

    async def page(
        self,
        log: FeedLog,
        start: int,
        recent: bool,
        active: ActiveFilter,
        now_ticks: int,
        style: RecordStyle | None = None,
    ) -> Page:
        """The page starting at log position `start`, from cache or freshly rendered."""
        page = self.cached(log, start, recent, active, now_ticks, style)
        if page is not None:
            return page
        plan = self._plan(log, start, recent, active, now_ticks, style)
        return self._store(log, plan, await _render(log, plan.entries, style))

    async def edited_page(
        self,
        log: FeedLog,
        start: int,
        recent: bool,
        active: ActiveFilter,
        now_ticks: int,
        edit: Callable[[list[Entry]], list[Entry]],
        style: RecordStyle | None = None,
    ) -> Page:
        """The page at `start` with its entries changed by `edit`; never cached."""
        plan = self._plan(log, start, recent, active, now_ticks, style)
        entries = edit(plan.entries)
        parts = await _render(log, entries, style)
        has_more = len(plan.entries) == self.page_size and plan.end < plan.limit
        body = self._body(log, plan.end, has_more, parts)
        keyless = _keyless(log, entries)
        return Page(body, start, plan.end, len(parts), has_more, plan.limit, 0, keyless)

    def page_now(
        self, log: FeedLog, start: int, recent: bool, active: ActiveFilter, now_ticks: int
    ) -> Page:
        """Like `page`, without yielding: for prerendering before the server starts."""
        page = self.cached(log, start, recent, active, now_ticks)
        if page is not None:
            return page
        plan = self._plan(log, start, recent, active, now_ticks, None)
        return self._store(log, plan, [log.render(entry) for entry in plan.entries])

    def _plan(
        self,
        log: FeedLog,
        start: int,
        recent: bool,
        active: ActiveFilter,
        now_ticks: int,
        style: RecordStyle | None,
    ) -> _Plan:
        limit = self.limit(log, recent, now_ticks)
        entries, end = log.scan(start, limit, self.page_size, active)
        key: PageKey = (log.tenant, log.feed_no, start, recent, active, style)
        return _Plan(key, entries, start, end, limit, len(log.stale))

    def _store(self, log: FeedLog, plan: _Plan, parts: list[bytes]) -> Page:
        has_more = len(parts) == self.page_size and plan.end < plan.limit
        body = self._body(log, plan.end, has_more, parts)
        keyless = _keyless(log, plan.entries)
        page = Page(
            body, plan.start, plan.end, len(parts), has_more, plan.limit, plan.stale_mark, keyless
        )
        self.cache.put(plan.key, page, len(body) + 200)
        return page

    def _body(self, log: FeedLog, end: int, has_more: bool, parts: list[bytes]) -> bytes:
        token = self.codec.encode(log.tenant, log.feed_no, end).encode()
        return b"".join(
            (
                b'{"hasMore":',
                b"true" if has_more else b"false",
                b',"continueFrom":"',
                token,
                b'","data":[',
                b",".join(parts),
                b"]}",
            )
        )

    def prerender(self, log: FeedLog, active: ActiveFilter, overlap: int, now_ticks: int) -> int:
        """Render the first pass over `log` in both modes; the number of pages rendered."""
        pages = 0
        for recent in (False, True):
            start = 0
            while True:
                page = self.page_now(log, start, recent, active, now_ticks)
                pages += 1
                if not page.has_more:
                    break
                start = log.overlap_start(page.end, overlap, active) if recent else page.end
        return pages


def _keyless(log: FeedLog, entries: list[Entry]) -> tuple[int, ...]:
    if not log.keyless_created:
        return ()
    return tuple(e.index for e in entries if log.keyless[e.index])


async def _render(
    log: FeedLog, entries: list[Entry], style: RecordStyle | None = None
) -> list[bytes]:
    parts: list[bytes] = []
    checkpoint = time.perf_counter()
    for n, entry in enumerate(entries):
        parts.append(log.render(entry, style))
        if n % 64 == 63 and time.perf_counter() - checkpoint > _YIELD_EVERY_S:
            # Entries carry their version, so the page stays consistent across the pause;
            # changes made meanwhile are caught by the validity check on the next hit.
            await asyncio.sleep(0)
            checkpoint = time.perf_counter()
    return parts


def _still_valid(log: FeedLog, page: Page, limit: int) -> bool:
    stale = log.stale
    total = len(stale)
    if page.stale_mark < total:
        low, high = page.start, page.end
        for position in stale[page.stale_mark :]:
            if low <= position <= high:
                return False
        page.stale_mark = total
    return page.has_more or page.limit == limit
