"""The fleet with real daemon processes: takeovers, balance, and what a fleet and WAIT cost.

    .venv/bin/python -m bench.fleet [--tenants 30] [--lease 15] [--records 3000]

1. Failover: three instances share the tenants; one is SIGKILLed mid-backfill, another stopped
   with SIGTERM, then the killed one comes back. For each change: seconds until its tenants have
   new owners (leases in Redis) and until the simulator sees them polled under a new token; the
   most and fewest tenants per instance afterwards; how long two processes polled one tenant at
   once (the simulator's per-token request spans overlapping).
2. Backfill records/s with one and with three instances (all on this machine, so Redis- and
   CPU-bound: three processes share two cores with Redis and the simulator).
3. The cost of `wait_replicas = 1`: one instance against a primary with one replica.
Results in bench/results/fleet.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from bench import common
from syncd.fleet.state import parse_holder
from syncd.keys import Keys
from syncd.testing.redis_server import RedisServer

FEEDS = ["crm.customers", "jpm.jobs"]
PREFIX = "st"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", type=int, default=common.env_int("BENCH_FLEET_TENANTS", 30))
    p.add_argument("--lease", type=float, default=15.0)
    p.add_argument("--records", type=int, default=common.env_int("BENCH_FLEET_RECORDS", 3000))
    p.add_argument("--only", choices=["failover", "throughput"], help="one part only")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs of each setting")
    return p


class Instance(common.Daemon):
    """A daemon taking part in a fleet under a given name."""

    def __init__(self, config_path: Path, name: str) -> None:
        super().__init__(config_path, log_path=config_path.with_name(f"{name}.log"))
        self.name = name

    def start(self) -> Instance:
        command = [common.PYTHON, "-m", "syncd", "run", "--config", str(self.config_path)]
        command += ["--instance", self.name]
        with self.log_path.open("ab") as out:
            self._log_offset = out.tell()
            self.started = time.monotonic()
            self.proc = subprocess.Popen(command, stdout=out, stderr=out, cwd=common.ROOT)
        return self

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> common.DaemonResult:
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        return common.DaemonResult(code, time.monotonic() - self.started, 0, 0, 0, 0)


def owners(r: redis.Redis, tenants: list[int]) -> dict[int, str]:
    pipe = r.pipeline(transaction=False)
    for t in tenants:
        pipe.get(Keys(PREFIX, t).owner)
    values = zip(tenants, pipe.execute(), strict=True)
    return {t: parse_holder(v)[0] for t, v in values if v is not None}  # names, not processes


def spread(r: redis.Redis, tenants: list[int], live: list[str]) -> tuple[int, int]:
    per = Counter(owners(r, tenants).values())
    counts = [per.get(name, 0) for name in live]
    return min(counts), max(counts)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"not within {timeout}s: {what}")
        time.sleep(0.05)
    return time.monotonic() - started


def stream_total(r: redis.Redis, tenants: list[int]) -> int:
    pipe = r.pipeline(transaction=False)
    for t in tenants:
        for f in FEEDS:
            pipe.xlen(Keys(PREFIX, t).stream(f))
    return sum(pipe.execute())


def pollers(sim: common.Simulator) -> dict[int, list[dict[str, Any]]]:
    return {int(t): s["pollers"] for t, s in sim.stats()["tenants"].items()}


def overlap_s(spans: list[dict[str, Any]]) -> float:
    return sum(
        max(0.0, min(a["last"], b["last"]) - max(a["first"], b["first"]))
        for a, b in itertools.combinations(spans, 2)
    )


def first_new_poll(sim: common.Simulator, tenants: set[int], since: float) -> float | None:
    """Wall-clock time by which every tenant was polled under a token first seen after `since`;
    None while some are not yet."""
    latest = 0.0
    seen = pollers(sim)
    for t in tenants:
        fresh = [p["first"] for p in seen.get(t, []) if p["first"] > since]
        if not fresh:
            return None
        latest = max(latest, min(fresh))
    return latest


def base_config(
    redis_url: str, sim: common.Simulator, tenants: list[int], rps: float, lease: float
) -> dict[str, Any]:
    data = common.config_dict(
        redis_url,
        sim.url,
        tenants,
        feeds=FEEDS,
        defaults={"requests_per_second": rps, "poll_interval": 5.0},
        engine={"shutdown_grace": 10.0},
        log_level="info",
    )
    data["fleet"] = {"enabled": True, "lease": lease}
    return data


def failover(args: argparse.Namespace, work: common.Workdir) -> dict[str, Any]:
    tenants = list(range(7001, 7001 + args.tenants))
    lease = args.lease
    sim_args = ["--tenants", ",".join(map(str, tenants)), "--records", str(args.records)]
    sim_args += ["--page-size", "50", "--feeds", ",".join(FEEDS), "--prerender"]
    sim = common.start_simulator(sim_args)
    out: dict[str, Any] = {"tenants": len(tenants), "lease_s": lease}
    instances: dict[str, Instance] = {}
    try:
        with common.redis_server() as server:
            r = common.redis_client(server)
            path = work.write_config(base_config(server.url, sim, tenants, 4.0, lease), "f.toml")
            for name in "abc":
                instances[name] = Instance(path, name).start()
            out["start_balance_s"] = round(
                wait_until(
                    lambda: (
                        spread(r, tenants, ["a", "b", "c"]) in ((10, 10), (9, 11), (10, 11))
                        and len(owners(r, tenants)) == len(tenants)
                    ),
                    120,
                    "three instances balanced",
                ),
                2,
            )
            out["after_start"] = spread(r, tenants, ["a", "b", "c"])

            # SIGKILL b mid-backfill.
            lost = {t for t, o in owners(r, tenants).items() if o == "b"}
            total = len(tenants) * len(FEEDS) * args.records
            out["kill_at_share_done"] = round(stream_total(r, tenants) / total, 3)
            wall, t0 = time.time(), time.monotonic()
            instances["b"].signal(signal.SIGKILL)
            instances["b"].wait(10)
            wait_until(
                lambda: all(owners(r, tenants).get(t) in ("a", "c") for t in lost),
                lease * 4,
                "b's tenants taken over",
            )
            out["sigkill_owned_s"] = round(time.monotonic() - t0, 2)
            wait_until(lambda: first_new_poll(sim, lost, wall) is not None, 60, "polled again")
            out["sigkill_polled_s"] = round((first_new_poll(sim, lost, wall) or wall) - wall, 2)
            out["after_sigkill"] = spread(r, tenants, ["a", "c"])

            # SIGTERM c.
            handed = {t for t, o in owners(r, tenants).items() if o == "c"}
            wall, t0 = time.time(), time.monotonic()
            instances["c"].signal(signal.SIGTERM)
            wait_until(
                lambda: all(owners(r, tenants).get(t) == "a" for t in handed),
                60,
                "c's tenants handed over",
            )
            out["sigterm_owned_s"] = round(time.monotonic() - t0, 2)
            wait_until(lambda: first_new_poll(sim, handed, wall) is not None, 60, "polled again")
            out["sigterm_polled_s"] = round((first_new_poll(sim, handed, wall) or wall) - wall, 2)
            out["sigterm_exit_code"] = instances["c"].wait(60).returncode
            out["after_sigterm"] = spread(r, tenants, ["a"])

            # b comes back: it gets its share again.
            instances["b"] = Instance(path, "b").start()
            t0 = time.monotonic()
            wait_until(
                lambda: (
                    spread(r, tenants, ["a", "b"]) == (len(tenants) // 2, -(-len(tenants) // 2))
                ),
                120,
                "b rejoined",
            )
            out["rejoin_balance_s"] = round(time.monotonic() - t0, 2)
            out["after_rejoin"] = spread(r, tenants, ["a", "b"])
            for inst in instances.values():
                if inst.running():
                    inst.signal(signal.SIGTERM)
                    inst.wait(60)
            spans = pollers(sim)
            overlaps = {t: overlap_s(s) for t, s in spans.items()}
            out["tenants_polled_twice_at_once"] = sum(1 for v in overlaps.values() if v > 0)
            out["double_polling_s_total"] = round(sum(overlaps.values()), 3)
    finally:
        for inst in instances.values():
            if inst.running():
                inst.proc.kill()  # type: ignore[union-attr]
        sim.stop()
    return out


def backfill_rate(
    redis_url: str,
    r: redis.Redis,
    sim: common.Simulator,
    tenants: list[int],
    instances: int,
    work: common.Workdir,
    total: int,
    extra: dict[str, Any] | None = None,
) -> float:
    """Records/s of a first sync of every tenant by `instances` fleet members, from the first
    event to the last."""
    r.flushall()
    data = base_config(redis_url, sim, tenants, 60.0, 15.0)
    for section, values in (extra or {}).items():
        data.setdefault(section, {}).update(values)
    path = work.write_config(data, f"backfill-{instances}.toml")
    sim.post("/_sim/reset-stats")
    members = [Instance(path, f"m{n}").start() for n in range(instances)]
    try:
        # From the first event on: process start-up is not what is measured.
        wait_until(lambda: stream_total(r, tenants) > 0, 120, "first events")
        started, first = time.monotonic(), stream_total(r, tenants)
        wait_until(lambda: stream_total(r, tenants) >= total, 900, "backfill done")
        elapsed = time.monotonic() - started
    finally:
        for m in members:
            m.signal(signal.SIGTERM)
        for m in members:
            m.wait(60)
    return (total - first) / elapsed


def throughput(args: argparse.Namespace, work: common.Workdir) -> dict[str, Any]:
    """Each setting in turn, `--repeats` rounds interleaved (a shared machine's load drifts);
    the median of each and every run."""
    tenants = list(range(8001, 8001 + args.tenants))
    records = args.records
    total = records * len(tenants) * len(FEEDS)
    sim_args = ["--tenants", ",".join(map(str, tenants)), "--records", str(records)]
    sim_args += ["--page-size", "500", "--feeds", ",".join(FEEDS), "--prerender"]
    sim = common.start_simulator(sim_args)
    runs: dict[str, list[float]] = {}
    replica = RedisServer(extra_args=["--appendonly", "no"])
    try:
        with common.redis_server() as alone, common.redis_server() as primary:
            replica.extra_args += ["--replicaof", "127.0.0.1", str(primary.port)]
            replica.start()
            r_alone, r_primary = common.redis_client(alone), common.redis_client(primary)
            wait_until(
                lambda: r_primary.info("replication").get("connected_slaves", 0) >= 1, 30, "replica"
            )
            settings: dict[str, tuple[str, redis.Redis, int, dict[str, Any]]] = {
                "1_instance": (alone.url, r_alone, 1, {}),
                "3_instances": (alone.url, r_alone, 3, {}),
                "wait_replicas_0": (primary.url, r_primary, 1, {"redis": {"wait_replicas": 0}}),
                "wait_replicas_1": (primary.url, r_primary, 1, {"redis": {"wait_replicas": 1}}),
            }
            for _ in range(args.repeats):
                for name, (url, r, n, extra) in settings.items():
                    rate = backfill_rate(url, r, sim, tenants, n, work, total, extra)
                    runs.setdefault(name, []).append(round(rate))
                    common.log(f"{name}: {rate:,.0f} records/s")
    finally:
        replica.stop()
        sim.stop()
    out: dict[str, Any] = {"records": total, "repeats": args.repeats}
    for name, rates in runs.items():
        out[f"records_per_s_{name}"] = sorted(rates)[len(rates) // 2]
        out[f"runs_{name}"] = rates
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = common.Workdir("fleet")
    try:
        parts = {"failover": failover, "throughput": throughput}
        figures = {
            name: part(args, work) for name, part in parts.items() if args.only in (None, name)
        }
    finally:
        work.cleanup()
    with common.redis_server() as server:
        version = common.redis_version(common.redis_client(server))
    previous = common.RESULTS_DIR / "fleet.json"
    if args.only and previous.exists():  # keep the other part's last figures
        kept = json.loads(previous.read_text())
        figures = {**{k: kept[k] for k in ("failover", "throughput") if k in kept}, **figures}
    common.write_result("fleet", figures, version)
    return figures


def main(argv: list[str] | None = None) -> None:
    figures = run(parser().parse_args(argv))
    for part, values in figures.items():
        for k, v in values.items():
            print(f"{part:10} {k:32} {v}")


if __name__ == "__main__":
    main()
