"""The index: linear hashing into small buckets, packed instants, and the move from the layout
before buckets. The pure functions by tables; the page scripts' Lua held to them on a real
Redis; the layout and the move end to end through the publisher."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import catalogue
from syncd.engine import index
from syncd.engine.publisher import Publisher
from syncd.engine.scripts import INDEX_LIB
from syncd.instants import fixed_width, packed_instant, sortable_instant, unpacked_instant
from syncd.keys import Keys
from syncd.servicetitan.page import FINGERPRINT_BYTES, decode_page
from syncd.testing.redis_server import RedisServer
from tests.index_helpers import buckets, entries, old_value, to_old_layout

CUSTOMERS = catalogue.feed("crm.customers")
T = 5150
KEYS = Keys("st", T)


@pytest.mark.parametrize(
    ("key", "h"),
    [
        ("1", 1),
        ("123456789", 123456789),
        ("999999999999999", 999999999999999),  # 15 digits: itself
        ("1000000000000000", None),  # 16 digits: hashed
        ("0", None),
        ("007", None),
        ("-5", None),
        ("1e5", None),
        ("ab", (97 * 257 + 98) % 4294967291),
        ("", 0),
    ],
)
def test_key_hash_table(key: str, h: int | None) -> None:
    got = index.key_hash(key)
    if h is None:
        assert got != int(key) if key.lstrip("-").isdigit() else True
        assert 0 <= got < 4294967291
    else:
        assert got == h


@pytest.mark.parametrize(
    ("h", "level", "split", "b"),
    [
        (5, 0, 0, 0),  # one bucket
        (5, 1, 0, 1),
        (4, 1, 0, 0),
        (4, 1, 1, 0),  # bucket 0 split: 4 mod 4 = 0
        (6, 1, 1, 2),  # 6 mod 4 = 2: moved up
        (7, 1, 1, 1),  # bucket 1 not split yet
        (7, 2, 3, 3),
        (10, 2, 3, 2),  # 10 mod 8 = 2
        (13, 2, 3, 5),  # 13 mod 8 = 5
    ],
)
def test_bucket_table(h: int, level: int, split: int, b: int) -> None:
    assert index.bucket(h, level, split) == b


@pytest.mark.parametrize(
    ("count", "start", "end", "splits"),
    [
        (0, (0, 0), (0, 0), []),
        (index.LOAD, (0, 0), (0, 0), []),
        (index.LOAD + 1, (0, 0), (1, 0), [0]),
        (2 * index.LOAD + 1, (1, 0), (1, 1), [0]),
        (3 * index.LOAD + 1, (1, 0), (2, 0), [0, 1]),
        (5 * index.LOAD + 1, (2, 0), (2, 2), [0, 1]),
    ],
)
def test_grown_table(
    count: int, start: tuple[int, int], end: tuple[int, int], splits: list[int]
) -> None:
    level, split, done = index.grown(count, *start)
    assert ((level, split), done) == (end, splits)
    assert count <= index.LOAD * ((1 << level) + split)


# --- The Lua of the scripts agrees with the Python -------------------------------------------

_PARITY = (
    INDEX_LIB
    + r"""
