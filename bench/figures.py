"""The benchmark figures of docs/benchmarks.md, generated from bench/results/*.json.

Each block of docs/benchmarks.md between `<!-- bench:begin NAME -->` and
`<!-- bench:end NAME -->` is what `BLOCKS[NAME]` makes of the result files; nothing between the
markers is typed by hand.

    .venv/bin/python -m bench.figures            # rewrite the blocks of docs/benchmarks.md
    .venv/bin/python -m bench.figures --check    # exit 1 when it differs from the results

`make bench` runs the writer at its end; tests/test_bench_figures.py runs the check.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = Path(__file__).resolve().parent / "results"

Results = dict[str, dict[str, Any]]


def load_results(directory: Path = RESULTS_DIR) -> Results:
    """Every `<name>.json` of `directory`, by name."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))}


def _get(results: Results, name: str) -> dict[str, Any]:
    if name not in results:
        raise KeyError(f"bench/results/{name}.json is missing: run its benchmark (make bench)")
    return results[name]


# -- number formats ----------------------------------------------------------------------------


def _leading_int(text: str) -> str:
    """'2750 polls' -> '2,750 polls'."""
    return re.sub(r"^\d+", lambda m: f"{int(m.group()):,}", text)


def _int(x: float) -> str:
    return f"{x:,.0f}"


def _hundreds(x: float) -> str:
    """Records/s to the hundred: the last digits are noise on a shared machine."""
    return f"{round(x, -2):,.0f}"


def _mb(n: float) -> str:
    """Bytes as MB: one decimal below 100 MB."""
    return f"{n / 1e6:,.1f} MB" if n < 100e6 else f"{n / 1e6:,.0f} MB"


def _row(*cells: str) -> str:
    return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"


def _sources(results: Results, names: list[str]) -> str:
    """Which result files a block comes from: their commit and date."""
    parts = [
        f"`{n}.json` ("
        + ", ".join(x for x in (results[n].get("syncd_commit"), results[n]["date"][:10]) if x)
        + ")"
        for n in names
    ]
    return "Generated from " + ", ".join(parts) + "."


def _machine(results: Results, names: list[str]) -> str:
    """'2-core machine (Python 3.11, Redis 7.0)', or each variety when the files differ."""
    cores = {str(results[n].get("cores") or results[n].get("cpu_count")) for n in names}
    pythons = {".".join(results[n]["python"].split(".")[:2]) for n in names}
    redises = {
        ".".join(v.split(".")[:2])
        for n in names
        if (v := str(results[n].get("redis_version", ""))) and v[0].isdigit()
    }
    return (
        f"{' or '.join(sorted(cores))}-core machine (Python {', '.join(sorted(pythons))}, "
        f"Redis {', '.join(sorted(redises))})"
    )


# -- the blocks ----------------------------------------------------------------------------------


def _backfill(b: dict[str, Any]) -> list[str]:
    s, first = b["setup"], b["first_sync"]
    return [
        _row(
            f"backfill, {s['tenants']} tenants x {len(s['feeds'])} feeds x "
            f"{s['records_per_feed']:,} records (~{first['avg_record_bytes']} B), `--once`",
            "records/s",
            _hundreds(b["records_per_s"]),
            ">= 0.9 x floor",
        ),
        _row(
            "",
            "floor (fetch, decode, pipelined XADD; no cursor, no change detection)",
            _hundreds(b["floor_records_per_s"]),
            "",
        ),
        _row(
            "",
            "re-export of unchanged data, records/s",
            f"{_hundreds(b['reexport_records_per_s'])} ({b['reexport_speedup']:.1f}x)",
            ">= 2x first sync",
        ),
        _row("", "client CPU per 100,000 records", f"{b['cpu_s_per_100k']:.2f} s", ""),
        _row(
            "",
            "CPU during the first sync, share of one core: Redis / daemon",
            f"{first['redis_cpu_share']:.2f} / {first['cpu_share_of_core']:.2f}",
            "",
        ),
        _row("", "daemon peak RSS", f"{b['peak_rss_mb']:.0f} MB", ""),
        _row(
            "",
            "Redis memory per record (stream entry + fingerprint)",
            f"{b['redis_bytes_per_record']:,} B",
            "",
        ),
    ]


