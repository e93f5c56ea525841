"""What comparing the fleet's configurations costs with many tenants: two instances (Fleet
objects in one process) on a real Redis, 10,000 tenants each with its own `start` (so that no
two tenants share a profile) and every default feed.

Cases: `same` (both publish the same configuration), `start_differs` (b's `start` is a day
later for every tenant), `interval_differs` (b polls every feed every 60 s, a every 30 s).

Per case: the size of a's configuration document in Redis and the time to build it; for
instance a, the round right after b joined (the one that compares), the Python memory it
allocates at its peak and still holds after it (tracemalloc, in a run of its own), the median of
the rounds after it; `syncd status --fleet` (`fleet_status`, which keeps no cache) the same way;
the differences named and the tenants they concern. Times are the fastest of `--repeat` runs. The
instances take no tenants (`drain`), so the rounds are the bookkeeping alone.

    .venv/bin/python -m bench.fleet_config [--tenants 10000] [--src c97e9de --label before]

`--src` measures the syncd of another checkout (a directory) or of a git revision with this
benchmark; the result is then written as `fleet_config-<label>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis

from bench import common
from syncd import catalogue, config, log
from syncd.daemon.fleet import fleet_status, profiles
from syncd.fleet.compare import Profile
from syncd.fleet.fleet import Fleet
from syncd.keys import FleetKeys

PREFIX = "st"
LEASE = 120.0  # long: the slowest rounds must not let a heartbeat run out
T = TypeVar("T")


def _profiles(tenants: int, interval: float, shift_days: int) -> dict[int, Profile]:
    first = datetime.date(2000, 1, 1) + datetime.timedelta(shift_days)
    data = {
        "redis": {"url": "redis://127.0.0.1:1"},
        "servicetitan": {"app_key": "k", "api_url": "http://127.0.0.1:1"},
        "defaults": {"poll_interval": interval},
        "tenants": [
            {
                "id": t,
                "client_id": f"client-{t}",
                "client_secret": f"secret-{t}",
                "feeds": list(catalogue.default_feeds()),
                "start": (first + datetime.timedelta(t)).isoformat(),
            }
            for t in range(1, tenants + 1)
        ],
    }
    return profiles(config.resolve(config.parse(data, "bench.toml"), environ={}))


CASES = {  # b's poll interval and how many days later its starts are
    "same": (30.0, 0),
    "start_differs": (30.0, 1),
    "interval_differs": (60.0, 0),
}


async def _nothing(tenant: int) -> None:
    return None


def _fleet(client: aioredis.Redis, name: str, tenants: int, mine: dict[int, Profile]) -> Fleet:
    fleet = Fleet(
        client,
        PREFIX,
        name,
        LEASE,
        on_acquire=_nothing,
        on_release=_nothing,
        tenants=range(1, tenants + 1),
        profiles=mine,
    )
    fleet.drain()
    return fleet


async def _timed(fn: Callable[[], Awaitable[T]], traced: bool) -> tuple[T, float, float, float]:
    """fn's result, seconds, and (traced) MB of Python memory at its peak and still held."""
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    result = await fn()
    elapsed = time.perf_counter() - start
    peak = held = 0.0
    if traced:
        current, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        peak, held = top / 1e6, current / 1e6
    return result, elapsed, peak, held


async def _case(url: str, tenants: int, a_profiles: Any, b_profiles: Any, traced: bool) -> Any:
    clients = [aioredis.Redis.from_url(url) for _ in range(3)]
    try:
        await clients[2].flushall()
        start = time.perf_counter()
        a = _fleet(clients[0], "a", tenants, a_profiles)
        build_s = time.perf_counter() - start
        b = _fleet(clients[1], "b", tenants, b_profiles)
        await a.round()
        await b.round()  # b joins
        _, compare_s, compare_peak, compare_held = await _timed(a.round, traced)
        steady = []
        for _ in range(5):
            started = time.perf_counter()
            await a.round()
            steady.append(time.perf_counter() - started)
        _, status_s, status_peak, status_held = await _timed(
            lambda: fleet_status(clients[2], PREFIX, []), traced
        )
        compared = a.view.compared
        return {
            "document_bytes": await clients[2].strlen(FleetKeys(PREFIX).config("a")),
            "build_document_s": round(build_s, 3),
            "compare_round_s": round(compare_s, 3),
            "compare_round_peak_mb": round(compare_peak, 1),
            "compare_round_held_mb": round(compare_held, 1),
            "steady_round_s_median": round(statistics.median(steady), 3),
            "status_fleet_s": round(status_s, 3),
            "status_fleet_peak_mb": round(status_peak, 1),
            "status_fleet_held_mb": round(status_held, 1),
            "differences_named": len(compared.differences),
            "tenants_differing": len(compared.disagreeing),
        }
    finally:
        for c in clients:
            await c.aclose()


async def _measure(url: str, tenants: int, repeat: int) -> dict[str, Any]:
    common.log(f"building the profiles of {tenants:,} tenants")
    base = _profiles(tenants, 30.0, 0)
    out: dict[str, Any] = {"source": common.syncd_source(), "tenants": tenants, "runs": repeat}
    for name, (interval, shift_days) in CASES.items():
        other = base if name == "same" else _profiles(tenants, interval, shift_days)
        common.log(f"{name}: timed, {repeat} runs")
        runs = [await _case(url, tenants, base, other, traced=False) for _ in range(repeat)]
        # The fastest run: the machine is shared, the best run is the code's own cost.
        figures = {
            k: min(r[k] for r in runs) if k.endswith("_s") else v for k, v in runs[0].items()
        }
        figures["steady_round_s_median"] = min(r["steady_round_s_median"] for r in runs)
        common.log(f"{name}: traced")
        traced = await _case(url, tenants, base, other, traced=True)
        for key in ("compare_round_peak_mb", "compare_round_held_mb"):
            figures[key] = traced[key]
        for key in ("status_fleet_peak_mb", "status_fleet_held_mb"):
            figures[key] = traced[key]
        out[name] = figures
    return out


def measure(tenants: int, repeat: int) -> dict[str, Any]:
    log.configure("warning", "json")  # as a daemon logs, on standard error
    with common.redis_server() as server:
        figures = asyncio.run(_measure(server.url, tenants, repeat))
        figures["redis"] = common.redis_version(common.redis_client(server))
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of each case")
    parser.add_argument("--src", help="another checkout's directory, or a git revision")
    parser.add_argument("--label", default="", help="suffix of the result name")
    parser.add_argument("--figures-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.figures_only:
        json.dump(measure(args.tenants, args.repeat), sys.stdout)
        return
    if args.src is None:
        figures = measure(args.tenants, args.repeat)
    else:
        argv = ["--tenants", str(args.tenants), "--repeat", str(args.repeat)]
        figures = common.figures_elsewhere(args.src, "bench.fleet_config", argv)
    name = "fleet_config" + (f"-{args.label}" if args.label else "")
    path = common.write_result(name, figures, redis_version=figures.pop("redis"))
    print(json.dumps(figures, indent=2))
    common.log(f"wrote {path}")


if __name__ == "__main__":
    main()
