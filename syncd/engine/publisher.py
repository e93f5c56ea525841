"""The publisher: atomic Redis scripts apply a page, chunk by chunk, behind the cursor fence.

Each script checks the cursor fence (the stored cursor must be the one the page was fetched
from), drops records whose fingerprint is unchanged and versions older than the one last
published for their key, XADDs the rest and records their fingerprints and timestamps. The
page's last script also dead-letters records it has not dead-lettered before and stores the
page's continueFrom. A crash before the last script refetches the page; after it, the next
page is fetched; an instance that fetched the same page finds the cursor moved; a page fetched
again from the same cursor (the API may repeat one) adds nothing.

With change detection, a big page goes in chunks (CHUNK_RECORDS, CHUNK_BYTES) so that Redis
is never blocked for long by one script: chunks before the last publish but leave the cursor
where it is. A page cut short between two (a crash, OOM, a lost connection) is fetched again
from the same cursor, and the versions its first chunks published are unchanged then: each
version is still published once, and the cursor never passes a record that was not applied.
Without change detection there are no fingerprints to make that safe: the page is one script.

With `[redis] wait_replicas`, every cursor the publisher hands back (a page's, applied; the
stored one, fenced or settled) is one that many replicas acknowledged; else ReplicasBehind.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import itertools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio.to_thread
import redis.exceptions
import structlog

from syncd.engine import index
from syncd.engine.scripts import APPLY_PAGE, LOOKUP, MIGRATE_INDEX, SETTLE
from syncd.errors import ReplicasBehind, TransientError
from syncd.keys import Keys
from syncd.redis.conn import RedisClient, RedisCluster
from syncd.redis.errors import redis_errors as redis_errors  # re-exported
from syncd.servicetitan.page import Page

log = structlog.get_logger("syncd.publisher")

T = TypeVar("T")

# Pages with at least this many records are checked against the fingerprints before sending.
PRECHECK_MIN = 32

# The precheck asks for at most this many keys a command.
PRECHECK_CHUNK = 2_500

# Pages with at least this many records are made ready for their scripts in a worker thread.
THREAD_MIN_RECORDS = 10_000

# A chunk of a page (one script) ends at this many records or at this many bytes of records,
# whichever comes first: what keeps each script, and so each time Redis is busy with it, short.
CHUNK_RECORDS = 1000
CHUNK_BYTES = 1024 * 1024

# Keys of an index in the layout before buckets moved per script, and scripts per page applied.
MIGRATE_CHUNK = 1000
MIGRATE_CHUNKS = 8


@dataclass(frozen=True, slots=True)
class Applied:
    """What one page did: `applied` False means the fence refused it (`stored` is the cursor
    found in Redis, None for none). `stale` counts versions not published because a newer one
    of their key was published before or came in the same page; `dead` counts records newly
    dead-lettered (one already dead-lettered for the feed is not written again)."""

    applied: bool
    published: int = 0
    unchanged: int = 0
    dead: int = 0
    stored: str | None = None
    stale: int = 0


@dataclass(frozen=True, slots=True)
class Prepared:
    """A page ready to apply: the keys its scripts touch, what every chunk's script is told
    (`header`: its fields 3, 5, 6 and 9 are set per chunk), the records to send (key, `seen`
    value, timestamp, data), where chunks end, the dead letters (for the last chunk), and how
    many records the precheck found unchanged. Chunks are built one at a time, as they are
    sent, so that a big page never holds the event loop for long."""

    keys: list[str]
    header: list[Any]
    records: list[tuple[str, bytes, str, bytes]]
    bounds: list[int]
    dead: list[Any]
    skipped: int
    continue_from: str
    stale: int
    fetched: int  # records in the page (a reconciliation pass counts them)

    def __len__(self) -> int:
        return len(self.bounds)

    def chunk(self, n: int, found_stale: int = 0) -> list[Any]:
        """The arguments of chunk `n`'s script; `found_stale`: versions earlier chunks found
        stale, counted by the last."""
        low = self.bounds[n - 1] if n else 0
        high = self.bounds[n]
        last = n == len(self.bounds) - 1
        args = list(self.header)
        args[2] = self.continue_from if last else ""  # "": not the page's last chunk
        args[4] = high - low
        args[5] = len(self.dead) // 3 if last else 0
        args[8] = self.stale + found_stale if last else 0
        args[12] = self.fetched if last else 0
        args.extend(itertools.chain.from_iterable(self.records[low:high]))
        if last:
            args.extend(self.dead)
        return args


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _records(
    page: Page, olds: tuple[int, list[Any]] | None, chunk_records: int, chunk_bytes: int
) -> tuple[list[tuple[str, bytes, str, bytes]], list[int], int, int]:
    """What a page's scripts send per record (key, index value and `modified_at`, timestamp,
    data), those the precheck against `olds` (the index's mark and each record's value; None:
    not looked at) did not drop; where chunks end (`chunk_records` 0: one chunk); how many
    were unchanged and stale."""
    keys, fps, mods, datas = page.keys, page.fingerprints, page.modified, page.data
    skipped = stale = 0
    if olds is None:
        instants, ats = page.instants, page.modified_at
    else:
        mark, values = olds
        # The timestamps of the records whose index value differs only: in a re-export, few.
        changed = index.changed(values, fps, mark)
        skipped = len(values) - len(changed)
        c_instants, c_ats = page.stamps_of(changed)
        c_values, c_fps = [values[i] for i in changed], [fps[i] for i in changed]
        kept, _, stale = index.precheck(c_values, c_fps, c_instants, mark)
        pick = [changed[j] for j in kept]
        instants, ats = [c_instants[j] for j in kept], [c_ats[j] for j in kept]
        # Unchanged but for the mark (a reconciliation pass is under way): only marked, so the
        # record's bytes are not sent.
        marks_only = [i for i in pick if (old := values[i]) is not None and old.startswith(fps[i])]
        if len(pick) < len(keys) or marks_only:
            keys = [keys[i] for i in pick]
            fps = [fps[i] for i in pick]
            mods = [mods[i] for i in pick]
            blank = set(marks_only)
            datas = [b"" if i in blank else datas[i] for i in pick]
    # Per record: key, what the index would keep (fingerprint, packed instant) and the event's
    # `modified_at` where it is not the timestamp as sent (one argument: each argument costs
    # the client more than the bytes do), timestamp, data.
    news = [fp + ts + at for fp, ts, at in zip(fps, instants, ats, strict=True)]
    records = list(zip(keys, news, mods, datas, strict=True))
    bounds = (
        chunk_bounds([len(d) for d in datas], chunk_records, chunk_bytes)
        if chunk_records
        else [len(records)]
    )
    return records, bounds, skipped, stale


def chunk_bounds(sizes: list[int], most_records: int, most_bytes: int) -> list[int]:
    """Where a page's chunks end (exclusive indexes, the last is len(sizes)): each holds at
    most `most_records` records and, but for a single record over it, `most_bytes` bytes of
    records. A page without records is one empty chunk."""
    bounds: list[int] = []
    count = size = 0
    for i, n in enumerate(sizes):
        if count and (count == most_records or size + n > most_bytes):
            bounds.append(i)
            count = size = 0
        count += 1
        size += n
    bounds.append(len(sizes))
    return bounds


def dead_fingerprint(data: bytes) -> bytes:
    """What identifies a dead record in the feed's `dead_seen` set: a digest of its bytes."""
    return hashlib.blake2b(data, digest_size=16).digest()


