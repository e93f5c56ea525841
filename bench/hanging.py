"""A healthy tenant's backfill, alone and beside nine tenants that hang.

Default pool and limits (64 workers, 8 requests in flight per tenant, 20 requests/s, default
timeouts). The healthy tenant backfills 10 feeds; nine more tenants sit beside it whose export
requests never answer ("requests"), or whose token requests never answer ("token"). Every
answer takes about 300 ms, so that 20 requests/s need about 6 requests in flight: the healthy
tenant's share of the pool matters, not only its rate limit. The simulator (its own process)
makes the nine hang with its per-tenant quirks. Measured: from the daemon's `started` line to
the healthy tenant's last `feed_drained` line, in the daemon's own log; and, from the
simulator, the hanging tenants' requests unanswered at that moment and the most of one tenant
in flight at once.

    .venv/bin/python -m bench.hanging [--records 3000] [--page-size 100] [--latency-ms 300]

Target: beside either kind of hanging tenants, within 2x of the time alone.
"""

from __future__ import annotations

import argparse
import datetime
import json
import signal
import sys
import time
from typing import Any

from bench import common

FEEDS = [
    "crm.customers",
    "crm.locations",
    "crm.leads",
    "jpm.jobs",
    "jpm.appointments",
    "jpm.job-history",
    "accounting.payments",
    "accounting.invoices",
    "customer-interactions.technician-ratings",
    "memberships.membership-status-changes",
]
HEALTHY = 6010
HANGING = list(range(6001, 6010))


def _ts(event: dict[str, Any]) -> float:
    return datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _backfill(
    work: common.Workdir,
    server: Any,
    sim: common.Simulator,
    name: str,
    tenants: list[int],
    timeout: float,
) -> dict[str, Any]:
    """Run the daemon until the healthy tenant drained every feed; seconds from `started`."""
    common.redis_client(server).flushall()
    sim.post("/_sim/reset-stats")
    # Defaults throughout, but a short shutdown grace: the hanging polls are cancelled soon.
    data = common.config_dict(
        server.url, sim.url, tenants, defaults={"feeds": FEEDS}, engine={"shutdown_grace": 1.0}
    )
    config = work.write_config(data, f"{name}.toml")
    daemon = common.Daemon(config).start()
    try:
        [started] = daemon.wait_for_event("started", timeout=120)
        deadline = time.monotonic() + timeout
        while True:
            drained = [
                e
                for e in daemon.events()
                if e.get("event") == "feed_drained" and e.get("tenant") == HEALTHY
            ]
            if len(drained) >= len(FEEDS):
                break
            if time.monotonic() > deadline or not daemon.running():
                raise RuntimeError(f"{name}: healthy tenant not drained: {daemon.tail()}")
            time.sleep(0.1)
        seconds = max(_ts(e) for e in drained) - _ts(started)
        stats = sim.stats()["tenants"]
    finally:
        asked = time.monotonic()
        daemon.signal(signal.SIGTERM)
        result = daemon.wait(120)
        shutdown_s = time.monotonic() - asked
    common.log(f"hanging: {name}: {seconds:.2f}s")
    hanging = [stats.get(str(t), {}) for t in HANGING]
    return {
        "healthy_backfill_s": round(seconds, 3),
        "healthy_max_in_flight": stats[str(HEALTHY)]["max_in_flight"],
        "hanging_requests_in_flight_at_the_end": sum(h.get("in_flight", 0) for h in hanging),
        "hanging_max_in_flight_of_one_tenant": max(h.get("max_in_flight", 0) for h in hanging),
        "hung_requests": sum(h.get("hung", 0) for h in hanging),
        "daemon_returncode": result.returncode,
        "shutdown_s": round(shutdown_s, 2),  # SIGTERM to exit, with a 1 s grace
    }


def _hang(sim: common.Simulator, **quirks: float) -> None:
    for t in HANGING:
        sim.set_quirks(t, **quirks)
    time.sleep(1.0)  # requests the previous daemon left hanging notice it is gone


def run(args: argparse.Namespace) -> dict[str, Any]:
    tenants = [*HANGING, HEALTHY]
    sim_args = [
        *("--records", str(args.records), "--page-size", str(args.page_size)),
        *("--tenants", ",".join(map(str, tenants)), "--rate-limit", "60", "--seed", "1"),
        *("--feeds", ",".join(FEEDS), "--fault-latency", str(args.latency_ms)),
    ]
    work = common.Workdir("hanging")
    common.log(f"hanging: {len(FEEDS)} feeds x {args.records} records, {args.page_size} per page")
    with common.redis_server() as server:
        version = common.redis_version(common.redis_client(server))
        sim = common.start_simulator(sim_args)
        try:
            alone = _backfill(work, server, sim, "alone", [HEALTHY], args.timeout)
            _hang(sim, hang=1.0, hang_token=0.0)
            requests = _backfill(work, server, sim, "requests", tenants, args.timeout)
            _hang(sim, hang=0.0, hang_token=1.0)
            tokens = _backfill(work, server, sim, "token", tenants, args.timeout)
        finally:
            sim.stop()
            work.cleanup()
    base = alone["healthy_backfill_s"]
    figures: dict[str, Any] = {
        "setup": {
            "feeds": len(FEEDS),
            "records_per_feed": args.records,
            "page_size": args.page_size,
            "latency_ms": args.latency_ms,
            "hanging_tenants": len(HANGING),
            "workers": 64,
            "max_in_flight": 8,
            "requests_per_second": 20.0,
            "settings": "defaults",
        },
        "alone_s": base,
        "beside_hanging_requests_s": requests["healthy_backfill_s"],
        "beside_hanging_token_s": tokens["healthy_backfill_s"],
        "ratio_requests": round(requests["healthy_backfill_s"] / base, 3),
        "ratio_token": round(tokens["healthy_backfill_s"] / base, 3),
        "alone": alone,
        "requests": requests,
        "token": tokens,
    }
    figures["targets"] = {
        "beside hanging requests <= 2 x alone": figures["ratio_requests"] <= 2.0,
        "beside a hanging token endpoint <= 2 x alone": figures["ratio_token"] <= 2.0,
        "no tenant over max_in_flight": max(
            requests["hanging_max_in_flight_of_one_tenant"], requests["healthy_max_in_flight"]
        )
        <= 8,
    }
    common.write_result("hanging", figures, version)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=common.env_int("BENCH_HANGING_RECORDS", 3000))
    p.add_argument("--page-size", type=int, default=100)
    p.add_argument(
        "--latency-ms",
        type=float,
        default=300.0,
        help="every answer's latency (+-50%%): 20 requests/s then need about 6 in flight",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per backfill at most")
    return p


def main(argv: list[str] | None = None) -> int:
    figures = run(parser().parse_args(argv))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
