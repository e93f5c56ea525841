"""The mirror's backfill: events/s from Redis streams into PostgreSQL, side by side with a naive
row-by-row upsert.

Streams of `--tenants` x `--feeds` hold `--events` events in all (about 800 bytes of JSON each;
a fifth of them newer versions of keys seen before), published before the clock starts. Each
contender starts on a fresh schema with a new consumer group at the streams' start and is timed
until its group has read and acknowledged every event:

- `copy`: `syncd mirror` itself (`syncd.mirror.Mirror`): each batch staged with COPY and upserted
  with one `INSERT ... SELECT DISTINCT ON ... ON CONFLICT` per feed, one transaction per batch,
  the next batch read while one is applied (`read_ahead`);
- `asyncpg`: the same `syncd mirror` (consumer, settings, tables, read-ahead) with its handler
  replaced by one on asyncpg instead of psycopg 3: the batch staged with asyncpg's binary COPY
  (`copy_records_to_table`) into the same temporary staging table, then the mirror's own upsert
  statements (`syncd.mirror.apply`), in one transaction and a savepoint as `apply_rows` does;
  skipped, with the reason, when asyncpg is not installed (it is in the `bench` extra);
- `row_by_row`: the same consumer, tables and transactions, each event its own `INSERT ... ON
  CONFLICT DO UPDATE ... WHERE` (the README's statement), one round trip per event.

`copy` and `asyncpg` differ in the driver alone and run in turns (which goes first alternates
from round to round), so that the machine's other load falls on both.

PostgreSQL is a private server (`syncd.testing.postgres_server`) with its durable defaults
(fsync, synchronous commit); Redis is private too. Reported per contender: events/s, the share of
the time spent in the handler (PostgreSQL) and the CPU seconds of this process and of PostgreSQL
(per 100,000 events: what the machine's other load does not change), with the machine's load
average before and after.

Then the steady state: the first `copy` round's mirror, caught up, while `--steady-rate` events/s
(2,000) are published for `--steady-seconds` (20): each event's lag from its stream entry's time
to the first moment (sampled every 5 ms) the mirror had committed it; p50, p99 and max.

    .venv/bin/python -m bench.mirror [--events 200000] [--rounds 2]

Targets: `copy` at 50,000 events/s or more; a steady lag p99 of at most 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil
import psycopg
import redis
import redis.asyncio as aioredis
from psycopg import sql

from bench import common
from syncd import config
from syncd.consumer import Consumer, Event, Failed, Subscription
from syncd.mirror import Mirror
from syncd.mirror.apply import _CREATE_STAGE, _UPSERT, STAGE
from syncd.mirror.rows import Row, row_of, rows_of
from syncd.mirror.schema import migrate
from syncd.testing import postgres_server
from syncd.testing.groups import caught_up

try:
    import asyncpg
except ImportError as exc:  # the bench extra not installed: the asyncpg contender is skipped
    asyncpg = None
    NO_ASYNCPG = f"asyncpg is not installed ({exc}); pip install -e '.[bench]'"
else:
    NO_ASYNCPG = ""

TARGET_EVENTS_PER_S = 50_000
TARGET_LAG_P99_MS = 1000
FEEDS = ["crm.customers", "jpm.jobs"]
BATCH = 1000
_NAIVE_UPSERT = """
INSERT INTO {table} AS stored
    (tenant, key, modified_on, modified_at, entry_ms, entry_seq, data, deleted_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, NULL)
ON CONFLICT (tenant, key) DO UPDATE SET modified_on = excluded.modified_on,
    modified_at = excluded.modified_at, entry_ms = excluded.entry_ms,
    entry_seq = excluded.entry_seq, data = excluded.data, deleted_at = NULL
WHERE (stored.modified_at, stored.entry_ms, stored.entry_seq)
   <= (excluded.modified_at, excluded.entry_ms, excluded.entry_seq)
