"""What `syncd doctor` learns of the mirror's PostgreSQL (`[mirror] url`): whether it answers
with the configured credentials, its version, whether it takes writes, whether the mirror may
create its schema and tables there, and the version its tables are at. Read-only: nothing is
created or changed."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from syncd.config import Settings
from syncd.config.urls import redact_url
from syncd.mirror.schema import VERSION, VERSION_TABLE

# The oldest PostgreSQL the mirror is built and tested for.
MIN_SERVER_VERSION = 150000


@dataclass(frozen=True, slots=True)
class PostgresFacts:
    where: str  # the URL, password removed
    error: str | None = None  # could not connect or query (the driver's message)
    server_version: int = 0  # server_version_num, e.g. 160002
    read_only: bool = False  # a standby, or default_transaction_read_only
    can_create: bool = False  # may create the schema, or may create tables in it
    schema_exists: bool = False
    newest_table_version: int = 0  # of the mirror's tables there (0: none yet)
    code_version: int = VERSION
    min_version: int = MIN_SERVER_VERSION


async def gather_postgres(settings: Settings, timeout: float = 10.0) -> PostgresFacts:
    m = settings.config.mirror
    assert m is not None
    where = redact_url(m.url)
    options: dict[str, Any] = {
        "application_name": "syncd-doctor",
        "connect_timeout": max(2, round(min(timeout, m.connect_timeout))),
    }
    if settings.mirror_password is not None:
        options["password"] = settings.mirror_password.reveal()
    try:
        async with asyncio.timeout(timeout):
            conn = await psycopg.AsyncConnection.connect(m.url, autocommit=True, **options)
            async with conn:
                return await _facts(conn, where, m.schema)
    except (psycopg.Error, OSError, TimeoutError) as exc:
        return PostgresFacts(where, error=f"{type(exc).__name__}: {str(exc).strip()}")


async def _facts(
    conn: psycopg.AsyncConnection[tuple[object, ...]], where: str, schema: str
) -> PostgresFacts:
    cur = await conn.execute(
        """SELECT current_setting('server_version_num')::int,
                  pg_is_in_recovery() OR current_setting('default_transaction_read_only') = 'on',
                  has_database_privilege(current_database(), 'CREATE'),
                  to_regnamespace(%s) IS NOT NULL""",
        [schema],
    )
    row = await cur.fetchone()
    assert row is not None
    version, read_only, create_db, exists = (
        int(str(row[0])),
        bool(row[1]),
        bool(row[2]),
        bool(row[3]),
    )
    can_create, newest = create_db, 0
    if exists:
        cur = await conn.execute("SELECT has_schema_privilege(%s, 'CREATE')", [schema])
        got = await cur.fetchone()
        can_create = bool(got and got[0])
        cur = await conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL", [f"{schema}.{VERSION_TABLE}"]
        )
        got = await cur.fetchone()
        if got and got[0]:
            cur = await conn.execute(
                sql.SQL("SELECT coalesce(max(version), 0) FROM {}.{}").format(
                    sql.Identifier(schema), sql.Identifier(VERSION_TABLE)
                )
            )
            got = await cur.fetchone()
            newest = int(str(got[0])) if got else 0
    return PostgresFacts(where, None, version, read_only, can_create, exists, newest)
