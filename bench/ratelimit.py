"""Rate limits: how close the daemon runs to a limit, and how it behaves under a stricter one.

(a) One tenant backfilling all 55 feeds; simulator and syncd both at 60 requests/s. Reported:
the achieved rate (>= 90% of 60) and the share of 429 answers (<= 0.1%).
(b) Two tenants backfilling all 55 feeds, syncd configured for 60 requests/s each; the simulator
limits the first to 10 requests/s (a runtime override), the second keeps 60. Reported: the
first tenant's achieved rate (close to 10), its 429s (bounded: at most the requests in flight per
pause), requests it sent while a pause announced by Retry-After was running (should be none),
and the second tenant's rate (unaffected: >= 90% of 60).

Request times come from the simulator's request log (`--log-requests`, stamped on arrival here).

    .venv/bin/python -m bench.ratelimit [--records 1500] [--window 25]
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import re
import sys
import time
from typing import Any

from bench import common
from syncd import catalogue

TENANT_A, TENANT_STRICT, TENANT_FREE = 3001, 3002, 3003
_TENANT = re.compile(r"/tenant/(\d+)/")


def _requests(sim: common.Simulator, tenant: int) -> list[tuple[float, int]]:
    """(time, status) of the tenant's export requests so far, in order."""
    out = []
    for when, path, status in list(sim.requests):
        m = _TENANT.search(path)
        if m and int(m.group(1)) == tenant:
            out.append((when, status))
    return out


def _rate(times: list[float]) -> float:
    if len(times) < 2:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def _per_second(times: list[float]) -> list[int]:
    if not times:
        return []
    start = times[0]
    buckets = [0] * (int(times[-1] - start) + 1)
    for t in times:
        buckets[int(t - start)] += 1
    return buckets


def _pauses(events: list[tuple[float, int]], announced: float) -> dict[str, Any]:
    """How a tenant's 429s were followed: episodes, 429s per episode, requests during pauses.

    A request counts as sent during a pause when it arrived more than 0.1 s after a 429 and
    more than 0.1 s before that 429's announced wait ran out (requests already in flight when
    the 429 came back arrive within milliseconds).
    """
    rejected = [t for t, status in events if status == 429]
    episodes: list[list[float]] = []
    for t in rejected:
        if episodes and t - episodes[-1][0] < announced:
            episodes[-1].append(t)
        else:
            episodes.append([t])
    during = 0
    for t, _ in events:
        # Any 429 answered between `announced - 0.1` and 0.1 seconds before this request?
        lo = bisect.bisect_right(rejected, t - announced + 0.1)
        hi = bisect.bisect_left(rejected, t - 0.1)
        if hi > lo:
            during += 1
    gaps = []
    for episode in episodes:
        after = [t for t, _ in events if t > episode[0] + 0.1]
        if after:
            gaps.append(after[0] - episode[0])
    return {
        "episodes": len(episodes),
        "max_429_per_episode": max((len(e) for e in episodes), default=0),
        "requests_during_pause": during,
        "min_gap_after_429_s": round(min(gaps), 3) if gaps else None,
        "median_gap_after_429_s": round(common.percentile(gaps, 0.5), 3) if gaps else None,
    }


