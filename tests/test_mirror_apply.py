"""The mirror's tables against a real PostgreSQL: created and migrated by the mirror, each batch
one transaction in which the newest version of a key wins, whatever the order and however
often batches come; refused records left out alone."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest
from psycopg import sql

from syncd.mirror.apply import apply_rows, prepare
from syncd.mirror.rows import Row
from syncd.mirror.schema import VERSION, Connection, SchemaTooNew, migrate

FEEDS = ["crm.customers", "jpm.jobs"]
TABLES = {"crm.customers": "crm_customers", "jpm.jobs": "jpm_jobs"}


@pytest.fixture
async def conn(pg_url: str) -> AsyncIterator[Connection]:
    async with await psycopg.AsyncConnection.connect(pg_url) as c:
        assert await migrate(c, "syncd", FEEDS) == TABLES
        await prepare(c)
        yield c


async def rows_of(c: Connection, table: str) -> dict[tuple[int, str], tuple[Any, ...]]:
    cur = await c.execute(
        sql.SQL(
            "SELECT tenant, key, modified_on, modified_at, entry_ms, entry_seq, data, deleted_at "
            "FROM syncd.{}"
        ).format(sql.Identifier(table))
    )
    return {(r[0], r[1]): tuple(r[2:]) for r in await cur.fetchall()}  # type: ignore[misc]


async def test_tables_are_created_then_migrated_once(pg_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
        assert await migrate(c, "mirror_a", ["crm.customers"]) == {"crm.customers": "crm_customers"}
        # Again, with a feed added: the new one gets its table, the old one is left alone.
        await c.execute("INSERT INTO mirror_a.crm_customers VALUES (1, 'k', NULL, '', 1, 0, '{}')")
        await migrate(c, "mirror_a", ["crm.customers", "crm.customers/contacts"])
        versions = await (
            await c.execute("SELECT table_name, feed, version FROM mirror_a.mirror_schema")
        ).fetchall()
        assert sorted(versions) == [
            ("crm_customers", "crm.customers", VERSION),
            ("crm_customers_contacts", "crm.customers/contacts", VERSION),
        ]
        count = await (await c.execute("SELECT count(*) FROM mirror_a.crm_customers")).fetchone()
        assert count == (1,)
        indexes = await (
            await c.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname = 'mirror_a' ORDER BY 1"
            )
        ).fetchall()
        assert [i for (i,) in indexes] == [
            "crm_customers_contacts_modified_at",
            "crm_customers_contacts_pkey",
            "crm_customers_modified_at",
            "crm_customers_pkey",
            "mirror_schema_pkey",
        ]
        # Migrated by a newer syncd: refused, and nothing changed.
        await c.execute("UPDATE mirror_a.mirror_schema SET version = %s", [VERSION + 1])
        with pytest.raises(SchemaTooNew, match=r"mirror_a\.crm_customers is at schema version"):
            await migrate(c, "mirror_a", ["crm.customers", "jpm.jobs"])
        tables = await (
            await c.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'mirror_a'")
        ).fetchone()
        assert tables == (3,)  # no jpm_jobs: the transaction was rolled back


def versions_of(rng: random.Random, keys: int) -> list[Row]:
    """Each key's versions in the order syncd publishes them (never back in time; some share
    a timestamp, some keys have none, some end deleted)."""
    rows: list[Row] = []
    ms = 1_714_564_800_000
    for k in range(keys):
        feed = FEEDS[k % 2]
        instant = 0
        timed = rng.random() < 0.8
        for v in range(rng.randint(1, 5)):
            instant += rng.choice([0, 0, 1, 7])  # 0: the same timestamp again
            ms += rng.randint(0, 2)
            deleted = v > 0 and rng.random() < 0.15
            at = f"2024-05-01T12:00:{instant:02d}.0000000Z" if timed else ""
            data = None if deleted and rng.random() < 0.5 else f'{{"id":{k},"v":{v}}}'
            rows.append(Row(feed, 1 + k % 3, str(k), deleted, at or None, at, ms, v, data))
            if deleted:
                break
    return rows


def newest(rows: list[Row]) -> dict[str, dict[tuple[int, str], tuple[Any, ...]]]:
    out: dict[str, dict[tuple[int, str], tuple[Any, ...]]] = {t: {} for t in TABLES.values()}
    best: dict[tuple[str, int, str], Row] = {}
    for r in rows:
        key = (r.feed, r.tenant, r.key)
        if key not in best or (r.modified_at, r.entry_ms, r.entry_seq) >= (
            best[key].modified_at,
            best[key].entry_ms,
            best[key].entry_seq,
        ):
            best[key] = r
    for (feed, tenant, key), r in best.items():
        deleted_at = datetime.fromtimestamp(r.entry_ms / 1000, UTC) if r.deleted else None
        data = None if r.data is None else json.loads(r.data)
        row = (r.modified_on, r.modified_at, r.entry_ms, r.entry_seq, data, deleted_at)
        out[TABLES[feed]][(tenant, key)] = row
    return out


@pytest.mark.parametrize("seed", range(6))
async def test_the_newest_version_wins_in_any_order_and_under_redelivery(
    conn: Connection, seed: int
) -> None:
    rng = random.Random(seed)
    rows = versions_of(rng, 60)
    shuffled = rows[:]
    rng.shuffle(shuffled)
    cuts = sorted(rng.sample(range(1, len(shuffled)), k=len(shuffled) // 15))
    batches = [shuffled[a:b] for a, b in zip([0, *cuts], [*cuts, len(shuffled)], strict=True)]
    # Some batches come again (redelivery), after others, and in another order.
    batches += rng.sample(batches, k=len(batches) // 2)
    rng.shuffle(batches)
    for batch in batches:
        assert await apply_rows(conn, "syncd", TABLES, batch) == []
    expected = newest(rows)
    for table in TABLES.values():
        assert await rows_of(conn, table) == expected[table], table


def good(key: str, feed: str = "crm.customers", data: str | None = None) -> Row:
    at = "2024-05-01T12:00:00.0000000Z"
    return Row(feed, 1, key, False, at, at, 1_714_564_800_000, int(key), data or f'{{"id":{key}}}')


REFUSED = [
    ('{"name":"a\\u0000b"}', "22P05"),  # jsonb holds no NUL
    ('{"name":"\\ud83d"}', "22P02"),  # a lone surrogate: no text at all
    ('{"name": "cut', "22P02"),  # not JSON
    ("", "22P02"),  # an upsert without a record
    ('{"n":1e1000000}', "22"),  # past numeric's range
]


async def test_refused_records_stand_alone_and_the_rest_is_applied(conn: Connection) -> None:
    rows = [good(str(i)) for i in range(40)] + [good(str(i), "jpm.jobs") for i in range(40, 50)]
    bad = {3: REFUSED[0], 17: REFUSED[1], 18: REFUSED[2], 41: REFUSED[3], 44: REFUSED[4]}
    for i, (data, _) in bad.items():
        rows[i] = rows[i]._replace(data=data)
    nul_key = 25
    rows[nul_key] = rows[nul_key]._replace(key="a\x00b")  # text holds no NUL: psycopg refuses
    refused = await apply_rows(conn, "syncd", TABLES, rows)
    assert [i for i, _ in refused] == sorted([*bad, nul_key])
    reasons = dict(refused)
    for i, (_, state) in bad.items():
        assert reasons[i].startswith(f"PostgreSQL refused the record: {state}"), reasons[i]
    assert "0x00" in reasons[nul_key] or "NUL" in reasons[nul_key], reasons[nul_key]
    stored = await rows_of(conn, "crm_customers") | await rows_of(conn, "jpm_jobs")
    assert sorted(int(k) for _, k in stored) == [i for i in range(50) if i not in reasons]


async def test_a_batch_that_fails_otherwise_commits_nothing(conn: Connection) -> None:
    await conn.execute("DROP TABLE syncd.jpm_jobs")
    await conn.commit()
    rows = [good("1"), good("2", "jpm.jobs")]
    with pytest.raises(psycopg.errors.UndefinedTable):
        await apply_rows(conn, "syncd", TABLES, rows)
    await conn.rollback()
    assert await rows_of(conn, "crm_customers") == {}
