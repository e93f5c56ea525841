"""Prometheus metrics: the series syncd exports, and the helpers the engine records them with.

Series count, for N tenants and F feeds (the catalogue has about 55), at each `[ops]
metrics_detail`:

- "tenant" (the default), never tenant x feed: 16 x N + S + 21 x F + 22, where S <= 6 x N is
  the `requests_total` series (one per status class a tenant has seen). Per tenant: six record
  counters, `rate_limited_total`, `paused_seconds_total`, `token_renewals_total`, time since
  success and its poll interval, configured and allowed request rate, `auth_failing`,
  `feeds_paused` for two reasons. Per feed: six record counters, time since success and its
  poll interval, `page_fetch_seconds` (13 series). Unlabelled: `redis_errors_total`,
  `schedule_lateness_seconds` (12), `polling_paused` (3 reasons), `replicas_behind_seconds_total`,
  the five fleet gauges. At 1,000 tenants and 55 feeds: at most 23,177 series, about 1.1 MB.
  Per feed with a `reconcile_interval`, five more (`syncd.ops.passes`).
- "tenant_feed": all of the above, plus per tenant and feed four record counters and the time
  since success (5 x N x F), and dead letters and stale records for the pairs that had any:
  about 298,000 series and 22 MB at 1,000 tenants. For small installations.

The detail levels, record counters, buckets and engine status types are in
`syncd.ops.metric_types`; the families and their text format in `syncd.ops.exposition`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from syncd.ops.exposition import Family, Histogram, Key, Labels, Snapshot, zlib_gzip
from syncd.ops.fleet_gauges import FleetGauges
from syncd.ops.metric_types import (
    DETAILS,
    LATENESS_BUCKETS,
    PAGE_SECONDS_BUCKETS,
    PAUSE_REASONS,
    RECORD_COUNTERS,
    Detail,
    EngineStatus,
    StatusSource,
    TenantStatus,
    status_class,
)
from syncd.ops.passes import PassMetrics
from syncd.ops.staleness import Success

# One thread renders (and compresses) every scrape: with a pool, each thread that happens to
# serve a scrape would grow a malloc arena of its own and keep it.
_RENDERER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics")


class Metrics(Collector):
    """Every series syncd exports; `render` writes them, `registry` serves prometheus_client.

    Helpers take plain values (tenant ids as int, HTTP status as int) so callers need no
    prometheus_client types. A tenant's series appear with `set_feeds` (or on first use);
    `forget_tenant` drops them. See the module docstring for what each detail level costs.
    """

    def __init__(self, clock: Callable[[], float] = time.time, detail: Detail = "tenant") -> None:
        if detail not in DETAILS:
            raise ValueError(f"metrics detail {detail!r}: expected one of {', '.join(DETAILS)}")
        self.detail = detail
        self._clock = clock
        t, f, tf = Labels(("tenant",)), Labels(("feed",)), Labels(("tenant", "feed"))
        none = Labels(())

        def fam(name: str, help_text: str, kind: str, labels: Labels) -> Family:
            return Family(name, help_text, kind, labels)

        self._per_tenant = {
            key: fam(f"syncd_tenant_{n}_total", h, "counter", t) for key, n, h in RECORD_COUNTERS
        }
        self._per_feed = {
            key: fam(f"syncd_feed_{n}_total", h, "counter", f) for key, n, h in RECORD_COUNTERS
        }
        self._per_pair = {
            key: Family(f"syncd_{n}_total", h, "counter", tf, cache_lines=False)
            for key, n, h in RECORD_COUNTERS
        }
        self.requests = fam(
            "syncd_requests_total",
            "ServiceTitan API requests by response class.",
            "counter",
            Labels(("tenant", "status")),
        )
        self.rate_limited_total = fam(
            "syncd_rate_limited_total", "429 responses that paused a tenant.", "counter", t
        )
        self.paused_seconds_total = fam(
            "syncd_paused_seconds_total",
            "Seconds a tenant was paused by ServiceTitan's rate limit.",
            "counter",
            t,
        )
        self.token_renewals_total = fam(
            "syncd_token_renewals_total", "Access tokens obtained.", "counter", t
        )
        self.feeds_paused = fam(
            "syncd_feeds_paused",
            "Feeds not polled right now, by reason: consumer_lag (a consumer group lags more"
            " than max_lag), rate_limit (the tenant waits out a 429).",
            "gauge",
            Labels(("tenant", "reason")),
        )
        self.redis_errors_total = fam(
            "syncd_redis_errors_total", "Failed Redis calls.", "counter", none
        )
        self.replicas_behind_s = fam(
            "syncd_replicas_behind_seconds_total",
            "Seconds all polling was held for too few replicas ([redis] wait_replicas).",
            "counter",
            none,
        )
        # At zero from the start: the first error must show as an increase.
        self.redis_errors_total.values[()] = 0
        self.fleet_gauges = FleetGauges()
        self.passes = PassMetrics()
        self.page_fetch_seconds = Histogram(
            "syncd_page_fetch_seconds", "Time to fetch one export page.", PAGE_SECONDS_BUCKETS, f
        )
        self.schedule_lateness_seconds = Histogram(
            "syncd_schedule_lateness_seconds",
            "How long after its due time a feed poll was handed to a worker.",
            LATENESS_BUCKETS,
            none,
        )
        self._gauge = {
            name: Family(name, h, "gauge", labels, cache_lines=labels is not tf)
            for name, h, labels in (
                (
                    "syncd_tenant_seconds_since_success",
                    "Seconds since the last success of the tenant's feed furthest behind its poll"
                    " interval (with one interval: the oldest last success).",
                    t,
                ),
                (
                    "syncd_tenant_poll_interval_seconds",
                    "Poll interval of the feed in syncd_tenant_seconds_since_success.",
                    t,
                ),
                (
                    "syncd_feed_oldest_seconds_since_success",
                    "Seconds since the last success of the feed in the tenant furthest behind its"
                    " poll interval (with one interval: the oldest last success).",
                    f,
                ),
                (
                    "syncd_feed_poll_interval_seconds",
                    "Poll interval of the feed in syncd_feed_oldest_seconds_since_success.",
                    f,
                ),
                (
                    "syncd_feed_seconds_since_success",
                    "Seconds since the feed's last successful poll.",
                    tf,
                ),
                (
                    "syncd_tenant_requests_per_second_limit",
                    "Configured requests per second of the tenant.",
                    t,
                ),
                (
                    "syncd_tenant_requests_per_second_allowed",
                    "Requests per second the tenant's limiter allows now (lowered after 429s).",
                    t,
                ),
                (
                    "syncd_tenant_auth_failing",
                    "1 while the tenant's last token request failed.",
                    t,
                ),
                (
                    "syncd_polling_paused",
                    "1 while nothing is polled, by reason: redis_memory, redis_unavailable,"
                    " replicas_behind.",
                    Labels(("reason",)),
                ),
            )
        }
        self._tenant_families = [
            family
            for family in (
                *self._per_tenant.values(),
                *self._per_pair.values(),
                self.requests,
                self.rate_limited_total,
                self.paused_seconds_total,
                self.token_renewals_total,
                self.feeds_paused,
                *self._gauge.values(),
            )
            if family.labels.names[:1] == ("tenant",)
        ]
        self._tenant_labels_all = {family.labels for family in self._tenant_families}
        self._forgotten: set[str] = set()
        self._limits: dict[Key, float] = {}  # configured requests per second, by tenant
        self._not_paused: dict[Key, float] = {}  # feeds_paused{reason="rate_limit"} at rest
        self._success = Success()
        self._status: StatusSource | None = None
        self._render_lock = asyncio.Lock()
        self._text_lock = threading.Lock()
        # Tenants no longer configured: a request or page still in flight for one of them when
        # it was removed must not bring its series back.
        self._retired: set[str] = set()
        self.registry = CollectorRegistry()
        self.registry.register(self)

    # -- recording ---------------------------------------------------------------------

    def track_tenant(self, tenant: int) -> None:
        """Record the tenant's series again (after `forget_tenant`, when it is re-added)."""
        self._retired.discard(str(tenant))

    def set_feeds(
        self, tenant: int, feeds: Mapping[str, float], last_ok: Mapping[str, float] | None = None
    ) -> None:
        """The tenant's configured feeds with their poll intervals (at start and each reload).

        A feed new here counts its time since success from `last_ok` (a unix time stored by an
        earlier run) or from now. Creates the tenant's counters at zero, so the first event of a
        kind shows as an increase.
        """
        t = str(tenant)
        if t in self._retired:
            return
        now = self._clock()
        known = set(self._success.feeds_of(t))
        for feed in known - set(feeds):
            self._success.remove(t, feed)
        for feed, interval in feeds.items():
            if feed in known and self._success.interval[(t, feed)] == interval:
                continue
            ts = self._success.get(t, feed) if feed in known else (last_ok or {}).get(feed)
            self._success.set(t, feed, interval, now if ts is None else ts)
            for key, _, _ in RECORD_COUNTERS:
                self._per_feed[key].inc((feed,), 0)
        for key, _, _ in RECORD_COUNTERS:
            self._per_tenant[key].inc((t,), 0)
        for family in (self.rate_limited_total, self.paused_seconds_total):
            family.inc((t,), 0)
        self.token_renewals_total.inc((t,), 0)
        self.feeds_paused.values.setdefault((t, "consumer_lag"), 0)

    def request(self, tenant: int, status: int | None) -> None:
        """Count one API request by its HTTP status, or None for a transport error or timeout."""
        t = str(tenant)
        if t not in self._retired:
            self.requests.inc((t, status_class(status)))

    def page(
        self, tenant: int, feed: str, fetched: int, published: int, unchanged: int, seconds: float
    ) -> None:
        """Record one applied page: its record counts and how long the fetch took."""
        self.page_fetch_seconds.observe((feed,), seconds)
        t = str(tenant)
        if t in self._retired:
            return
        self._success.touch(t, feed, self._clock())
        for key, n in (("pages", 1), ("fetched", fetched), ("published", published)):
            self._count(key, t, feed, n)
        self._count("unchanged", t, feed, unchanged)

    def _count(self, key: str, tenant: str, feed: str, n: int) -> None:
        self._per_tenant[key].inc((tenant,), n)
        self._per_feed[key].inc((feed,), n)
        if self.detail == "tenant_feed":
            self._per_pair[key].inc((tenant, feed), n)

    def rate_limited(self, tenant: int, wait_s: float) -> None:
        """Record a 429 that pauses the tenant for `wait_s` seconds."""
        t = str(tenant)
        if t not in self._retired:
            self.rate_limited_total.inc((t,))
            self.paused_seconds_total.inc((t,), max(0.0, wait_s))

    def token_renewed(self, tenant: int) -> None:
        """Count an access token obtained for the tenant."""
        if str(tenant) not in self._retired:
            self.token_renewals_total.inc((str(tenant),))

    def dead_letter(self, tenant: int, feed: str, n: int = 1) -> None:
        """Count records sent to the tenant's dead-letter stream."""
        if str(tenant) not in self._retired:
            self._count("dead", str(tenant), feed, n)

    def stale_records(self, tenant: int, feed: str, n: int) -> None:
        """Count record versions dropped as older than what was published for their key."""
        if str(tenant) not in self._retired:
            self._count("stale", str(tenant), feed, n)

    def redis_error(self) -> None:
        """Count a failed Redis call."""
        self.redis_errors_total.inc(())

    def lateness(self, seconds: float) -> None:
        """Record how late a due feed was dispatched."""
        self.schedule_lateness_seconds.observe((), max(0.0, seconds))

    def set_feeds_paused(self, tenant: int, count: int, reason: str = "consumer_lag") -> None:
        """Set how many of the tenant's feeds are held back right now, and why (one of
        PAUSE_REASONS: a label with few values, never free text)."""
        if reason not in PAUSE_REASONS:
            raise ValueError(f"pause reason {reason!r}: expected one of {', '.join(PAUSE_REASONS)}")
        if str(tenant) not in self._retired:
            self.feeds_paused.values[(str(tenant), reason)] = count

    def set_rate_limit(self, tenant: int, requests_per_second: float) -> None:
        """The tenant's configured requests per second (at start and each reload)."""
        t = str(tenant)
        if t not in self._retired:
            self._limits[(t,)] = requests_per_second
            self._not_paused[(t, "rate_limit")] = 0

    def set_fleet(
        self,
        members: int,
        tenants_owned: int,
        *,
        disagreements: int = 0,
        unpolled: int = 0,
        name_clash: bool = False,
    ) -> None:
        """The fleet as this instance sees it (see FleetGauges.set)."""
        self.fleet_gauges.set(members, tenants_owned, disagreements, unpolled, name_clash)

    def set_status_source(self, fn: StatusSource) -> None:
        """Read the engine's per-tenant state from `fn` once per scrape, on the event loop.

        Rows are needed only for tenants not at rest (a lowered rate, a 429 pause, a failing
        token): the others show their configured rate (`set_rate_limit`), no pause, no failure.
        """
        self._status = fn

    def forget_tenant(self, tenant: int) -> None:
        """Remove every series labelled with the tenant, once it is no longer configured; until
        `track_tenant`, what is still in flight for it records nothing."""
        t = str(tenant)
        self._retired.add(t)
        for feed in self._success.feeds_of(t):
            self._success.remove(t, feed)
        for family in self._tenant_families:
            family.drop_where(t)
        self._limits.pop((t,), None)
        self._not_paused.pop((t, "rate_limit"), None)
        self.passes.forget_tenant(tenant)
        # Their label strings belong to the render thread: it drops them at its next render.
        self._forgotten.add(t)

    # -- reading -----------------------------------------------------------------------

    def _snapshot(self, *, for_text: bool = True) -> Snapshot:
        """Every series as it stands; runs on the event loop, where the engine state is safe."""
        now = self._clock()
        g = self._gauge
        counters: list[tuple[Family, dict[Key, float]]] = []
        for key, _, _ in RECORD_COUNTERS:
            counters.append((self._per_tenant[key], self._per_tenant[key].values.copy()))
        for family in (
            self.requests,
            self.rate_limited_total,
            self.paused_seconds_total,
            self.token_renewals_total,
        ):
            counters.append((family, family.values.copy()))
        ages, intervals = self._success.by_tenant.stalest(now)
        counters.append((g["syncd_tenant_seconds_since_success"], ages))
        counters.append((g["syncd_tenant_poll_interval_seconds"], intervals))
        paused = self.feeds_paused.values.copy()
        polling: dict[Key, float] = {}
        if self._status is not None:
            status = self._status()
            # Tenants at rest cost two dict copies; only the rows given cost Python work.
            limits = self._limits.copy()
            allowed = limits.copy()
            failing: dict[Key, float] = dict.fromkeys(limits, 0)
            paused.update(self._not_paused)
            for row in status.tenants:
                tk = (str(row.tenant),)
                if tk in limits:  # else removed meanwhile
                    allowed[tk] = round(row.rate, 2)
                    failing[tk] = int(row.auth_failing)
                    paused[(tk[0], "rate_limit")] = row.feeds if row.rate_limit_paused else 0
            counters.append((g["syncd_tenant_requests_per_second_limit"], limits))
            counters.append((g["syncd_tenant_requests_per_second_allowed"], allowed))
            counters.append((g["syncd_tenant_auth_failing"], failing))
            polling = {
                ("redis_memory",): int(status.redis_memory_full),
                ("redis_unavailable",): int(status.redis_unavailable),
                ("replicas_behind",): int(status.replicas_behind),
            }
            counters.append((self.replicas_behind_s, {(): round(status.replicas_behind_s, 3)}))
        counters.append((self.feeds_paused, paused))
        for key, _, _ in RECORD_COUNTERS:
            counters.append((self._per_feed[key], self._per_feed[key].values.copy()))
        ages, intervals = self._success.by_feed.stalest(now)
        counters.append((g["syncd_feed_oldest_seconds_since_success"], ages))
        counters.append((g["syncd_feed_poll_interval_seconds"], intervals))
        counters.append((self.redis_errors_total, self.redis_errors_total.values.copy()))
        counters.append((g["syncd_polling_paused"], polling))
        counters.extend(self.fleet_gauges.snapshot())
        counters.extend(self.passes.snapshot(now))
        if self.detail == "tenant_feed":
            for family in self._per_pair.values():
                counters.append((family, family.values.copy()))
            counters.append((g["syncd_feed_seconds_since_success"], self._success.rows(now)))
        histograms = [
            (h, h.snapshot()) for h in (self.page_fetch_seconds, self.schedule_lateness_seconds)
        ]
        forgotten = set()
        if for_text:  # the render that gets them drops their label strings
            forgotten, self._forgotten = self._forgotten, set()
        return Snapshot(counters, histograms, forgotten)

    def _text(self, snapshot: Snapshot, *, gzip_from: int | None = None) -> tuple[bytes, bool]:
        # The lines kept between renders are one thread's at a time (`render` may run on the
        # loop while a scrape renders in the worker).
        with self._text_lock:
            for labels in self._tenant_labels_all:
                labels.purge(snapshot.forgotten)
            body = snapshot.text()
        if gzip_from is None or len(body) < gzip_from:
            return body, False
        # Level 1: the text is repetitive enough to shrink over tenfold even so, and higher
        # levels cost several times the CPU of rendering it for a few percent less.
        return zlib_gzip(body), True

    def render(self) -> bytes:
        """Every series in Prometheus text format, rendered on the calling thread."""
        return self._text(self._snapshot())[0]

    async def render_async(self) -> bytes:
        """Like `render`, formatted in a worker thread so the event loop keeps running."""
        body, _ = await self.render_http(None)
        return body

    async def render_http(self, gzip_from: int | None) -> tuple[bytes, bool]:
        """The body of a /metrics response, formatted in a worker thread so the event loop keeps
        running, gzip-compressed there too when at least `gzip_from` bytes long; and whether it
        is compressed.

        The engine's state is copied here on the loop, where it is safe to read; renders are
        serialised, so slow scrapes cannot pile up copies of the output.
        """
        async with self._render_lock:
            snapshot = self._snapshot()
            work = functools.partial(self._text, snapshot, gzip_from=gzip_from)
            return await asyncio.get_running_loop().run_in_executor(_RENDERER, work)

    def collect(self) -> Iterator[Metric]:
        """The same samples as `render`, for `CollectorRegistry` users."""
        yield from self._snapshot(for_text=False).metrics()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The current value of one sample, or None if it does not exist."""
        value: float | None = self.registry.get_sample_value(name, labels or {})
        return value


# The status types are those of `set_status_source`, importable from here with the collector.
__all__ = ["EngineStatus", "Metrics", "TenantStatus"]
