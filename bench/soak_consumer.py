"""The soak's downstream: one member of a consumer group applying events to a PostgreSQL table.

    python -m bench.soak_consumer --db NAME --name c1 --sentinels H:P,... --tenants 1,2 \\
        --feeds crm.customers,jpm.jobs

It reads through the sentinels with `syncd.consumer` and applies the README's rule: an event
is applied only if its `Event.version` (`modified_at`, then the entry id) is newer than or equal
to the stored one for its key, in SQL as the README writes it, `INSERT ... ON CONFLICT ... DO
UPDATE ... WHERE (stored version) <= (excluded version)`. `op=deleted` marks the row deleted by
the same rule. Each batch is one transaction, run by `psql` (the machine's client: no database
driver is needed); a batch that fails is retried event by event by the consumer library.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError

from syncd.consumer import Consumer, Event, Subscription

TABLE = "soak_rows"
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    tenant bigint NOT NULL,
    feed text NOT NULL,
    key text NOT NULL,
    op text NOT NULL,
    modified_on text NOT NULL,
    modified_at text COLLATE "C" NOT NULL,
    entry_ms bigint NOT NULL,
    entry_seq bigint NOT NULL,
    data bytea NOT NULL,
    deleted boolean NOT NULL,
    entry text NOT NULL,
    PRIMARY KEY (tenant, feed, key)
);
"""
PSQL = ["psql", "-h", "127.0.0.1", "-U", "postgres", "-X", "-q", "-v", "ON_ERROR_STOP=1"]


def _literal(text: str) -> str:
    if "\x00" in text:
        raise ValueError("NUL in a text value")
    return "'" + text.replace("'", "''") + "'"


def apply_sql(events: list[Event]) -> str:
    """One transaction applying `events` in order, each by the rule."""
    statements = []
    for e in events:
        deleted = e.op == "deleted"
        modified_at, entry_ms, entry_seq = e.version
        values = ", ".join(
            [
                str(e.tenant),
                _literal(e.feed),
                _literal(e.key),
                _literal(e.op),
                _literal(e.modified_on or ""),
                _literal(modified_at),
                str(entry_ms),
                str(entry_seq),
                f"'\\x{e.data.hex()}'::bytea",
                "true" if deleted else "false",
                _literal(e.id),
            ]
        )
        statements.append(
            f"INSERT INTO {TABLE} AS t VALUES ({values}) "
            "ON CONFLICT (tenant, feed, key) DO UPDATE SET op = excluded.op, "
            "modified_on = excluded.modified_on, modified_at = excluded.modified_at, "
            "entry_ms = excluded.entry_ms, entry_seq = excluded.entry_seq, data = excluded.data, "
            "deleted = excluded.deleted, entry = excluded.entry "
            "WHERE (t.modified_at, t.entry_ms, t.entry_seq) "
            "<= (excluded.modified_at, excluded.entry_ms, excluded.entry_seq);"
        )
    return "BEGIN;\n" + "\n".join(statements) + "\nCOMMIT;\n"


async def psql(db: str, sql: str) -> str:
    """Run `sql` in database `db`; its output. RuntimeError with psql's message on failure."""
    proc = await asyncio.create_subprocess_exec(
        *PSQL,
        "-d",
        db,
        "-f",
        "-",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
    )
    out, err = await proc.communicate(sql.encode())
    if proc.returncode != 0:
        raise RuntimeError(f"psql exited with {proc.returncode}: {err.decode().strip()[:300]}")
    return out.decode()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--db", required=True, help="PostgreSQL database holding the table (SCHEMA)")
    p.add_argument("--name", required=True, help="consumer name in the group")
    p.add_argument("--group", default="soak")
    p.add_argument("--sentinels", required=True, help="host:port,...")
    p.add_argument("--service", default="mymaster")
    p.add_argument("--prefix", default="st")
    p.add_argument("--tenants", required=True, help="1001,1002,...")
    p.add_argument("--feeds", required=True, help="crm.customers,...")
    p.add_argument("--claim-idle-ms", type=int, default=5000)
    return p


async def consume(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    sentinels = []
    for entry in args.sentinels.split(","):
        host, _, port = entry.rpartition(":")
        sentinels.append((host, int(port)))
    sentinel = Sentinel(sentinels, sentinel_kwargs={"socket_timeout": 5.0}, socket_timeout=10.0)
    client = sentinel.master_for(args.service, socket_timeout=10.0, socket_connect_timeout=5.0)
    feeds = args.feeds.split(",")
    streams = [Subscription(int(t), feeds) for t in args.tenants.split(",")]
    applied = 0

    async def handle(batch: list[Event]) -> None:
        nonlocal applied
        await psql(args.db, apply_sql(batch))  # raises: the library retries event by event
        applied += len(batch)

    print(f"consumer {args.name} started", flush=True)
    while not stop.is_set():
        consumer = Consumer(
            client,
            args.group,
            args.name,
            streams=streams,
            prefix=args.prefix,
            claim_idle_ms=args.claim_idle_ms,
            handler_timeout=30.0,
        )
        try:
            async with consumer:
                await consumer.run(handle, stop=stop)
        except RedisError as exc:  # creating the groups while Redis is away: try again
            print(f"consumer {args.name}: {type(exc).__name__}: {exc}", flush=True)
            await asyncio.sleep(1.0)
    await client.aclose()
    for s in sentinel.sentinels:
        await s.aclose()
    print(f"consumer {args.name} stopped after {applied} events", flush=True)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout)
    asyncio.run(consume(parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
