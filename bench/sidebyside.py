"""Side by side: one workload synced by an earlier commit's syncd and by this tree's, in one run.

The simulator (this tree's, started once) serves pre-rendered pages: 3 tenants x 20 pages x
5,000 `crm.customers` records by default. Each contender (the baseline, a worktree of `--against`
under .bench-trees/, and this tree) runs in turn, A B A B ..., so that the machine's noise hits
both: per run a fresh, empty Redis, then `python -m syncd run --once` with the contender's tree as
the working directory and first on PYTHONPATH (same venv: the dependencies are the same), then
the re-export (every tenant's cursor reset by the contender's own `syncd reset-cursor`, `--once`
again: every record fetched again, none published).

Per run: records/s (records fetched / daemon wall time, start-up included) of the first sync and
of the re-export; the daemon's CPU (wait4) and Redis's (INFO cpu) per 100,000 records; the
daemon's peak RSS; Redis bytes per record published, streams and everything else (the index)
apart, keys told apart by TYPE, not by name (the contenders may lay out Redis differently); the
longest Redis block (slow log over 100 µs, latency monitor over 1 ms, read after each daemon
run).
Reported per contender: the median and range of the runs, and the ratios new / baseline.

    .venv/bin/python -m bench.sidebyside --against e65f5ae [--runs 3] [--records 100000]

Results in bench/results/sidebyside.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

from bench import common

DEFAULT_AGAINST = "e65f5ae"
TREES = common.ROOT / ".bench-trees"
FEED = "crm.customers"
TENANTS = (1001, 1002, 1003)
SCRIPT_COMMANDS = {"EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"}
# Commands that scripts call are slow-logged too: at 0 µs every record's XADD would be, and the
# logging would cost Redis CPU; 100 µs keeps them out and any block that matters in.
SLOWLOG_SLOWER_THAN_US = 100
SLOWLOG_MAX_LEN = 100_000

# (name, what it is, whether more is better): the figures compared, in the table's order.
METRICS: tuple[tuple[str, str, bool], ...] = (
    ("first_records_per_s", "first sync, records/s", True),
    ("reexport_records_per_s", "re-export, records/s", True),
    ("first_redis_cpu_s_per_100k", "first sync, Redis CPU s per 100,000 records", False),
    ("first_client_cpu_s_per_100k", "first sync, client CPU s per 100,000 records", False),
    ("reexport_redis_cpu_s_per_100k", "re-export, Redis CPU s per 100,000 records", False),
    ("reexport_client_cpu_s_per_100k", "re-export, client CPU s per 100,000 records", False),
    ("stream_bytes_per_record", "Redis bytes per record, streams", False),
    ("index_bytes_per_record", "Redis bytes per record, index (every other key)", False),
    ("first_peak_rss_mb", "first sync, daemon peak RSS MB", False),
    ("reexport_peak_rss_mb", "re-export, daemon peak RSS MB", False),
    ("first_longest_block_ms", "first sync, longest Redis block ms", False),
    ("first_xreadgroup_p99_ms", "first sync, a consumer's XREADGROUP p99 ms", False),
    ("reexport_longest_block_ms", "re-export, longest Redis block ms", False),
)


@dataclass(frozen=True)
class Contender:
    """A syncd source tree run from the shared venv."""

    label: str  # "baseline" or "current"
    tree: Path
    commit: str

    def env(self) -> dict[str, str]:
        return {**os.environ, "PYTHONPATH": str(self.tree), "PYTHONUNBUFFERED": "1"}

    def syncd(self, *args: str, timeout: float = 120) -> str:
        """`python -m syncd ARGS` from this tree; its stdout (RuntimeError on failure)."""
        out = subprocess.run(
            [common.PYTHON, "-m", "syncd", *args],
            cwd=self.tree,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if out.returncode != 0:
            raise RuntimeError(f"{self.label}: syncd {args[0]} failed: {out.stderr[-500:]}")
        return out.stdout

    def check_import(self) -> str:
        """Where `import syncd` resolves for this contender; RuntimeError when not its tree."""
        out = subprocess.run(
            [common.PYTHON, "-c", "import syncd; print(syncd.__file__)"],
            cwd=self.tree,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        path = Path(out.stdout.strip()).resolve()
        if not path.is_relative_to(self.tree.resolve()):
            raise RuntimeError(f"{self.label}: syncd imports from {path}, not from {self.tree}")
        return str(path)


def _git(*args: str, cwd: Path = common.ROOT) -> str:
    out = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=300, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout.strip()


def baseline_tree(rev: str) -> Contender:
    """A detached worktree of `rev` under .bench-trees/, made once and reused."""
    commit = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    path = TREES / commit[:12]
    if (path / ".git").exists() and _git("rev-parse", "HEAD", cwd=path) == commit:
        common.log(f"sidebyside: reusing {path}")
    else:
        if path.exists():
            _git("worktree", "remove", "--force", str(path))
        _git("worktree", "prune")
        TREES.mkdir(exist_ok=True)
        _git("worktree", "add", "--detach", str(path), commit)
        common.log(f"sidebyside: worktree of {commit[:12]} at {path}")
    return Contender("baseline", path, commit)


def current_tree() -> Contender:
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--", "syncd"))
    return Contender("current", common.ROOT, commit + ("+dirty" if dirty else ""))


# -- Redis measurements ------------------------------------------------------------------------


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def watch_blocks(r: redis.Redis) -> None:
    """Log every command over 100 µs and every event over 1 ms from now on."""
    r.config_set("slowlog-log-slower-than", SLOWLOG_SLOWER_THAN_US)
    r.config_set("slowlog-max-len", SLOWLOG_MAX_LEN)
    r.config_set("latency-monitor-threshold", 1)
    r.slowlog_reset()
    r.execute_command("LATENCY", "RESET")


def longest_blocks(r: redis.Redis) -> dict[str, Any]:
    """The longest commands (any, and scripts) in the slow log and the latency monitor's
    maxima since `watch_blocks`."""
    count = int(r.slowlog_len())
    entries = r.slowlog_get(count) if count else []
    durations: Counter[str] = Counter()
    longest_any: tuple[float, str] = (0.0, "")
    longest_script = 0.0
    for entry in entries:
        name = entry["command"].split(b" ", 1)[0].decode(errors="replace").upper()
        ms = entry["duration"] / 1000
        durations[name] += 1
        if ms > longest_any[0]:
            longest_any = (ms, name)
        if name in SCRIPT_COMMANDS:
            longest_script = max(longest_script, ms)
    events = {
        (e[0].decode() if isinstance(e[0], bytes) else str(e[0])): int(e[3])
        for e in r.execute_command("LATENCY", "LATEST")
    }
    return {
        "longest_block_ms": round(max(longest_any[0], *events.values(), 0), 3),
        "slowlog_longest_ms": round(longest_any[0], 3),
        "slowlog_longest_command": longest_any[1],
        "slowlog_longest_script_ms": round(longest_script, 3),
        "slow_commands": dict(durations.most_common()),
        "slowlog_full": count >= SLOWLOG_MAX_LEN,
        "latency_max_ms": events,
    }


def memory_by_type(r: redis.Redis) -> dict[str, Any]:
    """MEMORY USAGE (every sample) of every key, summed by TYPE; stream entries counted."""
    by_type: Counter[str] = Counter()
    keys: Counter[str] = Counter()
    entries = 0
    for key in r.scan_iter(count=1000):
        kind = r.type(key).decode()
        by_type[kind] += int(r.memory_usage(key, samples=0) or 0)
        keys[kind] += 1
        if kind == "stream":
            entries += int(r.xlen(key))
    return {"bytes_by_type": dict(by_type), "keys_by_type": dict(keys), "stream_entries": entries}


# -- one contender-run ---------------------------------------------------------------------------


def _applied(result: common.DaemonResult) -> tuple[int, int]:
    """(records fetched, records published) from the daemon's `page_applied` lines."""
    applied = result.find("page_applied")
    return (
        sum(int(e["records"]) for e in applied),
        sum(int(e["published"]) for e in applied),
    )


