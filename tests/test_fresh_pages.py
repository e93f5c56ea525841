"""The page script's path for a feed whose last page was mostly new (ARGV[4] '2':
each key first offered to its bucket with HSETNX). The same steps are applied to two copies
of a feed's state under two prefixes of one Redis: one publisher always takes the fresh path
(its `_fresh` holds the feed before every page), the other never does (with or without the
precheck). Redis must then hold the same in both but for stream entry ids and times: events
(op, key, data, modified_on, modified_at), dead letters, the index (every bucket, the meta
hash, the layout before buckets), cursors and the feed's state; the index's `count` must be
the number of keys in its buckets; and what each page did (`Applied`) must agree.

Steps: pages of new, unchanged, changed, older and same-instant versions (keys repeated from
earlier pages, duplicates in a page, no timestamp, no key), pages of many new keys (the index
splits buckets in the same script), pages cut in chunks, reconciliation passes (their pages,
incremental pages while one is under way: values carry the pass's mark, the sweep), and an
index in the layout before buckets, moved or not.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Coroutine
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import catalogue
from syncd.engine import index
from syncd.engine.pass_scripts import PASS_START, SWEEP
from syncd.engine.publisher import Applied, Publisher
from syncd.errors import TransientError
from syncd.instants import packed_instant
from syncd.keys import Keys
from syncd.servicetitan.page import decode_page
from syncd.testing.redis_server import RedisServer
from tests.index_helpers import buckets, entries, spell, to_old_layout

TENANT = 5
SIDES = ("fa", "fb")  # fa: always fresh; fb: never


@st.composite
def record(draw: st.DrawFn, feed: catalogue.Feed) -> bytes:
    if draw(st.integers(0, 25)) == 0:
        return draw(st.sampled_from([b"7", b'"text"', b"null"]))
    body: dict[str, Any] = {}
    if len(feed.key_fields) == 1:
        body["id"] = draw(st.sampled_from([1, 2, 3, 4, 5, "a:b", "a\\", "", None, True]))
    else:
        body["technicianId"] = draw(st.sampled_from([1, "1:2", 2]))
        body["jobId"] = draw(st.sampled_from([3, "2:3", 2, "\\", None]))
    body["v"] = draw(st.integers(0, 3))
    stamp = draw(
        st.one_of(
            st.tuples(st.integers(0, 9), st.integers(0, 5)).map(lambda t: spell(*t)),
            st.sampled_from([None, 17, "soon", "missing"]),
        )
    )
    if stamp != "missing":
        body["modifiedOn"] = stamp
    return json.dumps(body).encode()


def envelope(recs: list[bytes], continue_from: str, more: bool = False) -> bytes:
    head = json.dumps({"hasMore": more, "continueFrom": continue_from})[:-1].encode()
    return head + b', "data": [' + b",".join(recs) + b"]}"


def many(start: int, n: int, instant: int) -> list[bytes]:
    return [
        json.dumps({"id": k, "v": 0, "modifiedOn": spell(instant, 0)}).encode()
        for k in range(start, start + n)
    ]


@st.composite
def steps(draw: st.DrawFn, feed: catalogue.Feed) -> list[tuple[Any, ...]]:
    out: list[tuple[Any, ...]] = []
    for _ in range(draw(st.integers(1, 14))):
        kinds = ["page", "page", "page", "many", "repeat", "pass", "pass_page", "sweep"]
        kind = draw(st.sampled_from([*kinds, "old", "migrate", "cut"]))
        if kind in ("page", "cut"):
            out.append((kind, draw(st.lists(record(feed), max_size=8))))
        elif kind == "many":
            if len(feed.key_fields) == 1:
                out.append(
                    (kind, draw(st.integers(1, 120)), draw(st.integers(20, 160)),
                     draw(st.integers(0, 9)))
                )  # fmt: skip
        elif kind == "repeat":
            out.append((kind, draw(st.integers(0, 100))))
        elif kind == "pass_page":
            out.append((kind, draw(st.lists(record(feed), max_size=8)), draw(st.booleans())))
        elif kind == "sweep":
            out.append((kind, draw(st.integers(1, 60))))
        elif kind == "migrate":
            out.append((kind, draw(st.integers(1, 50))))
        else:
            out.append((kind,))
    return out


def logical(snap: dict[str, Any]) -> dict[str, Any]:
    """A snapshot with the index as the keys it holds, wherever they are (a precheck that
    drops a key as unchanged leaves it in the layout before buckets, the script moves it)."""
    mark = int(snap["meta"].get(b"mark", 1))
    held = {k: index.decode(v) for b in snap["buckets"].values() for k, v in b.items()}
    for k, v in snap["seen"].items():
        rest = v[8:]
        text, _, earlier = rest.partition(b"|")
        held[k] = index.Entry(
            v[:8], mark, packed_instant(text.decode()),
            tuple(earlier[i : i + 8] for i in range(0, len(earlier), 8)),
        )  # fmt: skip
    meta = {f: v for f, v in snap["meta"].items() if f not in (b"level", b"split", b"count")}
    meta[b"mark"] = str(mark).encode()  # an index not written yet: the first mark
    out = {k: v for k, v in snap.items() if k not in ("buckets", "seen", "meta")}
    return {**out, "held": held, "meta": meta}


async def snapshot(r: aioredis.Redis, prefix: str, feed: str) -> dict[str, Any]:
    k = Keys(prefix, TENANT)
    events = [
        tuple(f.get(n) for n in (b"op", b"key", b"data", b"modified_on", b"modified_at"))
        for _, f in await r.xrange(k.stream(feed))
    ]
    dead = [tuple(sorted(f.items())) for _, f in await r.xrange(k.dead)]
    meta = await r.hgetall(k.index(feed))
    found = await buckets(r, k, feed)
    in_buckets = sum(len(b) for b in found.values())
    if meta:
        assert int(meta.get(b"count", 0)) == in_buckets, (prefix, meta, in_buckets)
    state = {
        f: v
        for f, v in (await r.hgetall(k.state)).items()
        if not f.endswith(b":last_ok")  # the time the page was applied
    }
    return {
        "events": events,
        "dead": dead,
        "dead_seen": sorted(await r.smembers(k.dead_seen(feed))),
        "meta": meta,
        "buckets": {n: b for n, b in found.items() if b},
        "seen": await r.hgetall(k.seen(feed)),
        "cursors": await r.hgetall(k.cursors),
        "state": state,
    }


async def run_steps(
    r: aioredis.Redis, feed: catalogue.Feed, todo: list[tuple[Any, ...]], precheck: int, chunk: int
) -> None:
    await r.flushall()
    fresh = Publisher(r, SIDES[0], precheck_min=10**9, chunk_records=chunk, migrate_chunks=0)
    plain = Publisher(r, SIDES[1], precheck_min=precheck, chunk_records=chunk, migrate_chunks=0)
    pubs = {SIDES[0]: fresh, SIDES[1]: plain}
    name = feed.name
    cursor: str | None = None
    pass_cursor: str | None = None
    sent: list[bytes] = []
    tokens = 0

    async def apply(page_recs: list[bytes], cf: str, expected: str | None, **kw: Any) -> None:
        results: list[Applied] = []
        more = kw.pop("more", False)
        for side, pub in pubs.items():
            if side == SIDES[0]:
                pub._fresh.add((TENANT, name))
            else:
                pub._fresh.clear()
            page = decode_page(envelope(page_recs, cf, more), feed)
            results.append(await pub.apply(TENANT, name, expected, page, **kw))
        a, b = results
        assert a == b, (a, b)

    for step in todo:
        kind = step[0]
        if kind in ("page", "many", "repeat", "cut"):
            if kind == "page":
                recs = step[1]
            elif kind == "many":
                recs = many(step[1], step[2], step[3])
            elif kind == "cut":
                recs = step[1]
            else:
                recs = sent[step[1] % len(sent) :][:8] if sent else []
            tokens += 1
            cf = f"c{tokens}"
            if kind == "cut":  # the first chunk runs, the rest never do
                if not precheck:  # a precheck drops records: other chunks, as valid
                    continue
                prepared = []
                for side, pub in pubs.items():
                    if side == SIDES[0]:
                        pub._fresh.add((TENANT, name))
                    else:
                        pub._fresh.clear()
                    page = decode_page(envelope(recs, cf), feed)
                    prepared.append(await pub.prepare(TENANT, name, cursor, page))
                if all(len(p) >= 2 for p in prepared):
                    for pub, p in zip(pubs.values(), prepared, strict=True):
                        await pub.run_chunks(p, range(1))
                continue
            await apply(recs, cf, cursor)
            cursor = cf
            sent.extend(recs)
        elif kind == "pass":
            for side in SIDES:
                k = Keys(side, TENANT)
                while await pubs[side].migrate(TENANT, name):
                    pass
                await r.eval(PASS_START, 2, k.index(name), k.seen(name), "1700000000.000")
            pass_cursor = None
        elif kind == "pass_page":
            tokens += 1
            cf = f"p{tokens}"
            await apply(step[1], cf, pass_cursor, reconcile=True, more=step[2])
            meta = await r.hgetall(Keys(SIDES[0], TENANT).index(name))
            if meta.get(b"pass_cursor") == cf.encode():
                pass_cursor = cf
            sent.extend(step[1])
        elif kind == "sweep":
            for side in SIDES:
                k = Keys(side, TENANT)
                at = await r.hget(k.index(name), "sweep")
                await r.eval(
                    SWEEP, 3, k.index(name), k.stream(name), k.state, int(at or 0), step[1],
                    "2026-12-07T10:00:00.000000Z", "2026-12-07T10:00:00.0000000Z", name,
                    "1700000001.000",
                )  # fmt: skip
        elif kind == "old":
            if (await r.hget(Keys(SIDES[0], TENANT).index(name), "pass")) is None:
                for side in SIDES:
                    await to_old_layout(r, Keys(side, TENANT), name)
        elif kind == "migrate":
            for pub in pubs.values():
                await pub.migrate(TENANT, name, 1, step[1])
        a, b = [await snapshot(r, side, name) for side in SIDES]
        if precheck:  # the same physical layout
            assert a == b, f"after {step[0]}"
        else:
            assert logical(a) == logical(b), f"after {step[0]}"


def run(coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` on a loop of its own, never made current: asyncio.run would leave the thread
    without one, which older pytest-asyncio versions need for the async tests that follow."""
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(coro)
    finally:
        loop.close()


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    feed=st.sampled_from(
        [
            catalogue.feed("crm.customers"),
            catalogue.feed("customer-interactions.technician-ratings"),
        ]
    ),
    data=st.data(),
    precheck=st.sampled_from([0, 10**9]),
    chunk=st.sampled_from([2, 1000]),
)
def test_the_fresh_path_leaves_redis_as_the_full_comparison_does(
    redis_server: RedisServer, feed: catalogue.Feed, data: st.DataObject, precheck: int, chunk: int
) -> None:
    todo = data.draw(steps(feed))

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            await run_steps(r, feed, todo, precheck, chunk)
        finally:
            await r.aclose()

    run(main())