"""


def record(rng: random.Random, key: int, version: int) -> bytes:
    """A customer-like record of about 800 bytes."""
    return json.dumps(
        {
            "id": key,
            "active": True,
            "name": f"Customer {key} {rng.choice(['Heating', 'Plumbing', 'Electric'])} LLC",
            "type": rng.choice(["Residential", "Commercial"]),
            "address": {
                "street": f"{rng.randint(1, 9999)} Main Street",
                "unit": None,
                "city": "Springfield",
                "state": "IL",
                "zip": f"{rng.randint(10000, 99999)}",
                "country": "USA",
                "latitude": round(rng.uniform(30, 45), 6),
                "longitude": round(rng.uniform(-120, -70), 6),
            },
            "customFields": [
                {"typeId": i, "name": f"field {i}", "value": f"value {rng.random():.6f}"}
                for i in range(4)
            ],
            "balance": round(rng.uniform(0, 5000), 2),
            "tagTypeIds": [rng.randint(1, 500) for _ in range(3)],
            "doNotMail": False,
            "doNotService": False,
            "createdOn": "2023-01-01T00:00:00Z",
            "createdById": 1234,
            "modifiedOn": f"2024-05-01T12:{version // 60 % 60:02d}:{version % 60:02d}Z",
            "mergedToId": None,
            "externalData": [{"key": "crm", "value": f"ext-{key}-{version}"}],
            "version": version,
        },
        separators=(",", ":"),
    ).encode()


def fill(client: redis.Redis, tenants: int, events: int, seed: int = 1) -> list[Subscription]:
    """Publish `events` across tenants x FEEDS, as syncd writes them; the subscriptions."""
    rng = random.Random(seed)
    streams = [(t, f) for t in range(1, tenants + 1) for f in FEEDS]
    per_stream = events // len(streams)
    for tenant, feed in streams:
        keys = 0
        pipe = client.pipeline(transaction=False)
        for n in range(per_stream):
            if keys and rng.random() < 0.2:  # a newer version of a key seen before
                key, version = rng.randrange(keys), n
            else:
                key, version = keys, 0
                keys += 1
            at = f"2024-05-01T12:{version // 60 % 60:02d}:{version % 60:02d}.0000000Z"
            fields = {
                "op": "updated" if version else "created",
                "key": str(key),
                "data": record(rng, key, version),
                "modified_on": at[:19] + "Z",
                "modified_at": at,
            }
            pipe.xadd(f"st:{{{tenant}}}:{feed}", fields)  # type: ignore[arg-type]
            if n % 5000 == 4999:
                pipe.execute()
        pipe.execute()
    return [Subscription(t, FEEDS) for t in range(1, tenants + 1)]


def settings(
    redis_url: str, pg_url: str, tenants: int, group: str, schema: str, workers: int | None = None
) -> Any:
    data = {
        "redis": {"url": redis_url},
        "servicetitan": {"app_key": "k", "api_url": "http://127.0.0.1:1"},
        "tenants": [
            {"id": t, "client_id": f"c{t}", "client_secret": "s", "feeds": FEEDS}
            for t in range(1, tenants + 1)
        ],
        "mirror": {"url": pg_url, "group": group, "schema": schema, "batch": BATCH},
    }
    if workers is not None:
        data["mirror"]["workers"] = workers
    return config.resolve(config.parse(data, "bench.toml"), environ={})


def postgres_cpu(server: postgres_server.Postgres) -> float:
    """CPU seconds of the PostgreSQL server and its backends so far."""
    proc = getattr(server, "proc", None)
    if proc is None:
        return float("nan")
    try:
        root = psutil.Process(proc.pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return float("nan")
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class Timed:
    """A handler wrapped to count the seconds spent in it."""

    def __init__(self, handler: Callable[[list[Event]], Awaitable[Any]]) -> None:
        self.handler = handler
        self.seconds = 0.0

    async def __call__(self, batch: list[Event], **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return await self.handler(batch, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


async def run_copy(s: Any, subs: list[Subscription], r: aioredis.Redis) -> tuple[float, float]:
    """`syncd mirror` until its group caught up: (seconds, seconds in the handler)."""
    mirror = Mirror(s, name="bench")
    timed = Timed(mirror.handle)
    mirror.handle = timed  # type: ignore[method-assign]
    t0 = time.perf_counter()
    task = asyncio.create_task(mirror.serve())
    streams = [stream for sub in subs for stream in sub.streams()]
    while not await caught_up(r, streams, s.config.mirror.group):
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - t0
    mirror.stop.set()
    assert await task == 0
    return elapsed, timed.seconds


async def run_asyncpg(s: Any, subs: list[Subscription], r: aioredis.Redis) -> tuple[float, float]:
    """`syncd mirror` as in `run_copy`, its batches applied through asyncpg: binary COPY
    (`copy_records_to_table`) into the same staging table, then the mirror's upserts."""
    mirror = Mirror(s, name="bench")
    m = s.config.mirror
    # The mirror's own statements, as text, with asyncpg's placeholder.
    create_stage = _CREATE_STAGE.as_string(None)
    conns: dict[int, Any] = {}  # a connection per worker, as the mirror's
    upserts: dict[str, str] = {}

    async def handle(batch: list[Event], worker: int = 0) -> list[Event | Failed] | None:
        # As Mirror.handle: each event's row, then the batch in one transaction.
        conn = conns.get(worker)
        if conn is None:
            conn = conns[worker] = await asyncpg.connect(
                m.url,
                server_settings={"application_name": "syncd-mirror-asyncpg", "work_mem": "64MB"},
            )
            await conn.execute(create_stage)
        pairs, failed = rows_of(batch)
        rows = [row for _, row in pairs]
        if rows:
            for feed in {row.feed for row in rows} - upserts.keys():
                upserts[feed] = (
                    sql.SQL(_UPSERT)
                    .format(
                        table=sql.Identifier(m.schema, mirror.tables[feed]),
                        stage=sql.Identifier(STAGE),
                    )
                    .as_string(None)
                    .replace("%s", "$1")
                )
            # A transaction and, inside it, a savepoint: what apply_rows does for a batch.
            async with conn.transaction(), conn.transaction():
                await conn.copy_records_to_table(STAGE, records=rows, columns=Row._fields)
                for feed in sorted({row.feed for row in rows}):
                    await conn.execute(upserts[feed], feed)
        if batch:
            mirror.newest_ms = max(
                mirror.newest_ms, max(int(e.id.partition("-")[0]) for e in batch)
            )
        mirror.batches += 1
        mirror.applied += len(rows)
        return failed or None

    timed = Timed(handle)
    mirror.handle = timed  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        task = asyncio.create_task(mirror.serve())
        streams = [stream for sub in subs for stream in sub.streams()]
        while not await caught_up(r, streams, m.group):
            await asyncio.sleep(0.02)
        elapsed = time.perf_counter() - t0
        mirror.stop.set()
        assert await task == 0
    finally:
        for conn in conns.values():
            await conn.close()
    return elapsed, timed.seconds