class Reader(threading.Thread):
    """A consumer meanwhile: XREADGROUP (COUNT 100, BLOCK 100 ms) and XACK on one stream, in a
    loop; the time each read that returned events took (a read that had to wait for events
    is left out: what is measured is how long a consumer waits behind the daemon's scripts)."""

    def __init__(self, r: redis.Redis, stream: str) -> None:
        super().__init__(daemon=True)
        self.r, self.stream = r, stream
        self.latencies: list[float] = []
        self.running = True
        r.xgroup_create(stream, "bench", id="0", mkstream=True)

    def run(self) -> None:
        while self.running:
            started = time.monotonic()
            got = self.r.xreadgroup("bench", "c", {self.stream: ">"}, count=100, block=100)
            took = time.monotonic() - started
            if got:
                self.latencies.append(took)
                ids = [entry_id for _, entries in got for entry_id, _ in entries]
                self.r.xack(self.stream, "bench", *ids)

    def p99_ms(self) -> float:
        return round(common.percentile(sorted(self.latencies), 0.99) * 1000, 1)


def _phase(
    contender: Contender, config: Path, r: redis.Redis, read: str | None = None
) -> dict[str, Any]:
    """One `--once` of `contender`: what it fetched and published, and what that cost; with
    `read`, a consumer reads that stream meanwhile."""
    watch_blocks(r)
    reader = None
    if read is not None:
        reader = Reader(
            redis.Redis(
                host=r.connection_pool.connection_kwargs["host"],
                port=r.connection_pool.connection_kwargs["port"],
            ),
            read,
        )
        reader.start()
    cpu_before = redis_cpu(r)
    try:
        result = common.run_daemon(config, timeout=3600, cwd=contender.tree, env=contender.env())
    finally:
        if reader is not None:
            reader.running = False
            reader.join()
    redis_cpu_s = redis_cpu(r) - cpu_before
    blocks = longest_blocks(r)
    if reader is not None:
        blocks["xreadgroup_p99_ms"] = reader.p99_ms()
        blocks["xreadgroup_reads"] = len(reader.latencies)
    if result.returncode != 0:
        raise RuntimeError(f"{contender.label}: the daemon exited with {result.returncode}")
    fetched, published = _applied(result)
    if not fetched:
        raise RuntimeError(f"{contender.label}: no page_applied lines in the daemon's log")
    return {
        "records": fetched,
        "published": published,
        "wall_s": round(result.wall_s, 3),
        "records_per_s": round(fetched / result.wall_s),
        "cpu_s": round(result.cpu_s, 3),
        "client_cpu_s_per_100k": round(result.cpu_s / fetched * 100_000, 3),
        "redis_cpu_s": round(redis_cpu_s, 3),
        "redis_cpu_s_per_100k": round(redis_cpu_s / fetched * 100_000, 3),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        **blocks,
    }


