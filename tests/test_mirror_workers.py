"""The mirror's workers: connections applying batches side by side never deadlock, and a
worker waiting for PostgreSQL keeps its events from the others."""

from __future__ import annotations

import asyncio

import psycopg

from syncd.mirror.apply import apply_rows, prepare
from syncd.mirror.schema import migrate
from tests.test_consumer_faults import until
from tests.test_mirror_apply import FEEDS, TABLES, good


async def _waiting_on_a_lock(watch: psycopg.AsyncConnection, pid: int) -> bool:
    cur = await watch.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", [pid])
    row = await cur.fetchone()
    return row is not None and row[0] == "Lock"


async def test_two_workers_never_deadlock_when_a_batch_holds_a_refused_record(
    pg_url: str,
) -> None:
    """docs/mirror.md: "Two workers (or two mirrors) applying batches at once never deadlock".
    A batch holding a record PostgreSQL refuses is applied again in halves, and a half applied
    keeps its row locks until COMMIT: halves split by position in the batch would lock key 9
    before key 1, against another worker taking them in key order (1, then 9). The halves are
    split in key order. The third connection only holds key 0 for a moment, to make the
    interleaving certain."""
    connect = psycopg.AsyncConnection.connect
    async with (
        await connect(pg_url) as w1,
        await connect(pg_url) as w2,
        await connect(pg_url) as other,
        await connect(pg_url, autocommit=True) as watch,
    ):
        assert await migrate(w1, "syncd", FEEDS) == TABLES
        await prepare(w1)
        await prepare(w2)
        # Older versions of keys 0, 1 and 9 stored.
        old = [good(k)._replace(entry_seq=0, entry_ms=1) for k in ("0", "1", "9")]
        assert await apply_rows(w1, "syncd", TABLES, old) == []
        await other.execute("SELECT 1 FROM syncd.crm_customers WHERE key = '0' FOR UPDATE")

        bad = good("5", data='{"name":"a\\u0000b"}')  # jsonb holds no NUL: 22P05
        first = asyncio.create_task(
            apply_rows(w1, "syncd", TABLES, [good("9"), bad, good("0"), good("1")])
        )
        await until(lambda: _waiting_on_a_lock(watch, w1.info.backend_pid), "w1 waiting on 0")
        second = asyncio.create_task(apply_rows(w2, "syncd", TABLES, [good("1"), good("9")]))
        # Halves taken in the batch's order, w1 would hold key 9 and wait for key 0 while w2
        # held key 1 and waited for key 9: a deadlock once key 0 is free. Taken in key order,
        # w1 holds nothing yet, and w2 goes through.
        await asyncio.sleep(0.5)
        await other.commit()
        results = await asyncio.gather(first, second, return_exceptions=True)
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors
    assert [i for i, _ in results[0]] == [1]  # type: ignore[union-attr]


# -- a PostgreSQL outage with several workers ---------------------------------------------

import urllib.parse  # noqa: E402

import redis.asyncio as aioredis  # noqa: E402
from structlog.testing import capture_logs  # noqa: E402

from syncd.consumer import Subscription  # noqa: E402
from syncd.testing.redis_server import RedisServer  # noqa: E402
from syncd.testing.tcpproxy import proxy  # noqa: E402
from tests.mirror_helpers import (  # noqa: E402
    GROUP,
    caught_up,
    mirror_config,
    publish,
    running_mirror,
)

TENANT = 4243
CUSTOMERS = "crm.customers"
AT = "2024-05-01T12:00:00.0000000Z"
STREAM = f"st:{{{TENANT}}}:{CUSTOMERS}"


def _via(pg_url: str, port: int) -> str:
    parts = urllib.parse.urlsplit(pg_url)
    return parts._replace(netloc=f"postgres@127.0.0.1:{port}").geturl()


async def _outage(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str, seconds: float, **mirror: object
) -> tuple[list[int], int]:
    """Five events published while PostgreSQL is unreachable for `seconds` (claim_idle 0.5 s);
    the delivery counts of the pending ones then, and the dead stream's length."""
    port = urllib.parse.urlsplit(pg_url).port
    assert port is not None
    subs = [Subscription(TENANT, [CUSTOMERS])]
    async with proxy(port) as line:
        data = mirror_config(
            redis_server.url,
            _via(pg_url, line.port),
            [TENANT],
            [CUSTOMERS],
            connect_timeout=2.0,
            **mirror,
        )
        with capture_logs():
            async with running_mirror(data):
                await publish(redis, TENANT, CUSTOMERS, "0", {"v": 1}, AT)
                await until(lambda: caught_up(redis, subs), "the first event")
                line.cut(close=True)
                # In one transaction: one worker reads them all, the other(s) stay idle.
                async with redis.pipeline(transaction=True) as pipe:
                    for key in range(1, 6):
                        fields = {"op": "updated", "key": str(key), "data": b'{"v":1}'}
                        pipe.xadd(STREAM, {**fields, "modified_on": AT, "modified_at": AT})
                    await pipe.execute()
                await asyncio.sleep(seconds)
                pending = await redis.xpending_range(STREAM, GROUP, "-", "+", 100)
                dead = await redis.xlen(f"st:{{{TENANT}}}:dead")
                line.restore()
                await until(lambda: caught_up(redis, subs), "the events once it is back")
    return sorted(p["times_delivered"] for p in pending), dead


async def test_an_outage_does_not_push_good_events_into_the_dead_stream(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    """A worker whose handler waits for PostgreSQL keeps its batch from the other workers:
    were it taken over (XAUTOCLAIM after claim_idle) by each idle worker in turn, every
    takeover would raise the delivery count, and with more workers than max_deliveries good
    events, which PostgreSQL never refused, would reach the dead stream in a mere outage."""
    _, dead = await _outage(redis, redis_server, pg_url, 4.0, workers=3, max_deliveries=2)
    assert dead == 0, f"{dead} good event(s) dead-lettered during the outage"


async def test_an_outage_does_not_deliver_held_events_again(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    """The default two workers: the idle one must not take the waiting one's batch over during
    an outage longer than claim_idle (delivering the events again would spend the delivery
    budget meant for refused records)."""
    delivered, dead = await _outage(redis, redis_server, pg_url, 3.0)
    assert dead == 0
    assert delivered
    assert set(delivered) == {1}, delivered
