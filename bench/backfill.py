"""Backfill throughput: tenants x feeds x records synced once, then re-exported unchanged.

The simulator serves pre-rendered pages (3 tenants x 5 feeds x 50,000 realistic records by
default, 100,000 in the issue; 5,000 per page); the daemon runs `--once` with change detection
on. Reported: records/s, client CPU seconds per 100,000 records, the daemon's peak RSS, Redis
memory per record, and the CPU share Redis and the simulator used meanwhile. On the same pages:
the floor (bench/floor.py: fetch, decode, pipelined XADD, nothing else) and `redis-benchmark`
XADD with the same payload size. Then the re-export: the cursors are deleted and `--once` runs
again; every record is fetched again, nothing is published.

Records/s counts the records fetched (the 50-record overlaps of `includeRecentChanges` pages
included) over the daemon process's wall time, start-up included; the floor likewise.

    .venv/bin/python -m bench.backfill [--records 100000] [--profile]

Targets: records/s >= 0.9 x the floor's; the re-export >= 2 x as fast as the first sync.
Sizes also come from BENCH_BACKFILL_RECORDS (records per feed per tenant).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from bench import common
from syncd.keys import Keys

FEEDS = ("crm.customers", "crm.locations", "jpm.jobs", "jpm.appointments", "accounting.payments")
TENANTS = (1001, 1002, 1003)
# The size is 100,000 records per feed (BENCH_BACKFILL_RECORDS=100000). Pre-rendering
# those 3 x 5 x 100,000 records in both modes takes the simulator about 3 minutes on 2 cores,
# which with the steady-state benchmark's 9 minutes breaks `make bench`'s 15-minute budget;
# half of it measures the same rates (pages of 5,000 records either way).
DEFAULT_RECORDS = 50_000
PROFILE_DIR = common.RESULTS_DIR


def _parse_ts(text: str) -> float:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _engine_seconds(result: common.DaemonResult) -> float | None:
    """From the daemon's `started` log line to its `stopped` line (no interpreter start-up)."""
    started, stopped = result.find("started"), result.find("stopped")
    if not started or not stopped:
        return None
    return _parse_ts(stopped[-1]["timestamp"]) - _parse_ts(started[0]["timestamp"])


def _pages(result: common.DaemonResult) -> dict[str, int]:
    applied = result.find("page_applied")
    return {
        "pages": len(applied),
        "fetched": sum(int(e["records"]) for e in applied),
        "published": sum(int(e["published"]) for e in applied),
        "unchanged": sum(int(e["unchanged"]) for e in applied),
    }


def _run_child(command: list[str], timeout: float) -> tuple[str, float, float, float]:
    """Run a child to completion: (stdout, wall s, cpu s via wait4(), peak RSS MB as its
    VmHWM read while it runs); it is killed after `timeout` seconds."""
    started = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, cwd=common.ROOT)
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    peak = common.HighWater(proc.pid)
    peak.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read().decode()
        # Its peak once more before it is reaped (it has closed its output by now).
        peak.mb = max(peak.mb, common.high_water_mb(proc.pid))
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        killer.cancel()
        peak.done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.monotonic() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{command[:4]} exited with {proc.returncode}")
    return out, wall, usage.ru_utime + usage.ru_stime, peak.mb or usage.ru_maxrss / 1024