class Publisher:
    """Applies pages to one Redis (or Redis Cluster) under one key prefix."""

    def __init__(
        self,
        redis_client: RedisClient,
        prefix: str,
        *,
        precheck_min: int = PRECHECK_MIN,
        wait_replicas: int = 0,
        wait_timeout: float = 5.0,
        chunk_records: int = CHUNK_RECORDS,
        chunk_bytes: int = CHUNK_BYTES,
        migrate_chunks: int = MIGRATE_CHUNKS,
    ) -> None:
        self.redis = redis_client
        self.prefix = prefix
        self.precheck_min = precheck_min
        self.chunk_records = chunk_records
        self.chunk_bytes = chunk_bytes
        self.migrate_chunks = migrate_chunks
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._script = redis_client.register_script(APPLY_PAGE)
        self._lookup_script = redis_client.register_script(LOOKUP)
        self._migrate = redis_client.register_script(MIGRATE_INDEX)
        self._settle = redis_client.register_script(SETTLE)
        # Feeds whose last page was mostly new records (a first sync, a backfill): their next
        # page skips the precheck, which would find next to nothing, until a page is not.
        self._fresh: set[tuple[int, str]] = set()

    @property
    def waits(self) -> bool:
        """Whether pages and adopted cursors count only once `wait_replicas` replicas have
        them (never on a cluster: it fails over by itself)."""
        return self.wait_replicas > 0 and not isinstance(self.redis, RedisCluster)

    def keys(self, tenant: int) -> Keys:
        return Keys(self.prefix, tenant)

    async def cursors(self, tenant: int) -> dict[str, str]:
        """Every stored cursor of a tenant, feed -> continueFrom."""
        try:
            raw = await self.redis.hgetall(self.keys(tenant).cursors)
        except redis.exceptions.RedisError as exc:
            raise TransientError(f"redis: {exc}") from None
        return {_text(k): _text(v) for k, v in raw.items()}

    async def apply(
        self,
        tenant: int,
        feed: str,
        expected: str | None,
        page: Page,
        *,
        change_detection: bool = True,
        reconcile: bool = False,
    ) -> Applied:
        """Apply `page`, fetched from cursor `expected` (None: nothing stored yet). A chunk
        refused (out of memory, a lost connection) leaves what earlier chunks published: the
        page is fetched again later, and those versions are unchanged then. `reconcile`: a
        page of the feed's reconciliation pass, fenced by the pass's cursor (refused, with no
        stored cursor, when no pass is fetching)."""
        with redis_errors("the page"):
            prepared = await self.prepare(
                tenant,
                feed,
                expected,
                page,
                change_detection=change_detection or reconcile,
                reconcile=reconcile,
            )
            if self.waits:
                result = await self._waited(
                    functools.partial(self._apply_on, tenant, feed, prepared)
                )
            else:
                result = await self.run_chunks(prepared)
        if int(result[0]) != 0:
            stored = _text(result[1]) if len(result) > 1 else None
            return Applied(False, stored=stored)
        if not reconcile:
            # Unchanged or stale: records a precheck would have kept from the scripts.
            repeated = int(result[2]) + int(result[3]) + prepared.skipped
            if repeated * 2 < len(page.keys):
                self._fresh.add((tenant, feed))
            else:
                self._fresh.discard((tenant, feed))
        if int(result[5]) and self.migrate_chunks:
            await self.migrate(tenant, feed, self.migrate_chunks)
        return Applied(
            True,
            published=int(result[1]),
            unchanged=int(result[2]) + prepared.skipped,
            dead=int(result[4]),
            stale=int(result[3]),
        )

    async def prepare(
        self,
        tenant: int,
        feed: str,
        expected: str | None,
        page: Page,
        *,
        change_detection: bool = True,
        reconcile: bool = False,
    ) -> Prepared:
        """The scripts that apply `page`: what `apply` runs. Raises what redis-py raises."""
        if not page.continue_from:
            # Nothing to resume from: storing "" would restart the feed from its beginning.
            raise TransientError("the page has no continueFrom; not applied")
        k = self.keys(tenant)
        idx, seen = k.index(feed), k.seen(feed)
        olds = None
        fresh = not reconcile and (tenant, feed) in self._fresh
        if change_detection and len(page.keys) >= self.precheck_min and not fresh:
            # Look first, send only what may be published: a re-export then ships keys, not
            # megabytes of unchanged records. The script checks every record it gets again,
            # and the fence makes sure nothing moved in between.
            olds = await self._lookup(idx, seen, page.keys)
        build = functools.partial(
            _records, page, olds, self.chunk_records if change_detection else 0, self.chunk_bytes
        )
        if len(page.keys) < THREAD_MIN_RECORDS:
            records, bounds, skipped, stale = build()
        else:  # a big page: the event loop goes on meanwhile
            records, bounds, skipped, stale = await anyio.to_thread.run_sync(build)
        dead: list[Any] = []
        for reason, data in page.dead:
            dead.extend((dead_fingerprint(data), reason, data))
        header: list[Any] = [
            feed,
            "" if expected is None else "=" + expected,
            "",  # the new cursor: the last chunk's
            # A feed whose last page was mostly new: keys are offered to the index as new.
            ("2" if fresh else "1") if change_detection else "0",
            0,  # records in the chunk
            0,  # dead letters: the last chunk's
            f"{time.time():.3f}",
            "1" if page.has_more else "0",
            0,  # stale versions: counted by the last chunk
            index.SAME_INSTANT_KEPT,
            index.LOAD,
            "1" if reconcile else "0",
            0,  # records in the page: the last chunk's
            # The mark the precheck judged records against (none looked up, none judged: ""):
            # a pass's page is refused under another.
            "" if olds is None or not page.keys else olds[0],
        ]
        page_keys = [k.cursors, idx, seen, k.stream(feed), k.dead, k.state, k.dead_seen(feed)]
        return Prepared(
            page_keys,
            header,
            records,
            bounds,
            dead,
            skipped,
            page.continue_from,
            stale + page.superseded,
            page.fetched,
        )

    async def _lookup(self, idx: str, seen: str, keys: list[str]) -> tuple[int, list[Any]]:
        """The index's mark and the value of each of `keys` (None: not in the index), read by
        a script of PRECHECK_CHUNK keys at a time: each reply is parsed on its own, so a big
        page's never holds the event loop for long."""
        mark = index.FIRST_MARK
        values: list[Any] = []
        for low in range(0, len(keys), PRECHECK_CHUNK):
            reply = await self._lookup_script(
                keys=[idx, seen], args=keys[low : low + PRECHECK_CHUNK]
            )
            mark = int(reply[0])
            values.extend(reply[1:])
        return mark, values

    async def migrate(
        self, tenant: int, feed: str, chunks: int = MIGRATE_CHUNKS, per_script: int = MIGRATE_CHUNK
    ) -> int:
        """Move up to about `chunks` x `per_script` keys of a feed's index in the layout before
        buckets into the buckets: the keys left to move. Each script moves its keys whole, so
        a move cut anywhere resumes where it was. After every page a feed applies, while
        there are keys left (`migrate_chunks` scripts)."""
        k = self.keys(tenant)
        left = 0
        with redis_errors("the index move"):
            for _ in range(chunks):
                _, left = await self._migrate(
                    keys=[k.index(feed), k.seen(feed)], args=[per_script, index.LOAD]
                )
                if not left:
                    log.info("index_migrated", tenant=tenant, feed=feed)
                    break
        return int(left)

    async def run_chunks(
        self, prepared: Prepared, chunks: range | None = None, client: Any = None
    ) -> Any:
        """A page's scripts in order, one per chunk (those numbered in `chunks`: all by
        default), on `client` (None: any connection): the last one's result with the counts of
        all, or the first refusal by the fence. Versions an earlier chunk found stale are
        counted by the last (an interrupted page counts them when it is applied again)."""
        published = unchanged = found_stale = 0
        result: list[Any] = []
        for n in range(len(prepared)) if chunks is None else chunks:
            args = prepared.chunk(n, found_stale)
            result = list(await self._script(keys=prepared.keys, args=args, client=client))
            if int(result[0]) != 0:
                return result
            published += int(result[1])
            unchanged += int(result[2])
            found_stale += int(result[3])
        result[1:3] = [published, unchanged]
        return result

    async def _apply_on(
        self, tenant: int, feed: str, prepared: Prepared, conn: Any
    ) -> tuple[Any, str]:
        """The page's scripts on `conn`, to be waited for: the page is done once enough
        replicas have it. A page the fence refused reports the stored cursor, settled on
        `conn`, so only once enough replicas have that too."""
        result = await self.run_chunks(prepared, client=conn)
        if int(result[0]) != 0:
            # Fenced: the cursor moved, maybe by a page whose own WAIT failed (this instance's,
            # another's, before a restart). Not adopted until replicas hold it.
            stored, what = await self._settle_on(tenant, feed, conn)
            return ([1] if stored is None else [1, stored]), what
        # Applied on the primary: not done (ReplicasBehind) until replicas have it. The feed
        # then settles (see settle()) before it fetches anything past this page.
        return result, "the page"

    async def settle(self, tenant: int, feed: str) -> str | None:
        """A feed's stored cursor (None: none) once `wait_replicas` replicas hold it, with
        everything the primary wrote before; ReplicasBehind if they do not within
        `wait_timeout`. What a feed adopts from Redis (at start, after a page whose WAIT
        failed) is settled first: nothing past a page is fetched before replicas have it."""
        with redis_errors("the settle"):
            if not self.waits:
                raw = await self.redis.hget(self.keys(tenant).cursors, feed)
                return None if raw is None else _text(raw)
            return await self._waited(functools.partial(self._settle_on, tenant, feed))

    async def replicated(self, write: Callable[[Any], Awaitable[T]], what: str) -> T:
        """`write(client)`; with `wait_replicas` on one connection, then WAITed for as a page
        is (ReplicasBehind naming `what`)."""
        if not self.waits:
            return await write(self.redis)
        return await self._waited(lambda conn: _named(write(conn), what))

    async def _settle_on(self, tenant: int, feed: str, conn: Any) -> tuple[str | None, str]:
        """The stored cursor, read on `conn` with a write for the WAIT after it to cover."""
        k = self.keys(tenant)
        raw = await self._settle(
            keys=[k.cursors, k.state], args=[feed, f"{time.time():.3f}"], client=conn
        )
        return (None if raw is None else _text(raw)), "the stored cursor"

    async def _waited(self, write: Callable[[Any], Awaitable[tuple[T, str]]]) -> T:
        """`write` on one connection of the pool, then WAIT for `wait_replicas` replicas on
        that connection (WAIT counts the writes of the connection it is sent on): what `write`
        returns, once they hold what it wrote and everything the primary wrote before;
        ReplicasBehind, naming what it wrote (its second value), when fewer answer."""
        assert not isinstance(self.redis, RedisCluster)
        async with self.redis.client() as conn:
            result, what = await write(conn)
            timeout_ms = max(1, int(self.wait_timeout * 1000))
            acked = int(await conn.wait(self.wait_replicas, timeout_ms))
        if acked < self.wait_replicas:
            raise ReplicasBehind(acked, self.wait_replicas, self.wait_timeout, what)
        return result

    async def resume_state(self, tenant: int) -> tuple[dict[str, str], dict[str, str]]:
        """A tenant's stored cursors (feed -> continueFrom) and feed state (last success,
        whether more pages were waiting), read when the daemon (re)starts."""
        k = self.keys(tenant)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hgetall(k.cursors)
                pipe.hgetall(k.state)
                cursors, state = await pipe.execute()
        except redis.exceptions.RedisError as exc:
            raise TransientError(f"redis: {exc}") from None
        return (
            {_text(a): _text(b) for a, b in cursors.items()},
            {_text(a): _text(b) for a, b in state.items()},
        )

    async def ping(self) -> bool:
        """Whether Redis answers (every primary, on a cluster)."""
        if isinstance(self.redis, RedisCluster):
            return bool(await self.redis.ping(target_nodes=RedisCluster.PRIMARIES))
        return bool(await self.redis.ping())

    async def record_error(self, tenant: int, feed: str, error: str) -> None:
        """Remember a feed's last error for `syncd status` (best effort)."""
        k = self.keys(tenant)
        with contextlib.suppress(redis.exceptions.RedisError):
            await self.redis.hset(
                k.state, mapping={f"{feed}:last_error": error, f"{feed}:last_error_at": time.time()}
            )


async def _named(result: Awaitable[T], what: str) -> tuple[T, str]:
    return await result, what