def _steady(s: dict[str, Any]) -> list[str]:
    setup, restart = s["setup"], s["restart"]
    return [
        _row(
            f"steady state, {setup['tenants']:,} tenants x {setup['feeds_per_tenant']} feeds "
            f"drained, {s['requests_per_s']:.0f} requests/s",
            "CPU share of one core",
            f"{s['cpu_share']:.0%}",
            "<= 25%",
        ),
        _row(
            "",
            "RSS (peak, during a /metrics scrape)",
            f"{s['rss_mb']:.0f} MB ({s['peak_rss_mb']:.0f} MB)",
            "<= 300 MB",
        ),
        _row(
            "",
            "poll lateness p50 / p99",
            f"<= {s['lateness_p50_bucket_le']:g} s / <= {s['lateness_p99_bucket_le']:g} s",
            "p99 < 2 s",
        ),
        _row(
            "",
            f"first {restart['window_s']:.0f} s after a restart: requests/s (peak)",
            f"{restart['requests'] / restart['window_s']:.0f} "
            f"(peak {restart['peak_requests_per_s']:,})",
            "",
        ),
    ]


def _ratelimit(r: dict[str, Any]) -> list[str]:
    s, st = r["setup"], r["strict_tenant"]
    during = st["requests_during_pause"]
    return [
        _row(
            f"rate limits, one tenant, all {s['feeds']} feeds",
            f"achieved at {s['syncd_requests_per_second']:g}/s, share of 429s",
            f"{r['achieved_rps']:.1f}/s, {r['share_429']:.1%}",
            ">= 54/s, <= 0.1%",
        ),
        _row(
            "",
            f"simulator at {s['strict_simulator_rate']:g}/s, "
            f"syncd at {s['syncd_requests_per_second']:g}/s",
            f"{r['strict_achieved_rps']:.1f}/s, {r['strict_429s']} 429s in "
            f"{r['strict_span_s']:.0f} s, {during or 'none'} during a pause",
            f"~{s['strict_simulator_rate']:g}/s, no storm",
        ),
    ]


def _hanging(h: dict[str, Any]) -> list[str]:
    s = h["setup"]
    return [
        _row(
            f"a tenant's backfill ({s['feeds']} feeds x {s['records_per_feed']:,} records, "
            f"{s['latency_ms']:.0f} ms answers), {s['settings']}",
            f"alone / beside {s['hanging_tenants']} tenants whose requests hang / whose token "
            "endpoint hangs",
            f"{h['alone_s']:.1f} s / {h['beside_hanging_requests_s']:.1f} s / "
            f"{h['beside_hanging_token_s']:.1f} s",
            "beside <= 2x alone",
        )
    ]


def _freshness(f: dict[str, Any]) -> list[str]:
    return [
        _row(
            f"freshness, poll interval {f['poll_interval_s']:g} s, `includeRecentChanges`",
            "change to event, p50 / p99",
            f"{f['p50_s']:.1f} s / {f['p99_s']:.1f} s, {f['duplicates']} duplicates, "
            f"{f['missing']} missing",
            f"p99 <= {f['poll_interval_s'] + 1:g} s",
        )
    ]


def _simulator(s: dict[str, Any]) -> list[str]:
    setup = s["setup"]
    return [
        _row(
            f"simulator, {setup['page_size']:,}-record pages, {setup['connections']} connections",
            "pages/s, MB/s",
            f"{s['pages_per_s']:.0f}, {s['mb_per_s']:,.0f}",
            "",
        )
    ]


