"""The daemon's reconciliation passes: each feed with a `reconcile_interval` gets one pass per
interval (`syncd.engine.reconcile`), one pass at a time, for the tenants this instance polls
(in a fleet, the ones it owns: a pass a lost tenant's new owner finds under way goes on where
it was). A pass only spends what the tenant's polls leave over of its request budget: a token
of the tenant's own bucket when the bucket is full and no poll is under way. What holds the
feed's polls holds its pass (a 429's wait, backpressure, Redis short of memory), and a pass of
a tenant or feed no longer polled here stops where it is. Passes do not run with `--once`."""

from __future__ import annotations

import asyncio
import contextlib
import time

import structlog

from syncd import catalogue
from syncd.daemon.state import DaemonState
from syncd.engine.due import TenantState
from syncd.engine.reconcile import PassFailed, Reconciler, on_spare, while_held

log = structlog.get_logger("syncd.daemon")

# Seconds between looks for passes that are due.
PASS_CHECK_S = 30.0


class Passes(DaemonState):
    """Reconciliation passes, one at a time."""

    async def _passes(self) -> None:
        while True:
            try:
                await self._passes_once()
            except Exception as exc:
                log.warning("reconcile_failed", error=f"{type(exc).__name__}: {exc}")
            # Every PASS_CHECK_S, or a quarter of the shortest interval when that is shorter;
            # at once when a tenant starts being polled here (startup, reload, the fleet).
            intervals = [
                self.settings.reconcile_interval(f)
                for t in self.settings.tenants
                for f in t.feeds
                if self.settings.reconcile_interval(f) > 0
            ]
            wait = max(0.1, min([PASS_CHECK_S, *(i / 4 for i in intervals)]))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self.passes_wake.wait()
            self.passes_wake.clear()

    async def _passes_once(self) -> None:
        """Run every pass that is due now, one after the other."""
        assert self.scheduler is not None
        for t in list(self.scheduler.tenants.values()):
            for feed in await self._due_passes(t):
                if t.removed or self.scheduler.stopping:
                    return
                await self._run_pass(t, feed)

    async def _due_passes(self, t: TenantState) -> list[str]:
        """The tenant's feeds whose pass is under way or due: none completed yet, or the last
        completed an interval ago or more."""
        assert self.publisher is not None
        intervals = {
            f: self.settings.reconcile_interval(f)
            for f in t.feeds
            if self.settings.reconcile_interval(f) > 0
        }
        if not intervals:
            return []
        keys = self.publisher.keys(t.settings.id)
        fields = [(f"{f}:pass_finished", f"{f}:pass_seen") for f in intervals]
        state = await self.publisher.redis.hmget(keys.state, [n for pair in fields for n in pair])
        under_way = [await self.publisher.redis.hexists(keys.index(f), "pass") for f in intervals]
        now = time.time()
        due = []
        for (feed, interval), finished, seen, going in zip(
            intervals.items(), state[::2], state[1::2], under_way, strict=True
        ):
            last = None if finished is None else float(finished)
            keys_seen = None if seen is None else int(seen)
            self.metrics.passes.due(t.settings.id, feed, interval, last, now, keys_seen)
            if going or last is None or now - last >= interval:
                due.append(feed)
        return due

    async def _run_pass(self, t: TenantState, feed: str) -> None:
        assert self.scheduler is not None
        assert self.publisher is not None
        scheduler = self.scheduler

        def gone() -> bool:
            return t.removed or feed not in t.feeds

        def held() -> bool:
            # What holds the feed's polls: backpressure on it; all polling held (Redis short of
            # memory or unreachable, replicas behind).
            fs = t.feeds.get(feed)
            return scheduler.held or (fs is not None and fs.paused is not None)

        def busy() -> bool:
            # A poll under way, the tenant waiting out a 429, or the feed held.
            return t.inflight > 0 or t.paused_until > scheduler.clock() or held()

        reconciler = Reconciler(
            self.publisher,
            scheduler.client,
            t.tokens,
            pace=on_spare(t.bucket, busy, gone=gone, clock=scheduler.clock),
            hold=while_held(held, gone=gone),
        )
        try:
            figures = await reconciler.run(catalogue.feed(feed))
        except PassFailed as exc:
            log.warning("reconcile_failed", tenant=t.settings.id, feed=feed, error=str(exc))
            return
        self.metrics.passes.completed(
            t.settings.id, feed, figures.drift, figures.deleted, figures.finished, figures.seen
        )
