"""A feed's reconciliation pass: the feed re-exported from its beginning on a cursor of its own,
beside the incremental one (which keeps running), then a sweep of the index.

The rules live in the scripts (`syncd.engine.scripts`): a pass takes a new mark; every key a
page of the pass or of the incremental polls holds is marked with it; what the pass sees
changed is published like any change (drift); once the pass has drained, the sweep publishes
one `deleted` event for each key in the index without the mark, and drops its entry. Each step
is one script fenced by where the pass is (its cursor, the sweep's bucket), so a pass killed
anywhere resumes where it was, and two processes running one never publish a thing twice.
This module is the shell: fetching, pacing, retrying, reporting.
"""

from __future__ import annotations

import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import structlog

from syncd.catalogue import Feed
from syncd.engine.pass_scripts import PASS_START, SWEEP
from syncd.engine.policy import NoProgress, follow, page_progress
from syncd.engine.publisher import Publisher, redis_errors
from syncd.engine.ratelimit import TokenBucket, backoff
from syncd.errors import RateLimited, TransientError
from syncd.instants import utc_instant
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.client import ExportClient

log = structlog.get_logger("syncd.reconcile")

# Keys of the index a sweep script looks at, at most (about: whole buckets).
SWEEP_BUDGET = 2000

# Failures in a row (API or Redis) after which a pass gives up; it resumes when run again.
MAX_FAILURES = 8


@dataclass(frozen=True, slots=True)
class PassFigures:
    """What a feed's last completed pass found (from the feed's state in Redis)."""

    started: float
    finished: float
    seen: int  # keys in the index when it ended: seen by it, or published while it ran
    fetched: int  # records it fetched
    drift: int
    deleted: int

    @classmethod
    def from_state(cls, feed: str, state: dict[str, str]) -> PassFigures | None:
        try:
            return cls(
                float(state[f"{feed}:pass_started"]),
                float(state[f"{feed}:pass_finished"]),
                int(state[f"{feed}:pass_seen"]),
                int(state[f"{feed}:pass_fetched"]),
                int(state[f"{feed}:pass_drift"]),
                int(state[f"{feed}:pass_deleted"]),
            )
        except (KeyError, ValueError):
            return None


@dataclass(slots=True)
class Progress:
    """Where a pass is: its phase (`fetch`, `sweep`, `done`), pages and records fetched, the
    sweep's bucket of how many."""

    phase: str = "fetch"
    pages: int = 0
    records: int = 0
    swept: int = 0
    buckets: int = 0
    # Cursors this run of `hasMore: true` pages asked with, and its empty pages in a row
    # (syncd.engine.policy.follow): a pass must make progress like a feed's polls.
    trail: tuple[str, ...] = ()
    empty_run: int = 0


class PassFailed(Exception):
    """A pass gave up after MAX_FAILURES failures in a row; it resumes where it was."""