def _scrape(sc: dict[str, Any]) -> list[str]:
    s, d, full = sc["setup"], sc["tenant"], sc["tenant_feed"]
    return [
        _row(
            f"/metrics at {s['tenants']:,} tenants x {s['feeds_per_tenant']} feeds, default "
            f"detail, {_leading_int(s['events_between_scrapes'])} between scrapes "
            "(`bench.scrape`)",
            "series, bytes (gzip)",
            f"{d['series']:,}, {d['bytes'] / 1e6:.2f} MB ({d['gzip_bytes'] / 1e3:.0f} kB)",
            "<= 30,000, <= 3 MB",
        ),
        _row(
            "",
            "CPU per scrape over HTTP, gzip included (render alone, render and gzip)",
            f"{d['cpu_ms_per_scrape']:.1f} ms ({d['render_cpu_ms']:.1f} ms, "
            f"{d['render_gzip_cpu_ms']:.1f} ms)",
            "<= 20 ms",
        ),
        _row(
            "",
            "RSS above the RSS before a scrape, at most",
            f"{d['rss_transient_mb_max']:.1f} MB",
            "no transient growth",
        ),
        _row(
            'same at `metrics_detail = "tenant_feed"`',
            "series, bytes, CPU per scrape, transient RSS",
            f"{full['series']:,}, {full['bytes'] / 1e6:.0f} MB, "
            f"{full['cpu_ms_per_scrape']:.0f} ms, {full['rss_transient_mb_max']:.0f} MB",
            "",
        ),
    ]


_FAILURES = {"ConnectionResetError": "reset", "TimeoutError": "timed out"}


def _probes(phase: dict[str, Any]) -> str:
    """'7% failed (reset), 2.8 ms / 612 ms' of one phase of bench.ops."""
    kinds = ", ".join(_FAILURES.get(k, k) for k in phase.get("healthz_failures", {}))
    failed = f"{phase['healthz_failed_share']:.0%} failed" + (f" ({kinds})" if kinds else "")
    if phase["healthz_p50_ms"] is None:
        return failed
    return f"{failed}, {phase['healthz_p50_ms']:.1f} ms / {phase['healthz_p99_ms']:.0f} ms"


def _ops(o: dict[str, Any], before: dict[str, Any]) -> list[str]:
    slow, flood = o["slow_connections"], o["readyz_flood"]
    slow_then, flood_then = before["slow_connections"], before["readyz_flood"]
    return [
        _row(
            f"ops port, daemon at {o['daemon_nofile']:,} fds, {o['slow_clients']:,} clients "
            "trickling a byte/s (`bench.ops`)",
            "/healthz failed, p50 / p99; polling (export requests/s, "
            f"{o['baseline']['export_requests_per_s']:.1f} idle); the daemon's log",
            f"{_probes(slow)}; {slow['export_requests_per_s']:.1f}/s; "
            f"{o['daemon_log_bytes'] / 1e3:,.0f} kB (before: {_probes(slow_then)}; "
            f"{slow_then['export_requests_per_s']:.1f}/s; {_mb(before['daemon_log_bytes'])})",
            "",
        ),
        _row(
            f"ops port, {o['flood_clients']} clients flooding /readyz",
            "/healthz failed, p50 / p99; polling",
            f"{_probes(flood)}; {flood['export_requests_per_s']:.1f}/s (before: "
            f"{_probes(flood_then)}; {flood_then['export_requests_per_s']:.1f}/s)",
            "",
        ),
    ]


def _retention(rt: dict[str, Any]) -> list[str]:
    runs = rt["runs"]
    return [
        _row(
            f"retention check trimming {rt['trimmed_per_check']} of `max_len` + "
            f"{rt['trimmed_per_check']} events (~{rt['data_bytes']} B), "
            "`python -m bench.retention`",
            "Redis bytes sent per check at `max_len` "
            + " / ".join(f"{r['max_len']:,}" for r in runs),
            " / ".join(f"{r['current']['bytes_sent']:,} B" for r in runs)
            + " (formerly "
            + " / ".join(_mb(r["previous"]["bytes_sent"]) for r in runs)
            + ")",
            "<= 10 kB",
        )
    ]


MAIN = (
    "backfill",
    "steady",
    "ratelimit",
    "hanging",
    "freshness",
    "simulator",
    "scrape",
    "ops",
    "ops-before",
    "retention",
)


