"""What a consumer group has done, for tests and benchmarks: whether it caught up."""

from __future__ import annotations

from collections.abc import Iterable

import redis.asyncio as aioredis


async def caught_up(r: aioredis.Redis, streams: Iterable[str], group: str) -> bool:
    """Whether `group` has read and acknowledged every event of `streams`."""
    for stream in streams:
        groups = {g["name"].decode(): g for g in await r.xinfo_groups(stream)}
        g = groups.get(group)
        if g is None or g["pending"] or g["lag"] != 0:
            return False
    return True
