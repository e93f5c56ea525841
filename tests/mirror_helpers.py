"""Helpers for the mirror's tests: its settings, running it in-process, reading its tables and
telling when its group has caught up."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import redis.asyncio as aioredis
from psycopg import sql

from syncd.consumer import Subscription
from syncd.mirror import Mirror
from syncd.mirror.schema import table_name
from syncd.testing import groups
from tests.engine_helpers import config_dict, settings

GROUP = "syncd-mirror"


def mirror_config(
    redis_url: str,
    pg_url: str,
    tenants: list[int],
    feeds: list[str],
    sim_url: str = "http://127.0.0.1:1",
    app_key: str = "k",
    **mirror: Any,
) -> dict[str, Any]:
    """A configuration of `tenants` x `feeds` with a [mirror] section for `pg_url`."""
    data = config_dict(redis_url, sim_url, app_key, tenants, feeds)
    data["mirror"] = {"url": pg_url, "claim_idle": 0.5, **mirror}
    return data


@contextlib.asynccontextmanager
async def running_mirror(data: dict[str, Any], name: str = "m1") -> AsyncIterator[Mirror]:
    """`Mirror.serve` as a task for the block; stopped (and its exit checked) afterwards."""
    mirror = Mirror(settings(data), name=name)
    task = asyncio.create_task(mirror.serve())
    try:
        yield mirror
    finally:
        mirror.stop.set()
        assert await asyncio.wait_for(task, 30) == 0


async def caught_up(r: aioredis.Redis, subs: list[Subscription], group: str = GROUP) -> bool:
    """Whether `group` has read and acknowledged every event of the streams."""
    return await groups.caught_up(r, [s for sub in subs for s in sub.streams()], group)


async def table(pg_url: str, feed: str, schema: str = "syncd") -> dict[tuple[int, str], Any]:
    """(tenant, key) -> record of a feed's table; deleted rows as ("deleted", record)."""
    async with await psycopg.AsyncConnection.connect(pg_url) as c:
        cur = await c.execute(
            sql.SQL("SELECT tenant, key, data, deleted_at FROM {}").format(
                sql.Identifier(schema, table_name(feed))
            )
        )
        rows = await cur.fetchall()
    return {
        (int(t), str(k)): ("deleted", d) if deleted else d  # type: ignore[call-overload]
        for t, k, d, deleted in rows
    }


async def count(pg_url: str, feed: str, schema: str = "syncd") -> int:
    """Rows in a feed's table (0 while it does not exist)."""
    try:
        return len(await table(pg_url, feed, schema))
    except psycopg.errors.UndefinedTable:
        return 0


async def publish(
    r: aioredis.Redis, tenant: int, feed: str, key: str, record: Any, at: str, op: str = "updated"
) -> str:
    """One event as syncd writes it; its entry id."""
    data = record if isinstance(record, bytes) else json.dumps(record).encode()
    fields = {"op": op, "key": key, "data": data, "modified_on": at, "modified_at": at}
    entry = await r.xadd(f"st:{{{tenant}}}:{feed}", fields)  # type: ignore[arg-type]
    return str(entry.decode())