async def run_row_by_row(
    s: Any, subs: list[Subscription], r: aioredis.Redis
) -> tuple[float, float]:
    """The same consumer, one INSERT ... ON CONFLICT per event."""
    m = s.config.mirror
    t0 = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(m.url) as conn:
        tables = await migrate(conn, m.schema, FEEDS)
        statements = {
            feed: sql.SQL(_NAIVE_UPSERT).format(table=sql.Identifier(m.schema, name))
            for feed, name in tables.items()
        }

        async def handle(batch: list[Event]) -> None:
            async with conn.transaction():
                for event in batch:
                    row = row_of(event)
                    assert not isinstance(row, str)
                    await conn.execute(
                        statements[row.feed],
                        [
                            row.tenant,
                            row.key,
                            row.modified_on,
                            row.modified_at,
                            row.entry_ms,
                            row.entry_seq,
                            row.data,
                        ],
                    )

        timed = Timed(handle)
        stop = asyncio.Event()
        client = aioredis.Redis.from_url(str(s.config.redis.url))
        consumer = Consumer(client, m.group, "bench", streams=subs, batch=BATCH)
        async with consumer:
            task = asyncio.create_task(consumer.run(timed, stop=stop))
            streams = [stream for sub in subs for stream in sub.streams()]
            while not await caught_up(r, streams, m.group):
                await asyncio.sleep(0.02)
            elapsed = time.perf_counter() - t0
            stop.set()
            await task
        await client.aclose()
    return elapsed, timed.seconds