def block_results(results: Results) -> str:
    """The table of `make bench`'s benchmarks (and bench.ops, bench.retention)."""
    g = {name: _get(results, name) for name in MAIN}
    rows = [
        *_backfill(g["backfill"]),
        *_steady(g["steady"]),
        *_ratelimit(g["ratelimit"]),
        *_hanging(g["hanging"]),
        *_freshness(g["freshness"]),
        *_simulator(g["simulator"]),
        *_scrape(g["scrape"]),
        *_ops(g["ops"], g["ops-before"]),
        *_retention(g["retention"]),
    ]
    return "\n".join(
        [
            f"Latest results on a {_machine(results, list(MAIN))}:",
            "",
            "| benchmark | figure | result | target |",
            "|---|---|---|---|",
            *rows,
            "",
            _sources(results, list(MAIN)),
        ]
    )


def _cell(name: str, value: float) -> str:
    if name.endswith("records_per_s"):
        return _hundreds(value)
    if "cpu_s" in name:
        return f"{value:.3f} s"
    if name.endswith("bytes_per_record"):
        return f"{_int(value)} B"
    if name.endswith("_mb"):
        return f"{value:.0f} MB"
    return f"{value:.1f} ms"


def _spread(name: str, s: dict[str, float], runs: int) -> str:
    if runs < 2 or _cell(name, s["min"]) == _cell(name, s["max"]):
        return _cell(name, s["median"])
    low, high = _cell(name, s["min"]).split()[0], _cell(name, s["max"])
    return f"{_cell(name, s['median'])} ({low} to {high})"


def block_sidebyside(results: Results) -> str:
    """The table of bench.sidebyside: an earlier commit and the tree measured in one run."""
    r = _get(results, "sidebyside")
    s, base, new = r["setup"], r["contenders"]["baseline"], r["contenders"]["current"]
    head = (
        f"{s['tenants']} tenants x {s['pages_per_tenant']} pages x {s['page_size']:,} "
        f"`{s['feed']}` records (~{s['record_bytes']} B) from pre-rendered pages, an empty Redis "
        f"per contender and run, `syncd run --once`, then the re-export (cursors reset, "
        f"`--once` again); the median (and range) of {s['runs']} runs per contender, taken in "
        f"turns, on a {_machine(results, ['sidebyside'])}:"
    )
    rows = []
    for m in r["metrics"]:
        name = m["name"]
        ratio = r["ratios"][name]
        rows.append(
            _row(
                re.sub(r" (MB|ms)$", "", m["figure"]),
                _spread(name, base["summary"][name], s["runs"]),
                _spread(name, new["summary"][name], s["runs"]),
                "n/a" if ratio is None else f"{ratio:.2f}",
            )
        )
    return "\n".join(
        [
            head,
            "",
            f"| figure | {base['commit'][:7]} (baseline) | {new['commit'][:7]}"
            f"{'+dirty' if new['commit'].endswith('+dirty') else ''} (this tree) "
            "| new / baseline |",
            "|---|---|---|---|",
            *rows,
            "",
            _sources(results, ["sidebyside"]),
        ]
    )


def block_fleet(results: Results) -> str:
    """The table of bench.fleet and bench.fleet_rounds."""
    f, rounds = _get(results, "fleet"), _get(results, "fleet_rounds")
    fo, tp = f["failover"], f["throughput"]

    def spread(pair: list[int]) -> str:
        return " / ".join(map(str, pair))

    def runs(name: str) -> str:
        values = tp[f"runs_{name}"]
        return f"{_hundreds(tp[f'records_per_s_{name}'])} ({_hundreds(min(values))} to " + (
            f"{_hundreds(max(values))})"
        )

    rows = [
        _row(
            "start: three instances balanced (fewest / most tenants each)",
            f"{fo['start_balance_s']:.1f} s, process start included ({spread(fo['after_start'])})",
        ),
        _row(
            "SIGKILL mid-backfill: tenants owned again / polled again",
            f"{fo['sigkill_owned_s']:.1f} s / {fo['sigkill_polled_s']:.1f} s "
            f"(lease {fo['lease_s']:g} s); {spread(fo['after_sigkill'])} after",
        ),
        _row(
            "SIGTERM: tenants owned again / polled again",
            f"{fo['sigterm_owned_s']:.1f} s / {fo['sigterm_polled_s']:.1f} s; "
            f"{spread(fo['after_sigterm'])} after",
        ),
        _row(
            "the killed instance starts again: balanced again",
            f"{fo['rejoin_balance_s']:.1f} s, process start included "
            f"({spread(fo['after_rejoin'])})",
        ),
        _row(
            "two instances polling one tenant at once (simulator's per-token spans)",
            "never (0 s)"
            if not fo["tenants_polled_twice_at_once"]
            else f"{fo['tenants_polled_twice_at_once']} tenants, "
            f"{fo['double_polling_s_total']:.1f} s in all",
        ),
        _row(
            f"backfill of {tp['records']:,} records ({fo['tenants']} tenants), one instance / "
            f"three, records/s, median (range) of {tp['repeats']}",
            f"{runs('1_instance')} / {runs('3_instances')}",
        ),
        _row(
            "same with a replica, `wait_replicas` 0 / 1",
            f"{runs('wait_replicas_0')} / {runs('wait_replicas_1')}",
        ),
        _row(
            f"bookkeeping, {rounds['tenants']:,} tenants on {rounds['instances']} instances: "
            "one round (median), commands/s to Redis",
            f"{rounds['round_s_median']:.2f} s, {_int(rounds['fleet_commands_per_s'])}/s",
        ),
    ]
    return "\n".join(
        [
            "| figure | result |",
            "|---|---|",
            *rows,
            "",
            _sources(results, ["fleet", "fleet_rounds"]),
        ]
    )


