"""Freshness: from a record's change in the simulator to its event in the stream.

The simulator mutates records at a steady rate (`--mutation-rate`, per tenant, spread over the
served feeds); each changed record carries `modifiedOn` = the instant of the change (100 ns
ticks of the simulator's wall clock). The daemon polls every feed every P = 5 s with
`includeRecentChanges=true` and change detection on. For every event of a change made during
the window, latency = the event's stream entry time (the millisecond part of its ID, Redis's
clock on the same machine) minus its `modified_on`.

Reported: p50/p99 latency, duplicate events (the same key and data published twice: must be 0)
and missing changes (records changed in the window whose current version has no event).

    .venv/bin/python -m bench.freshness [--window 60] [--interval 5] [--mutation-rate 5]

Target: p99 <= P + 1 s, zero duplicates.
"""

from __future__ import annotations

import argparse
import calendar
import json
import sys
import time
from collections import Counter
from typing import Any

import msgspec

from bench import common
from syncd import catalogue
from syncd.keys import Keys

FEEDS = ("crm.customers", "crm.locations", "jpm.jobs", "jpm.appointments", "accounting.payments")
TENANTS = (4001, 4002)


class _Head(msgspec.Struct):
    modifiedOn: str | None = None


def parse_ts(text: str) -> float:
    """ServiceTitan's `2024-05-01T12:00:00.1234567Z` as Unix seconds (full 100 ns precision)."""
    text = text.rstrip("Z")
    head, _, frac = text.partition(".")
    seconds = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
    return seconds + (int(frac.ljust(7, "0")[:7]) / 1e7 if frac else 0.0)


def run(args: argparse.Namespace) -> dict[str, Any]:
    for name in FEEDS:
        assert catalogue.feed(name).timestamp_field == "modifiedOn", name
    sim_args = [
        *("--records", str(args.records), "--page-size", str(args.page_size)),
        *("--tenants", ",".join(map(str, TENANTS)), "--feeds", ",".join(FEEDS)),
        *("--mutation-rate", str(args.mutation_rate), "--prerender"),
    ]
    work = common.Workdir("freshness")
    common.log(
        f"freshness: {len(TENANTS)} tenants x {len(FEEDS)} feeds, P = {args.interval}s, "
        f"{args.mutation_rate} changes/s per tenant, window {args.window:.0f}s"
    )
    with common.redis_server() as server:
        r = common.redis_client(server)
        version = common.redis_version(r)
        sim = common.start_simulator(sim_args)
        daemon = None
        try:
            config = work.write_config(
                common.config_dict(
                    server.url,
                    sim.url,
                    TENANTS,
                    feeds=FEEDS,
                    defaults={"poll_interval": args.interval, "include_recent_changes": True},
                )
            )
            daemon = common.Daemon(config).start()
            daemon.wait_for_event("feed_drained", timeout=600, count=len(TENANTS) * len(FEEDS))
            window_start = time.time()
            common.log("freshness: backfill done; measuring")
            time.sleep(args.window)
            window_end = time.time()
            # Let every change of the window arrive: one interval (+ jitter) and some slack.
            time.sleep(args.interval * 1.1 + 5)
            result = daemon.stop(timeout=60)
            daemon = None
            streams: dict[tuple[int, str], list[tuple[bytes, dict[bytes, bytes]]]] = {}
            for t in TENANTS:
                for f in FEEDS:
                    streams[(t, f)] = r.xrange(Keys("st", t).stream(f))
            truth = {
                (t, f): msgspec.json.decode(
                    urlopen_bytes(sim.url + f"/_sim/tenants/{t}/feeds/{f}/records"),
                    type=list[msgspec.Raw],
                )
                for t in TENANTS
                for f in FEEDS
            }
        finally:
            if daemon is not None:
                daemon.stop(timeout=60)
            sim.stop()
            work.cleanup()

    latencies: list[float] = []
    duplicates = 0
    events = 0
    missing = 0
    changed = 0
    ops: Counter[str] = Counter()
    for key, entries in streams.items():
        seen: Counter[tuple[bytes, bytes]] = Counter()
        published = set()
        for entry_id, fields in entries:
            events += 1
            seen[(fields[b"key"], fields[b"data"])] += 1
            published.add(fields[b"data"])
            modified = fields.get(b"modified_on", b"").decode()
            if not modified:
                continue
            changed_at = parse_ts(modified)
            if window_start <= changed_at <= window_end:
                ops[fields[b"op"].decode()] += 1
                added_ms = int(entry_id.split(b"-")[0])
                latencies.append(added_ms / 1000 - changed_at)
        duplicates += sum(n - 1 for n in seen.values() if n > 1)
        for raw in truth[key]:
            data = bytes(raw)
            head = msgspec.json.decode(data, type=_Head)
            if head.modifiedOn and window_start <= parse_ts(head.modifiedOn) <= window_end:
                changed += 1
                if data not in published:
                    missing += 1
    figures: dict[str, Any] = {
        "setup": {
            "tenants": len(TENANTS),
            "feeds": list(FEEDS),
            "records_per_feed": args.records,
            "page_size": args.page_size,
            "mutation_rate_per_tenant": args.mutation_rate,
            "window_s": args.window,
            "include_recent_changes": True,
            "change_detection": True,
        },
        "poll_interval_s": args.interval,
        "p50_s": round(common.percentile(latencies, 0.50), 3),
        "p99_s": round(common.percentile(latencies, 0.99), 3),
        "max_s": round(max(latencies), 3) if latencies else None,
        "min_s": round(min(latencies), 3) if latencies else None,
        "duplicates": duplicates,
        "changes_measured": len(latencies),
        "ops_in_window": dict(ops),
        "records_changed_in_window": changed,
        "missing": missing,
        "events_total": events,
        "daemon_cpu_s": round(result.cpu_s, 2),
        "daemon_returncode": result.returncode,
    }
    figures["targets"] = {
        f"p99 <= P + 1 = {args.interval + 1:g}s": figures["p99_s"] <= args.interval + 1,
        "zero duplicates": duplicates == 0,
        "nothing missing": missing == 0,
    }
    common.write_result("freshness", figures, version)
    return figures


def urlopen_bytes(url: str) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=120) as resp:
        return bytes(resp.read())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--interval", type=float, default=5.0, help="poll interval P, seconds")
    p.add_argument("--window", type=float, default=common.env_float("BENCH_FRESHNESS_WINDOW", 60))
    p.add_argument("--mutation-rate", type=float, default=5.0, help="changes/s per tenant")
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--page-size", type=int, default=500)
    return p


def main(argv: list[str] | None = None) -> int:
    figures = run(parser().parse_args(argv))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
