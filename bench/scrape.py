"""What one /metrics scrape costs at 1,000 tenants x 55 feeds, at each `metrics_detail`.

A server process holds a `Metrics` in which every tenant and feed has recorded every kind of
event (pages, dead letters, requests of several status classes, 429s, token renewals, pauses,
Redis errors, lateness, fleet membership, per-tenant rate limits and failing tokens), and serves
it with syncd's own `OpsServer`. Before each scrape it records what a steady daemon records
between two scrapes 15 s apart (55,000 feeds every 300 s: about 2,750 polls, their requests and
lateness, now and then a 429 or a dead letter), then this process scrapes it over HTTP as
Prometheus does (gzip accepted). The server's CPU time is read around the scrapes only.

Reported per detail level: series, uncompressed and gzip bytes, CPU ms per scrape, wall ms,
RSS after a first scrape and after the measured ones, how far each scrape raised the peak RSS
above the RSS just before it (the kernel's high-water mark, reset before each scrape); and, in
this process, what rendering alone (and with gzip) costs.

    .venv/bin/python -m bench.scrape [--tenants 1000] [--scrapes 30]

Targets at the default detail ("tenant"): <= 30,000 series, <= 3 MB, <= 20 ms CPU per scrape, no
transient RSS growth (under 1 MB above the RSS before the scrape).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from typing import Any

import psutil

from bench import common
from syncd import catalogue
from syncd.engine.ratelimit import TokenBucket
from syncd.ops.exposition import zlib_gzip
from syncd.ops.metric_types import DETAILS
from syncd.ops.metrics import EngineStatus, Metrics, TenantStatus
from syncd.testing.redis_server import free_port

MB = 2**20
SCRAPE_INTERVAL_S = 15.0
POLLS_PER_S = 55_000 / 300


class Clock:
    """Wall-clock time that a scrape interval's events move on by the interval."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def populated(tenants: int, detail: str) -> Metrics:
    """A `Metrics` after every kind of event for every tenant and feed."""
    metrics = Metrics(clock=Clock(), detail=detail)  # type: ignore[arg-type]
    feeds = list(catalogue.feeds())
    for tenant in range(1, tenants + 1):
        metrics.track_tenant(tenant)
        metrics.set_feeds(tenant, dict.fromkeys(feeds, 300.0))
        metrics.token_renewed(tenant)
        for status in (200, 200, 401, 503, None):
            metrics.request(tenant, status)
        if tenant % 10 == 0:
            metrics.request(tenant, 429)
            metrics.rate_limited(tenant, 5.0)
        for i, feed in enumerate(feeds):
            metrics.page(tenant, feed, 100 + i, 10, 90 + i, 0.05 * (i % 20))
            if (tenant + i) % 50 == 0:
                metrics.dead_letter(tenant, feed, 1)
            if (tenant + i) % 30 == 0:
                metrics.stale_records(tenant, feed, 2)
        metrics.set_feeds_paused(tenant, tenant % 3)
    for i in range(1000):
        metrics.lateness(i / 1000)
        metrics.redis_error()
    metrics.set_fleet(3, tenants)
    # As the daemon does: at each scrape, a row for each tenant not at rest (here 1 in 7 after a
    # 429, 1 in 10 paused by one, 1 in 100 failing its token requests).
    buckets = {t: TokenBucket(20.0, 10.0) for t in range(1, tenants + 1)}
    for t in buckets:
        metrics.set_rate_limit(t, 20.0)
    for t, bucket in buckets.items():
        if t % 7 == 0:
            bucket.throttled(time.monotonic())

    def status() -> EngineStatus:
        now = time.monotonic()
        rows = []
        for t, b in buckets.items():
            paused, failing = t % 10 == 0, t % 100 == 0
            if paused or failing or b.current < b.rate:
                rows.append(TenantStatus(t, b.allowed(now), len(feeds), paused, failing))
        return EngineStatus(rows, redis_memory_full=False)

    metrics.set_status_source(status)
    return metrics


def between_scrapes(metrics: Metrics, tenants: int, rng: random.Random) -> None:
    """What a steady daemon records in one scrape interval: mostly empty polls."""
    feeds = list(catalogue.feeds())
    clock = metrics._clock
    assert isinstance(clock, Clock)
    clock.offset += SCRAPE_INTERVAL_S  # time since success moves on for every feed
    for _ in range(int(POLLS_PER_S * SCRAPE_INTERVAL_S)):
        tenant, feed = rng.randint(1, tenants), rng.choice(feeds)
        metrics.lateness(rng.random() * 0.01)
        metrics.request(tenant, 200)
        records = 1 if rng.random() < 0.1 else 0
        metrics.page(tenant, feed, records, records, 0, rng.random() * 0.2)
        if rng.random() < 0.002:
            metrics.request(tenant, 429)
            metrics.rate_limited(tenant, 2.0)
        if rng.random() < 0.001:
            metrics.dead_letter(tenant, feed)


async def _serve(tenants: int, detail: str, port: int) -> None:
    """The server process: answers "tick" on stdin by recording a scrape interval's events."""
    from syncd.ops.server import OpsServer

    class Healthy:
        def liveness(self) -> tuple[bool, dict[str, object]]:
            return True, {}

        async def readiness(self) -> tuple[bool, dict[str, object]]:
            return True, {}

    metrics = populated(tenants, detail)
    server = OpsServer(f"127.0.0.1:{port}", metrics, Healthy())
    await server.start()
    print("ready", flush=True)
    rng = random.Random(1)
    while await asyncio.to_thread(sys.stdin.readline):
        between_scrapes(metrics, tenants, rng)
        print("ok", flush=True)