class Reconciler:
    """Runs reconciliation passes of one tenant's feeds against one Redis."""

    def __init__(
        self,
        publisher: Publisher,
        client: ExportClient,
        tokens: TokenProvider,
        *,
        pace: Callable[[], Awaitable[None]],
        hold: Callable[[], Awaitable[None]] | None = None,
        sweep_budget: int = SWEEP_BUDGET,
        rng: random.Random | None = None,
    ) -> None:
        """`pace` waits before each request of a pass for its share of the tenant's budget
        (`paced_at` a rate of its own, or what the tenant's polls leave over); `hold`, before
        each sweep script, while the feed may not publish (`while_held`)."""
        self.publisher = publisher
        self.client = client
        self.tokens = tokens
        self.tenant = tokens.tenant
        self.sweep_budget = sweep_budget
        self.pace = pace
        self.hold = hold
        self.rng = rng or random.Random()
        self._start = publisher.redis.register_script(PASS_START)
        self._sweep = publisher.redis.register_script(SWEEP)

    async def run(
        self, feed: Feed, on_progress: Callable[[Progress], None] | None = None
    ) -> PassFigures:
        """One pass of `feed`, or the rest of one under way: its figures once it is done."""
        k = self.publisher.keys(self.tenant)
        meta = k.index(feed.name)
        progress = Progress()
        flog = log.bind(tenant=self.tenant, feed=feed.name)
        while True:
            with redis_errors("the pass"):
                began, phase = await self._start(
                    keys=[meta, k.seen(feed.name)], args=[f"{time.time():.3f}"]
                )
            if _text(phase) != "migrating":
                break
            # The index first moves out of the layout before buckets, where no sweep looks.
            await self.publisher.migrate(self.tenant, feed.name, chunks=100)
        flog.info("reconcile_started" if int(began) else "reconcile_resumed", phase=_text(phase))
        failures = 0
        while True:
            try:
                phase = await self._step(feed, progress)
            except (TransientError, RateLimited) as exc:
                failures += 1
                if failures >= MAX_FAILURES:
                    raise PassFailed(f"{feed.name}: {failures} failures in a row: {exc}") from None
                retry = exc.retry_after if isinstance(exc, RateLimited) else None
                wait = retry if retry is not None else backoff(failures, rng=self.rng, cap=30.0)
                flog.warning("reconcile_retry", error=str(exc), retry_in_s=round(wait, 3))
                await anyio.sleep(wait)
                continue
            failures = 0
            progress.phase = phase
            if on_progress is not None:
                on_progress(progress)
            if phase == "done":
                break
        state = await self.publisher.redis.hgetall(k.state)
        figures = PassFigures.from_state(feed.name, {_text(a): _text(b) for a, b in state.items()})
        if figures is None:
            raise PassFailed(f"{feed.name}: the pass ended without its figures in {k.state}")
        flog.info(
            "reconcile_finished",
            seen=figures.seen,
            drift=figures.drift,
            deleted=figures.deleted,
            duration_s=round(figures.finished - figures.started, 3),
        )
        return figures

    async def _step(self, feed: Feed, progress: Progress) -> str:
        """One page of the pass or one sweep script: the phase after it (`done` at the end)."""
        k = self.publisher.keys(self.tenant)
        meta = k.index(feed.name)
        with redis_errors("the pass"):
            phase, cursor, sweep, level, split = await self.publisher.redis.hmget(
                meta, ["pass", "pass_cursor", "sweep", "level", "split"]
            )
        if phase is None:
            return "done"
        if _text(phase) == "fetch":
            await self.pace()
            expected = None if cursor is None else _text(cursor)
            # With recent changes whatever the tenant's polls use: without them the API hides a
            # record changed in the last minutes (its version before is gone from the export
            # already), and a pass draining then would take it for deleted.
            page = await self.client.fetch(self.tokens, feed, expected, include_recent_changes=True)
            stall = page_progress(
                expected, page.has_more, page.fetched, page.continue_from, progress.trail
            )
            if stall is not None:  # asked again, it would answer the same: a failure
                raise TransientError(_no_progress(stall))
            applied = await self.publisher.apply(
                self.tenant, feed.name, expected, page, reconcile=True
            )
            if not applied.applied:  # another process moved the pass on: its cursors now
                progress.trail, progress.empty_run = (), 0
                return "fetch"
            progress.pages += 1
            progress.records += page.fetched
            progress.trail, progress.empty_run, stall = follow(
                progress.trail, progress.empty_run, expected, page.has_more, page.fetched
            )
            if stall is not None:  # moving on, but only through empty pages: back off
                raise TransientError(_no_progress(stall))
            return "fetch"
        # The sweep, from where it is (another process may be sweeping too: the fence).
        if self.hold is not None:
            await self.hold()
        now = time.time()
        on = dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="microseconds")
        on = on.replace("+00:00", "Z")
        progress.buckets = (1 << int(level or 0)) + int(split or 0)
        at = utc_instant(on)
        args: list[str | int] = [
            int(sweep or 0),
            self.sweep_budget,
            on,
            at,
            feed.name,
            f"{now:.3f}",
        ]

        async def step(client: Any) -> Any:
            return await self._sweep(
                keys=[meta, k.stream(feed.name), k.state], args=args, client=client
            )

        # With `wait_replicas`, each step's deletes are on enough replicas before the next:
        # the window in which a failover can make a sweep publish a delete again is a page's.
        with redis_errors("the sweep"):
            result = await self.publisher.replicated(step, "the sweep")
        if int(result[0]) == 0:
            progress.swept = int(result[3])
            return "done" if int(result[1]) else "sweep"
        return "sweep"


def paced_at(rate: float) -> Callable[[], Awaitable[None]]:
    """A pace of `rate` requests per second."""
    bucket = TokenBucket(rate=rate, burst=1.0)

    async def pace() -> None:
        while (wait := bucket.try_acquire(time.monotonic())) > 0:
            await anyio.sleep(wait)

    return pace


def while_held(
    held: Callable[[], bool],
    *,
    gone: Callable[[], bool] = lambda: False,
    poll_s: float = 0.05,
) -> Callable[[], Awaitable[None]]:
    """A wait while what holds the feed's polls holds (`held`: backpressure, Redis short of
    memory); a pass stops (PassFailed) once its tenant or feed is `gone` from this process."""

    async def hold() -> None:
        while gone() or held():
            if gone():
                raise PassFailed("the feed is no longer polled here; the pass stays where it is")
            await anyio.sleep(poll_s)

    return hold


def on_spare(
    bucket: TokenBucket,
    busy: Callable[[], bool],
    *,
    gone: Callable[[], bool] = lambda: False,
    clock: Callable[[], float] = time.monotonic,
    poll_s: float = 0.05,
) -> Callable[[], Awaitable[None]]:
    """A pace that takes a token of a tenant's own `bucket` (read at `clock`, the
    scheduler's) only while the tenant's polls leave it full and none is under way nor held
    (`busy`): a pass never takes a token a poll wanted, nor one a poll may not take. Once the
    tenant is `gone` from this process (a reload dropped it, another instance holds its
    lease), its bucket fills no one's requests any more: the pass stops (PassFailed), where
    it is, for whoever polls the tenant now."""

    async def pace() -> None:
        while gone() or busy() or not bucket.spare(clock()):
            if gone():
                raise PassFailed("the feed is no longer polled here; the pass stays where it is")
            await anyio.sleep(poll_s)

    return pace


def _no_progress(stall: NoProgress) -> str:
    if stall.empty_pages:
        what = f"{stall.empty_pages} pages in a row without a record"
    elif stall.cursor_missing:
        what = "no continueFrom"
    else:
        what = "a continueFrom asked with before"
    return f"no progress: hasMore {str(stall.has_more).lower()}, {what}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