local what = ARGV[1]
if what == 'hash' then return string.format('%.0f', hash(ARGV[2])) end
if what == 'bucket' then return bucket_of(hash(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])) end
if what == 'pack' then return packed_of(ARGV[2]) end
if what == 'fixed' then return fixed_of(ARGV[2]) end
if what == 'before' then return before(ARGV[2], ARGV[3]) and 1 or 0 end
if what == 'converted' then return converted(ARGV[2], ARGV[3]) end
"""
)


@pytest.fixture(scope="module")
def sync_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


keys_strategy = st.one_of(
    st.integers(0, 10**16).map(str),
    st.text(min_size=0, max_size=30),
    st.from_regex(r"[0-9]{1,18}", fullmatch=True),
)
instants = st.datetimes(
    min_value=__import__("datetime").datetime(1, 1, 1),
    max_value=__import__("datetime").datetime(9999, 12, 31, 23, 59, 59),
).map(lambda d: d.isoformat(timespec="microseconds") + "Z")


@settings(max_examples=300, deadline=None)
@given(key=keys_strategy, level=st.integers(0, 25), data=st.data())
def test_lua_hashes_and_buckets_keys_as_python_does(
    sync_redis: redis.Redis, key: str, level: int, data: st.DataObject
) -> None:
    split = data.draw(st.integers(0, (1 << level) - 1))
    h = index.key_hash(key)
    assert int(sync_redis.eval(_PARITY, 0, "hash", key)) == h
    assert int(sync_redis.eval(_PARITY, 0, "bucket", key, level, split)) == index.bucket(
        h, level, split
    )


@settings(max_examples=300, deadline=None)
@given(when=instants, digit=st.integers(0, 9), other=instants)
def test_lua_packs_and_reads_instants_as_python_does(
    sync_redis: redis.Redis, when: str, digit: int, other: str
) -> None:
    sortable = sortable_instant(when[:-1] + str(digit) + "Z")
    packed = packed_instant(sortable)
    assert sync_redis.eval(_PARITY, 0, "pack", sortable) == packed
    assert sync_redis.eval(_PARITY, 0, "fixed", packed).decode() == fixed_width(sortable)
    assert unpacked_instant(packed) == fixed_width(sortable)
    theirs = packed_instant(sortable_instant(other))
    assert int(sync_redis.eval(_PARITY, 0, "before", packed, theirs)) == (packed < theirs)


@settings(max_examples=100, deadline=None)
@given(
    fp=st.binary(min_size=FINGERPRINT_BYTES, max_size=FINGERPRINT_BYTES),
    when=st.one_of(st.just(""), instants),
    earlier=st.lists(st.binary(min_size=FINGERPRINT_BYTES, max_size=FINGERPRINT_BYTES), max_size=4),
    mark=st.integers(1, 255),
)
def test_values_of_the_layout_before_buckets_read_the_same(
    sync_redis: redis.Redis, fp: bytes, when: str, earlier: list[bytes], mark: int
) -> None:
    instant = packed_instant(sortable_instant(when)) if when else b""
    entry = index.Entry(fp, mark, instant, tuple(earlier) if instant else ())
    got = sync_redis.eval(_PARITY, 0, "converted", old_value(entry), bytes([mark]))
    assert index.decode(got) == entry
    assert got == index.encode(entry)


# --- The layout, end to end ------------------------------------------------------------------


def customers(ids: list[int | str], cursor: str, version: int = 0) -> bytes:
    records = [
        {"id": i, "v": version, "modifiedOn": f"2024-03-01T10:00:{n % 60:02d}.{n:07d}Z"}
        for n, i in enumerate(ids)
    ]
    return json.dumps({"hasMore": False, "continueFrom": cursor, "data": records}).encode()


async def apply_all(
    pub: Publisher,
    ids: list[int | str],
    version: int = 0,
    start: str | None = None,
    size: int = 500,
) -> tuple[str | None, int, int]:
    """Apply the records of `ids` in pages of `size`: the last cursor, published, unchanged."""
    cursor, published, unchanged = start, 0, 0
    for n in range(0, len(ids), size):
        nxt = f"v{version}-{n}"
        page = decode_page(customers(ids[n : n + size], nxt, version), CUSTOMERS)
        applied = await pub.apply(T, CUSTOMERS.name, cursor, page)
        assert applied.applied
        published += applied.published
        unchanged += applied.unchanged
        cursor = nxt
    return cursor, published, unchanged


async def test_the_index_grows_in_small_buckets_and_finds_every_key(
    redis: aioredis.Redis,
) -> None:
    rng = random.Random(7)
    numeric = rng.sample(range(1, 10**12), 6000)
    other: list[int | str] = [f"k-{rng.random()}" for _ in range(1500)] + ["0", "007"]
    ids: list[int | str] = [*numeric, *other]
    rng.shuffle(ids)
    pub = Publisher(redis, "st", precheck_min=10**9)
    cursor, published, _ = await apply_all(pub, ids)
    assert published == len(ids)
    meta = await redis.hgetall(KEYS.index(CUSTOMERS.name))
    level, split, count = int(meta[b"level"]), int(meta[b"split"]), int(meta[b"count"])
    assert count == len(ids)
    assert count <= index.LOAD * ((1 << level) + split) < count + index.LOAD + 1
    found = await buckets(redis, KEYS, CUSTOMERS.name)
    assert sorted(found) == list(range((1 << level) + split))
    for n, bucket in found.items():
        assert await redis.object("encoding", KEYS.bucket(CUSTOMERS.name, n)) == b"listpack"
        for key in bucket:
            assert index.bucket(index.key_hash(key.decode()), level, split) == n
    # Everything is found again: a re-export publishes nothing, with and without the precheck.
    for precheck in (0, 10**9):
        again = Publisher(redis, "st", precheck_min=precheck)
        cursor, published, unchanged = await apply_all(again, ids, start=cursor)
        assert (published, unchanged) == (0, len(ids))
    # And a change to each is one event each.
    _, published, _ = await apply_all(pub, ids, version=1, start=cursor)
    assert published == len(ids)
    assert await redis.xlen(KEYS.stream(CUSTOMERS.name)) == 2 * len(ids)


@pytest.mark.parametrize("hashtable", [False, True])
async def test_an_index_of_the_layout_before_buckets_moves_without_an_event_lost_or_repeated(
    redis: aioredis.Redis, hashtable: bool
) -> None:
    ids: list[int | str] = list(range(1, 3001))
    pub = Publisher(redis, "st", migrate_chunks=0)
    cursor, _, _ = await apply_all(pub, ids)
    before = await entries(redis, KEYS, CUSTOMERS.name)
    # An installation of the earlier layout, upgraded now.
    assert await to_old_layout(redis, KEYS, CUSTOMERS.name, hashtable=hashtable) == len(ids)
    assert not await redis.exists(KEYS.index(CUSTOMERS.name))
    # Read while nothing has moved yet: unchanged records stay unchanged; changed ones are one
    # event each and move as they are written.
    cursor, published, unchanged = await apply_all(pub, ids[:1000], start=cursor)
    assert (published, unchanged) == (0, 1000)
    cursor, published, _ = await apply_all(pub, ids[1000:1500], version=1, start=cursor)
    assert published == 500
    left = await redis.hlen(KEYS.seen(CUSTOMERS.name))
    assert 1500 <= left < len(ids)
    # The move, a few keys a script, by new publishers each time (a restart between scripts).
    rounds = 0
    while left:
        left = await Publisher(redis, "st").migrate(T, CUSTOMERS.name, chunks=1, per_script=200)
        rounds += 1
        assert rounds < 100
    assert rounds > 1 if hashtable else rounds >= 1
    assert not await redis.exists(KEYS.seen(CUSTOMERS.name))
    after = await entries(redis, KEYS, CUSTOMERS.name)
    assert set(after) == set(before)
    changed = {str(i).encode() for i in ids[1000:1500]}
    assert {k: e for k, e in after.items() if k not in changed} == {
        k: e for k, e in before.items() if k not in changed
    }
    meta = await redis.hgetall(KEYS.index(CUSTOMERS.name))
    assert int(meta[b"count"]) == len(ids)
    assert b"migrate" not in meta
    # Nothing was published twice: the stream holds the first sync and the 500 changes.
    assert await redis.xlen(KEYS.stream(CUSTOMERS.name)) == len(ids) + 500
    cursor, published, unchanged = await apply_all(pub, ids[1000:1500], version=1, start=cursor)
    assert (published, unchanged) == (0, 500)
    _, published, unchanged = await apply_all(pub, ids[1500:], start=cursor)
    assert (published, unchanged) == (0, 1500)


async def test_a_feed_moves_its_index_as_it_applies_pages(redis: aioredis.Redis) -> None:
    ids: list[int | str] = list(range(1, 20_001))
    cursor, _, _ = await apply_all(Publisher(redis, "st"), ids, size=5000)
    await to_old_layout(redis, KEYS, CUSTOMERS.name, hashtable=True)
    pub = Publisher(redis, "st")
    # Each page applied moves up to migrate_chunks x MIGRATE_CHUNK keys.
    cursor, published, unchanged = await apply_all(pub, ids[:10], start=cursor)
    assert (published, unchanged) == (0, 10)
    left = await redis.hlen(KEYS.seen(CUSTOMERS.name))
    assert 0 < left < len(ids)
    polls = 0
    while left:  # polls that find nothing new
        polls += 1
        page = decode_page(customers([], f"empty-{polls}"), CUSTOMERS)
        assert (await pub.apply(T, CUSTOMERS.name, cursor, page)).published == 0
        cursor = f"empty-{polls}"
        now = await redis.hlen(KEYS.seen(CUSTOMERS.name))
        assert now < left
        left = now
    assert len(await entries(redis, KEYS, CUSTOMERS.name)) == len(ids)


async def test_a_pass_begins_once_the_index_has_left_the_layout_before_buckets(
    redis: aioredis.Redis,
) -> None:
    """The sweep looks at the buckets only: a key still in the layout before would never be
    found gone, so a pass moves the index first."""
    from syncd.engine.pass_scripts import PASS_START

    ids: list[int | str] = list(range(1, 2001))
    await apply_all(Publisher(redis, "st"), ids)
    await to_old_layout(redis, KEYS, CUSTOMERS.name, hashtable=True)
    meta, old = KEYS.index(CUSTOMERS.name), KEYS.seen(CUSTOMERS.name)
    assert await redis.eval(PASS_START, 2, meta, old, "0") == [0, b"migrating"]
    assert not await redis.hexists(meta, "pass")
    while await Publisher(redis, "st").migrate(T, CUSTOMERS.name):
        pass
    assert await redis.eval(PASS_START, 2, meta, old, "0") == [1, b"fetch"]