def _redis_benchmark(port: int, payload_size: int, requests: int = 200_000) -> dict[str, Any]:
    binary = shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")
    if binary is None:
        return {"skipped": "no redis-benchmark binary"}
    payload = "x" * payload_size
    command = [
        binary,
        *("-p", str(port), "-n", str(requests), "-P", "32", "-q"),
        *("XADD", "bench", "*", "op", "created", "key", "12345678", "data", payload),
        *("modified_on", "2024-01-01T00:00:00.1234567Z"),
    ]
    out = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    m = re.search(r"([\d.]+) requests per second", out.stdout.replace("\r", "\n"))
    if not m:
        return {"error": (out.stdout + out.stderr)[-300:]}
    return {
        "xadd_per_s": round(float(m.group(1))),
        "requests": requests,
        "pipeline": 32,
        "payload_bytes": payload_size,
        "command": "XADD bench * op created key K data <payload> modified_on T",
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tenants = [int(t) for t in args.tenants.split(",")]
    feeds = args.feeds.split(",")
    pages_bytes = args.records * len(tenants) * len(feeds) * 1.2 * 1024 * 2
    cache_mb = max(1024, int(pages_bytes / 2**20 * 1.3))
    sim_args = [
        *("--records", str(args.records), "--page-size", str(args.page_size)),
        *("--tenants", args.tenants, "--feeds", args.feeds),
        *("--rate-limit", "1000", "--cache-mb", str(cache_mb), "--prerender"),
    ]
    work = common.Workdir("backfill")
    common.log(f"backfill: {len(tenants)} tenants x {len(feeds)} feeds x {args.records} records")
    with common.redis_server() as server:
        r = common.redis_client(server)
        version = common.redis_version(r)
        sim = common.start_simulator(sim_args)
        try:
            config = work.write_config(
                common.config_dict(
                    server.url,
                    sim.url,
                    tenants,
                    feeds=feeds,
                    defaults={
                        "requests_per_second": args.rps,
                        "max_in_flight": args.max_in_flight,
                        "poll_interval": 300.0,
                        "include_recent_changes": True,
                    },
                    log_level="debug",
                )
            )
            profile = "py-spy" if args.profile else None
            pids = {"redis": server.proc.pid if server.proc else None, "simulator": sim.pid}
            before = common.used_memory(r)
            common.log("backfill: first sync (--once)")
            meter = common.CpuMeter(**pids)
            first = common.run_daemon(
                config,
                timeout=3600,
                profile=profile,
                profile_out=PROFILE_DIR / "backfill.prof",
            )
            first_others = meter.read()
            after = common.used_memory(r)
            first_pages = _pages(first)
            stream_len = sum(r.xlen(Keys("st", t).stream(f)) for t in tenants for f in feeds)
            stream_bytes = sum(
                int(r.memory_usage(Keys("st", t).stream(f), samples=0) or 0)
                for t in tenants
                for f in feeds
            )
            seen_bytes = sum(
                int(r.memory_usage(name, samples=0) or 0)
                for t in tenants
                for f in feeds
                for name in r.scan_iter(match=Keys("st", t).index(f) + "*", count=1000)
            )
            sample = r.xrange(Keys("st", tenants[0]).stream(feeds[0]), count=1)
            sizes = [
                len(fields[b"data"])
                for t in tenants[:1]
                for f in feeds
                for _, fields in r.xrange(Keys("st", t).stream(f), count=2000)
            ]
            payload = round(sum(sizes) / max(len(sizes), 1))
            common.log(
                f"backfill: first sync {first.wall_s:.1f}s, {first_pages['published']} published"
            )

            for t in tenants:
                r.delete(Keys("st", t).cursors)
            common.log("backfill: re-export (cursors deleted, --once again)")
            meter = common.CpuMeter(**pids)
            again = common.run_daemon(
                config,
                timeout=3600,
                profile=profile,
                profile_out=PROFILE_DIR / "backfill-reexport.prof",
            )
            again_others = meter.read()
            again_pages = _pages(again)
            stream_len_after = sum(r.xlen(Keys("st", t).stream(f)) for t in tenants for f in feeds)

            r.flushall()
            common.log("backfill: floor (bench/floor.py)")
            meter = common.CpuMeter(**pids)
            out, floor_wall, floor_cpu, floor_rss = _run_child(
                [
                    common.PYTHON,
                    "-m",
                    "bench.floor",
                    *("--sim-url", sim.url, "--redis-url", server.url),
                    *("--tenants", args.tenants, "--feeds", args.feeds),
                    *("--max-in-flight", str(args.max_in_flight)),
                ],
                timeout=3600,
            )
            floor = json.loads(out.strip().splitlines()[-1])
            floor_others = meter.read()
            r.flushall()
            common.log("backfill: redis-benchmark XADD")
            bench_xadd = _redis_benchmark(server.port, payload)
            r.flushall()
            sim_stats = sim.stats()
        finally:
            sim.stop()
            work.cleanup()
    if args.profile:
        for name in ("backfill", "backfill-reexport"):
            summary = common.summarize_profile(PROFILE_DIR / f"{name}.prof")
            common.print_profile(summary, f"py-spy profile of the daemon, {name}")

    fetched = first_pages["fetched"]
    published = first_pages["published"]
    if first.returncode != 0 or again.returncode != 0 or not fetched:
        raise RuntimeError(
            f"the daemon failed (exit {first.returncode}, {again.returncode}; {fetched} records)"
        )
    records_per_s = fetched / first.wall_s
    floor_records_per_s = floor["records"] / floor_wall
    reexport_records_per_s = again_pages["fetched"] / again.wall_s
    engine_s = _engine_seconds(first)
    engine_again_s = _engine_seconds(again)
    figures: dict[str, Any] = {
        "setup": {
            "tenants": len(tenants),
            "feeds": feeds,
            "records_per_feed": args.records,
            "page_size": args.page_size,
            "requests_per_second": args.rps,
            "max_in_flight": args.max_in_flight,
            "change_detection": True,
            "include_recent_changes": True,
            "profiled": bool(args.profile),
        },
        "records_per_s": round(records_per_s),
        "floor_records_per_s": round(floor_records_per_s),
        "reexport_records_per_s": round(reexport_records_per_s),
        "cpu_s_per_100k": round(first.cpu_s / fetched * 100_000, 3),
        "peak_rss_mb": round(first.peak_rss_mb, 1),
        "redis_bytes_per_record": round((after - before) / max(published, 1)),
        "ratio_to_floor": round(records_per_s / floor_records_per_s, 3),
        "reexport_speedup": round(reexport_records_per_s / records_per_s, 2),
        "first_sync": {
            **first_pages,
            "returncode": first.returncode,
            "wall_s": round(first.wall_s, 2),
            "engine_s": round(engine_s, 2) if engine_s else None,
            "records_per_s_engine": round(fetched / engine_s) if engine_s else None,
            "cpu_s": round(first.cpu_s, 2),
            "user_s": round(first.user_s, 2),
            "system_s": round(first.system_s, 2),
            "cpu_share_of_core": round(first.cpu_s / first.wall_s, 2),
            "stream_entries": stream_len,
            "redis_used_memory_delta": after - before,
            "redis_stream_bytes_per_record": round(stream_bytes / max(stream_len, 1)),
            "redis_index_bytes_per_record": round(seen_bytes / max(stream_len, 1)),
            "avg_record_bytes": payload,
            "event_fields": sorted(k.decode() for k in sample[0][1]) if sample else [],
            **first_others,
        },
        "reexport": {
            **again_pages,
            "returncode": again.returncode,
            "wall_s": round(again.wall_s, 2),
            "engine_s": round(engine_again_s, 2) if engine_again_s else None,
            "records_per_s_engine": round(again_pages["fetched"] / engine_again_s)
            if engine_again_s
            else None,
            "cpu_s": round(again.cpu_s, 2),
            "cpu_s_per_100k": round(again.cpu_s / max(again_pages["fetched"], 1) * 100_000, 3),
            "peak_rss_mb": round(again.peak_rss_mb, 1),
            "new_stream_entries": stream_len_after - stream_len,
            **again_others,
        },
        "floor": {
            **floor,
            "wall_s": round(floor_wall, 2),
            "cpu_s": round(floor_cpu, 2),
            "cpu_s_per_100k": round(floor_cpu / max(floor["records"], 1) * 100_000, 3),
            "peak_rss_mb": round(floor_rss, 1),
            **floor_others,
        },
        "redis_benchmark": bench_xadd,
        "simulator": {
            "requests": sim_stats["totals"]["requests"],
            "errors": sim_stats["totals"]["errors"],
            "rate_limited": sim_stats["totals"]["rate_limited"],
        },
    }
    figures["targets"] = {
        "records_per_s >= 0.9 x floor": figures["ratio_to_floor"] >= 0.9,
        "reexport >= 2 x first sync": figures["reexport_speedup"] >= 2.0,
        "exactly once (published == stream entries, re-export published 0)": (
            published == stream_len
            and again_pages["published"] == 0
            and stream_len_after == stream_len
        ),
    }
    if not args.profile:
        common.write_result("backfill", figures, version)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--records", type=int, default=common.env_int("BENCH_BACKFILL_RECORDS", DEFAULT_RECORDS)
    )
    p.add_argument("--page-size", type=int, default=5000)
    p.add_argument("--tenants", default=",".join(map(str, TENANTS)))
    p.add_argument("--feeds", default=",".join(FEEDS))
    p.add_argument("--rps", type=float, default=60.0)
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument(
        "--profile",
        action="store_true",
        help="run the daemon under py-spy (raw stacks in bench/results/*.prof); no result file",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    figures = run(parser().parse_args(argv))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
