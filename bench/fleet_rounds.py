"""What the fleet's bookkeeping costs at scale: Fleet objects in one process on a real Redis.

    .venv/bin/python -m bench.fleet_rounds [--tenants 5000] [--instances 5]

Measures how long a cold fleet takes to spread the tenants, how long one round (renew the
heartbeat and every lease held, read members and owners, decide) takes, and the commands per
second the whole fleet sends Redis in steady state. Results in bench/results/fleet_rounds.json.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from bench import common
from syncd.fleet.fleet import Fleet

PREFIX = "st"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=common.env_int("BENCH_FLEET_TENANTS", 5000))
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--lease", type=float, default=15.0)
    return p


async def _measure(url: str, tenants: int, instances: int, lease: float) -> dict[str, Any]:
    owned: dict[str, set[int]] = {}
    clients = [aioredis.Redis.from_url(url) for _ in range(instances + 1)]
    fleets: list[Fleet] = []
    tasks = []
    for n in range(instances):
        name = f"i{n}"
        mine = owned.setdefault(name, set())

        async def acquire(t: int, mine: set[int] = mine) -> None:
            mine.add(t)

        async def release(t: int, mine: set[int] = mine) -> None:
            mine.discard(t)

        fleet = Fleet(
            clients[n],
            PREFIX,
            name,
            lease,
            on_acquire=acquire,
            on_release=release,
            tenants=range(1, tenants + 1),
        )
        fleets.append(fleet)
    started = time.monotonic()
    for fleet in fleets:
        tasks.append(asyncio.create_task(fleet.run()))
    share = -(-tenants // instances)
    while not (
        sum(len(s) for s in owned.values()) == tenants
        and all(share - 1 <= len(s) <= share for s in owned.values())
    ):
        await asyncio.sleep(0.05)
        if time.monotonic() - started > 300:
            raise RuntimeError("the fleet did not spread the tenants within 300 s")
    spread_s = time.monotonic() - started
    per_instance = sorted(len(s) for s in owned.values())
    probe = clients[instances]
    # The whole fleet's load on Redis in steady state: heartbeats, renewals, reads, epoch polls.
    window = 2 * lease / 3
    before = (await probe.info("stats"))["total_commands_processed"]
    await asyncio.sleep(window)
    after = (await probe.info("stats"))["total_commands_processed"]
    rounds = []
    for _ in range(5):
        t0 = time.monotonic()
        await fleets[0].round()
        rounds.append(time.monotonic() - t0)
    for fleet in fleets:
        fleet.stop()
    await asyncio.gather(*tasks)
    for c in clients:
        await c.aclose()
    return {
        "tenants": tenants,
        "instances": instances,
        "lease_s": lease,
        "cold_spread_s": round(spread_s, 3),
        "round_s_median": round(sorted(rounds)[len(rounds) // 2], 4),
        "round_s_max": round(max(rounds), 4),
        "fleet_commands_per_s": round((after - before - 2) / window),
        "per_instance_min": per_instance[0],
        "per_instance_max": per_instance[-1],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    with common.redis_server() as server:
        version = common.redis_version(common.redis_client(server))
        figures = asyncio.run(_measure(server.url, args.tenants, args.instances, args.lease))
    common.write_result("fleet_rounds", figures, version)
    return figures


def main(argv: list[str] | None = None) -> None:
    figures = run(parser().parse_args(argv))
    for k, v in figures.items():
        print(f"{k:24} {v}")


if __name__ == "__main__":
    main()
