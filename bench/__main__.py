"""`make bench`: every benchmark in turn, a summary table, results in bench/results/*.json.

    .venv/bin/python -m bench                      # all of them (about 20 minutes)
    BENCH_ONLY=backfill,freshness .venv/bin/python -m bench

At the end, docs/benchmarks.md's figures are generated again from bench/results/*.json
(bench/figures.py).

Sizes: BENCH_BACKFILL_RECORDS, BENCH_STEADY_TENANTS, BENCH_STEADY_WINDOW, BENCH_RATELIMIT_RECORDS,
BENCH_FRESHNESS_WINDOW, BENCH_HANGING_RECORDS, BENCH_SCRAPE_TENANTS, BENCH_SCRAPE_SCRAPES,
BENCH_SIDEBYSIDE_RECORDS, BENCH_SIDEBYSIDE_RUNS (see each module's --help);
BENCH_SIDEBYSIDE_AGAINST is bench.sidebyside's baseline commit (default e65f5ae). A missed target
is reported, not an error; the exit status is 1 only when a benchmark could not run.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from bench import (
    backfill,
    bench_simulator,
    common,
    figures,
    freshness,
    hanging,
    loop,
    mirror,
    ratelimit,
    retention,
    scrape,
    sidebyside,
    steady,
)

Row = tuple[str, str, str, bool | None]  # figure, value, target, met


def _simulator() -> dict[str, Any]:
    with contextlib.redirect_stdout(io.StringIO()):
        bench_simulator.main(["--duration", "5"])
    import json

    return dict(json.loads((common.RESULTS_DIR / "simulator.json").read_text()))


def _rows_simulator(f: dict[str, Any]) -> list[Row]:
    return [
        ("pages/s (warm, 4 connections)", f"{f['pages_per_s']:.0f}", "", None),
        ("records/s served", f"{f['records_per_s']:,}", "", None),
    ]


def _rows_backfill(f: dict[str, Any]) -> list[Row]:
    floor = f["floor_records_per_s"]
    first = f["records_per_s"]
    rb = f.get("redis_benchmark", {}).get("xadd_per_s")
    return [
        (
            "records/s (first sync)",
            f"{first:,}",
            f">= 0.9 x floor = {0.9 * floor:,.0f}",
            first >= 0.9 * floor,
        ),
        ("floor records/s", f"{floor:,}", "", None),
        ("redis-benchmark XADD/s", f"{rb:,}" if rb else "n/a", "", None),
        (
            "re-export records/s",
            f"{f['reexport_records_per_s']:,}",
            f">= 2 x first = {2 * first:,}",
            f["reexport_records_per_s"] >= 2 * first,
        ),
        ("client CPU s / 100k records", f"{f['cpu_s_per_100k']:.3f}", "", None),
        ("daemon peak RSS MB", f"{f['peak_rss_mb']:.0f}", "", None),
        ("Redis bytes / record", f"{f['redis_bytes_per_record']}", "", None),
    ]


_SHORT = (
    ("first sync", "first"),
    (" s per 100,000 records", " s/100k"),
    ("Redis bytes per record", "Redis B/record"),
    (" (every other key)", ""),
    ("daemon peak RSS", "peak RSS"),
    ("longest Redis block", "longest block"),
)


def _rows_sidebyside(f: dict[str, Any]) -> list[Row]:
    base, new = f["contenders"]["baseline"], f["contenders"]["current"]
    rows: list[Row] = [
        ("baseline / this tree", f"{base['commit'][:7]} / {new['commit'][:7]}", "", None)
    ]

    def fmt(v: float) -> str:
        return f"{v:,.0f}" if v >= 1000 else f"{v:.3g}"

    for m in f["metrics"]:
        name, figure = m["name"], m["figure"]
        for long, short in _SHORT:
            figure = figure.replace(long, short)
        old_v, new_v = base["summary"][name]["median"], new["summary"][name]["median"]
        ratio = f["ratios"][name]
        value = f"{fmt(old_v)} / {fmt(new_v)}" + (f" ({ratio:.2f}x)" if ratio else "")
        rows.append((figure, value, "", None))
    return rows


def _sidebyside() -> dict[str, Any]:
    against = os.environ.get("BENCH_SIDEBYSIDE_AGAINST", sidebyside.DEFAULT_AGAINST)
    return sidebyside.run(sidebyside.parser().parse_args(["--against", against]))


def _rows_steady(f: dict[str, Any]) -> list[Row]:
    return [
        ("feeds", f"{f['feeds']:,}", "", None),
        ("requests/s", f"{f['requests_per_s']:.1f}", "~183", None),
        ("daemon CPU share of a core", f"{f['cpu_share']:.3f}", "<= 0.25", f["cpu_share"] <= 0.25),
        (
            "daemon RSS MB (end / peak)",
            f"{f['rss_mb']:.0f} / {f['peak_rss_mb']:.0f}",
            "<= 300",
            f["rss_mb"] <= 300 and f["peak_rss_mb"] <= 300,
        ),
        (
            "lateness p50 s",
            f"{f['lateness_p50_s']:.3f} (le {f['lateness_p50_bucket_le']})",
            "",
            None,
        ),
        (
            "lateness p99 s",
            f"{f['lateness_p99_s']:.3f} (le {f['lateness_p99_bucket_le']})",
            "< 2",
            f["lateness_p99_s"] < 2,
        ),
    ]


def _rows_ratelimit(f: dict[str, Any]) -> list[Row]:
    st = f["strict_tenant"]
    return [
        (
            "achieved requests/s (limit 60)",
            f"{f['achieved_rps']:.1f}",
            ">= 54",
            f["achieved_rps"] >= 54,
        ),
        ("429 share", f"{f['share_429']:.4%}", "<= 0.1%", f["share_429"] <= 0.001),
        (
            "strict: achieved requests/s",
            f"{f['strict_achieved_rps']:.2f}",
            "~10",
            abs(f["strict_achieved_rps"] - 10) <= 1,
        ),
        (
            "strict: 429s (max per pause)",
            f"{f['strict_429s']} ({st['max_429_per_episode']})",
            "<= 8 per pause",
            st["max_429_per_episode"] <= 8,
        ),
        (
            "strict: requests during a pause",
            f"{st['requests_during_pause']}",
            "0",
            st["requests_during_pause"] == 0,
        ),
        (
            "free tenant requests/s",
            f"{f['free_tenant']['achieved_rps']:.1f}",
            ">= 54",
            f["free_tenant"]["achieved_rps"] >= 54,
        ),
    ]


def _rows_freshness(f: dict[str, Any]) -> list[Row]:
    limit = f["poll_interval_s"] + 1
    return [
        ("p50 s", f"{f['p50_s']:.2f}", "", None),
        ("p99 s", f"{f['p99_s']:.2f}", f"<= {limit:g}", f["p99_s"] <= limit),
        ("duplicates", f"{f['duplicates']}", "0", f["duplicates"] == 0),
        ("missing changes", f"{f['missing']}", "0", f["missing"] == 0),
    ]


def _rows_retention(f: dict[str, Any]) -> list[Row]:
    return [
        (
            f"bytes sent per check, max_len {r['max_len']:,} (previously)",
            f"{r['current']['bytes_sent']:,} ({r['previous']['bytes_sent']:,})",
            "<= 10 kB",
            r["current"]["bytes_sent"] <= 10_000,
        )
        for r in f["runs"]
    ]


def _rows_hanging(f: dict[str, Any]) -> list[Row]:
    alone = f["alone_s"]
    return [
        ("healthy backfill alone s", f"{alone:.2f}", "", None),
        (
            "beside 9 hanging (requests) s",
            f"{f['beside_hanging_requests_s']:.2f}",
            f"<= 2 x alone = {2 * alone:.1f}",
            f["ratio_requests"] <= 2.0,
        ),
        (
            "beside 9 hanging (token) s",
            f"{f['beside_hanging_token_s']:.2f}",
            f"<= 2 x alone = {2 * alone:.1f}",
            f["ratio_token"] <= 2.0,
        ),
    ]


def _rows_scrape(f: dict[str, Any]) -> list[Row]:
    d, full = f["tenant"], f["tenant_feed"]
    return [
        (
            "series (1,000 tenants x 55 feeds)",
            f"{d['series']:,}",
            "<= 30,000",
            d["series"] <= 30_000,
        ),
        ("scrape bytes", f"{d['bytes']:,}", "<= 3 MB", d["bytes"] <= 3_000_000),
        (
            "CPU ms per scrape (gzip)",
            f"{d['cpu_ms_per_scrape']:.1f}",
            "<= 20",
            d["cpu_ms_per_scrape"] <= 20,
        ),
        (
            "transient RSS MB per scrape (max)",
            f"{d['rss_transient_mb_max']}",
            "< 1",
            0 <= d["rss_transient_mb_max"] < 1,
        ),
        (
            "tenant_feed: series, CPU ms",
            f"{full['series']:,}, {full['cpu_ms_per_scrape']:.0f}",
            "",
            None,
        ),
    ]


def _rows_loop(f: dict[str, Any]) -> list[Row]:
    threaded, on_loop = f["worker_thread"], f["on_the_loop"]
    return [
        (
            "/healthz p99 ms, 30 MiB deep page",
            f"{threaded['healthz_p99_ms']:.0f}",
            "< 100",
            threaded["healthz_p99_ms"] < 100,
        ),
        ("  ...everything on the loop", f"{on_loop['healthz_p99_ms']:.0f}", "", None),
    ]


def _rows_mirror(f: dict[str, Any]) -> list[Row]:
    copy = f["copy_events_per_s"]
    return [
        ("mirror events/s (COPY, upsert)", f"{copy:,}", ">= 50,000", copy >= 50_000),
        ("  ...row by row", f"{f['row_by_row_events_per_s']:,}", "", None),
    ]


BENCHMARKS: dict[
    str, tuple[Callable[[], dict[str, Any]], Callable[[dict[str, Any]], list[Row]]]
] = {
    "simulator": (_simulator, _rows_simulator),
    "backfill": (lambda: backfill.run(backfill.parser().parse_args([])), _rows_backfill),
    "ratelimit": (lambda: ratelimit.run(ratelimit.parser().parse_args([])), _rows_ratelimit),
    "freshness": (lambda: freshness.run(freshness.parser().parse_args([])), _rows_freshness),
    "steady": (lambda: steady.run(steady.parser().parse_args([])), _rows_steady),
    "retention": (lambda: retention.run([50_000, 1_000_000], 900), _rows_retention),
    "hanging": (lambda: hanging.run(hanging.parser().parse_args([])), _rows_hanging),
    "scrape": (lambda: scrape.run(scrape.parser().parse_args([])), _rows_scrape),
    "sidebyside": (_sidebyside, _rows_sidebyside),
    "loop": (loop.run, _rows_loop),
    "mirror": (lambda: mirror.run(mirror.parser().parse_args([])), _rows_mirror),
}


def main() -> int:
    only = [n.strip() for n in os.environ.get("BENCH_ONLY", "").split(",") if n.strip()]
    unknown = [n for n in only if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    rows: list[tuple[str, Row]] = []
    failed = []
    started = time.monotonic()
    for name, (run, table) in BENCHMARKS.items():
        if only and name not in only:
            continue
        common.log(f"=== {name}")
        t0 = time.monotonic()
        try:
            result = run()
        except Exception:
            traceback.print_exc()
            failed.append(name)
            rows.append((name, ("FAILED (see above)", "", "", False)))
            continue
        rows.extend((name, row) for row in table(result))
        common.log(f"=== {name} done in {time.monotonic() - t0:.0f}s")
    print()
    print(f"{'benchmark':10} {'figure':34} {'value':>24}  {'target':26} met")
    print("-" * 102)
    for name, (figure, value, target, met) in rows:
        mark = "" if met is None else ("yes" if met else "NO")
        print(f"{name:10} {figure:34} {value:>24}  {target:26} {mark}")
    print(f"\n{time.monotonic() - started:.0f}s; results in {common.RESULTS_DIR}/")
    try:
        figures.main([])
    except (KeyError, ValueError) as e:
        print(f"docs/benchmarks.md's figures not generated: {e}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
