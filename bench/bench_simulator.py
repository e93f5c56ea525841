"""How fast the simulator serves warm export pages.

Starts `syncd simulate --prerender` as a separate process, then walks every feed of every
tenant over several concurrent keep-alive connections for a fixed time, following
`continueFrom` like a client backfilling. Reports pages/s and MB/s and writes
`bench/results/simulator.json`.

    .venv/bin/python -m bench.bench_simulator [--duration 10] [--connections 4]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench import common
from syncd import catalogue
from syncd.testing.simulator import SimulatorProcess

RESULTS = Path(__file__).parent / "results" / "simulator.json"


class _Envelope(msgspec.Struct):
    hasMore: bool
    continueFrom: str


@dataclass
class Tally:
    pages: int = 0
    bytes: int = 0
    records: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)


async def _walk(
    session: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    recent: bool,
    deadline: float,
    tally: Tally,
) -> None:
    """Page through one feed from the start, again and again, until the deadline."""
    params: dict[str, str] = {"includeRecentChanges": "true" if recent else "false"}
    while time.monotonic() < deadline:
        started = time.monotonic()
        async with session.get(url, params=params, headers=headers) as resp:
            body = await resp.read()
            if resp.status != 200:
                tally.errors += 1
                continue
        tally.latencies.append(time.monotonic() - started)
        # Only the envelope is decoded: a client's own parsing cost is not the server's.
        head = msgspec.json.decode(body, type=_Envelope)
        tally.pages += 1
        tally.bytes += len(body)
        params["from"] = head.continueFrom
        if not head.hasMore:
            params.pop("from")


async def _run_clients(proc: SimulatorProcess, args: argparse.Namespace) -> dict[str, Any]:
    tenants = [int(t) for t in args.tenants.split(",")]
    feeds = args.feeds.split(",")
    connector = aiohttp.TCPConnector(limit=args.connections)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tokens = {t: await common.fetch_token(session, proc.auth_url, t) for t in tenants}
        jobs = []
        for n in range(args.connections):
            tenant = tenants[n % len(tenants)]
            feed = catalogue.feed(feeds[(n // len(tenants)) % len(feeds)])
            headers = {"Authorization": tokens[tenant], "ST-App-Key": proc.app_key}
            jobs.append((proc.url + feed.url_path(tenant), headers, n % 2 == 1))
        tally = Tally()
        started = time.monotonic()
        deadline = started + args.duration
        await asyncio.gather(
            *(
                _walk(session, url, headers, recent, deadline, tally)
                for url, headers, recent in jobs
            )
        )
        elapsed = time.monotonic() - started
        async with session.get(proc.url + "/_sim/stats") as resp:
            stats = await resp.json()
    latencies = sorted(tally.latencies) or [0.0]
    return {
        "pages": tally.pages,
        "errors": tally.errors,
        "elapsed_s": round(elapsed, 2),
        "pages_per_s": round(tally.pages / elapsed, 1),
        "records_per_s": round(tally.pages * args.page_size / elapsed),
        "mb_per_s": round(tally.bytes / elapsed / 1e6, 1),
        "avg_page_mb": round(tally.bytes / max(tally.pages, 1) / 1e6, 2),
        "latency_ms_p50": round(latencies[len(latencies) // 2] * 1000, 1),
        "latency_ms_p99": round(latencies[int(len(latencies) * 0.99)] * 1000, 1),
        "server_cache": stats["cache"],
    }


def _render_rate(seconds: float = 2.0) -> dict[str, float]:
    """Cold rendering speed (records/s) in this process, for pages not in the cache."""
    from syncd.simulator.cache import SizedCache
    from syncd.simulator.data import FeedLog

    rates = {}
    for number, name in enumerate(("crm.customers", "jpm.jobs", "accounting.invoices")):
        log = FeedLog(catalogue.feed(name), number, 1, 0, 1_000_000, SizedCache(0))
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / 3:
            log.render(log.live_entry(count))
            count += 1
        rates[name] = round(count / (time.perf_counter() - started))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--records", type=int, default=30_000, help="per feed per tenant")
    parser.add_argument("--page-size", type=int, default=5000)
    parser.add_argument("--tenants", default="1001,1002")
    parser.add_argument("--feeds", default="crm.customers,jpm.jobs,crm.locations")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    sim_args = [
        *("--records", str(args.records), "--page-size", str(args.page_size)),
        *("--tenants", args.tenants, "--feeds", args.feeds),
        *("--rate-limit", "1000000", "--cache-mb", "4096", "--prerender"),
    ]
    started = time.monotonic()
    with SimulatorProcess(sim_args, startup_timeout=600) as proc:
        startup_s = time.monotonic() - started
        print(f"simulator up at {proc.url} after {startup_s:.1f}s (prerender)", flush=True)
        figures = asyncio.run(_run_clients(proc, args))
    figures["render_records_per_s"] = _render_rate()
    result = {
        "benchmark": "simulator",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "aiohttp": aiohttp.__version__,
        "setup": {
            "records_per_feed": args.records,
            "page_size": args.page_size,
            "tenants": args.tenants,
            "feeds": args.feeds,
            "connections": args.connections,
            "duration_s": args.duration,
            "startup_with_prerender_s": round(startup_s, 1),
        },
        **figures,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
