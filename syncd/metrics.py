"""Prometheus metrics: the series syncd exports, and the helpers the engine records them with."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# The classic text format: every series name syncd exports is a legacy Prometheus name, so this
# is what every Prometheus and compatible scraper understands.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A page is one HTTP round trip for up to a few thousand records, usually well under a second;
# the long tail reaches into the client's timeout.
PAGE_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Lateness stays near zero while workers keep up; seconds to minutes mean the pool is saturated.
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)

LastSuccessSource = Callable[[], Iterable[tuple[str, str, float]]]

# The counters labelled {tenant, feed}: (key used by the helpers, exported name, help).
FEED_COUNTERS = (
    ("fetched", "syncd_records_fetched_total", "Records received in export pages."),
    ("published", "syncd_records_published_total", "Records published as change events."),
    (
        "unchanged",
        "syncd_records_unchanged_total",
        "Records dropped because their content had already been published.",
    ),
    ("pages", "syncd_pages_total", "Export pages fetched and applied."),
    (
        "dead",
        "syncd_dead_letters_total",
        "Records written to the dead-letter stream instead of a feed stream.",
    ),
    (
        "stale",
        "syncd_stale_records_total",
        "Record versions not published because a newer version of their key was published"
        " before or came in the same page.",
    ),
)
SINCE_SUCCESS = "syncd_feed_seconds_since_success"
SINCE_SUCCESS_HELP = "Seconds since the feed's last successful poll."

FeedKey = tuple[str, str]
Snapshot = dict[str, dict[FeedKey, int]]


def status_class(status: int | None) -> str:
    """The `status` label of a response: "2xx".."5xx", "429" on its own, "error" for none."""
    if status is None or not 200 <= status <= 599:
        # No response at all (timeout, refused connection, TLS failure); aiohttp never hands 1xx
        # to the caller, so anything outside 200..599 is just as broken.
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


def _escape(value: str) -> str:
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def _label_text(key: FeedKey) -> str:
    # Label names sorted, as prometheus_client writes them.
    return f'{{feed="{_escape(key[1])}",tenant="{_escape(key[0])}"}}'


def _header(name: str, help_text: str, kind: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


class _FeedSeries:
    """The {tenant, feed} series: nearly all of syncd's, so kept in plain dicts.

    prometheus_client spends about 10 us per series per scrape (a child object, a lock, a Sample
    tuple, generic formatting); at 1,000 tenants x 55 feeds that is seconds of CPU per scrape.
    Dicts of ints written with a cached label string cost a tenth of that.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self.values: Snapshot = {key: {} for key, _, _ in FEED_COUNTERS}
        self.source: LastSuccessSource | None = None
        self._clock = clock
        self._labels: dict[FeedKey, str] = {}
        self._tenant_feeds: dict[str, set[str]] = {}

    def inc(self, counter: str, key: FeedKey, n: int) -> None:
        series = self.values[counter]
        series[key] = series.get(key, 0) + n
        if key not in self._labels:
            self._labels[key] = _label_text(key)
            self._tenant_feeds.setdefault(key[0], set()).add(key[1])

    def forget(self, tenant: str) -> None:
        for feed in self._tenant_feeds.pop(tenant, set()):
            key = (tenant, feed)
            del self._labels[key]
            for series in self.values.values():
                series.pop(key, None)

    def snapshot(self) -> tuple[Snapshot, list[tuple[str, str, float]]]:
        """Copies safe to read from another thread while the event loop keeps counting."""
        rows = [] if self.source is None else list(self.source())
        return {name: series.copy() for name, series in self.values.items()}, rows

    def text(self, snapshot: Snapshot, rows: list[tuple[str, str, float]]) -> str:
        labels = self._labels
        out: list[str] = []
        for counter, name, help_text in FEED_COUNTERS:
            out.append(_header(name, help_text, "counter"))
            out.extend(
                f"{name}{labels.get(key) or _label_text(key)} {value}\n"
                for key, value in snapshot[counter].items()
            )
        out.append(_header(SINCE_SUCCESS, SINCE_SUCCESS_HELP, "gauge"))
        now = self._clock()
        for tenant, feed, ts in rows:
            key = (str(tenant), feed)
            # A timestamp slightly ahead of this clock is skew, not a success from the future.
            out.append(
                f"{SINCE_SUCCESS}{labels.get(key) or _label_text(key)} {max(0.0, now - ts):.3f}\n"
            )
        return "".join(out)

    def collect(self) -> Iterator[Metric]:
        """The same series as `text`, for `CollectorRegistry` users (tests, get_sample_value)."""
        snapshot, rows = self.snapshot()
        for counter, name, help_text in FEED_COUNTERS:
            family = CounterMetricFamily(
                name.removesuffix("_total"), help_text, labels=("tenant", "feed")
            )
            for key, value in snapshot[counter].items():
                family.add_metric(key, value)
            yield family
        gauge = GaugeMetricFamily(SINCE_SUCCESS, SINCE_SUCCESS_HELP, labels=("tenant", "feed"))
        now = self._clock()
        for tenant, feed, ts in rows:
            gauge.add_metric((str(tenant), feed), round(max(0.0, now - ts), 3))
        yield gauge