async def steady(s: Any, subs: list[Subscription], rate: int, seconds: float) -> dict[str, Any]:
    """`syncd mirror` keeping up with `rate` events/s published for `seconds` (its group has
    caught up before): each event's lag, from its stream entry's time to the first moment the
    mirror had committed it (sampled every 5 ms)."""
    mirror = Mirror(s, name="bench")
    task = asyncio.create_task(mirror.serve())
    r = aioredis.Redis.from_url(str(s.config.redis.url))
    streams = [stream for sub in subs for stream in sub.streams()]
    rng = random.Random(7)
    published: list[int] = []
    samples: list[tuple[float, int]] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append((time.time(), mirror.newest_ms))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    await asyncio.sleep(1.0)  # connected, tables migrated
    per_tick = max(1, round(rate * 0.01))  # published every 10 ms
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        async with r.pipeline(transaction=False) as pipe:
            for _ in range(per_tick):
                n += 1
                at = "2024-06-01T00:00:00.0000000Z"
                pipe.xadd(
                    streams[n % len(streams)],
                    {
                        "op": "updated",
                        "key": str(rng.randrange(10_000)),
                        "data": record(rng, n, n),
                        "modified_on": at[:19] + "Z",
                        "modified_at": at,
                    },
                )
            ids = await pipe.execute()
        published.extend(int(i.decode().partition("-")[0]) for i in ids)
        await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
    while not await caught_up(r, streams, s.config.mirror.group):
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.05)
    done.set()
    await sampler
    mirror.stop.set()
    assert await task == 0
    await r.aclose()
    lags, i = [], 0
    for ms in sorted(published):
        while i < len(samples) and samples[i][1] < ms:
            i += 1
        if i < len(samples):
            lags.append(max(0.0, samples[i][0] * 1000 - ms))
    lags.sort()
    result = {
        "rate": rate,
        "seconds": seconds,
        "events": len(published),
        "lag_p50_ms": round(lags[len(lags) // 2]),
        "lag_p99_ms": round(lags[int(len(lags) * 0.99)]),
        "lag_max_ms": round(lags[-1]),
    }
    common.log(f"steady: {result}")
    return result


def same_rows(conn: psycopg.Connection[Any], a: str, b: str, table: str) -> bool:
    """Whether `a.table` and `b.table` hold the same rows."""
    query = sql.SQL(
        "SELECT count(*) FROM ((TABLE {a} EXCEPT ALL TABLE {b}) UNION ALL "
        "(TABLE {b} EXCEPT ALL TABLE {a})) AS differing"
    ).format(a=sql.Identifier(a, table), b=sql.Identifier(b, table))
    differing = conn.execute(query).fetchone()
    return differing is not None and differing[0] == 0


def versus(rounds: dict[str, list[dict[str, Any]]], a: str, b: str) -> dict[str, float]:
    """`a` / `b`: the ratios of the medians of their runs, of events/s and of the CPU seconds
    per event of this process and of PostgreSQL. Medians rather than best runs: the machine's
    other load changes from one run to the next."""

    def median(name: str, key: str) -> float:
        runs = rounds[name]
        if key == "events_per_s":
            return statistics.median(r[key] for r in runs)
        return statistics.median(r[key] / r["events"] for r in runs)

    return {
        label: round(median(a, key) / median(b, key), 2)
        for label, key in (
            ("events_per_s", "events_per_s"),
            ("client_cpu", "client_cpu_s"),
            ("postgres_cpu", "postgres_cpu_s"),
        )
    }


async def measure(
    name: str, run: Any, s: Any, subs: list[Subscription], events: int, pg: Any
) -> dict[str, Any]:
    r = aioredis.Redis.from_url(str(s.config.redis.url))
    me = psutil.Process()
    cpu0, pg0 = sum(me.cpu_times()[:2]), postgres_cpu(pg)
    elapsed, in_handler = await run(s, subs, r)
    cpu1, pg1 = sum(me.cpu_times()[:2]), postgres_cpu(pg)
    await r.aclose()
    result = {
        "events": events,
        "seconds": round(elapsed, 2),
        "events_per_s": round(events / elapsed),
        "handler_share": round(in_handler / elapsed, 2),
        "client_cpu_s": round(cpu1 - cpu0, 2),
        "postgres_cpu_s": round(pg1 - pg0, 2),
    }
    common.log(f"{name}: {result}")
    return result


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    load_before = os.getloadavg()[0]
    pg = postgres_server.start(durable=True)
    try:
        with common.redis_server() as rs:
            client = common.redis_client(rs)
            common.log(f"publishing {args.events:,} events")
            subs = fill(client, args.tenants, args.events)
            version = common.redis_version(client)
            db = pg.create_database("syncd_bench")
            url = pg.url(db)
            drivers: list[tuple[str, Any]] = [("copy", run_copy)]
            if asyncpg is not None:
                drivers.append(("asyncpg", run_asyncpg))
            else:
                common.log(f"asyncpg: skipped: {NO_ASYNCPG}")
            rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in drivers}
            rounds["row_by_row"] = []
            for n in range(args.rounds):
                # psycopg and asyncpg in turns, the first of them alternating between rounds.
                turn = drivers if n % 2 == 0 else drivers[::-1]
                for name, run in [*turn, ("row_by_row", run_row_by_row)]:
                    group = schema = f"{name}_{n}"
                    s = settings(rs.url, url, args.tenants, group, schema)
                    rounds[name].append(await measure(name, run, s, subs, args.events, pg))
            # Before the steady state adds events to copy_0: asyncpg's tables hold the same rows.
            same = None
            if "asyncpg" in rounds:
                with psycopg.connect(url) as conn:
                    same = all(
                        same_rows(conn, "copy_0", "asyncpg_0", table)
                        for table in ("crm_customers", "jpm_jobs")
                    )
            # Steady state: the first copy round's group, caught up, keeps up with new events.
            quiet = settings(rs.url, url, args.tenants, "copy_0", "copy_0")
            lag = await steady(quiet, subs, args.steady_rate, args.steady_seconds)
            with psycopg.connect(url) as conn:
                server = conn.execute("SHOW server_version").fetchone()
                sync = conn.execute("SHOW synchronous_commit").fetchone()
                tables = conn.execute("SELECT count(*) FROM copy_0.crm_customers").fetchone()
            pg.drop_database(db)
    finally:
        pg.stop()
    best = {name: max(r["events_per_s"] for r in runs) for name, runs in rounds.items()}

    def per_100k(name: str, key: str) -> float:
        runs = rounds[name]
        return round(statistics.median(r[key] / r["events"] * 100_000 for r in runs), 2)

    figures: dict[str, Any] = {
        "postgres_version": server[0] if server else "",
        "psycopg": psycopg.__version__,
        "asyncpg": asyncpg.__version__ if asyncpg is not None else None,
        "asyncpg_skipped": NO_ASYNCPG or None,
        "synchronous_commit": sync[0] if sync else "",
        "tenants": args.tenants,
        "feeds": FEEDS,
        "batch": BATCH,
        # Batches applied at once (the mirror's default): each worker a consumer with its own
        # connection, the asyncpg contender's too.
        "workers": quiet.config.mirror.workers,
        "rows_per_table": tables[0] if tables else 0,
        "rounds": rounds,
        "copy_events_per_s": best["copy"],
        "row_by_row_events_per_s": best["row_by_row"],
        "speedup": round(best["copy"] / best["row_by_row"], 1),
        "asyncpg_events_per_s": best.get("asyncpg"),
        # Its tables hold what the mirror's hold, row for row.
        "asyncpg_same_rows": same,
        "cpu_s_per_100k": {
            name: {
                "client": per_100k(name, "client_cpu_s"),
                "postgres": per_100k(name, "postgres_cpu_s"),
            }
            for name in rounds
        },
        # asyncpg / psycopg (`copy`), the medians of their runs.
        "asyncpg_vs_psycopg": versus(rounds, "asyncpg", "copy") if "asyncpg" in rounds else None,
        "steady": lag,
        "target_lag_p99_ms": TARGET_LAG_P99_MS,
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "target_events_per_s": TARGET_EVENTS_PER_S,
        "target_met": best["copy"] >= TARGET_EVENTS_PER_S,
    }
    common.write_result("mirror", figures, version)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=200_000, help="events in all the streams")
    p.add_argument("--tenants", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="runs of each contender, in turns")
    p.add_argument("--steady-rate", type=int, default=2000, help="events/s in steady state")
    p.add_argument("--steady-seconds", type=float, default=20.0)
    return p


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The benchmark; its figures (also written to bench/results/mirror.json)."""
    return asyncio.run(bench(args))


def main(argv: list[str] | None = None) -> int:
    figures = run(parser().parse_args(argv))
    print(json.dumps({k: v for k, v in figures.items() if k != "rounds"}, indent=2))
    return 0 if figures["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
