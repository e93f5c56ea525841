"""What one /metrics scrape costs at 1,000 tenants x 55 feeds, at each `metrics_detail`.

A server process holds a `Metrics` in which every tenant and feed has recorded every kind of
event (pages, dead letters, requests of several status classes, 429s, token renewals, pauses,
Redis errors, lateness, fleet membership, per-tenant rate limits and failing tokens), and serves
it with syncd's own `OpsServer`. This process scrapes it over HTTP, as Prometheus does (gzip
accepted), and reads the server's CPU time and RSS around each scrape; the server does nothing
else meanwhile, so its CPU time is the scrape's.

Reported per detail level: series, uncompressed and gzip bytes, CPU ms per scrape (median and
max over `--scrapes`), wall ms, RSS before the scrapes and its peak during them.

    .venv/bin/python -m bench.scrape [--tenants 1000] [--scrapes 20]

Targets at the default detail ("tenant"): <= 30,000 series, <= 3 MB, <= 20 ms CPU per scrape, no
RSS growth across scrapes.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import statistics
import subprocess
import sys
import time
import urllib.request
from typing import Any

import psutil

from bench import common
from syncd import catalogue
from syncd.metrics import DETAILS, EngineStatus, Metrics, TenantStatus
from syncd.redisserver import free_port

MB = 2**20


def populated(tenants: int, detail: str) -> Metrics:
    """A `Metrics` after every kind of event for every tenant and feed."""
    metrics = Metrics(detail=detail)  # type: ignore[arg-type]
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
        metrics.set_feeds_paused(tenant, tenant % 3)
    for i in range(1000):
        metrics.lateness(i / 1000)
        metrics.redis_error()
    metrics.set_fleet(3, tenants)
    rows = [
        TenantStatus(t, 20.0, 20.0 - t % 7, len(feeds), t % 10 == 0, t % 100 == 0)
        for t in range(1, tenants + 1)
    ]
    metrics.set_status_source(lambda: EngineStatus(rows, redis_memory_full=False))
    return metrics


async def _serve(tenants: int, detail: str, port: int) -> None:
    from syncd.ops import OpsServer

    class Healthy:
        def liveness(self) -> tuple[bool, dict[str, object]]:
            return True, {}

        async def readiness(self) -> tuple[bool, dict[str, object]]:
            return True, {}

    server = OpsServer(f"127.0.0.1:{port}", populated(tenants, detail), Healthy())
    await server.start()
    print("ready", flush=True)
    await asyncio.Event().wait()


def _scrape(url: str) -> tuple[bytes, bytes]:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=120) as resp:
        raw = resp.read()
        gzipped = resp.headers.get("Content-Encoding") == "gzip"
    return (gzip.decompress(raw) if gzipped else raw), raw


def measure(tenants: int, detail: str, scrapes: int) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.scrape",
            "--serve",
            detail,
            "--tenants",
            str(tenants),
            "--port",
            str(port),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        # structlog writes to stdout too: wait for the line that says the server listens.
        for line in proc.stdout:
            if line.strip() == "ready":
                break
        else:
            raise RuntimeError("scrape server did not start")
        ps = psutil.Process(proc.pid)
        url = f"http://127.0.0.1:{port}/metrics"
        text, wire = _scrape(url)  # warm-up: label caches filled, allocator arenas in place
        time.sleep(0.5)
        rss_before = ps.memory_info().rss / MB
        cpu_ms, wall_ms = [], []
        with common.PeakRss(proc.pid) as peak:
            for _ in range(scrapes):
                cpu0 = sum(ps.cpu_times()[:2])
                t0 = time.perf_counter()
                text, wire = _scrape(url)
                wall_ms.append((time.perf_counter() - t0) * 1000)
                # The server's threads may still be finishing the response: let them.
                time.sleep(0.05)
                cpu_ms.append((sum(ps.cpu_times()[:2]) - cpu0) * 1000)
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
        "cpu_ms_per_scrape_median": round(statistics.median(cpu_ms), 1),
        "cpu_ms_per_scrape_max": round(max(cpu_ms), 1),
        "wall_ms_median": round(statistics.median(wall_ms), 1),
        "rss_before_mb": round(rss_before, 1),
        "rss_peak_during_mb": round(peak.peak_mb, 1),
        "rss_after_mb": round(rss_after, 1),
        "scrapes": scrapes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "setup": {
            "tenants": args.tenants,
            "feeds_per_tenant": len(catalogue.feeds()),
            "scrapes": args.scrapes,
            "note": "CPU ms is the server process's user+system time per scrape, gzip included "
            "(the scraper accepts gzip, as Prometheus does); the cpu_times clock ticks in 10 ms",
        }
    }
    for detail in DETAILS:
        common.log(f"scrape: {args.tenants} tenants, detail {detail}")
        figures[detail] = measure(args.tenants, detail, args.scrapes)
    d = figures["tenant"]
    figures["targets"] = {
        "series <= 30000": d["series"] <= 30_000,
        "bytes <= 3 MB": d["bytes"] <= 3_000_000,
        "cpu_ms_per_scrape <= 20": d["cpu_ms_per_scrape_median"] <= 20,
        "no rss growth": d["rss_after_mb"] - d["rss_before_mb"] < 1.0,
    }
    common.write_result("scrape", figures, "n/a (no Redis involved)")
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=common.env_int("BENCH_SCRAPE_TENANTS", 1000))
    p.add_argument("--scrapes", type=int, default=common.env_int("BENCH_SCRAPE_SCRAPES", 20))
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