def block_loop(results: Results) -> str:
    """/healthz while big pages are processed (bench.loop)."""
    f = _get(results, "loop")
    t, o = f["worker_thread"], f["on_the_loop"]
    return "\n".join(
        [
            f"A {f['page_bytes'] / 2**20:.0f} MiB page of records nested {f['depth']} levels, "
            f"fetched, checked, decoded and applied {f['rounds']} times on a "
            f"{_machine(results, ['loop'])}: /healthz, asked every 10 ms, answered in "
            f"{t['healthz_p50_ms']:.1f} ms at the median and {t['healthz_p99_ms']:.0f} ms at p99 "
            f"({t['healthz_max_ms']:.0f} ms at most; target: p99 under 100 ms). With every page "
            f"checked and decoded on the event loop: {o['healthz_p99_ms']:.0f} ms at p99 "
            f"({o['healthz_max_ms']:.0f} ms at most).",
            "",
            _sources(results, ["loop"]),
        ]
    )


def block_mirror(results: Results) -> str:
    """The mirror's backfill into PostgreSQL beside the same through asyncpg and a row-by-row
    upsert (bench.mirror)."""
    f = _get(results, "mirror")
    cpu = f["cpu_s_per_100k"]
    before, after = f["load_average_1m"]
    lines = [
        f"{f['rounds']['copy'][0]['events']:,} events (~800 B records, a fifth of them newer "
        f"versions) of {f['tenants']} tenants x {len(f['feeds'])} feeds into PostgreSQL "
        f"{f['postgres_version'].split()[0]} (durable defaults, `synchronous_commit = "
        f"{f['synchronous_commit']}`), all on one {_machine(results, ['mirror'])}, best of "
        f"{len(f['rounds']['copy'])} runs each, taken in turns; the machine's load average was "
        f"{before:.1f} before and {after:.1f} after (other work shared the two cores):",
        "",
        "| contender | events/s | CPU s per 100,000 events: mirror / PostgreSQL |",
        "|---|---|---|",
        _row(
            f"`syncd mirror` ({f.get('workers', 1)} workers, `[mirror] workers`): COPY to a "
            "staging table, one upsert per feed and batch, each batch one transaction",
            f"{f['copy_events_per_s']:,} (median "
            f"{statistics.median(r['events_per_s'] for r in f['rounds']['copy']):,.0f}; "
            "target: 50,000)",
            f"{cpu['copy']['client']:.2f} s / {cpu['copy']['postgres']:.2f} s",
        ),
    ]
    if "asyncpg" in cpu:
        lines.append(
            _row(
                f"the same through asyncpg {f['asyncpg']} instead of psycopg {f['psycopg']}: "
                "binary COPY (`copy_records_to_table`), the same upserts",
                f"{f['asyncpg_events_per_s']:,}",
                f"{cpu['asyncpg']['client']:.2f} s / {cpu['asyncpg']['postgres']:.2f} s",
            )
        )
    lines.append(
        _row(
            "row by row: one `INSERT ... ON CONFLICT` per event",
            f"{f['row_by_row_events_per_s']:,}",
            f"{cpu['row_by_row']['client']:.2f} s / {cpu['row_by_row']['postgres']:.2f} s",
        )
    )
    vs = f.get("asyncpg_vs_psycopg")
    if vs:
        same = {
            True: "the same rows as",
            False: "NOT the same rows as",
            None: "rows not compared with",
        }
        lines += [
            "",
            f"asyncpg / psycopg, the medians of {len(f['rounds']['asyncpg'])} runs each taken in "
            f"turns (the best runs above follow the machine's other load, which changed from "
            f"run to run): {vs['events_per_s']:.2f}x the events/s, {vs['client_cpu']:.2f}x the "
            f"mirror's CPU and {vs['postgres_cpu']:.2f}x PostgreSQL's per event; asyncpg's tables "
            f"held {same[f.get('asyncpg_same_rows')]} the mirror's.",
        ]
    elif f.get("asyncpg_skipped"):
        lines += ["", f"The asyncpg contender was skipped: {f['asyncpg_skipped']}."]
    steady = f.get("steady")
    if steady:
        lines += [
            "",
            f"In steady state, {steady['rate']:,} events/s published for {steady['seconds']:g} s "
            f"to a mirror that had caught up: each event's lag from its stream entry to its "
            f"commit was {steady['lag_p50_ms']:,} ms at the median, {steady['lag_p99_ms']:,} ms "
            f"at p99 and {steady['lag_max_ms']:,} ms at most (target: p99 at most 1 s).",
        ]
    lines += ["", _sources(results, ["mirror"])]
    return "\n".join(lines)