def _remove(metric: Counter | Gauge, *labels: str) -> None:
    """Remove one labelled series, whether or not it was ever recorded: prometheus_client 0.20
    raises KeyError for a series never recorded (a tenant that never hit a 429), later versions
    do nothing."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class _WithoutCreated:
    """A view of a registry without the `_created` samples of counters and histograms.

    In the classic text format each `_created` sample becomes a series of its own, doubling the
    series count for a timestamp nobody graphs. Filtered here rather than through
    prometheus_client's process-wide switch, so other registries keep their behaviour.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            created = metric.name + "_created"
            if any(s.name == created for s in metric.samples):
                metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class Metrics:
    """Every series syncd exports, in registries of its own.

    Label cardinality, for N tenants and F feeds (the catalogue has about 55):

    - per tenant and feed (5 x N x F): `records_fetched_total`, `records_published_total`,
      `records_unchanged_total`, `pages_total`, `feed_seconds_since_success`; plus
      `dead_letters_total` and `stale_records_total` for the feeds that ever produced one;
    - per tenant (up to 10 x N): `requests_total` (6 status classes), `rate_limited_total`,
      `paused_seconds_total`, `token_renewals_total`, `feeds_paused`;
    - per feed only (13 x F): `page_fetch_seconds`, a histogram whose label set is bounded by the
      catalogue, not by the customer list. Labelled by tenant it would add 13 x N series, by
      tenant and feed 13 x N x F (715,000 at 1,000 tenants); a slow tenant shows up in its
      `requests_total` and rate-limit series instead;
    - `redis_errors_total`, `schedule_lateness_seconds`: 13 series, no labels.

    That is 5 x N x F + 10 x N + 13 x F + 13 series plus dead letters and stale records: about
    286,000 at 1,000 tenants and 55 feeds. The {tenant, feed} ones bypass prometheus_client (see
    `_FeedSeries`), and `render_async` formats in a worker thread, so a scrape neither costs
    seconds of CPU nor stalls the event loop.

    `registry` holds every series for `CollectorRegistry` users; `render` is the fast path.
    Helpers take plain values (tenant ids as int, HTTP status as int) so callers need no
    prometheus_client types. A series appears on first use; `forget_tenant` drops a tenant's.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        # Metrics rendered by prometheus_client; `registry` adds the hand-written feed series.
        self._core = CollectorRegistry()
        r = self._core
        self.requests_total = Counter(
            "syncd_requests",
            "ServiceTitan API requests by response class.",
            ("tenant", "status"),
            registry=r,
        )
        self.page_fetch_seconds = Histogram(
            "syncd_page_fetch_seconds",
            "Time to fetch one export page.",
            ("feed",),
            buckets=PAGE_SECONDS_BUCKETS,
            registry=r,
        )
        self.rate_limited_total = Counter(
            "syncd_rate_limited", "429 responses that paused a tenant.", ("tenant",), registry=r
        )
        self.paused_seconds_total = Counter(
            "syncd_paused_seconds",
            "Seconds a tenant was paused by ServiceTitan's rate limit.",
            ("tenant",),
            registry=r,
        )
        self.token_renewals_total = Counter(
            "syncd_token_renewals", "Access tokens obtained.", ("tenant",), registry=r
        )
        self.redis_errors_total = Counter("syncd_redis_errors", "Failed Redis calls.", registry=r)
        self.schedule_lateness_seconds = Histogram(
            "syncd_schedule_lateness_seconds",
            "How long after its due time a feed poll was handed to a worker.",
            buckets=LATENESS_BUCKETS,
            registry=r,
        )
        self.feeds_paused = Gauge(
            "syncd_feeds_paused", "Feeds currently paused by backpressure.", ("tenant",), registry=r
        )
        self._feeds = _FeedSeries(clock)
        self.registry = CollectorRegistry()
        for collector in (
            self.requests_total,
            self.page_fetch_seconds,
            self.rate_limited_total,
            self.paused_seconds_total,
            self.token_renewals_total,
            self.redis_errors_total,
            self.schedule_lateness_seconds,
            self.feeds_paused,
            self._feeds,
        ):
            self.registry.register(collector)
        self._core_view = _WithoutCreated(self._core)
        self._render_lock = asyncio.Lock()
        # Status labels handed out per tenant, so forget_tenant can remove exactly those.
        self._statuses: dict[str, set[str]] = {}
        # Tenants no longer configured: a request or page still in flight for one of them when
        # it was removed must not bring its series back.
        self._retired: set[str] = set()

    def track_tenant(self, tenant: int) -> None:
        """Record the tenant's series again (after `forget_tenant`, when it is re-added)."""
        self._retired.discard(str(tenant))

    def request(self, tenant: int, status: int | None) -> None:
        """Count one API request by its HTTP status, or None for a transport error or timeout."""
        t = str(tenant)
        if t in self._retired:
            return
        label = status_class(status)
        self._statuses.setdefault(t, set()).add(label)
        self.requests_total.labels(t, label).inc()

    def page(
        self, tenant: int, feed: str, fetched: int, published: int, unchanged: int, seconds: float
    ) -> None:
        """Record one applied page: its record counts and how long the fetch took."""
        key = (str(tenant), feed)
        self.page_fetch_seconds.labels(feed).observe(seconds)
        if key[0] in self._retired:
            return
        inc = self._feeds.inc
        inc("pages", key, 1)
        inc("fetched", key, fetched)
        inc("published", key, published)
        inc("unchanged", key, unchanged)

    def rate_limited(self, tenant: int, wait_s: float) -> None:
        """Record a 429 that pauses the tenant for `wait_s` seconds."""
        t = str(tenant)
        if t in self._retired:
            return
        self.rate_limited_total.labels(t).inc()
        self.paused_seconds_total.labels(t).inc(max(0.0, wait_s))

    def token_renewed(self, tenant: int) -> None:
        """Count an access token obtained for the tenant."""
        if str(tenant) not in self._retired:
            self.token_renewals_total.labels(str(tenant)).inc()

    def dead_letter(self, tenant: int, feed: str, n: int = 1) -> None:
        """Count records sent to the tenant's dead-letter stream."""
        if str(tenant) not in self._retired:
            self._feeds.inc("dead", (str(tenant), feed), n)

    def stale_records(self, tenant: int, feed: str, n: int) -> None:
        """Count record versions dropped as older than what was published for their key."""
        self._feeds.inc("stale", (str(tenant), feed), n)

    def redis_error(self) -> None:
        """Count a failed Redis call."""
        self.redis_errors_total.inc()

    def lateness(self, seconds: float) -> None:
        """Record how late a due feed was dispatched."""
        self.schedule_lateness_seconds.observe(max(0.0, seconds))

    def set_feeds_paused(self, tenant: int, count: int) -> None:
        """Set how many of the tenant's feeds backpressure holds back right now."""
        if str(tenant) not in self._retired:
            self.feeds_paused.labels(str(tenant)).set(count)

    def set_last_success_source(self, fn: LastSuccessSource) -> None:
        """Read `(tenant, feed, unix_ts)` of each feed's last successful poll from `fn` per scrape.

        `fn` runs on the thread that asks for the metrics; `render_async` calls it on the event
        loop. A feed missing from its output has no series: to alert on feeds that never
        succeeded, report the time a feed was first scheduled until its first success.
        """
        self._feeds.source = fn

    def forget_tenant(self, tenant: int) -> None:
        """Remove every series labelled with the tenant, once it is no longer configured; until
        `track_tenant`, what is still in flight for it records nothing."""
        t = str(tenant)
        self._retired.add(t)
        self._feeds.forget(t)
        for status in self._statuses.pop(t, set()):
            _remove(self.requests_total, t, status)
        for per_tenant in (
            self.rate_limited_total,
            self.paused_seconds_total,
            self.token_renewals_total,
            self.feeds_paused,
        ):
            _remove(per_tenant, t)

    def render(self) -> bytes:
        """Every series in Prometheus text format, rendered on the calling thread."""
        return self._render(*self._feeds.snapshot())

    async def render_async(self) -> bytes:
        """Like `render`, formatted in a worker thread so the event loop keeps running.

        The engine's state is copied here on the loop, where it is safe to read; renders are
        serialised, so slow scrapes cannot pile up copies of the output.
        """
        async with self._render_lock:
            snapshot, rows = self._feeds.snapshot()
            return await asyncio.to_thread(self._render, snapshot, rows)

    def _render(self, snapshot: Snapshot, rows: list[tuple[str, str, float]]) -> bytes:
        core: bytes = generate_latest(self._core_view)
        return core + self._feeds.text(snapshot, rows).encode()

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """The current value of one sample, or None if it does not exist."""
        value: float | None = self.registry.get_sample_value(name, labels or {})
        return value
