"""Applying a batch of events to the feeds' tables: in ONE transaction, the newest version of
each key winning, whatever order the events come in and however often.

The batch is copied (COPY) into a temporary staging table, then one statement per feed keeps
each key's newest staged version (`DISTINCT ON (tenant, key) ... ORDER BY` the version,
descending) and upserts it where the stored version is not newer: the README's rule,
`Event.version >= stored`, in SQL. So a batch applied twice, or an older batch delivered after
a newer one, leaves the tables as they were.

A record PostgreSQL refuses (its JSON holds `\\u0000`, say) fails its part of the batch: the
part is rolled back to a savepoint, halved, and each half applied again, until the refused
records stand alone; they are returned, the rest of the batch is applied. Any other error
(connection lost, database read-only or down) is raised: nothing of the batch is committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import psycopg
from psycopg import sql

from syncd.mirror.rows import Row, error_kind, refusal
from syncd.mirror.schema import Connection

__all__ = ["STAGE", "Refused", "apply_rows"]

STAGE = "syncd_mirror_stage"

# Emptied at each commit: a connection stages one batch at a time.
_CREATE_STAGE = sql.SQL(
    """CREATE TEMP TABLE IF NOT EXISTS {} (
        feed text NOT NULL,
        tenant bigint NOT NULL,
        key text NOT NULL,
        deleted boolean NOT NULL,
        modified_on text,
        modified_at text COLLATE "C" NOT NULL,
        entry_ms bigint NOT NULL,
        entry_seq bigint NOT NULL,
        data jsonb
    ) ON COMMIT DELETE ROWS"""
).format(sql.Identifier(STAGE))

_COPY = sql.SQL(
    "COPY {} (feed, tenant, key, deleted, modified_on, modified_at, entry_ms, entry_seq, data) "
    "FROM STDIN"
).format(sql.Identifier(STAGE))

# The row is the newest version's, whatever came before it: a deletion without a record leaves
# none (keeping the record stored would keep whichever version happened to arrive first).
_UPSERT = """
INSERT INTO {table} AS stored
    (tenant, key, modified_on, modified_at, entry_ms, entry_seq, data, deleted_at)
SELECT DISTINCT ON (tenant, key)
    tenant, key, modified_on, modified_at, entry_ms, entry_seq, data,
    CASE WHEN deleted THEN to_timestamp(entry_ms / 1000.0) END
FROM {stage}
WHERE feed = %s
ORDER BY tenant, key, modified_at DESC, entry_ms DESC, entry_seq DESC
ON CONFLICT (tenant, key) DO UPDATE SET
    modified_on = excluded.modified_on,
    modified_at = excluded.modified_at,
    entry_ms = excluded.entry_ms,
    entry_seq = excluded.entry_seq,
    data = excluded.data,
    deleted_at = excluded.deleted_at
WHERE (stored.modified_at, stored.entry_ms, stored.entry_seq)
   <= (excluded.modified_at, excluded.entry_ms, excluded.entry_seq)
"""

Refused = list[tuple[int, str]]
"""Positions in the batch of the rows PostgreSQL refused, with the reason."""


async def prepare(conn: Connection) -> None:
    """Create this connection's staging table (once per connection)."""
    async with conn.transaction():
        await conn.execute(_CREATE_STAGE)


async def apply_rows(
    conn: Connection, schema: str, tables: Mapping[str, str], rows: Sequence[Row]
) -> Refused:
    """Apply `rows` (of feeds in `tables`: feed -> table name in `schema`) in one transaction,
    committed before this returns; the rows PostgreSQL refused, which are left out of it.

    Raises psycopg.Error for any error that is not a record's own (see `error_kind`): then
    nothing was committed.
    """
    if not rows:
        return []
    upserts = {
        feed: sql.SQL(_UPSERT).format(
            table=sql.Identifier(schema, tables[feed]), stage=sql.Identifier(STAGE)
        )
        for feed in dict.fromkeys(row.feed for row in rows)
    }
    async with conn.transaction():
        return sorted(await _part(conn, upserts, list(enumerate(rows)), whole=True))


async def _part(
    conn: Connection,
    upserts: Mapping[str, sql.Composed],
    part: list[tuple[int, Row]],
    *,
    whole: bool = False,
) -> Refused:
    """Apply `part` inside a savepoint; on a record's error, its halves one after the other."""
    try:
        async with conn.transaction():
            await _stage(conn, [row for _, row in part])
            # Feeds in one order, keys sorted in each: mirrors applying batches side by side take
            # their row locks in the same order and never deadlock.
            for feed in sorted({row.feed for _, row in part}):
                await conn.execute(upserts[feed], [feed])
            if not whole:
                # The next part stages its own rows only.
                await conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(STAGE)))
        return []
    except psycopg.Error as exc:
        # A DataError without a SQLSTATE is psycopg's own refusal (a NUL in a text value).
        own = isinstance(exc, psycopg.DataError) or error_kind(exc.sqlstate) == "record"
        if not own or conn.closed:
            raise
        if len(part) == 1:
            diag = exc.diag
            primary = diag.message_primary or str(exc)
            return [(part[0][0], refusal(exc.sqlstate, primary, diag.message_detail))]
    # Halves in the order the upserts take row locks (feeds, then keys): a half applied keeps
    # its locks until COMMIT, and one taken in another order could deadlock with a mirror
    # applying a batch beside this one.
    part = sorted(part, key=_lock_order)
    middle = len(part) // 2
    return await _part(conn, upserts, part[:middle]) + await _part(conn, upserts, part[middle:])


def _lock_order(item: tuple[int, Row]) -> tuple[str, int, str]:
    row = item[1]
    return row.feed, row.tenant, row.key


async def _stage(conn: Connection, rows: Sequence[Row]) -> None:
    async with conn.cursor() as cur, cur.copy(_COPY) as copy:
        for row in rows:
            await copy.write_row(row)
