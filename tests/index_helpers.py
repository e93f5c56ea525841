"""The index as an installation of an earlier layout holds it: one `seen` hash per feed, key ->
fingerprint, sortable instant text, `|` and earlier fingerprints (what `syncd.engine.scripts`
reads until its keys have moved); instants in several spellings."""

from __future__ import annotations

import redis.asyncio as aioredis

from syncd.engine import index
from syncd.instants import unpacked_instant
from syncd.keys import Keys


def old_value(entry: index.Entry) -> bytes:
    """What the layout before buckets stored for an index entry (it kept no mark)."""
    if not entry.instant:
        return entry.fingerprint
    fixed = unpacked_instant(entry.instant)
    sortable = (fixed[:19] + fixed[20:27].rstrip("0")).encode()
    earlier = b"|" + b"".join(entry.earlier) if entry.earlier else b""
    return entry.fingerprint + sortable + earlier


async def buckets(r: aioredis.Redis, keys: Keys, feed: str) -> dict[int, dict[bytes, bytes]]:
    """Every bucket of a feed's index: number -> its hash."""
    meta = keys.index(feed)
    found: dict[int, dict[bytes, bytes]] = {}
    async for name in r.scan_iter(match=f"{meta}:*", count=1000):
        found[int(name.decode().rpartition(":")[2])] = await r.hgetall(name)
    return found


async def entries(r: aioredis.Redis, keys: Keys, feed: str) -> dict[bytes, index.Entry]:
    """Every key in the buckets of a feed's index, read."""
    return {
        k: index.decode(v)
        for bucket in (await buckets(r, keys, feed)).values()
        for k, v in bucket.items()
    }


async def to_old_layout(
    r: aioredis.Redis, keys: Keys, feed: str, *, hashtable: bool = False
) -> int:
    """Move a feed's index back to the layout before buckets, as if an earlier syncd had
    written it (`hashtable`: Redis keeps the hash as a hash table, so that a scan of it
    returns a few keys at a time); keys not moved yet stay. The number of keys moved."""
    found = await entries(r, keys, feed)
    if hashtable:
        await r.config_set("hash-max-listpack-entries", 0)
    try:
        async with r.pipeline(transaction=True) as pipe:
            pipe.delete(keys.index(feed))
            for n in await buckets(r, keys, feed):
                pipe.delete(keys.bucket(feed, n))
            if found:
                pipe.hset(keys.seen(feed), mapping={k: old_value(e) for k, e in found.items()})
            await pipe.execute()
    finally:
        if hashtable:
            await r.config_set("hash-max-listpack-entries", 128)
    return len(found)


# Instants are tenths of a second after 2024-01-01T10:00:00Z, 0.5 s apart; each is written in
# one of several spellings that name the same instant.
def spell(instant: int, style: int) -> str:
    seconds, half = divmod(instant, 2)
    frac = ".5" if half else ""
    return [
        f"2024-01-01T10:00:0{seconds}{frac}Z",
        f"2024-01-01T10:00:0{seconds}.{'5' if half else '0'}000000Z",
        f"2024-01-01T10:00:0{seconds}{frac}",  # no zone: UTC
        f"2024-01-01T12:00:0{seconds}{frac}+02:00",
        f"2024-01-01T08:30:0{seconds}{frac}-01:30",
        f"2024-01-01T10:00:0{seconds}{'.50' if half else '.000'}+00:00",
    ][style]