def block_reconcile(results: Results) -> str:
    """A reconciliation pass of a big feed (bench.reconcile)."""
    f = _get(results, "reconcile")
    return "\n".join(
        [
            "| figure | result |",
            "|---|---|",
            _row("records in the feed / deleted upstream", f"{f['records']:,} / {f['deletes']:,}"),
            _row(
                "pass time (fetch and sweep), records/s",
                f"{f['pass_s']:.1f} s, {f['pass_records_per_s']:,}",
            ),
            _row("deletes found / drift", f"{f['deleted']:,} / {f['drift']:,}"),
            _row("index, bytes per key", f"{f['index_bytes_per_key']:.1f}"),
            _row(
                "Redis memory: before / the pass's extra at its peak",
                f"{f['redis_used_memory_before_mb']:,.0f} MB"
                f" / {f['redis_extra_memory_peak_mb']:.1f} MB",
            ),
            _row(
                "longest Redis block (slow log, latency monitor)",
                f"{f['longest_block_ms']:.1f} ms ({f['slowlog_longest_command']})",
            ),
            _row(
                "requests the pass sent (at `--share 1`)",
                f"{f['requests']:,} ({f['requests_per_s']:.1f}/s)",
            ),
            "",
            _sources(results, ["reconcile"]),
        ]
    )


def block_pass_budget(results: Results) -> str:
    """What passes take from a tenant's polls (bench.pass_budget)."""
    f = _get(results, "pass_budget")
    a, b = f["without_passes"], f["with_passes"]
    s = f["setup"]

    def row(name: str, key: str, fmt: str) -> str:
        return _row(name, f"{format(a[key], fmt)} | {format(b[key], fmt)}")

    return "\n".join(
        [
            f"One tenant, {s['tenant_feeds']} feeds of {s['records_per_feed']:,} records each "
            f"polled every {s['poll_interval_s']:.0f} s at {s['requests_per_second']:.0f} "
            f"requests/s; passes of `{s['pass_feed']}` ({s['pages_per_pass']} pages each) back "
            "to back in the second window.",
            "",
            "| figure | without passes | with passes |",
            "|---|---|---|",
            row("polls/s", "poll_requests_per_s", ".2f"),
            row("poll lateness p50, s", "lateness_p50_s", ".4f"),
            row("poll lateness p99, s", "lateness_p99_s", ".4f"),
            row("other requests/s (the passes')", "other_requests_per_s", ".2f"),
            row("requests/s in all", "requests_per_s", ".2f"),
            "",
            f"The polls kept {f['poll_rate_ratio']:.3f}x their rate while passes took "
            f"{f['pass_requests_per_s']:.2f} requests/s of the tenant's spare budget "
            "(lateness buckets start at 10 ms: values below are interpolated within it).",
            "",
            _sources(results, ["pass_budget"]),
        ]
    )