def test_a_fresh_page_repeating_keys_of_earlier_pages_publishes_each_change_once(
    redis_server: RedisServer,
) -> None:
    """Targeted: a first page, then while fresh: new keys, the same versions, changed ones,
    older ones, same-instant changes, a record without a timestamp, under a pass's mark, with
    the index splitting buckets in the same script."""
    feed = catalogue.feed("crm.customers")

    def rec(k: int, v: int, instant: int | None) -> bytes:
        body: dict[str, Any] = {"id": k, "v": v}
        if instant is not None:
            body["modifiedOn"] = spell(instant, 0)
        return json.dumps(body).encode()

    first = [rec(k, 0, 4) for k in range(1, 11)]
    second = (
        [rec(k, 0, 4) for k in range(1, 4)]  # unchanged
        + [rec(4, 1, 6), rec(5, 1, 2), rec(6, 1, 4), rec(7, 1, None)]  # newer, older, tie, none
        + [rec(k, 0, 5) for k in range(100, 180)]  # new: the index splits
    )
    third = [rec(6, 0, 4), rec(6, 2, 4), rec(8, 3, 9)] + [rec(k, 0, 5) for k in range(100, 110)]
    todo: list[tuple[Any, ...]] = [
        ("page", first),
        ("page", second),
        ("pass",),
        ("page", third),
        ("pass_page", first[:5], False),
        ("sweep", 1000),
        ("page", [rec(9, 9, 9), rec(500, 0, 1)]),
    ]

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_server.url)
        try:
            for precheck in (0, 10**9):
                await run_steps(r, feed, todo, precheck, 1000)
            events = (await snapshot(r, SIDES[0], feed.name))["events"]
            live: set[bytes] = set()
            for op, key, *_ in events:  # created once, again only after its delete
                assert (op == b"created") == (key not in live), (op, key)
                if op == b"deleted":
                    live.discard(key)
                else:
                    live.add(key)
        finally:
            await r.aclose()

    run(main())