def _scrape(url: str) -> tuple[bytes, bytes]:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        raw = resp.read()
        gzipped = resp.headers.get("Content-Encoding") == "gzip"
    return (gzip.decompress(raw) if gzipped else raw), raw


class _HighWaterMark:
    """The kernel's peak RSS of a process (VmHWM), reset now (clear_refs 5: Linux, owner or
    root); growth_mb() is how far the peak rose above the RSS at reset, -1 if unavailable."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
            self.start = self._read("VmRSS")
        except OSError:
            self.start = -1.0

    def _read(self, field: str) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
        raise OSError(f"no {field}")

    def growth_mb(self) -> float:
        if self.start < 0:
            return -1.0
        return max(0.0, self._read("VmHWM") - self.start)


def _cpu(ps: psutil.Process) -> float:
    times = ps.cpu_times()
    return float(times.user + times.system)


def _in_process(tenants: int, detail: str) -> dict[str, float]:
    """Rendering alone, and with gzip, in this process after a scrape interval's events: the
    best of five, CPU ms."""
    metrics = populated(tenants, detail)
    metrics.render()
    rng = random.Random(2)

    def best(fn: Callable[[], object]) -> float:
        times = []
        for _ in range(5):
            between_scrapes(metrics, tenants, rng)
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return round(min(times) * 1000, 1)

    return {
        "render_cpu_ms": best(metrics.render),
        "render_gzip_cpu_ms": best(lambda: zlib_gzip(metrics.render())),
    }


def measure(tenants: int, detail: str, scrapes: int) -> dict[str, Any]:
    port = free_port()
    argv = [sys.executable, "-m", "bench.scrape", "--serve", detail]
    argv += ["--tenants", str(tenants), "--port", str(port)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    assert proc.stdout is not None
    stdin, stdout = proc.stdin, proc.stdout

    def tick() -> None:
        stdin.write("tick\n")
        stdin.flush()
        # structlog writes to stdout too: wait for the line that answers.
        for line in stdout:
            if line.strip() == "ok":
                return
        raise RuntimeError("scrape server exited")

    try:
        for line in stdout:
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError("scrape server did not start")
        ps = psutil.Process(proc.pid)
        url = f"http://127.0.0.1:{port}/metrics"
        tick()
        text, wire = _scrape(url)  # a first scrape: label caches filled, render thread started
        time.sleep(0.5)
        rss_before = ps.memory_info().rss / MB
        # CPU ticks are 10 ms: add up many scrapes rather than read each one.
        cpu_s, wall_ms, transient = 0.0, [], []
        with common.PeakRss(proc.pid) as peak:
            for _ in range(scrapes):
                tick()
                time.sleep(0.05)  # let the server settle before the clock starts
                hwm = _HighWaterMark(proc.pid)
                cpu0, t0 = _cpu(ps), time.perf_counter()
                text, wire = _scrape(url)
                wall_ms.append((time.perf_counter() - t0) * 1000)
                time.sleep(0.05)  # the server may still be closing the response
                cpu_s += _cpu(ps) - cpu0
                transient.append(hwm.growth_mb())
        rss_after = ps.memory_info().rss / MB
    finally:
        proc.kill()
        proc.wait()
    series = sum(1 for line in text.splitlines() if line and not line.startswith(b"#"))
    return {
        "detail": detail,
        "series": series,
        "bytes": len(text),
        "gzip_bytes": len(wire),
        "cpu_ms_per_scrape": round(cpu_s * 1000 / scrapes, 1),
        "wall_ms_median": round(statistics.median(wall_ms), 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_during_mb": round(peak.peak_mb, 1),
        "rss_after_mb": round(rss_after, 1),
        "rss_growth_mb": round(rss_after - rss_before, 1),
        # Peak RSS during a scrape over RSS just before it (VmHWM after resetting it).
        "rss_transient_mb_max": round(max(transient), 2) if transient[0] >= 0 else None,
        "rss_transient_mb_median": (
            round(statistics.median(transient), 2) if transient[0] >= 0 else None
        ),
        **_in_process(tenants, detail),
        "scrapes": scrapes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "setup": {
            "tenants": args.tenants,
            "feeds_per_tenant": len(catalogue.feeds()),
            "scrapes": args.scrapes,
            "events_between_scrapes": f"{POLLS_PER_S * SCRAPE_INTERVAL_S:.0f} polls",
            "note": "cpu_ms_per_scrape: the server process's user+system time during the "
            "scrapes (gzip included: the scraper accepts it, as Prometheus does) over their "
            "number; render_*: the same Metrics rendered in the bench process, best of five",
        }
    }
    for detail in DETAILS:
        common.log(f"scrape: {args.tenants} tenants, detail {detail}")
        figures[detail] = measure(args.tenants, detail, args.scrapes)
    d = figures["tenant"]
    figures["targets"] = {
        "series <= 30000": d["series"] <= 30_000,
        "bytes <= 3 MB": d["bytes"] <= 3_000_000,
        "cpu_ms_per_scrape <= 20": d["cpu_ms_per_scrape"] <= 20,
        "no transient rss growth (< 1 MB)": 0 <= d["rss_transient_mb_max"] < 1.0,
    }
    common.write_result("scrape", figures, "n/a (no Redis involved)")
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=common.env_int("BENCH_SCRAPE_TENANTS", 1000))
    p.add_argument("--scrapes", type=int, default=common.env_int("BENCH_SCRAPE_SCRAPES", 30))
    p.add_argument("--serve", choices=DETAILS, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.tenants, args.serve, args.port))
        return 0
    print(json.dumps(run(args), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
