"""A reconciliation pass of a big feed: its time, Redis memory, the longest Redis block, and
the requests it made.

One tenant's `crm.customers` with `--records` records (1,000,000 by default) in pages of
5,000, pre-rendered by the simulator, synced by `syncd run --once`; then `--deletes` records
are deleted upstream and `syncd reconcile --share 1 --json` runs a pass. Reported: the pass's
wall time (fetch and sweep) and records/s, the records it fetched and the deletes it found,
Redis memory before the pass and its peak during it (sampled every 20 ms), the index's bytes
per key, the longest Redis block meanwhile (slow log over 100 µs, latency monitor over 1 ms),
and the requests the pass sent (the simulator's count) at what rate.

    .venv/bin/python -m bench.reconcile [--records 1000000] [--deletes 1000]

Results in bench/results/reconcile.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from typing import Any

from bench import common
from bench.sidebyside import longest_blocks, watch_blocks
from syncd.keys import Keys

TENANT = 1001
FEED = "crm.customers"


def _requests(sim: common.Simulator) -> int:
    return int(sim.stats()["totals"]["requests"])


def run(args: argparse.Namespace) -> dict[str, Any]:
    sim_args = [
        *("--records", str(args.records), "--page-size", "5000"),
        *("--tenants", str(TENANT), "--feeds", FEED),
        # Every record's body cached: the pages the deletes changed are rendered again for the
        # pass from them, so that the pass measures syncd rather than the simulator.
        *("--rate-limit", "1000", "--cache-mb", "4096", "--record-cache-mb", "2048"),
        *(["--prerender"] if args.prerender else []),
    ]
    work = common.Workdir("reconcile")
    common.log(f"reconcile: {args.records:,} records, {args.deletes:,} deleted")
    with common.redis_server() as server:
        r = common.redis_client(server)
        version = common.redis_version(r)
        sim = common.start_simulator(sim_args)
        try:
            data = common.config_dict(
                server.url,
                sim.url,
                [TENANT],
                feeds=[FEED],
                defaults={"requests_per_second": 60.0, "poll_interval": 300.0},
            )
            config = work.write_config(data)
            synced = common.Daemon(config, once=True).start().wait(timeout=3600)
            assert synced.returncode == 0, "the first sync failed"
            keys = Keys("st", TENANT)
            index_bytes = sum(
                int(r.memory_usage(name, samples=0) or 0)
                for name in r.scan_iter(match=keys.index(FEED) + "*", count=1000)
            )
            indexed = int(r.hget(keys.index(FEED), "count") or 0)
            sim.post(f"/_sim/tenants/{TENANT}/feeds/{FEED}/mutate?kind=delete&count={args.deletes}")
            before = common.used_memory(r)
            peak = [before]
            done = threading.Event()

            def sample() -> None:
                while not done.wait(0.02):
                    peak[0] = max(peak[0], common.used_memory(r))

            sampler = threading.Thread(target=sample, daemon=True)
            watch_blocks(r)
            requests_before = _requests(sim)
            started = time.monotonic()
            sampler.start()
            out = subprocess.run(
                [
                    sys.executable,
                    *("-m", "syncd", "reconcile", "--config", str(config)),
                    *("--tenant", str(TENANT), "--share", "1", "--json"),
                ],
                capture_output=True,
                timeout=3600,
                check=True,
                cwd=common.ROOT,
            )
            wall = time.monotonic() - started
            done.set()
            sampler.join()
            requests = _requests(sim) - requests_before
            blocks = longest_blocks(r)
            figures = json.loads(out.stdout.decode().strip().splitlines()[-1])
        finally:
            sim.stop()
            work.cleanup()
    result = {
        "records": args.records,
        "deletes": args.deletes,
        "pass_s": round(wall, 2),
        "pass_records_per_s": round(figures["fetched"] / wall),
        "fetched": figures["fetched"],
        "deleted": figures["deleted"],
        "drift": figures["drift"],
        "seen": figures["seen"],
        "index_bytes_per_key": round(index_bytes / max(indexed, 1), 1),
        "redis_used_memory_before_mb": round(before / 2**20, 1),
        "redis_extra_memory_peak_mb": round((peak[0] - before) / 2**20, 2),
        "requests": requests,
        "requests_per_s": round(requests / wall, 1),
        **blocks,
    }
    common.write_result("reconcile", result, version)
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--records", type=int, default=common.env_int("BENCH_RECONCILE_RECORDS", 1_000_000)
    )
    p.add_argument("--deletes", type=int, default=1000)
    p.add_argument(
        "--no-prerender",
        dest="prerender",
        action="store_false",
        help="render pages as they are asked (pre-rendering a million records takes minutes)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    result = run(parser().parse_args(argv))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