def _config(server_url: str, sim_url: str, tenants: list[int]) -> dict[str, Any]:
    return common.config_dict(
        server_url,
        sim_url,
        tenants,
        defaults={
            # Every catalogue feed, the legacy one too (by default syncd skips it).
            "feeds": list(catalogue.feeds()),
            "requests_per_second": 60.0,
            "max_in_flight": 8,
            "poll_interval": 300.0,
            "include_recent_changes": True,
        },
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    tenants = [TENANT_A, TENANT_STRICT, TENANT_FREE]
    sim_args = [
        *("--records", str(args.records), "--page-size", str(args.page_size)),
        *("--tenants", ",".join(map(str, tenants)), "--rate-limit", "60", "--prerender"),
    ]
    work = common.Workdir("ratelimit")
    common.log(f"ratelimit: 55 feeds x {args.records} records, {args.page_size} per page")
    with common.redis_server() as server:
        version = common.redis_version(common.redis_client(server))
        sim = common.start_simulator(sim_args, access_log=True)
        try:
            # (a) one tenant, 60 and 60.
            common.log("ratelimit: (a) one tenant at 60 requests/s, --once")
            config = work.write_config(_config(server.url, sim.url, [TENANT_A]), "a.toml")
            stats0 = sim.stats()["tenants"][str(TENANT_A)]
            a = common.run_daemon(config, timeout=1800)
            time.sleep(0.5)  # the last log lines
            stats_a = sim.stats()["tenants"][str(TENANT_A)]
            events_a = _requests(sim, TENANT_A)

            # (b) a strict tenant at 10 beside a free one at 60; syncd thinks both have 60.
            common.log(f"ratelimit: (b) simulator at 10 and 60 requests/s, {args.window:.0f}s")
            sim.post(f"/_sim/tenants/{TENANT_STRICT}/faults", {"rate_limit": args.strict_rate})
            config = work.write_config(
                _config(server.url, sim.url, [TENANT_STRICT, TENANT_FREE]), "b.toml"
            )
            before = {t: sim.stats()["tenants"][str(t)] for t in (TENANT_STRICT, TENANT_FREE)}
            daemon = common.Daemon(config).start()
            daemon.wait_for_event("started", timeout=120)
            time.sleep(args.window)
            b = daemon.stop(timeout=120)
            time.sleep(0.5)
            after = {t: sim.stats()["tenants"][str(t)] for t in (TENANT_STRICT, TENANT_FREE)}
            events_strict = _requests(sim, TENANT_STRICT)
            events_free = _requests(sim, TENANT_FREE)
        finally:
            sim.stop()
            work.cleanup()

    requests_a = stats_a["requests"] - stats0["requests"]
    limited_a = stats_a["rate_limited"] - stats0["rate_limited"]
    times_a = [t for t, _ in events_a]
    per_sec_a = _per_second(times_a)
    strict = {k: after[TENANT_STRICT][k] - before[TENANT_STRICT][k] for k in ("requests",)}
    strict_429 = after[TENANT_STRICT]["rate_limited"] - before[TENANT_STRICT]["rate_limited"]
    ok_strict = [t for t, status in events_strict if status == 200]
    ok_free = [t for t, status in events_free if status == 200]
    # Rates of (b) over the same span: from the first request of either tenant to the last.
    span_start = min(t for t, _ in events_strict + events_free)
    span_end = max(t for t, _ in events_strict + events_free)
    span = span_end - span_start
    announced = float(max(1, math.ceil(1.0 / args.strict_rate)))
    figures: dict[str, Any] = {
        "setup": {
            "feeds": len(catalogue.feeds()),
            "records_per_feed": args.records,
            "page_size": args.page_size,
            "syncd_requests_per_second": 60.0,
            "max_in_flight": 8,
            "strict_simulator_rate": args.strict_rate,
            "strict_window_s": args.window,
        },
        "achieved_rps": round(_rate(times_a), 2),
        "share_429": round(limited_a / max(requests_a, 1), 5),
        "strict_achieved_rps": round(len(ok_strict) / span, 2),
        "strict_429s": strict_429,
        "single_tenant": {
            "requests": requests_a,
            "rate_limited": limited_a,
            "wall_s": round(a.wall_s, 2),
            "request_span_s": round(times_a[-1] - times_a[0], 2) if times_a else None,
            "median_requests_per_second": common.percentile(per_sec_a[1:-1], 0.5)
            if len(per_sec_a) > 2
            else None,
            "min_requests_per_second": min(per_sec_a[1:-1]) if len(per_sec_a) > 2 else None,
            "max_requests_per_second": max(per_sec_a) if per_sec_a else None,
            "rate_limited_at_s": [
                round(t - times_a[0], 2) for t, status in events_a if status == 429
            ][:100],
            "daemon_cpu_s": round(a.cpu_s, 2),
            "returncode": a.returncode,
        },
        "strict_tenant": {
            "requests": strict["requests"],
            "ok": len(ok_strict),
            "rate_limited": strict_429,
            "share_429": round(strict_429 / max(strict["requests"], 1), 3),
            "rate_limited_per_s": round(strict_429 / span, 2),
            "announced_wait_s": announced,
            **_pauses(events_strict, announced),
        },
        "free_tenant": {
            "requests": after[TENANT_FREE]["requests"] - before[TENANT_FREE]["requests"],
            "rate_limited": after[TENANT_FREE]["rate_limited"]
            - before[TENANT_FREE]["rate_limited"],
            "achieved_rps": round(len(ok_free) / span, 2),
        },
        "strict_span_s": round(span, 2),
        "strict_daemon_returncode": b.returncode,
    }
    figures["targets"] = {
        "achieved_rps >= 54": figures["achieved_rps"] >= 0.9 * 60,
        "share_429 <= 0.001": figures["share_429"] <= 0.001,
        "strict_achieved_rps within 10% of 10": abs(figures["strict_achieved_rps"] - 10) <= 1.0,
        "strict: no request during an announced pause": (
            figures["strict_tenant"]["requests_during_pause"] == 0
        ),
        "strict: 429s per pause <= max_in_flight": (
            figures["strict_tenant"]["max_429_per_episode"] <= 8
        ),
        "free tenant >= 54 requests/s": figures["free_tenant"]["achieved_rps"] >= 0.9 * 60,
    }
    common.write_result("ratelimit", figures, version)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=common.env_int("BENCH_RATELIMIT_RECORDS", 1500))
    p.add_argument("--page-size", type=int, default=50)
    p.add_argument("--window", type=float, default=25.0, help="seconds of case (b)")
    p.add_argument("--strict-rate", type=float, default=10.0)
    return p


def main(argv: list[str] | None = None) -> int:
    figures = run(parser().parse_args(argv))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