def run_once(
    contender: Contender, sim_url: str, tenants: list[int], work: common.Workdir, index: int
) -> dict[str, Any]:
    """First sync and re-export of `contender` against a fresh, empty Redis."""
    with common.redis_server() as server:
        r = common.redis_client(server)
        config = work.write_config(
            common.config_dict(
                server.url,
                sim_url,
                tenants,
                feeds=[FEED],
                defaults={
                    "requests_per_second": 60.0,
                    "max_in_flight": 8,
                    "poll_interval": 300.0,
                    "include_recent_changes": True,
                },
                log_level="debug",
            ),
            name=f"{contender.label}-{index}.toml",
        )
        first = _phase(contender, config, r, read=f"st:{{{tenants[0]}}}:{FEED}")
        memory = memory_by_type(r)
        for t in tenants:
            contender.syncd(
                "reset-cursor", "--config", str(config), "--tenant", str(t), "--feed", FEED
            )
        again = _phase(contender, config, r)
        after = memory_by_type(r)
        version = common.redis_version(r)
    entries = memory["stream_entries"]
    stream_bytes = memory["bytes_by_type"].get("stream", 0)
    index_bytes = sum(b for kind, b in memory["bytes_by_type"].items() if kind != "stream")
    exactly_once = (
        first["published"] == entries
        and again["published"] == 0
        and after["stream_entries"] == entries
    )
    if not exactly_once:
        raise RuntimeError(
            f"{contender.label}: published {first['published']}, {entries} stream entries; "
            f"re-export published {again['published']}, {after['stream_entries']} entries after"
        )
    common.log(
        f"sidebyside: {contender.label} run {index}: first {first['records_per_s']:,}/s, "
        f"re-export {again['records_per_s']:,}/s"
    )
    return {
        "metrics": {
            "first_records_per_s": first["records_per_s"],
            "reexport_records_per_s": again["records_per_s"],
            "first_redis_cpu_s_per_100k": first["redis_cpu_s_per_100k"],
            "first_client_cpu_s_per_100k": first["client_cpu_s_per_100k"],
            "reexport_redis_cpu_s_per_100k": again["redis_cpu_s_per_100k"],
            "reexport_client_cpu_s_per_100k": again["client_cpu_s_per_100k"],
            "stream_bytes_per_record": round(stream_bytes / max(entries, 1)),
            "index_bytes_per_record": round(index_bytes / max(entries, 1)),
            "first_peak_rss_mb": first["peak_rss_mb"],
            "reexport_peak_rss_mb": again["peak_rss_mb"],
            "first_longest_block_ms": first["longest_block_ms"],
            "first_xreadgroup_p99_ms": first["xreadgroup_p99_ms"],
            "reexport_longest_block_ms": again["longest_block_ms"],
        },
        "first_sync": first,
        "reexport": again,
        "redis": {**memory, "redis_version": version},
    }


