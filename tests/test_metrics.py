"""The metrics budget: which series each detail level exports, how many, and what they say."""

from __future__ import annotations

import gzip

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from syncd import config
from syncd.engine.ratelimit import RECOVERY, TokenBucket
from syncd.ops.metric_types import LATENESS_BUCKETS, PAGE_SECONDS_BUCKETS, RECORD_COUNTERS
from syncd.ops.metrics import EngineStatus, Metrics, TenantStatus

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
STATUSES = (200, 304, 404, 429, 503, None)  # every status class


class Clock:
    def __init__(self, now: float = 10_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(metrics: Metrics) -> Samples:
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


def busy(tenants: int, feeds: int, detail: str = "tenant", clock: Clock | None = None) -> Metrics:
    """Every kind of event for every tenant and feed, every status class for every tenant."""
    m = Metrics(clock=clock or Clock(), detail=detail)  # type: ignore[arg-type]
    names = [f"feed.{i}" for i in range(feeds)]
    for t in range(1, tenants + 1):
        m.set_feeds(t, dict.fromkeys(names, 300.0))
        for status in STATUSES:
            m.request(t, status)
        for name in names:
            m.page(t, name, 3, 2, 1, 0.3)
            m.dead_letter(t, name)
            m.stale_records(t, name, 2)
        m.rate_limited(t, 2.0)
        m.token_renewed(t)
        m.set_feeds_paused(t, 1)
    m.redis_error()
    m.lateness(0.2)
    m.set_fleet(3, tenants)
    for t in range(1, tenants + 1):
        m.set_rate_limit(t, 20.0)
    rows = [TenantStatus(t, 10.0, feeds, True, False) for t in range(1, tenants + 1)]
    m.set_status_source(lambda: EngineStatus(rows, redis_memory_full=True))
    return m


def test_fleet_gauges_say_how_configurations_compare_and_whether_a_name_clashes() -> None:
    m = Metrics(clock=Clock())  # type: ignore[arg-type]
    assert not [k for k in samples(m) if k[0].startswith("syncd_fleet_")]  # not in a fleet
    m.set_fleet(3, 2, disagreements=4, unpolled=1, name_clash=True)
    got = samples(m)
    assert value(got, "syncd_fleet_members") == 3
    assert value(got, "syncd_fleet_tenants_owned") == 2
    assert value(got, "syncd_fleet_config_disagreements") == 4
    assert value(got, "syncd_fleet_feeds_unpolled") == 1
    assert value(got, "syncd_fleet_instance_name_clash") == 1
    m.set_fleet(3, 2)
    got = samples(m)
    assert value(got, "syncd_fleet_config_disagreements") == 0
    assert value(got, "syncd_fleet_instance_name_clash") == 0


@pytest.mark.parametrize(("tenants", "feeds"), [(1, 1), (3, 4), (7, 2)])
def test_series_count_formula_at_each_detail(tenants: int, feeds: int) -> None:
    """The formulas of the README and syncd.ops.metrics, counted on what is rendered."""
    n, f, r = tenants, feeds, len(RECORD_COUNTERS)
    page_histogram = len(PAGE_SECONDS_BUCKETS) + 3  # buckets, +Inf, _count, _sum
    # errors, lateness, polling, replicas behind, fleet
    unlabelled = 1 + (len(LATENESS_BUCKETS) + 3) + 3 + 1 + 5
    per_tenant = r + 3 + 2 + 3 + 2  # records, 429s/paused/tokens, age, rates/auth, pauses
    per_feed = r + 2 + page_histogram
    statuses = len(STATUSES) * n
    default = per_tenant * n + statuses + per_feed * f + unlabelled
    assert (per_tenant, per_feed, unlabelled) == (16, 21, 22)
    assert len(samples(busy(n, f))) == default
    # Tenant x feed: four record counters, time since success, and here a dead letter and a
    # stale record each.
    assert len(samples(busy(n, f, "tenant_feed"))) == default + 7 * n * f


def test_default_detail_never_labels_tenant_and_feed_together() -> None:
    for (name, labels), _ in samples(busy(4, 5)).items():
        assert not {"tenant", "feed"} <= {k for k, _ in labels}, name
    full = samples(busy(4, 5, "tenant_feed"))
    assert value(full, "syncd_pages_total", tenant="2", feed="feed.3") == 1


def test_per_tenant_and_per_feed_counts_add_up() -> None:
    m = Metrics(clock=Clock())
    m.page(1, "a", fetched=10, published=4, unchanged=6, seconds=0.1)
    m.page(1, "b", fetched=5, published=5, unchanged=0, seconds=0.1)
    m.page(2, "a", fetched=1, published=0, unchanged=1, seconds=0.1)
    m.dead_letter(2, "a", 3)
    got = samples(m)
    assert value(got, "syncd_tenant_records_fetched_total", tenant="1") == 15
    assert value(got, "syncd_tenant_records_published_total", tenant="1") == 9
    assert value(got, "syncd_tenant_pages_total", tenant="2") == 1
    assert value(got, "syncd_tenant_dead_letters_total", tenant="2") == 3
    assert value(got, "syncd_feed_records_fetched_total", feed="a") == 11
    assert value(got, "syncd_feed_records_unchanged_total", feed="a") == 7
    assert value(got, "syncd_feed_dead_letters_total", feed="a") == 3
    assert value(got, "syncd_feed_pages_total", feed="b") == 1


def test_counters_and_errors_start_at_zero() -> None:
    """A first 429, dead letter or Redis error must show as an increase, not as a new series."""
    m = Metrics(clock=Clock())
    m.set_feeds(5, {"a": 60.0})
    got = samples(m)
    for name in (
        "syncd_rate_limited_total",
        "syncd_paused_seconds_total",
        "syncd_token_renewals_total",
        "syncd_tenant_dead_letters_total",
        "syncd_tenant_pages_total",
    ):
        assert value(got, name, tenant="5") == 0, name
    assert value(got, "syncd_feed_dead_letters_total", feed="a") == 0
    assert value(got, "syncd_redis_errors_total") == 0
    assert value(got, "syncd_feeds_paused", tenant="5", reason="consumer_lag") == 0


@pytest.mark.parametrize(
    ("feeds", "ages", "expected"),
    [
        # One interval: the oldest last success.
        ({"a": 300.0, "b": 300.0}, {"a": 100.0, "b": 700.0}, (700, 300)),
        # Mixed intervals: the feed furthest behind its own interval, not the oldest.
        ({"a": 60.0, "b": 3600.0}, {"a": 200.0, "b": 1000.0}, (200, 60)),
        ({"a": 60.0, "b": 3600.0}, {"a": 50.0, "b": 1000.0}, (50, 60)),
        ({"a": 60.0, "b": 3600.0}, {"a": 20.0, "b": 2000.0}, (2000, 3600)),
        # A success stamped ahead of the reading clock is skew: zero, not negative.
        ({"a": 300.0}, {"a": -5.0}, (0, 300)),
    ],
)
def test_time_since_success_is_the_feed_furthest_behind(
    feeds: dict[str, float], ages: dict[str, float], expected: tuple[int, float]
) -> None:
    clock = Clock()
    m = Metrics(clock=clock)
    m.set_feeds(1, feeds, last_ok={f: clock.now - age for f, age in ages.items()})
    # Another tenant, fresh everywhere, does not hide the first one in the per-feed series.
    m.set_feeds(2, feeds)
    got = samples(m)
    age, interval = expected
    assert value(got, "syncd_tenant_seconds_since_success", tenant="1") == age
    assert value(got, "syncd_tenant_poll_interval_seconds", tenant="1") == interval
    assert value(got, "syncd_tenant_seconds_since_success", tenant="2") == 0
    # Per feed across tenants: tenant 1's copy is the oldest of each feed.
    for feed, feed_age in ages.items():
        assert value(got, "syncd_feed_oldest_seconds_since_success", feed=feed) == max(
            0, int(feed_age)
        )
        assert value(got, "syncd_feed_poll_interval_seconds", feed=feed) == feeds[feed]


def test_time_since_success_moves_with_successes_and_configuration() -> None:
    clock = Clock(1_000.0)
    m = Metrics(clock=clock)
    m.set_feeds(1, {"a": 60.0, "b": 60.0})  # never succeeded: counts from now
    clock.now += 50
    m.page(1, "a", 1, 1, 0, 0.1)
    clock.now += 30
    got = samples(m)
    assert value(got, "syncd_tenant_seconds_since_success", tenant="1") == 80  # b, never
    assert value(got, "syncd_feed_oldest_seconds_since_success", feed="a") == 30
    m.page(1, "b", 1, 1, 0, 0.1)
    clock.now += 10
    assert value(samples(m), "syncd_tenant_seconds_since_success", tenant="1") == 40  # a
    # A reload: "a" is gone, "b" keeps its last success under a new interval, "c" is new.
    m.set_feeds(1, {"b": 600.0, "c": 60.0})
    clock.now += 5
    got = samples(m)
    assert value(got, "syncd_feed_oldest_seconds_since_success", feed="a") is None
    assert value(got, "syncd_feed_oldest_seconds_since_success", feed="b") == 15
    assert value(got, "syncd_feed_poll_interval_seconds", feed="b") == 600
    assert value(got, "syncd_tenant_seconds_since_success", tenant="1") == 5  # c: 5/60 > 15/600


def test_engine_status_per_tenant_and_pauses_by_reason() -> None:
    m = Metrics(clock=Clock())
    m.set_feeds(1, {"a": 60.0, "b": 60.0})
    m.set_feeds(2, {"a": 60.0})
    m.set_feeds(3, {"a": 60.0})
    m.set_feeds_paused(1, 1)
    for tenant, limit in ((1, 20.0), (2, 7.5), (3, 5.0)):
        m.set_rate_limit(tenant, limit)
    # Tenant 3 is at rest: no row. Tenant 4 was removed meanwhile: its row is ignored.
    rows = [
        TenantStatus(1, 13.999, 2, True, False),
        TenantStatus(2, 7.5, 1, False, True),
        TenantStatus(4, 1.0, 1, True, True),
    ]
    m.set_status_source(lambda: EngineStatus(rows, redis_unavailable=True))
    got = samples(m)
    assert value(got, "syncd_tenant_requests_per_second_limit", tenant="1") == 20
    assert value(got, "syncd_tenant_requests_per_second_allowed", tenant="1") == 14.0
    assert value(got, "syncd_tenant_requests_per_second_limit", tenant="2") == 7.5
    assert value(got, "syncd_tenant_auth_failing", tenant="1") == 0
    assert value(got, "syncd_tenant_auth_failing", tenant="2") == 1
    assert value(got, "syncd_feeds_paused", tenant="1", reason="consumer_lag") == 1
    assert value(got, "syncd_feeds_paused", tenant="1", reason="rate_limit") == 2
    assert value(got, "syncd_feeds_paused", tenant="2", reason="rate_limit") == 0
    assert value(got, "syncd_tenant_requests_per_second_allowed", tenant="3") == 5
    assert value(got, "syncd_tenant_auth_failing", tenant="3") == 0
    assert value(got, "syncd_feeds_paused", tenant="3", reason="rate_limit") == 0
    assert not [k for k in got if ("tenant", "4") in k[1]]
    assert value(got, "syncd_tenant_requests_per_second_allowed", tenant="3") == 5
    assert value(got, "syncd_tenant_auth_failing", tenant="3") == 0
    assert value(got, "syncd_feeds_paused", tenant="3", reason="rate_limit") == 0
    assert not [k for k in got if ("tenant", "4") in k[1]]
    assert value(got, "syncd_polling_paused", reason="redis_unavailable") == 1
    assert value(got, "syncd_polling_paused", reason="redis_memory") == 0
    assert value(got, "syncd_polling_paused", reason="replicas_behind") == 0
    m.set_status_source(lambda: EngineStatus(rows, replicas_behind=True))
    assert value(samples(m), "syncd_polling_paused", reason="replicas_behind") == 1


def test_replicas_behind_seconds_are_a_counter_from_zero() -> None:
    """Seconds held for replicas, whatever the hold's state at the scrape: its rate is the share
    of time held (the SyncdReplicasBehind alert), which a gauge back at 0 between two short
    holds cannot tell."""
    m = Metrics(clock=Clock())
    m.set_status_source(lambda: EngineStatus(()))
    assert value(samples(m), "syncd_replicas_behind_seconds_total") == 0
    m.set_status_source(lambda: EngineStatus((), replicas_behind=False, replicas_behind_s=42.25))
    got = samples(m)
    assert value(got, "syncd_replicas_behind_seconds_total") == 42.25
    assert value(got, "syncd_polling_paused", reason="replicas_behind") == 0


def test_renders_after_changes_show_the_new_values() -> None:
    """Lines are kept between renders: a change, a removal and a return all show."""
    m = busy(3, 2)
    first = samples(m)
    m.page(2, "feed.1", 100, 0, 100, 0.1)
    m.request(2, 200)
    m.forget_tenant(3)
    # The engine no longer lists it either.
    m.set_status_source(lambda: EngineStatus([TenantStatus(2, 20.0, 2, False, False)]))
    got = samples(m)
    assert value(got, "syncd_tenant_records_fetched_total", tenant="2") == 106
    assert value(got, "syncd_requests_total", tenant="2", status="2xx") == 2
    assert value(got, "syncd_tenant_records_fetched_total", tenant="1") == value(
        first, "syncd_tenant_records_fetched_total", tenant="1"
    )
    assert not [k for k in got if ("tenant", "3") in k[1]]
    m.track_tenant(3)
    m.set_feeds(3, {"feed.0": 300.0})
    got = samples(m)
    assert value(got, "syncd_tenant_records_fetched_total", tenant="3") == 0


def test_render_matches_the_registry_at_each_detail() -> None:
    for detail in ("tenant", "tenant_feed"):
        m = busy(3, 3, detail)
        m.page(1, 'odd"feed\\name\n', fetched=1, published=1, unchanged=0, seconds=0.1)
        reference = {
            (s.name, frozenset(s.labels.items()), s.value)
            for family in text_string_to_metric_families(generate_latest(m.registry).decode())
            for s in family.samples
        }
        assert {(k[0], k[1], v) for k, v in samples(m).items()} == reference


async def test_render_http_compresses_from_the_size_asked() -> None:
    m = busy(2, 2)
    plain = await m.render_async()
    assert plain == m.render()
    body, compressed = await m.render_http(1024)
    assert compressed
    assert gzip.decompress(body) == plain
    assert await m.render_http(len(plain) + 1) == (plain, False)
    assert await m.render_http(None) == (plain, False)


def test_pause_reasons_are_a_closed_set() -> None:
    with pytest.raises(ValueError, match="consumer_lag, rate_limit"):
        Metrics().set_feeds_paused(1, 2, reason="group g1 has 9 unacknowledged events")


def test_unknown_detail_is_refused() -> None:
    with pytest.raises(ValueError, match="tenant, tenant_feed"):
        Metrics(detail="feed")  # type: ignore[arg-type]
    base = {
        "servicetitan": {"app_key": "k"},
        "tenants": [{"id": 1, "client_id": "c", "client_secret": "s"}],
    }
    with pytest.raises(config.ConfigError, match=r"syncd\.toml: ops\.metrics_detail"):
        config.parse({**base, "ops": {"metrics_detail": "feed"}}, "syncd.toml")
    full = config.parse({**base, "ops": {"metrics_detail": "tenant_feed"}})
    assert full.ops.metrics_detail == "tenant_feed"
    assert config.parse(base).ops.metrics_detail == "tenant"


@pytest.mark.parametrize(
    ("elapsed", "expected"),
    [(0.0, 14.0), (5.0, 14.0 + RECOVERY * 20.0 * 5.0), (1_000.0, 20.0), (-1.0, 14.0)],
)
def test_allowed_rate_recovers_towards_the_ceiling(elapsed: float, expected: float) -> None:
    bucket = TokenBucket(rate=20.0, burst=10.0, updated=100.0, current=14.0)
    assert bucket.allowed(100.0 + elapsed) == pytest.approx(expected)
    assert bucket.current == 14.0  # reading does not change the bucket