def block_peer(results: Results) -> str:
    """tap-service-titan and a Singer PostgreSQL target beside syncd and its mirror."""
    f = _get(results, "peer")
    tap, ours = f["tap"], f["syncd"]
    first, again = tap["first_run"], tap["run_after_change"]
    mine = ours["first_sync"]
    lag = ours["after_change"]
    return "\n".join(
        [
            f"{f['records']:,} `{f['feed']}` records of one simulated tenant into PostgreSQL "
            f"{f['postgres_version'].split()[0]}, on a {_machine(results, ['peer'])}:",
            "",
            "| | tap-service-titan + target-postgres | syncd `run --once` + `syncd mirror` |",
            "|---|---|---|",
            _row(
                "records/s into PostgreSQL",
                f"{first['records_per_s']:,}",
                f"{mine['records_per_s']:,}",
            ),
            _row(
                "time to the first row",
                f"{first['first_row_s']:.1f} s",
                f"{mine['first_row_s']:.1f} s",
            ),
            _row(
                "client CPU seconds",
                f"{first['tap_cpu_s'] + first['target_cpu_s']:.1f}",
                f"{mine['run_once_cpu_s'] + mine['mirror_cpu_s']:.1f}",
            ),
            _row(
                "a change seen in PostgreSQL",
                f"not by a run {again['seconds_since_change']:.0f} s after it (the export hides"
                f" changes for {f['simulator_recent_delay_s']:.0f} s without includeRecentChanges)",
                f"{lag['lag_median_s']:.1f} s at the median (polled every"
                f" {lag['poll_interval_s']:g} s; {lag['after_poll_median_s'] * 1000:.0f} ms from"
                " the poll to the row)",
            ),
            "",
            _sources(results, ["peer"]),
        ]
    )


BLOCKS: dict[str, Callable[[Results], str]] = {
    "results": block_results,
    "sidebyside": block_sidebyside,
    "fleet": block_fleet,
    "loop": block_loop,
    "mirror": block_mirror,
    "reconcile": block_reconcile,
    "pass_budget": block_pass_budget,
    "peer": block_peer,
}

_BLOCK = re.compile(
    r"(?P<begin><!-- bench:begin (?P<name>[\w-]+) -->\n)"
    r"(?P<body>.*?)"
    r"(?P<end><!-- bench:end (?P=name) -->)",
    re.S,
)


def render(doc: str, results: Results) -> str:
    """`doc` with every block replaced by what the results make of it."""
    found = [m.group("name") for m in _BLOCK.finditer(doc)]
    unknown = sorted(set(found) - set(BLOCKS))
    missing = sorted(set(BLOCKS) - set(found))
    if unknown or missing:
        raise ValueError(f"{_name()} blocks unknown {unknown}, missing {missing}")

    def fill(m: re.Match[str]) -> str:
        body = BLOCKS[m.group("name")](results)
        return f"{m.group('begin')}{body}\n{m.group('end')}"

    return _BLOCK.sub(fill, doc)


def _name() -> str:
    return str(DOC.relative_to(ROOT)) if DOC.is_relative_to(ROOT) else str(DOC)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help=f"exit 1 when {_name()} is not up to date")
    args = p.parse_args(argv)
    current = DOC.read_text()
    wanted = render(current, load_results())
    if args.check:
        if wanted != current:
            print(
                f"{_name()}'s benchmark figures differ from bench/results/*.json: "
                "run `.venv/bin/python -m bench.figures`",
                file=sys.stderr,
            )
            return 1
        return 0
    if wanted != current:
        DOC.write_text(wanted)
        print(f"{_name()}: benchmark figures rewritten", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
