"""The series of reconciliation passes, per feed, for the feeds with a `reconcile_interval`:
drift and deletes found, passes completed, keys the last passes left in the index, and the pass
furthest behind its interval among the tenants this instance polls (6 series per such feed;
none for the others)."""

from __future__ import annotations

from syncd.ops.exposition import Family, Key, Labels


class PassMetrics:
    """Recorded by the daemon's pass loop; read into each scrape's snapshot."""

    def __init__(self) -> None:
        f = Labels(("feed",))
        self.drift = Family(
            "syncd_feed_reconcile_drift_total",
            "Records reconciliation passes found changed and published (drift).",
            "counter",
            f,
        )
        self.deleted = Family(
            "syncd_feed_reconcile_deleted_total",
            "Keys reconciliation passes found gone upstream and published as deleted.",
            "counter",
            f,
        )
        self.passes = Family(
            "syncd_feed_reconcile_passes_total", "Reconciliation passes completed.", "counter", f
        )
        self.oldest = Family(
            "syncd_feed_oldest_reconcile_seconds",
            "Seconds since the last completed pass of the feed in the tenant furthest behind"
            " (since the feed was first due, for a tenant whose pass never completed).",
            "gauge",
            f,
        )
        self.seen = Family(
            "syncd_feed_reconcile_seen_keys",
            "Keys the last completed pass of the feed left in the index (seen upstream, or"
            " published while it ran), summed over the tenants this instance polls.",
            "gauge",
            f,
        )
        self.interval = Family(
            "syncd_feed_reconcile_interval_seconds",
            "The feed's reconcile_interval.",
            "gauge",
            f,
        )
        # (tenant, feed) -> unix time of its last completed pass, or when it was first due.
        self._last: dict[tuple[str, str], float] = {}
        self._seen: dict[tuple[str, str], int] = {}  # (tenant, feed) -> its last pass's keys
        self._intervals: dict[str, float] = {}

    def due(
        self,
        tenant: int,
        feed: str,
        interval: float,
        finished: float | None,
        now: float,
        seen: int | None = None,
    ) -> None:
        """A feed of a tenant has passes every `interval` seconds; its last completed at
        `finished` (None: never, counted from now on), leaving `seen` keys in the index."""
        key = (str(tenant), feed)
        if seen is not None:
            self._seen[key] = seen
        if finished is not None:
            self._last[key] = finished
        else:
            self._last.setdefault(key, now)
        self._intervals[feed] = interval
        for family in (self.drift, self.deleted, self.passes):
            family.values.setdefault((feed,), 0)

    def completed(
        self, tenant: int, feed: str, drift: int, deleted: int, finished: float, seen: int = 0
    ) -> None:
        self._last[(str(tenant), feed)] = finished
        self._seen[(str(tenant), feed)] = seen
        self.drift.inc((feed,), drift)
        self.deleted.inc((feed,), deleted)
        self.passes.inc((feed,), 1)

    def forget_tenant(self, tenant: int) -> None:
        t = str(tenant)
        for key in [k for k in self._last if k[0] == t]:
            del self._last[key]
        for key in [k for k in self._seen if k[0] == t]:
            del self._seen[key]

    def snapshot(self, now: float) -> list[tuple[Family, dict[Key, float]]]:
        oldest: dict[Key, float] = {}
        for (_, feed), last in self._last.items():
            age = max(0.0, now - last)
            if age > oldest.get((feed,), -1.0):
                oldest[(feed,)] = round(age, 3)
        intervals: dict[Key, float] = {(f,): i for f, i in self._intervals.items()}
        seen: dict[Key, float] = {(f,): 0 for f in self._intervals}
        for (_, feed), keys in self._seen.items():
            seen[(feed,)] = seen.get((feed,), 0) + keys
        return [
            (self.drift, self.drift.values.copy()),
            (self.deleted, self.deleted.values.copy()),
            (self.passes, self.passes.values.copy()),
            (self.oldest, oldest),
            (self.seen, seen),
            (self.interval, intervals),
        ]