# A page script that fails part-way (a Redis command error: Redis does not undo a script's
# earlier writes) must not leave a key in the index without its event, or the page applied
# again finds the key unchanged and its `created` event is lost for good: the fresh path writes
# the index first (HSETNX), and takes the key out again when its event fails.
ERR_TENANT = 9
ERR_FEED = catalogue.feed("crm.customers")


def two_records() -> bytes:
    recs = [{"id": k, "modifiedOn": "2024-01-01T00:00:00Z"} for k in (1, 2)]
    return json.dumps({"hasMore": False, "continueFrom": "c1", "data": recs}).encode()


@pytest.mark.parametrize("fresh", [False, True], ids=["full-comparison", "fresh"])
async def test_a_script_failing_at_its_first_event_loses_no_event(
    redis: aioredis.Redis, fresh: bool
) -> None:
    pub = Publisher(redis, "st", precheck_min=10**9)
    k = Keys("st", ERR_TENANT)
    await redis.set(k.stream(ERR_FEED.name), "not a stream")  # XADD fails: WRONGTYPE
    if fresh:
        pub._fresh.add((ERR_TENANT, ERR_FEED.name))
    with pytest.raises(TransientError, match="WRONGTYPE"):
        await pub.apply(ERR_TENANT, ERR_FEED.name, None, decode_page(two_records(), ERR_FEED))
    await redis.delete(k.stream(ERR_FEED.name))  # the operator repairs it; the page comes again
    applied = await pub.apply(ERR_TENANT, ERR_FEED.name, None, decode_page(two_records(), ERR_FEED))
    assert applied.applied
    events = [f for _, f in await redis.xrange(k.stream(ERR_FEED.name))]
    assert sorted(e[b"key"] for e in events if e[b"op"] == b"created") == [b"1", b"2"]


