"""How long each tenant and each feed has gone without success, relative to its poll interval.

The scheduler records every success; /metrics needs, per tenant (and per feed across tenants),
only the feed furthest behind. Successes are far more frequent than scrapes and almost never
move that answer: a success of any feed but the oldest changes nothing. So the oldest is kept
per (name, poll interval) group and found again only when it moved, and a scrape costs one
subtraction per tenant, not one per feed. Pure: times are arguments.
"""

from __future__ import annotations

Key = tuple[str, ...]


class _Oldest:
    """Timestamps by name, and which one is the oldest (None: to be found again)."""

    __slots__ = ("oldest", "times")

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.oldest: str | None = None

    def set(self, name: str, ts: float) -> bool:
        """Record `ts` for `name`; True when the oldest may have changed."""
        times = self.times
        times[name] = ts
        if name == self.oldest:
            self.oldest = None
        elif self.oldest is None:
            return True
        elif ts < times[self.oldest]:
            self.oldest = name
        else:
            return False
        return True

    def pop(self, name: str) -> None:
        self.times.pop(name, None)
        if name == self.oldest:
            self.oldest = None

    def min(self) -> float:
        if self.oldest is None:
            self.oldest = min(self.times, key=self.times.__getitem__)
        return self.times[self.oldest]


class _Index:
    """Outer name (a tenant, or a feed) -> poll interval -> inner name -> unix time."""

    def __init__(self) -> None:
        self.groups: dict[str, dict[float, _Oldest]] = {}
        self._dirty: set[str] = set()
        # For names with one interval: their key, oldest time and interval, kept between scrapes.
        self._single: dict[str, tuple[Key, float, float]] = {}
        self._mixed: set[str] = set()  # names with several intervals: worked out every time

    def set(self, outer: str, inner: str, interval: float, ts: float) -> None:
        groups = self.groups.setdefault(outer, {})
        group = groups.get(interval)
        if group is None:
            group = groups[interval] = _Oldest()
            self._dirty.add(outer)
        if group.set(inner, ts):
            self._dirty.add(outer)

    def remove(self, outer: str, inner: str, interval: float) -> None:
        groups = self.groups[outer]
        groups[interval].pop(inner)
        if not groups[interval].times:
            del groups[interval]
        if not groups:
            del self.groups[outer]
        self._dirty.add(outer)

    def stalest(self, now: float) -> tuple[dict[Key, float], dict[Key, float]]:
        """Per name: whole seconds since success of its entry furthest behind its poll
        interval (zero for a time ahead of `now`: clock skew), and that interval."""
        single, mixed = self._single, self._mixed
        for outer in self._dirty:
            groups = self.groups.get(outer)
            single.pop(outer, None)
            mixed.discard(outer)
            if groups is not None and len(groups) == 1:
                [(interval, group)] = groups.items()
                single[outer] = ((outer,), group.min(), interval)
            elif groups is not None:
                mixed.add(outer)
        self._dirty.clear()
        ages: dict[Key, float] = {
            key: int(now - ts) if now > ts else 0 for key, ts, _ in single.values()
        }
        intervals: dict[Key, float] = {key: interval for key, _, interval in single.values()}
        for outer in mixed:
            behind, age, interval = -1.0, 0.0, 0.0
            for each, group in self.groups[outer].items():
                since = now - group.min()
                if since / each > behind:
                    behind, age, interval = since / each, since, each
            ages[(outer,)] = int(age) if age > 0 else 0
            intervals[(outer,)] = interval
        return ages, intervals


class Success:
    """When each (tenant, feed) last succeeded: the last applied page, or when the feed was
    first scheduled until then, so that a feed that never succeeds still ages."""

    def __init__(self) -> None:
        self.interval: dict[tuple[str, str], float] = {}
        self.by_tenant = _Index()
        self.by_feed = _Index()

    def get(self, tenant: str, feed: str) -> float | None:
        interval = self.interval.get((tenant, feed))
        if interval is None:
            return None
        return self.by_tenant.groups[tenant][interval].times[feed]

    def set(self, tenant: str, feed: str, interval: float, ts: float) -> None:
        old = self.interval.get((tenant, feed))
        if old is not None and old != interval:
            self.remove(tenant, feed)
        self.interval[(tenant, feed)] = interval
        self.by_tenant.set(tenant, feed, interval, ts)
        self.by_feed.set(feed, tenant, interval, ts)

    def touch(self, tenant: str, feed: str, ts: float) -> None:
        """A success now; nothing for a feed not configured (see `set`)."""
        interval = self.interval.get((tenant, feed))
        if interval is not None:
            self.by_tenant.set(tenant, feed, interval, ts)
            self.by_feed.set(feed, tenant, interval, ts)

    def remove(self, tenant: str, feed: str) -> None:
        interval = self.interval.pop((tenant, feed), None)
        if interval is not None:
            self.by_tenant.remove(tenant, feed, interval)
            self.by_feed.remove(feed, tenant, interval)

    def feeds_of(self, tenant: str) -> list[str]:
        groups = self.by_tenant.groups.get(tenant, {})
        return [f for group in groups.values() for f in group.times]

    def rows(self, now: float) -> dict[Key, float]:
        """Seconds since success of every (tenant, feed)."""
        return {
            (t, f): round(max(0.0, now - ts), 3)
            for t, groups in self.by_tenant.groups.items()
            for group in groups.values()
            for f, ts in group.times.items()
        }