# -- the comparison ----------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: the median and the range of the runs."""
    out = {}
    for name, _, _ in METRICS:
        values = [run["metrics"][name] for run in runs]
        out[name] = {
            "median": statistics.median(values),
            "min": min(values),
            "max": max(values),
        }
    return out


def ratios(new: dict[str, dict[str, float]], old: dict[str, dict[str, float]]) -> dict[str, Any]:
    """new / baseline of the medians (None where the baseline's is 0)."""
    return {
        name: round(new[name]["median"] / old[name]["median"], 3) if old[name]["median"] else None
        for name, _, _ in METRICS
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    tenants = [int(t) for t in args.tenants.split(",")]
    baseline = baseline_tree(args.against)
    current = current_tree()
    contenders = (baseline, current)
    imports = {c.label: c.check_import() for c in contenders}
    for c in contenders:
        # Bytecode compiled up front, not inside the first measured run.
        subprocess.run(
            [common.PYTHON, "-m", "compileall", "-q", str(c.tree / "syncd")],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    pages_bytes = args.records * len(tenants) * 1.2 * 1024 * 2
    sim_args = [
        *("--records", str(args.records), "--page-size", str(args.page_size)),
        *("--tenants", args.tenants, "--feeds", FEED),
        *("--rate-limit", "1000", "--cache-mb", str(max(1024, int(pages_bytes / 2**20 * 1.3)))),
        "--prerender",
    ]
    common.log(
        f"sidebyside: {baseline.commit[:12]} against {current.commit[:12]}, {args.runs} runs of "
        f"{len(tenants)} tenants x {args.records:,} records"
    )
    work = common.Workdir("sidebyside")
    runs: dict[str, list[dict[str, Any]]] = {c.label: [] for c in contenders}
    order = []
    sim = common.start_simulator(sim_args)
    try:
        for i in range(1, args.runs + 1):
            for c in contenders:
                runs[c.label].append(run_once(c, sim.url, tenants, work, i))
                order.append(c.label)
        cache = sim.stats()["cache"]
    finally:
        sim.stop()
        work.cleanup()
    fetched = {label: {r["first_sync"]["records"] for r in rs} for label, rs in runs.items()}
    if len({n for s in fetched.values() for n in s}) != 1:
        raise RuntimeError(f"the contenders fetched different numbers of records: {fetched}")
    summary = {label: summarize(rs) for label, rs in runs.items()}
    figures: dict[str, Any] = {
        "setup": {
            "tenants": len(tenants),
            "feed": FEED,
            "records_per_tenant": args.records,
            "page_size": args.page_size,
            "pages_per_tenant": -(-args.records // args.page_size),
            "record_bytes": round(cache["record_bytes"] / max(cache["records"], 1)),
            "records_fetched_per_run": next(iter(fetched["current"])),
            "include_recent_changes": True,
            "requests_per_second": 60.0,
            "max_in_flight": 8,
            "runs": args.runs,
            "order": order,
        },
        "contenders": {
            c.label: {
                "rev": args.against if c is baseline else "HEAD",
                "commit": c.commit,
                "syncd_imported_from": imports[c.label],
                "summary": summary[c.label],
                "runs": runs[c.label],
            }
            for c in contenders
        },
        "metrics": [{"name": n, "figure": f, "more_is_better": m} for n, f, m in METRICS],
        "ratios": ratios(summary["current"], summary["baseline"]),
    }
    version = runs["current"][0]["redis"]["redis_version"]
    common.write_result("sidebyside", figures, version)
    return figures


def print_table(figures: dict[str, Any]) -> None:
    base, new = figures["contenders"]["baseline"], figures["contenders"]["current"]
    print(f"{'figure':48} {base['commit'][:10]:>24} {new['commit'][:10]:>24}  new/base")
    for m in figures["metrics"]:
        cells = []
        for c in (base, new):
            s = c["summary"][m["name"]]
            cells.append(f"{s['median']:,.3g} ({s['min']:,.3g}-{s['max']:,.3g})")
        ratio = figures["ratios"][m["name"]]
        print(f"{m['figure']:48} {cells[0]:>24} {cells[1]:>24}  {ratio}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default=DEFAULT_AGAINST, help="the baseline revision")
    p.add_argument("--runs", type=int, default=common.env_int("BENCH_SIDEBYSIDE_RUNS", 3))
    p.add_argument(
        "--records",
        type=int,
        default=common.env_int("BENCH_SIDEBYSIDE_RECORDS", 100_000),
        help="records per tenant",
    )
    p.add_argument("--page-size", type=int, default=5000)
    p.add_argument("--tenants", default=",".join(map(str, TENANTS)))
    return p


def main(argv: list[str] | None = None) -> int:
    figures = run(parser().parse_args(argv))
    print_table(figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