# A stream two entries short of its last possible id: the third XADD of a page fails.
LAST_IDS = "18446744073709551615-18446744073709551613"


@pytest.mark.parametrize("fresh", [False, True], ids=["full-comparison", "fresh"])
async def test_a_script_failing_part_way_keeps_the_index_count_true(
    redis: aioredis.Redis, fresh: bool
) -> None:
    pub = Publisher(redis, "st", precheck_min=10**9)
    k = Keys("st", ERR_TENANT)
    stream = k.stream(ERR_FEED.name)
    await redis.xadd(stream, {"op": "filler"}, id=LAST_IDS)
    if fresh:
        pub._fresh.add((ERR_TENANT, ERR_FEED.name))
    recs = [{"id": n, "modifiedOn": "2024-01-01T00:00:00Z"} for n in range(1, 6)]
    body = json.dumps({"hasMore": False, "continueFrom": "c1", "data": recs}).encode()
    with pytest.raises(TransientError):
        await pub.apply(ERR_TENANT, ERR_FEED.name, None, decode_page(body, ERR_FEED))
    indexed = await entries(redis, k, ERR_FEED.name)
    published = [f[b"key"] for _, f in await redis.xrange(stream) if f[b"op"] == b"created"]
    assert sorted(indexed) == sorted(published) == [b"1", b"2"]  # each with its event, no more
    assert int(await redis.hget(k.index(ERR_FEED.name), "count")) == 2
    await redis.delete(stream)  # the operator repairs it; the page comes again
    applied = await pub.apply(ERR_TENANT, ERR_FEED.name, None, decode_page(body, ERR_FEED))
    assert applied.applied
    assert sorted(await entries(redis, k, ERR_FEED.name)) == [b"1", b"2", b"3", b"4", b"5"]
    assert int(await redis.hget(k.index(ERR_FEED.name), "count")) == 5
