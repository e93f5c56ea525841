"""The ops server over real HTTP, the metrics it serves, and listen address parsing."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from syncd.config import OpsConfig
from syncd.config.addresses import parse_listen
from syncd.ops import server as ops
from syncd.ops.metric_types import CONTENT_TYPE, status_class
from syncd.ops.metrics import Metrics
from syncd.ops.server import OpsServer

Samples = set[tuple[str, frozenset[tuple[str, str]], float]]


class FakeHealth:
    """A HealthSource whose answers the test sets."""

    def __init__(self) -> None:
        self.live: tuple[bool, dict[str, object]] = (True, {"last_progress_s": 1.5})
        self.ready: tuple[bool, dict[str, object]] = (True, {"redis": "ok", "tenants": 2})
        self.ready_delay = 0.0
        self.fail_with: Exception | None = None

    def liveness(self) -> tuple[bool, dict[str, object]]:
        if self.fail_with is not None:
            raise self.fail_with
        return self.live

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        if self.fail_with is not None:
            raise self.fail_with
        await asyncio.sleep(self.ready_delay)
        return self.ready


def samples(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items()), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def populated_metrics() -> Metrics:
    """Every tenant x feed series too (`tenant_feed` detail), at clock 1,000."""
    clock = Clock(900.5)
    metrics = Metrics(clock=clock, detail="tenant_feed")
    metrics.set_feeds(123456, {"crm.customers": 300.0})
    metrics.set_feeds(777, {"jpm.jobs": 60.0})
    metrics.request(123456, 200)
    metrics.request(123456, 200)
    metrics.request(123456, 429)
    metrics.request(123456, None)
    metrics.request(777, 503)
    metrics.page(123456, "crm.customers", fetched=500, published=20, unchanged=480, seconds=0.3)
    metrics.page(123456, "crm.customers", fetched=10, published=10, unchanged=0, seconds=0.07)
    clock.now = 1_000.25  # a success stamped slightly ahead of the clock that reads it
    metrics.page(777, "jpm.jobs", fetched=1, published=1, unchanged=0, seconds=4.0)
    clock.now = 1_000.0
    metrics.rate_limited(123456, 12.5)
    metrics.token_renewed(123456)
    metrics.dead_letter(123456, "crm.customers", n=2)
    metrics.redis_error()
    metrics.set_feeds_paused(123456, 3)
    metrics.lateness(0.02)
    return metrics


@pytest.fixture
def health() -> FakeHealth:
    return FakeHealth()


@pytest.fixture
def metrics() -> Metrics:
    return populated_metrics()


@pytest.fixture
async def server(metrics: Metrics, health: FakeHealth) -> AsyncIterator[OpsServer]:
    # Readiness is checked in the background; often here, so that tests see changes quickly.
    options = OpsConfig(listen="127.0.0.1:0", readiness_interval=0.02)
    srv = OpsServer("127.0.0.1:0", metrics, health, options)
    await srv.start()
    yield srv
    await srv.stop()


async def readyz_until(
    http: aiohttp.ClientSession, server: OpsServer, status: int, body: dict[str, object]
) -> None:
    """Poll /readyz until it answers `status` with `body` (the background check catches up)."""
    got: tuple[int, object] = (0, None)
    for _ in range(500):
        async with http.get(url(server, "/readyz")) as resp:
            got = (resp.status, await resp.json())
        if got == (status, body):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"/readyz kept answering {got}, expected {(status, body)}")


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(server: OpsServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def test_metrics_endpoint(server: OpsServer, http: aiohttp.ClientSession) -> None:
    async with http.get(url(server, "/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == CONTENT_TYPE
        got = samples(await resp.text())
    t, f = "123456", "crm.customers"
    expected = {
        ("syncd_requests_total", frozenset({("tenant", t), ("status", "2xx")}), 2.0),
        ("syncd_requests_total", frozenset({("tenant", t), ("status", "429")}), 1.0),
        ("syncd_requests_total", frozenset({("tenant", t), ("status", "error")}), 1.0),
        ("syncd_requests_total", frozenset({("tenant", "777"), ("status", "5xx")}), 1.0),
        ("syncd_records_fetched_total", frozenset({("tenant", t), ("feed", f)}), 510.0),
        ("syncd_records_published_total", frozenset({("tenant", t), ("feed", f)}), 30.0),
        ("syncd_records_unchanged_total", frozenset({("tenant", t), ("feed", f)}), 480.0),
        ("syncd_pages_total", frozenset({("tenant", t), ("feed", f)}), 2.0),
        ("syncd_pages_total", frozenset({("tenant", "777"), ("feed", "jpm.jobs")}), 1.0),
        ("syncd_page_fetch_seconds_count", frozenset({("feed", f)}), 2.0),
        ("syncd_page_fetch_seconds_bucket", frozenset({("feed", f), ("le", "0.1")}), 1.0),
        ("syncd_page_fetch_seconds_bucket", frozenset({("feed", f), ("le", "+Inf")}), 2.0),
        ("syncd_rate_limited_total", frozenset({("tenant", t)}), 1.0),
        ("syncd_paused_seconds_total", frozenset({("tenant", t)}), 12.5),
        ("syncd_token_renewals_total", frozenset({("tenant", t)}), 1.0),
        ("syncd_dead_letters_total", frozenset({("tenant", t), ("feed", f)}), 2.0),
        ("syncd_redis_errors_total", frozenset(), 1.0),
        ("syncd_feeds_paused", frozenset({("tenant", t), ("reason", "consumer_lag")}), 3.0),
        ("syncd_schedule_lateness_seconds_count", frozenset(), 1.0),
        ("syncd_schedule_lateness_seconds_bucket", frozenset({("le", "0.05")}), 1.0),
        ("syncd_feed_seconds_since_success", frozenset({("tenant", t), ("feed", f)}), 99.5),
        # A last success timestamp ahead of the clock reads as zero, not negative.
        (
            "syncd_feed_seconds_since_success",
            frozenset({("tenant", "777"), ("feed", "jpm.jobs")}),
            0.0,
        ),
    }
    assert expected <= got
    assert not [s for s in got if s[0].endswith("_created")]


async def test_metrics_are_compressed_on_request(
    server: OpsServer, http: aiohttp.ClientSession
) -> None:
    async with http.get(url(server, "/metrics"), headers={"Accept-Encoding": "gzip"}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Encoding"] == "gzip"
        assert "syncd_pages_total" in await resp.text()


async def test_healthz(server: OpsServer, health: FakeHealth, http: aiohttp.ClientSession) -> None:
    async with http.get(url(server, "/healthz")) as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok", "last_progress_s": 1.5}
    health.live = (False, {"last_progress_s": 400.0, "reason": "scheduler stalled"})
    async with http.get(url(server, "/healthz")) as resp:
        assert resp.status == 503
        assert await resp.json() == {
            "status": "fail",
            "last_progress_s": 400.0,
            "reason": "scheduler stalled",
        }


async def test_readyz(server: OpsServer, health: FakeHealth, http: aiohttp.ClientSession) -> None:
    await readyz_until(http, server, 200, {"status": "ok", "redis": "ok", "tenants": 2})
    health.ready = (False, {"redis": "ConnectionError", "tenants_failing": [123456]})
    await readyz_until(
        http,
        server,
        503,
        {"status": "fail", "redis": "ConnectionError", "tenants_failing": [123456]},
    )


async def test_readyz_times_out(
    server: OpsServer,
    health: FakeHealth,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ops, "READINESS_TIMEOUT_S", 0.05)
    health.ready_delay = 5
    await readyz_until(http, server, 503, {"status": "fail", "error": "readiness check timed out"})


async def test_failing_health_source_answers_503(
    server: OpsServer, health: FakeHealth, http: aiohttp.ClientSession
) -> None:
    health.fail_with = RuntimeError("boom")
    async with http.get(url(server, "/healthz")) as resp:
        assert resp.status == 503
        assert await resp.json() == {"status": "error", "error": "RuntimeError"}
    await readyz_until(http, server, 503, {"status": "fail", "error": "RuntimeError"})


async def test_unknown_path_is_404(server: OpsServer, http: aiohttp.ClientSession) -> None:
    async with http.get(url(server, "/")) as resp:
        assert resp.status == 404


async def test_ipv6_listen(metrics: Metrics, health: FakeHealth) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 support in this Python build")
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback on this host")
    srv = OpsServer("[::1]:0", metrics, health)
    await srv.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://[::1]:{srv.port}/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        await srv.stop()


async def test_stop_twice_and_start_twice(metrics: Metrics, health: FakeHealth) -> None:
    srv = OpsServer("127.0.0.1:0", metrics, health)
    await srv.start()
    assert srv.port > 0
    with pytest.raises(RuntimeError, match="already started"):
        await srv.start()
    await srv.stop()
    await srv.stop()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9108", ("127.0.0.1", 9108)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:9108", ("::1", 9108)),
        ("[::]:9108", ("::", 9108)),
        ("[fe80::1%eth0]:9108", ("fe80::1%eth0", 9108)),
        (":9108", ("", 9108)),
        (" 0.0.0.0:65535 ", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no port"),
        ("9108", "no port"),
        ("localhost", "no port"),
        ("localhost:", "port must be 0..65535"),
        ("localhost:http", "port must be 0..65535"),
        ("localhost:65536", "port must be 0..65535"),
        ("localhost:-1", "port must be 0..65535"),
        ("localhost:٣", "port must be 0..65535"),
        ("::1:9108", "in brackets"),
        ("[::1]", "needs ]:PORT"),
        ("[::1]9108", "needs ]:PORT"),
        ("[localhost]:9108", "not an IPv6 address"),
    ],
)
def test_parse_listen_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_listen(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    ("status", "label"),
    [
        (200, "2xx"),
        (204, "2xx"),
        (304, "3xx"),
        (401, "4xx"),
        (429, "429"),
        (500, "5xx"),
        (599, "5xx"),
        (None, "error"),
        (100, "error"),
        (600, "error"),
    ],
)
def test_status_class(status: int | None, label: str) -> None:
    assert status_class(status) == label


def test_render_matches_prometheus_client() -> None:
    metrics = populated_metrics()
    metrics.page(1, 'odd"feed\\name\n', fetched=1, published=1, unchanged=0, seconds=0.1)
    everything = samples(generate_latest(metrics.registry).decode())
    reference = {s for s in everything if not s[0].endswith("_created")}
    assert samples(metrics.render().decode()) == reference


async def test_render_async_matches_render() -> None:
    metrics = populated_metrics()
    assert await metrics.render_async() == metrics.render()


def test_forget_tenant_removes_its_series_only() -> None:
    metrics = populated_metrics()
    metrics.forget_tenant(123456)
    got = samples(metrics.render().decode())
    assert not [s for s in got if ("tenant", "123456") in s[1]]
    assert ("syncd_pages_total", frozenset({("tenant", "777"), ("feed", "jpm.jobs")}), 1.0) in got
    assert ("syncd_requests_total", frozenset({("tenant", "777"), ("status", "5xx")}), 1.0) in got
    # The histogram is per feed, not per tenant, and stays.
    assert ("syncd_page_fetch_seconds_count", frozenset({("feed", "crm.customers")}), 2.0) in got
    metrics.forget_tenant(123456)


def test_instances_do_not_share_series() -> None:
    first, second = Metrics(), Metrics()
    first.token_renewed(1)
    assert first.sample("syncd_token_renewals_total", {"tenant": "1"}) == 1.0
    assert second.sample("syncd_token_renewals_total", {"tenant": "1"}) is None
