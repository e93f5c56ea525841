"""The mirror's tables: one per feed in the configured schema, created and migrated by the mirror
itself, each table's version kept in `<schema>.mirror_schema`.

A table holds one row per tenant and record key: the newest version applied (its `modified_on`,
`modified_at` and stream entry id), the record as `jsonb`, and `deleted_at`. Migrations run at
start in one transaction under an advisory lock, so mirrors starting together take turns; a
table at a version newer than this syncd knows stops the mirror rather than be written wrongly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from psycopg import AsyncConnection, sql

from syncd import catalogue

__all__ = [
    "VERSION",
    "Connection",
    "SchemaTooNew",
    "migrate",
    "table_name",
]

VERSION_TABLE = "mirror_schema"

Connection = AsyncConnection[tuple[object, ...]]


class SchemaTooNew(Exception):
    """A table was migrated by a newer syncd than this one."""


def table_name(feed: str) -> str:
    """The feed's table: its name with `.`, `-` and `/` as `_` (`crm.customers/contacts` ->
    `crm_customers_contacts`), an unquoted PostgreSQL name."""
    return re.sub(r"[.\-/]", "_", feed)


Step = Callable[[sql.Identifier, sql.Identifier, str], list[sql.Composed]]


def _v1(schema: sql.Identifier, table: sql.Identifier, name: str) -> list[sql.Composed]:
    """The table, its key, and an index for reading a tenant's changes in time order."""
    return [
        sql.SQL(
            """CREATE TABLE {}.{} (
                tenant bigint NOT NULL,
                key text NOT NULL,
                modified_on text,
                modified_at text COLLATE "C" NOT NULL,
                entry_ms bigint NOT NULL,
                entry_seq bigint NOT NULL,
                data jsonb,
                deleted_at timestamptz,
                PRIMARY KEY (tenant, key)
            )"""
        ).format(schema, table),
        sql.SQL("CREATE INDEX {} ON {}.{} (tenant, modified_at)").format(
            sql.Identifier(f"{name}_modified_at"), schema, table
        ),
    ]


# Step n takes a table from version n to n + 1. Append; never change one that was released.
MIGRATIONS: tuple[Step, ...] = (_v1,)
VERSION = len(MIGRATIONS)


async def migrate(conn: Connection, schema: str, feeds: Iterable[str]) -> dict[str, str]:
    """Create the schema, the version table and every feed's table where missing, and bring each
    table to `VERSION`; feed -> table name. One transaction: all of it or nothing.

    Raises SchemaTooNew when a table is at a newer version than this syncd knows.
    """
    names = {feed: table_name(feed) for feed in dict.fromkeys(feeds)}
    unknown = [feed for feed in names if feed not in catalogue.feeds()]
    if unknown:
        raise ValueError(f"not catalogue feeds: {', '.join(unknown)}")
    ident = sql.Identifier(schema)
    versions = sql.Identifier(VERSION_TABLE)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"syncd.mirror:{schema}"])
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {}.{} (
                    table_name text PRIMARY KEY,
                    feed text NOT NULL,
                    version integer NOT NULL,
                    migrated_at timestamptz NOT NULL DEFAULT now()
                )"""
            ).format(ident, versions)
        )
        cur = await conn.execute(
            sql.SQL("SELECT table_name, version FROM {}.{}").format(ident, versions)
        )
        found = {str(name): int(str(version)) for name, version in await cur.fetchall()}
        for feed, name in names.items():
            current = found.get(name, 0)
            if current > VERSION:
                raise SchemaTooNew(
                    f"{schema}.{name} is at schema version {current}, this syncd knows "
                    f"{VERSION}: run the newer syncd's mirror, or upgrade this one"
                )
            for step in MIGRATIONS[current:]:
                for statement in step(ident, sql.Identifier(name), name):
                    await conn.execute(statement)
            if current < VERSION:
                await conn.execute(
                    sql.SQL(
                        "INSERT INTO {}.{} (table_name, feed, version) VALUES (%s, %s, %s) "
                        "ON CONFLICT (table_name) DO UPDATE SET version = excluded.version, "
                        "migrated_at = now()"
                    ).format(ident, versions),
                    [name, feed, VERSION],
                )
    return names
