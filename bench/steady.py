"""Steady state: 1,000 tenants x all 55 feeds, drained, each feed polled once per interval.

Every poll answers `hasMore: false` with no data (simulator `--records 0`). The poll interval is
feeds / 183.3 s (300 s for 55,000 feeds), so the daemon sends about 183 requests/s, as 55,000
feeds at ServiceTitan's 5-minute guidance would.

A fresh daemon would poll all 55,000 feeds at once at start-up, and then again in the same
bunch one interval later; a steady state needs the polls spread over the interval. So the first
round is paced by the tenants' own limiters (requests_per_second = feeds per tenant / interval,
which spreads each tenant's first polls evenly over one interval), then a SIGHUP reload restores
the default 20 requests/s. Measurement starts at 1.1 intervals (by then every due time comes
from a spread-out poll plus the +-10% jitter) and lasts `--window` seconds (3 minutes).

Then the daemon is restarted over the same drained feeds (cursors stored: what a deploy does)
and its first `--restart-window` seconds are watched: how fast every feed is polled again, the
peak request rate, CPU and lateness (from the new process's histogram).

Reported over the window: the daemon's CPU share of one core, its RSS (at the end, and peak
over its whole life), the request rate the simulator saw, poll lateness p50/p99 from the
daemon's own `syncd_schedule_lateness_seconds` histogram (difference of two scrapes of /metrics,
interpolated within buckets as Prometheus does), and what one /metrics scrape costs.

    .venv/bin/python -m bench.steady [--tenants 1000] [--window 180] [--profile]

Targets: CPU <= 25% of a core, RSS <= 300 MB, lateness p99 < 2 s.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any

from bench import common
from syncd import catalogue
from syncd.engine import ratelimit

LATENESS = "syncd_schedule_lateness_seconds"
TARGET_RPS = 55_000 / 300


def _config(
    redis_url: str, sim_url: str, tenants: list[int], rps: float, interval: float, listen: str
) -> dict[str, Any]:
    return common.config_dict(
        redis_url,
        sim_url,
        tenants,
        defaults={
            # Every catalogue feed, the legacy one too (by default syncd skips it).
            "feeds": list(catalogue.feeds()),
            "requests_per_second": rps,
            "max_in_flight": 8,
            "poll_interval": interval,
            "include_recent_changes": True,
        },
        ops_listen=listen,
        log_level="info",
    )


def _sum_series(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run(args: argparse.Namespace) -> dict[str, Any]:
    tenants = list(range(1, args.tenants + 1))
    feeds_per_tenant = len(catalogue.feeds())
    total_feeds = len(tenants) * feeds_per_tenant
    interval = args.interval or total_feeds / TARGET_RPS
    # The limiter paces a little under its configured rate (syncd.engine.ratelimit.PACE, if any):
    # configure the first round so that it really spans one interval.
    pace = float(getattr(ratelimit, "PACE", 1.0))
    first_round_rps = min(60.0, feeds_per_tenant / interval / pace)
    sim_args = [
        *("--records", "0", "--tenants", ",".join(map(str, tenants))),
        *("--token-throttle", "100000", "--rate-limit", "60", "--prerender"),
    ]
    common.log(
        f"steady: {len(tenants)} tenants x {feeds_per_tenant} feeds, interval {interval:.0f}s, "
        f"warm-up {1.1 * interval:.0f}s, window {args.window:.0f}s"
    )
    work = common.Workdir("steady")
    listen, metrics_url = common.ops_listen()
    with common.redis_server() as server:
        r = common.redis_client(server)
        version = common.redis_version(r)
        sim = common.start_simulator(sim_args)
        daemon = None
        try:
            config = work.write_config(
                _config(server.url, sim.url, tenants, first_round_rps, interval, listen)
            )
            daemon = common.Daemon(config).start()
            daemon.wait_for_event("started", timeout=600)
            t_started = time.monotonic()
            startup_s = t_started - daemon.started
            common.log(f"steady: daemon started in {startup_s:.1f}s; first round paced")

            # The first round ends after (feeds - 1) / rate seconds; then lift the pacing.
            _sleep_until(
                t_started + interval * (feeds_per_tenant - 1) / feeds_per_tenant + 3, daemon
            )
            config.write_text(
                common.to_toml(_config(server.url, sim.url, tenants, 20.0, interval, listen))
            )
            daemon.signal(signal.SIGHUP)
            t_reload = time.monotonic()
            daemon.wait_for_event("reloaded", timeout=120)
            common.log("steady: reloaded with requests_per_second = 20")

            _sleep_until(t_started + 1.1 * interval, daemon)
            common.log("steady: measuring")
            cpu_a, rss_a = daemon.cpu_times(), daemon.rss_mb()
            scrape_started = time.monotonic()
            with common.PeakRss(daemon.pid) as scrape_rss:
                text0 = common.scrape(metrics_url)
            scrape_s = time.monotonic() - scrape_started
            scrape_cpu = daemon.cpu_times() - cpu_a
            time.sleep(2.0)  # the scrape's compression and clean-up stay out of the window
            if args.profile:
                daemon.attach_py_spy(
                    common.RESULTS_DIR / "steady.prof", duration=min(args.window, 120)
                )
            sim0 = sim.stats()["totals"]
            meter = common.CpuMeter(redis=server.proc.pid if server.proc else None, sim=sim.pid)
            cpu0, t0 = daemon.cpu_times(), time.monotonic()
            peak_rss = daemon.rss_mb()
            while time.monotonic() - t0 < args.window:
                time.sleep(min(5.0, args.window - (time.monotonic() - t0)))
                peak_rss = max(peak_rss, daemon.rss_mb())
            cpu1, t1 = daemon.cpu_times(), time.monotonic()
            others = meter.read()
            sim1 = sim.stats()["totals"]
            rss_end = daemon.rss_mb()
            text1 = common.scrape(metrics_url)
            daemon.wait_py_spy(args.window + 60)
            result = daemon.stop(timeout=120)
            peak_at, peak_sampled = daemon.rss_peak_at()
            phases = {
                "reload_at_s": round(t_reload - daemon.started, 1),
                "window_start_at_s": round(t0 - daemon.started, 1),
                "window_end_at_s": round(t1 - daemon.started, 1),
            }
            daemon = None
            restart: dict[str, Any] = {}
            if args.restart_window > 0:
                common.log(f"steady: restart with stored cursors, {args.restart_window:.0f}s")
                expected = [(str(t), f) for t in tenants for f in catalogue.feeds()]
                # Counters are read before the new process starts: its first polls are counted.
                stats = sim.stats()
                daemon = common.Daemon(config).start()
                restart = _restart(daemon, sim, metrics_url, args.restart_window, expected, stats)
                daemon.stop(timeout=120)
                daemon = None
        finally:
            if daemon is not None:
                daemon.stop(timeout=60)
            sim.stop()
            work.cleanup()

    wall = t1 - t0
    window_hist = common.histogram_between(text0, text1, LATENESS)
    p50, p50_bucket = common.histogram_quantile(window_hist, 0.50)
    p99, p99_bucket = common.histogram_quantile(window_hist, 0.99)
    polls = window_hist[-1][1] if window_hist else 0.0
    requests = sim1["requests"] - sim0["requests"]
    figures: dict[str, Any] = {
        "setup": {
            "tenants": len(tenants),
            "feeds_per_tenant": feeds_per_tenant,
            "poll_interval_s": round(interval, 1),
            "window_s": round(wall, 1),
            "first_round_requests_per_second_per_tenant": round(first_round_rps, 4),
            "requests_per_second_per_tenant": 20.0,
            "max_in_flight": 8,
            "workers": 64,
            "profiled": bool(args.profile),
        },
        "feeds": total_feeds,
        "requests_per_s": round(requests / wall, 1),
        "cpu_share": round((cpu1 - cpu0) / wall, 3),
        "cpu_ms_per_poll": round((cpu1 - cpu0) / max(requests, 1) * 1000, 3),
        "rss_mb": round(rss_end, 1),
        "rss_peak_window_mb": round(peak_rss, 1),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "peak_rss_sampled": {"mb": round(peak_sampled, 1), "at_s": round(peak_at, 1), **phases},
        "lateness_p50_s": round(p50, 4),
        "lateness_p99_s": round(p99, 4),
        "lateness_p50_bucket_le": p50_bucket,
        "lateness_p99_bucket_le": p99_bucket,
        "lateness_buckets_window": [
            ["+Inf" if b == float("inf") else b, c] for b, c in window_hist
        ],
        "polls_in_window": polls,
        "errors_in_window": sim1["errors"] - sim0["errors"],
        "rate_limited_in_window": sim1["rate_limited"] - sim0["rate_limited"],
        "startup_s": round(startup_s, 2),
        "metrics_scrape": {
            "bytes": len(text0.encode()),
            "wall_s": round(scrape_s, 2),
            "cpu_s": round(scrape_cpu, 2),
            "rss_before_mb": round(rss_a, 1),
            "rss_peak_during_mb": round(scrape_rss.peak_mb, 1),
            "gzip": True,
        },
        "restart": restart,
        "daemon_returncode": result.returncode,
        "daemon_total_cpu_s": round(result.cpu_s, 1),
        **others,
    }
    figures["targets"] = {
        "cpu_share <= 0.25": figures["cpu_share"] <= 0.25,
        "rss_mb <= 300": figures["rss_mb"] <= 300 and figures["peak_rss_mb"] <= 300,
        "lateness_p99_s < 2": p99 < 2.0,
    }
    if args.profile:
        common.print_profile(
            common.summarize_profile(common.RESULTS_DIR / "steady.prof"),
            "py-spy profile of the daemon, steady state",
        )
    else:
        common.write_result("steady", figures, version)
    return figures


def _restart(
    daemon: common.Daemon,
    sim: common.Simulator,
    metrics_url: str,
    window: float,
    expected: list[tuple[str, str]],
    stats: dict[str, Any],
) -> dict[str, Any]:
    """The first `window` seconds of a daemon restarted over drained feeds (cursors stored):
    how fast it polls them all again and how late those polls are. `stats`: the simulator's
    counters from before the daemon started."""
    before = _feed_counts(stats)
    last = start_requests = stats["totals"]["requests"]
    daemon.wait_for_event("started", timeout=600)
    t0, cpu0 = time.monotonic(), daemon.cpu_times()
    per_second = []
    while time.monotonic() - t0 < window:
        time.sleep(1.0)
        now = sim.stats()["totals"]["requests"]
        per_second.append(now - last)
        last = now
    cpu = daemon.cpu_times() - cpu0
    wall = time.monotonic() - t0
    after = _feed_counts(sim.stats())
    polled = {key for key, n in after.items() if n > before.get(key, 0)}
    missed: dict[str, int] = {}
    for tenant, feed in expected:
        if (tenant, feed) not in polled:
            missed[feed] = missed.get(feed, 0) + 1
    hist = common.histogram(common.scrape(metrics_url), LATENESS)
    p50, p50_bucket = common.histogram_quantile(hist, 0.50)
    p99, p99_bucket = common.histogram_quantile(hist, 0.99)
    polls = hist[-1][1] if hist else 0.0
    # Requests, not dispatches: a poll counts once the simulator has answered it.
    seconds_to_99 = next(
        (i + 1 for i in range(len(per_second)) if sum(per_second[: i + 1]) >= 0.99 * len(expected)),
        None,
    )
    return {
        "window_s": round(wall, 1),
        "requests": last - start_requests,
        "polls_dispatched": polls,
        "seconds_until_99pct_of_feeds_polled": seconds_to_99,
        "peak_requests_per_s": max(per_second, default=0),
        "feeds_polled": len(polled),
        "feeds_not_polled_by_feed": missed,
        "cpu_share": round(cpu / wall, 3),
        "lateness_p50_s": round(p50, 3),
        "lateness_p99_s": round(p99, 3),
        "lateness_p50_bucket_le": p50_bucket,
        "lateness_p99_bucket_le": p99_bucket,
        "lateness_buckets": [["+Inf" if b == float("inf") else b, c] for b, c in hist],
    }


def _feed_counts(stats: dict[str, Any]) -> dict[tuple[str, str], int]:
    """Requests so far per (tenant, feed), from /_sim/stats."""
    return {
        (tenant, feed): n
        for tenant, body in stats["tenants"].items()
        for feed, n in body["feeds"].items()
    }


def _sleep_until(deadline: float, daemon: common.Daemon) -> None:
    while (left := deadline - time.monotonic()) > 0:
        if not daemon.running():
            raise RuntimeError(f"daemon exited: {daemon.tail()}")
        time.sleep(min(left, 5.0))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tenants", type=int, default=common.env_int("BENCH_STEADY_TENANTS", 1000))
    p.add_argument(
        "--interval",
        type=float,
        default=common.env_float("BENCH_STEADY_INTERVAL", 0.0),
        help="poll interval (default: feeds / 183.3 requests/s)",
    )
    p.add_argument("--window", type=float, default=common.env_float("BENCH_STEADY_WINDOW", 180.0))
    p.add_argument(
        "--restart-window",
        type=float,
        default=common.env_float("BENCH_STEADY_RESTART_WINDOW", 60.0),
        help="then restart the daemon and watch its first seconds (0: skip)",
    )
    p.add_argument("--profile", action="store_true", help="py-spy the window; no result file")
    return p


def main(argv: list[str] | None = None) -> int:
    figures = run(parser().parse_args(argv))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
