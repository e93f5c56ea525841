"""`syncd mirror` with real Redis, PostgreSQL and the simulator: after a daemon run its tables
equal the ground truth; a record PostgreSQL refuses is dead-lettered with the reason while the
rest is applied; a PostgreSQL that is down or read-only pauses it, acknowledging nothing."""

from __future__ import annotations

import contextlib
import re
import socket
import time
import urllib.parse
from pathlib import Path

import psycopg
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Subscription
from syncd.daemon import Daemon
from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import run_simulator
from syncd.testing.tcpproxy import proxy
from tests.engine_helpers import mutate, settings, truth
from tests.mirror_helpers import (
    GROUP,
    caught_up,
    count,
    mirror_config,
    publish,
    running_mirror,
    table,
)
from tests.test_consumer_faults import until

TENANT = 4242
CUSTOMERS = "crm.customers"
AT = "2024-05-01T12:00:00.0000000Z"
QUIRKS = {
    "stale_repeats": 0.5,
    "duplicate_keys": 0.3,
    "out_of_order": 0.5,
    "shared_timestamps": 0.5,
    "naive_timestamps": 0.3,
    "keyless": 0.1,
}


async def test_after_daemon_runs_the_tables_equal_the_ground_truth(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    tenants, feeds = [TENANT, TENANT + 1], [CUSTOMERS, "customer-interactions.technician-ratings"]
    async with run_simulator(
        tenants=tenants, records=150, page_size=40, seed=3, quirks=QUIRKS
    ) as sim:
        # No takeover between the workers here (claim_idle well above a batch): with one, the
        # two workers can stall on a batch they both hold, an open problem of its own.
        data = mirror_config(
            redis_server.url, pg_url, tenants, feeds, sim.url, sim.app_key, batch=25, claim_idle=5.0
        )
        subs = [Subscription(t, feeds) for t in tenants]
        async with running_mirror(data) as mirror:
            # The mirror applies while the daemon publishes, and changes come in between.
            for _ in range(3):
                assert await Daemon(settings(data), once=True).run() == 0
                for tenant in tenants:
                    for feed in feeds:
                        await mutate(sim.url, tenant, feed, 20)
            assert await Daemon(settings(data), once=True).run() == 0
            await until(lambda: caught_up(redis, subs), "the mirror to catch up", timeout=60)
            assert mirror.refused == 0
        for feed in feeds:
            expected = {
                (tenant, key): record
                for tenant in tenants
                for key, record in (await truth(sim.url, tenant, feed)).items()
            }
            assert await table(pg_url, feed) == expected, feed


async def test_records_deleted_upstream_are_marked_deleted_in_the_tables(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    """A reconciliation pass finds records gone upstream; their rows get `deleted_at`."""
    import io

    import aiohttp

    from syncd.cli.reconcile import reconcile

    async with run_simulator(tenants=[TENANT], records=120, page_size=40, seed=9) as sim:
        data = mirror_config(
            redis_server.url, pg_url, [TENANT], [CUSTOMERS], sim.url, sim.app_key, batch=25
        )
        data["mirror"]["listen"] = "127.0.0.1:0"
        subs = [Subscription(TENANT, [CUSTOMERS])]
        async with running_mirror(data) as mirror:
            assert await Daemon(settings(data), once=True).run() == 0
            async with (
                aiohttp.ClientSession() as s,
                s.post(
                    f"{sim.url}/_sim/tenants/{TENANT}/feeds/{CUSTOMERS}/mutate",
                    params={"count": "6", "kind": "delete"},
                ) as resp,
            ):
                gone = {str(k) for k in (await resp.json())["keys"]}
            out = io.StringIO()
            code = await reconcile(
                settings(data), TENANT, CUSTOMERS, share=1.0, out=out, progress=False
            )
            assert code == 0, out.getvalue()
            await until(lambda: caught_up(redis, subs), "the mirror to catch up", timeout=60)
            assert mirror.refused == 0
            # Its ops endpoint: the mirror's series and the consumer's.
            assert mirror.ops is not None
            base = f"http://127.0.0.1:{mirror.ops.port}"
            async with aiohttp.ClientSession() as s:
                async with s.get(base + "/metrics") as resp:
                    text = await resp.text()
                async with s.get(base + "/readyz") as resp:
                    assert resp.status == 200
            assert f"syncd_mirror_events_applied_total {mirror.applied}\n" in text
            assert mirror.applied == 120 + 6
            assert 'syncd_consumer_events_handled_total{group="syncd-mirror"' in text
            found = re.search(r"^syncd_mirror_newest_applied_timestamp_seconds (\S+)$", text, re.M)
            assert found is not None
            newest = float(found.group(1))
            assert 0 <= time.time() - newest < 60
        rows = await table(pg_url, CUSTOMERS)
        deleted = {key for (_, key), row in rows.items() if isinstance(row, tuple)}
        assert deleted == gone
        live = {
            (TENANT, key): record
            for key, record in (await truth(sim.url, TENANT, CUSTOMERS)).items()
        }
        assert {k: v for k, v in rows.items() if k[1] not in gone} == live


BAD = {
    "2": b'{"id":2,"name":"a\\u0000b"}',  # jsonb holds no NUL
    "4": b'{"id":4,"name":"\\ud83d"}',  # a string cut in the middle of an emoji
}


async def test_a_refused_record_is_dead_lettered_with_its_reason_and_the_rest_applied(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    for key in range(1, 7):
        record = BAD.get(str(key), {"id": key})
        await publish(redis, TENANT, CUSTOMERS, str(key), record, AT)
    data = mirror_config(redis_server.url, pg_url, [TENANT], [CUSTOMERS], max_deliveries=2)
    subs = [Subscription(TENANT, [CUSTOMERS])]
    dead = f"st:{{{TENANT}}}:dead"
    with capture_logs() as logs:
        async with running_mirror(data):
            await until(lambda: count(pg_url, CUSTOMERS), "the good records")
            await until(
                lambda: caught_up(redis, subs), "the refused ones in the dead stream", timeout=60
            )
    assert await table(pg_url, CUSTOMERS) == {(TENANT, k): {"id": int(k)} for k in "1356"}
    letters = {f[b"key"].decode(): f for _, f in await redis.xrange(dead)}
    assert sorted(letters) == ["2", "4"]
    assert letters["2"][b"reason"] == b"max_deliveries"
    assert letters["2"][b"data"] == BAD["2"]
    assert letters["2"][b"detail"].startswith(b"PostgreSQL refused the record: 22P05")
    assert letters["4"][b"detail"].startswith(b"PostgreSQL refused the record: 22P02")
    refused = [e for e in logs if e["event"] == "mirror_record_refused"]
    assert {e["key"] for e in refused} == {"2", "4"}
    assert not [e for e in logs if e["event"] == "consumer_handler_outage"]


def _via(pg_url: str, port: int) -> str:
    parts = urllib.parse.urlsplit(pg_url)
    return parts._replace(netloc=f"postgres@127.0.0.1:{port}").geturl()


async def test_postgresql_down_pauses_the_mirror_and_acknowledges_nothing(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    port = urllib.parse.urlsplit(pg_url).port
    assert port is not None
    subs = [Subscription(TENANT, [CUSTOMERS])]
    async with proxy(port) as line:
        data = mirror_config(
            redis_server.url, _via(pg_url, line.port), [TENANT], [CUSTOMERS], connect_timeout=2.0
        )
        with capture_logs() as logs:
            async with running_mirror(data):
                for key in range(5):
                    await publish(redis, TENANT, CUSTOMERS, str(key), {"v": 1}, AT)
                await until(lambda: caught_up(redis, subs), "the first events")
                line.cut(close=True)  # PostgreSQL gone: connections reset, new ones unanswered
                for key in range(5, 10):
                    await publish(redis, TENANT, CUSTOMERS, str(key), {"v": 1}, AT)

                def retried() -> bool:
                    return len([e for e in logs if e["event"] == "mirror_postgres_unavailable"]) > 1

                await until(retried, "the mirror to retry")
                # Held (read, not acknowledged, not delivered again meanwhile) or not read yet.
                stream = f"st:{{{TENANT}}}:{CUSTOMERS}"
                pending = await redis.xpending_range(stream, GROUP, "-", "+", 100)
                assert pending
                assert {p["times_delivered"] for p in pending} == {1}
                (group,) = await redis.xinfo_groups(stream)
                assert group["pending"] + group["lag"] == 5
                assert await count(pg_url, CUSTOMERS) == 5
                line.restore()
                await until(lambda: caught_up(redis, subs), "the held events once it is back")
    assert sorted(k for _, k in await table(pg_url, CUSTOMERS)) == [str(k) for k in range(10)]
    assert await redis.xlen(f"st:{{{TENANT}}}:dead") == 0


async def test_a_read_only_postgresql_pauses_the_mirror(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    db = urllib.parse.urlsplit(pg_url).path.lstrip("/")
    admin = pg_url.rsplit("/", 1)[0] + "/postgres"
    subs = [Subscription(TENANT, [CUSTOMERS])]
    data = mirror_config(redis_server.url, pg_url, [TENANT], [CUSTOMERS])

    def sql(statement: str) -> None:
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute(statement.encode())

    with capture_logs() as logs:
        async with running_mirror(data):
            await publish(redis, TENANT, CUSTOMERS, "1", {"v": 1}, AT)
            await until(lambda: caught_up(redis, subs), "the first event")
            sql(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
            sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{db}' AND application_name = 'syncd-mirror'"
            )
            await publish(redis, TENANT, CUSTOMERS, "2", {"v": 1}, AT)

            def refused_writes() -> bool:
                errors = [e["error"] for e in logs if e["event"] == "mirror_postgres_unavailable"]
                return any("read-only transaction" in e for e in errors)

            await until(refused_writes, "writes refused")
            (group,) = await redis.xinfo_groups(f"st:{{{TENANT}}}:{CUSTOMERS}")
            assert group["pending"] == 1
            sql(f'ALTER DATABASE "{db}" RESET default_transaction_read_only')
            await until(lambda: caught_up(redis, subs), "the event once writes are allowed")
    assert sorted(k for _, k in await table(pg_url, CUSTOMERS)) == ["1", "2"]


async def test_two_mirrors_in_one_group_share_the_work_and_the_newest_wins(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    feeds = [CUSTOMERS, "jpm.jobs"]
    newest: dict[str, dict[tuple[int, str], object]] = {feed: {} for feed in feeds}
    for n in range(600):  # a key's versions in publication order, interleaved across keys
        feed, key = feeds[n % 2], str(n % 23)
        at = f"2024-05-01T1{n // 3600}:{n // 60 % 60:02d}:{n % 60:02d}.0000000Z"
        await publish(redis, TENANT, feed, key, {"n": n}, at)
        newest[feed][(TENANT, key)] = {"n": n}
    data = mirror_config(redis_server.url, pg_url, [TENANT], feeds, batch=3)
    subs = [Subscription(TENANT, feeds)]
    async with running_mirror(data, "m1") as one, running_mirror(data, "m2") as two:
        await until(lambda: caught_up(redis, subs), "both mirrors to catch up")
    assert one.applied > 0
    assert two.applied > 0
    assert one.applied + two.applied >= 600
    for feed in feeds:
        assert await table(pg_url, feed) == newest[feed], feed


async def test_one_mirror_applies_batches_on_its_workers_and_the_newest_wins(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    newest: dict[tuple[int, str], object] = {}
    for n in range(600):  # a key's versions in publication order, interleaved across keys
        key = str(n % 17)
        at = f"2024-05-01T1{n // 3600}:{n // 60 % 60:02d}:{n % 60:02d}.0000000Z"
        await publish(redis, TENANT, CUSTOMERS, key, {"n": n}, at)
        newest[(TENANT, key)] = {"n": n}
    data = mirror_config(redis_server.url, pg_url, [TENANT], [CUSTOMERS], batch=3, workers=3)
    subs = [Subscription(TENANT, [CUSTOMERS])]
    async with running_mirror(data, "m1"):
        await until(lambda: caught_up(redis, subs), "the mirror to catch up")
        async with await psycopg.AsyncConnection.connect(pg_url) as c:
            cur = await c.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'syncd-mirror'"
            )
            assert await cur.fetchone() == (3,)  # a connection per worker
        consumers = await redis.xinfo_consumers(subs[0].streams()[0], GROUP)
        assert sorted(c["name"] for c in consumers) == [b"m1", b"m1.2", b"m1.3"]
    assert await table(pg_url, CUSTOMERS) == newest


async def test_systemd_hears_ready_at_once_and_why_it_waits(
    redis_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PostgreSQL unreachable at start: a started service waiting for it, not a failed start.
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    closed = f"postgresql://postgres@127.0.0.1:{free_port()}/none"
    data = mirror_config(redis_server.url, closed, [TENANT], [CUSTOMERS], connect_timeout=2.0)
    messages: list[str] = []

    def heard(text: str) -> bool:
        with contextlib.suppress(BlockingIOError):
            while True:
                messages.append(sock.recv(4096).decode())
        return any(text in m for m in messages)

    try:
        with capture_logs() as logs:
            async with running_mirror(data):
                await until(lambda: heard("STATUS=waiting for PostgreSQL"), "the status")
        assert any(m.startswith("READY=1") for m in messages)
        assert [e for e in logs if e["event"] == "mirror_postgres_unavailable"]
    finally:
        sock.close()
