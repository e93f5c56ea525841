"""What a reconciliation pass takes from a tenant's incremental polls: their lateness and their
request rate, without passes and with passes back to back.

One tenant, `--feeds` feeds of `--records` records each in pages of 500, a first sync, then two
windows of `--window` seconds with the same daemon configuration (requests_per_second 20, every
feed polled every `--interval` seconds), each from a fresh start over the stored cursors:

- without passes (`reconcile_interval = 0`);
- with passes of `crm.customers` back to back (`reconcile_interval = 1`): each pass fetches
  every page of the feed again, on the tokens the polls leave over.

Per window: the polls' lateness p50/p99 (the daemon's `syncd_schedule_lateness_seconds`,
the difference of two scrapes), the requests/s the simulator saw, the polls (every feed is
drained: a poll is one request) and so the requests the passes took, and the passes completed.

    .venv/bin/python -m bench.pass_budget [--feeds 12] [--records 20000] [--window 60]

Results in bench/results/pass_budget.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from bench import common
from syncd import catalogue

TENANT = 1001
PASS_FEED = "crm.customers"
LATENESS = "syncd_schedule_lateness_seconds"
PAGE_SIZE = 500
RATE = 20.0


def _feeds(count: int) -> list[str]:
    others = [f for f in catalogue.default_feeds() if f != PASS_FEED]
    return [PASS_FEED, *others[: count - 1]]


def _config(
    redis_url: str, sim_url: str, feeds: list[str], interval: float, listen: str, passes: bool
) -> dict[str, Any]:
    return common.config_dict(
        redis_url,
        sim_url,
        [TENANT],
        feeds=feeds,
        defaults={"requests_per_second": RATE, "poll_interval": interval},
        feed_options={PASS_FEED: {"reconcile_interval": 1.0 if passes else 0.0}},
        ops_listen=listen,
    )


def _window(
    config: Path, sim: common.Simulator, metrics_url: str, seconds: float
) -> dict[str, Any]:
    """A fresh daemon over the stored cursors, warmed up for 10 s, then watched `seconds`."""
    daemon = common.Daemon(config).start()
    try:
        daemon.wait_for_event("started", timeout=120)
        time.sleep(10.0)
        text0 = common.scrape(metrics_url)
        requests0 = int(sim.stats()["totals"]["requests"])
        t0 = time.monotonic()
        time.sleep(seconds)
        text1 = common.scrape(metrics_url)
        requests1 = int(sim.stats()["totals"]["requests"])
        wall = time.monotonic() - t0
    finally:
        result = daemon.stop(timeout=60)
    buckets = common.histogram_between(text0, text1, LATENESS)
    p50, _ = common.histogram_quantile(buckets, 0.50)
    p99, _ = common.histogram_quantile(buckets, 0.99)
    finished = [e for e in result.find("reconcile_finished") if e.get("feed") == PASS_FEED]
    requests = requests1 - requests0
    polls = int(buckets[-1][1]) if buckets else 0  # one request a poll: every feed is drained
    return {
        "window_s": round(wall, 1),
        "requests_per_s": round(requests / wall, 2),
        "polls": polls,
        "poll_requests_per_s": round(polls / wall, 2),
        "other_requests_per_s": round((requests - polls) / wall, 2),
        "lateness_p50_s": round(p50, 4),
        "lateness_p99_s": round(p99, 4),
        "passes_finished_in_run": len(finished),
        "daemon_cpu_s": round(result.cpu_s, 2),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    feeds = _feeds(args.feeds)
    sim_args = [
        *("--records", str(args.records), "--page-size", str(PAGE_SIZE)),
        *("--tenants", str(TENANT), "--feeds", ",".join(feeds)),
        *("--rate-limit", "60", "--token-throttle", "100000"),
    ]
    common.log(
        f"pass_budget: {len(feeds)} feeds x {args.records:,} records, polls every "
        f"{args.interval:.0f}s at {RATE:.0f} requests/s, windows of {args.window:.0f}s"
    )
    work = common.Workdir("pass_budget")
    listen, metrics_url = common.ops_listen()
    with common.redis_server() as server:
        r = common.redis_client(server)
        version = common.redis_version(r)
        sim = common.start_simulator(sim_args)
        try:
            base = _config(server.url, sim.url, feeds, args.interval, listen, passes=False)
            config = work.write_config(base)
            synced = common.run_daemon(config, timeout=1800)
            common.log(f"pass_budget: first sync in {synced.wall_s:.1f}s")
            without = _window(config, sim, metrics_url, args.window)
            common.log(f"pass_budget: without passes {json.dumps(without)}")
            config = work.write_config(
                _config(server.url, sim.url, feeds, args.interval, listen, passes=True)
            )
            with_passes = _window(config, sim, metrics_url, args.window)
            common.log(f"pass_budget: with passes {json.dumps(with_passes)}")
        finally:
            sim.stop()
            work.cleanup()
    pages = -(-args.records // PAGE_SIZE)
    result = {
        "setup": {
            "tenant_feeds": len(feeds),
            "records_per_feed": args.records,
            "page_size": PAGE_SIZE,
            "requests_per_second": RATE,
            "poll_interval_s": args.interval,
            "pass_feed": PASS_FEED,
            "pages_per_pass": pages,
        },
        "without_passes": without,
        "with_passes": with_passes,
        # What the passes took (the requests that were no poll's) and what the polls kept.
        "pass_requests_per_s": with_passes["other_requests_per_s"],
        "poll_rate_ratio": round(
            with_passes["poll_requests_per_s"] / max(without["poll_requests_per_s"], 1e-9), 3
        ),
    }
    result["path"] = str(common.write_result("pass_budget", result, version))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--feeds", type=int, default=12)
    p.add_argument("--records", type=int, default=20_000)
    p.add_argument("--interval", type=float, default=2.0, help="poll interval of every feed")
    p.add_argument("--window", type=float, default=60.0)
    print(json.dumps(run(p.parse_args()), indent=2))


if __name__ == "__main__":
    main()
