"""The page script's promises, page by page: real Redis, pages built as ServiceTitan sends them."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from syncd import catalogue
from syncd.cli import commands
from syncd.daemon import Daemon
from syncd.engine.publisher import (
    PRECHECK_CHUNK,
    PRECHECK_MIN,
    THREAD_MIN_RECORDS,
    Publisher,
    chunk_bounds,
)
from syncd.errors import TransientError
from syncd.instants import packed_instant
from syncd.servicetitan.page import (
    HEADS_PASS_MAX_BYTES,
    Page,
    decode_page,
    encode_key,
    newest_per_key,
    sortable_instant,
)
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, settings, stream_events, truth

CUSTOMERS = catalogue.feed("crm.customers")
RATINGS = catalogue.feed("customer-interactions.technician-ratings")
CANCELED = catalogue.feed("jpm.job-canceled-logs")  # dated by createdOn
HISTORY = catalogue.feed("jpm.job-history")  # no timestamp at all
T = 4242


def body(records: list[Any], cursor: str | None = "next", *, more: bool = False) -> bytes:
    env: dict[str, Any] = {"hasMore": more, "data": records}
    if cursor is not None:
        env["continueFrom"] = cursor
    return json.dumps(env).encode()


def page(records: list[Any], cursor: str = "next", feed: catalogue.Feed = CUSTOMERS) -> Page:
    return decode_page(body(records, cursor), feed)


async def events(r: aioredis.Redis, feed: catalogue.Feed = CUSTOMERS) -> list[tuple[str, str, Any]]:
    return [
        (e["op"].decode(), e["key"].decode(), json.loads(e["data"]))
        for e in await stream_events(r, T, feed.name)
    ]


async def dead(r: aioredis.Redis) -> list[bytes]:
    return [fields[b"data"] for _, fields in await r.xrange(f"st:{{{T}}}:dead")]


# 1. A page fetched again from the same cursor adds nothing, dead letters included.


async def test_repeated_cursor_adds_nothing_the_second_time(redis: aioredis.Redis) -> None:
    # A drained feed with includeRecentChanges answers continueFrom=C with the same C and
    # the same tail; here the tail holds a record without a key.
    tail = [
        {"id": 1, "name": "a", "modifiedOn": "2024-01-01T00:00:00Z"},
        {"name": "no id", "modifiedOn": "2024-01-01T00:00:00Z"},
        {"id": None, "name": "null id"},
    ]
    one, other = Publisher(redis, "st"), Publisher(redis, "st")
    await redis.hset(f"st:{{{T}}}:cursors", CUSTOMERS.name, "C")
    first = await one.apply(T, CUSTOMERS.name, "C", page(tail, "C"))
    assert (first.applied, first.published, first.dead) == (True, 1, 2)
    for pub in (one, other, one):  # the same instance, another one, the API repeating itself
        again = await pub.apply(T, CUSTOMERS.name, "C", page(tail, "C"))
        assert (again.applied, again.published, again.dead, again.unchanged) == (True, 0, 0, 1)
    assert await events(redis) == [("created", "1", tail[0])]
    assert len(await dead(redis)) == 2
    assert await one.cursors(T) == {CUSTOMERS.name: "C"}


async def test_dead_letters_are_idempotent_without_change_detection(
    redis: aioredis.Redis,
) -> None:
    pub = Publisher(redis, "st")
    records = [{"id": 1}, {"id": {"nested": 1}}]
    await pub.apply(T, CUSTOMERS.name, None, page(records, "C"), change_detection=False)
    await pub.apply(T, CUSTOMERS.name, "C", page(records, "C"), change_detection=False)
    assert await dead(redis) == [b'{"id": {"nested": 1}}']
    # A different dead record of the same feed is still dead-lettered, once.
    await pub.apply(T, CUSTOMERS.name, "C", page([{"id": True}], "D"), change_detection=False)
    assert await dead(redis) == [b'{"id": {"nested": 1}}', b'{"id": true}']


async def test_without_change_detection_only_the_fence_holds(redis: aioredis.Redis) -> None:
    """What the README says of `change_detection = false`: a moved cursor keeps a page out,
    a repeated cursor publishes its records again."""
    pub = Publisher(redis, "st")
    new = {"id": 1, "v": 2, "modifiedOn": "2024-02-01T00:00:00Z"}
    old = {"id": 1, "v": 1, "modifiedOn": "2024-01-01T00:00:00Z"}
    await pub.apply(T, CUSTOMERS.name, None, page([new], "C1"), change_detection=False)
    refused = await pub.apply(T, CUSTOMERS.name, None, page([new], "C1"), change_detection=False)
    assert (refused.applied, refused.stored) == (False, "C1")
    again = await pub.apply(T, CUSTOMERS.name, "C1", page([old], "C1"), change_detection=False)
    assert (again.published, again.stale) == (1, 0)
    assert [(op, data) for op, _, data in await events(redis)] == [("upsert", new), ("upsert", old)]


async def test_racing_instance_with_a_moved_cursor_writes_nothing(redis: aioredis.Redis) -> None:
    a, b = Publisher(redis, "st"), Publisher(redis, "st")
    p1 = page([{"id": 1, "modifiedOn": "2024-01-01T00:00:00Z"}, {"id": None}], "C1")
    assert (await a.apply(T, CUSTOMERS.name, None, p1)).applied
    assert (await a.apply(T, CUSTOMERS.name, "C1", page([{"id": 2}], "C2"))).applied
    # b fetched from the start before a moved on: refused, nothing written.
    refused = await b.apply(T, CUSTOMERS.name, None, p1)
    assert (refused.applied, refused.stored) == (False, "C2")
    assert [k for _, k, _ in await events(redis)] == ["1", "2"]
    assert len(await dead(redis)) == 1


# 2. Events never go back in time.


@pytest.mark.parametrize("precheck_min", [PRECHECK_MIN, 0])
@pytest.mark.parametrize(
    ("newer", "older"),
    [
        ("2024-03-01T10:00:00Z", "2024-03-01T09:59:59.9999999Z"),
        ("2024-03-01T10:00:00.5Z", "2024-03-01T10:00:00.45Z"),  # as strings, .45 sorts after .5
        ("2024-03-01T09:00:00Z", "2024-03-01T10:00:00+02:00"),  # 08:00 UTC
        ("2024-03-01T10:00:00", "2024-03-01T09:00:00Z"),  # no zone: UTC
        ("2024-03-01T09:00:00.1-01:00", "2024-03-01T10:00:00.0999Z"),
    ],
)
async def test_an_older_version_is_not_published_and_is_counted(
    redis: aioredis.Redis, newer: str, older: str, precheck_min: int
) -> None:
    pub = Publisher(redis, "st", precheck_min=precheck_min)
    new = {"id": 7, "v": "new", "modifiedOn": newer}
    old = {"id": 7, "v": "old", "modifiedOn": older}
    await pub.apply(T, CUSTOMERS.name, None, page([new], "C1"))
    applied = await pub.apply(T, CUSTOMERS.name, "C1", page([old], "C2"))
    assert (applied.applied, applied.published, applied.stale) == (True, 0, 1)
    assert await events(redis) == [("created", "7", new)]
    assert await redis.hget(f"st:{{{T}}}:state", f"{CUSTOMERS.name}:stale") == b"1"
    assert await pub.cursors(T) == {CUSTOMERS.name: "C2"}
    # The same instant written differently, or a later one, is not older: published.
    later = {"id": 7, "v": "later", "modifiedOn": newer.replace("2024", "2025")}
    applied = await pub.apply(T, CUSTOMERS.name, "C2", page([later], "C3"))
    assert applied.published == 1


async def test_created_on_is_the_timestamp_where_a_feed_has_no_modified_on(
    redis: aioredis.Redis,
) -> None:
    assert CANCELED.timestamp_field == "createdOn"
    pub = Publisher(redis, "st")
    new = {"id": 3, "reasonId": 1, "createdOn": "2024-05-02T00:00:00Z"}
    old = {"id": 3, "reasonId": 2, "createdOn": "2024-05-01T00:00:00Z"}
    await pub.apply(T, CANCELED.name, None, page([new], "C1", CANCELED))
    applied = await pub.apply(T, CANCELED.name, "C1", page([old], "C2", CANCELED))
    assert (applied.published, applied.stale) == (0, 1)
    assert [e[2] for e in await events(redis, CANCELED)] == [new]


async def test_feeds_without_a_timestamp_publish_what_differs(redis: aioredis.Redis) -> None:
    assert HISTORY.timestamp_field is None
    pub = Publisher(redis, "st")
    v1 = {"jobId": 5, "history": [1], "modifiedOn": "2024-05-02T00:00:00Z"}
    v2 = {"jobId": 5, "history": [], "modifiedOn": "2024-05-01T00:00:00Z"}  # not its timestamp
    await pub.apply(T, HISTORY.name, None, page([v1], "C1", HISTORY))
    applied = await pub.apply(T, HISTORY.name, "C1", page([v2], "C2", HISTORY))
    assert (applied.published, applied.stale) == (1, 0)
    assert [(op, data) for op, _, data in await events(redis, HISTORY)] == [
        ("created", v1),
        ("updated", v2),
    ]


async def test_fingerprints_stored_before_timestamps_keep_working(redis: aioredis.Redis) -> None:
    rec = {"id": 9, "v": 1, "modifiedOn": "2024-01-01T00:00:00Z"}
    first = page([rec], "C1")
    # What an installation wrote before timestamps were stored: the bare 8-byte fingerprint.
    await redis.hset(f"st:{{{T}}}:seen:{CUSTOMERS.name}", "9", first.fingerprints[0])
    await redis.hset(f"st:{{{T}}}:cursors", CUSTOMERS.name, "C0")
    pub = Publisher(redis, "st")
    assert (await pub.apply(T, CUSTOMERS.name, "C0", first)).unchanged == 1
    older = {"id": 9, "v": 0, "modifiedOn": "2023-01-01T00:00:00Z"}
    # No stored timestamp: not older, published; from then on its timestamp is kept.
    assert (await pub.apply(T, CUSTOMERS.name, "C1", page([older], "C2"))).published == 1
    assert (await pub.apply(T, CUSTOMERS.name, "C2", page([rec], "C3"))).published == 1
    assert (await pub.apply(T, CUSTOMERS.name, "C3", page([older], "C4"))).stale == 1
    assert [e[2] for e in await events(redis)] == [older, rec]


async def test_stale_versions_are_counted_in_metrics_and_status(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant, feed = 8801, "crm.customers"
    async with run_simulator(tenants=[tenant], records=60, page_size=25, seed=5) as sim:
        records = await truth(sim.url, tenant, feed)
        # Every key was published before with a version dated far in the future.
        await redis.hset(
            f"st:{{{tenant}}}:seen:{feed}",
            mapping=dict.fromkeys(records, b"12345678" + b"9999-12-31T00:00:00"),
        )
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [feed])
        daemon = Daemon(settings(data), once=True)
        assert await daemon.run() == 0
    assert await redis.xlen(f"st:{{{tenant}}}:{feed}") == 0
    counted = int(await redis.hget(f"st:{{{tenant}}}:state", f"{feed}:stale") or 0)
    assert counted >= len(records)
    # The daemon polled this one feed of this one tenant: its per-tenant and per-feed counts.
    assert daemon.metrics.sample("syncd_tenant_stale_records_total", {"tenant": str(tenant)}) == (
        counted
    )
    assert daemon.metrics.sample("syncd_feed_stale_records_total", {"feed": feed}) == counted
    rows = await commands.collect_status(settings(data), redis)
    assert [r["stale_records"] for r in rows] == [counted]
    out = io.StringIO()
    commands.render_table(rows, out)
    assert "stale" in out.getvalue().splitlines()[0]


# 3. The same key twice in one page: the newest version wins, whatever the page size.


@pytest.mark.parametrize("filler", [0, PRECHECK_MIN + 5])
async def test_the_newest_version_of_a_key_in_a_page_wins(
    redis: aioredis.Redis, filler: int
) -> None:
    others = [{"id": 1000 + i, "modifiedOn": "2024-01-01T00:00:00Z"} for i in range(filler)]
    newest = {"id": 1, "v": "newest", "modifiedOn": "2024-06-01T00:00:00Z"}
    older = {"id": 1, "v": "older", "modifiedOn": "2024-05-01T00:00:00+00:00"}
    first_tie = {"id": 2, "v": "first", "modifiedOn": "2024-05-01T00:00:00Z"}
    last_tie = {"id": 2, "v": "last", "modifiedOn": "2024-05-01T00:00:00.000Z"}
    p = page([newest, *others, first_tie, older, last_tie], "C1")
    assert p.superseded == 2
    assert p.fetched == filler + 4
    pub = Publisher(redis, "st")
    applied = await pub.apply(T, CUSTOMERS.name, None, p)
    assert (applied.published, applied.stale) == (filler + 2, 2)
    got = {k: data for _, k, data in await events(redis)}
    assert (got["1"], got["2"]) == (newest, last_tie)
    # Seen with every page size: what was published is what is stored.
    again = await pub.apply(T, CUSTOMERS.name, "C1", page([newest, last_tie], "C2"))
    assert (again.published, again.unchanged) == (0, 2)


@pytest.mark.parametrize(
    ("keys", "instants", "kept"),
    [
        (["a", "b", "a"], ["2", "1", "1"], [0, 1]),  # older later in the page loses
        (["a", "a"], ["1", "1"], [1]),  # equal: the later wins
        (["a", "a"], ["1", "2"], [1]),
        (["a", "a", "a"], ["3", "", "2"], [1]),  # no timestamp: not older; 2 is older than 3
        (["a", "a"], ["", ""], [1]),
        (["b", "a", "b", "a"], ["1", "5", "2", "4"], [1, 2]),
    ],
)
def test_newest_per_key_table(keys: list[str], instants: list[str], kept: list[int]) -> None:
    assert newest_per_key(keys, [i.encode() for i in instants]) == kept


# 4. Off-schema records are events when their key is usable; only an unusable key dead-letters.


async def test_off_schema_records_are_still_events(redis: aioredis.Redis) -> None:
    usable = [
        {"id": 1, "name": None, "active": None, "modifiedOn": "2024-01-01T00:00:00Z"},
        {"id": 2, "type": 3, "modifiedOn": "2024-01-01T00:00:00Z"},  # int for a string enum
        {"id": 3, "modifiedOn": "2025-10-13T00:00:00"},  # no zone
        {"id": 4, "modifiedOn": 1700000000},  # not a string
        {"id": 5, "modifiedOn": "yesterday"},
        {"id": 6, "modifiedOn": None},
        {"id": 7},
        {"id": "8"},
        {"id": 9, "modifiedOn": "2024-02-30T00:00:00Z"},  # no such day
    ]
    unusable = [
        {"modifiedOn": "2024-01-01T00:00:00Z"},
        {"id": None},
        {"id": ""},
        {"id": True},
        {"id": 1.5},
        {"id": [1]},
        {"id": {"x": 1}},
        7,
        "text",
        None,
    ]
    p = page(usable + unusable, "C1")
    assert p.keys == [str(i) for i in range(1, 10)]
    # `modified_on` carries the timestamp as sent when it is a string.
    assert p.modified[2:] == [
        "2025-10-13T00:00:00",
        "",
        "yesterday",
        "",
        "",
        "",
        usable[8]["modifiedOn"],
    ]
    assert p.instants[2:] == [packed_instant("2025-10-13T00:00:00"), b"", b"", b"", b"", b"", b""]
    pub = Publisher(redis, "st")
    applied = await pub.apply(T, CUSTOMERS.name, None, p)
    assert (applied.published, applied.dead) == (len(usable), len(unusable))
    assert [data for _, _, data in await events(redis)] == usable
    assert len(await dead(redis)) == len(unusable)
    again = await pub.apply(T, CUSTOMERS.name, "C1", page(usable + unusable, "C2"))
    assert (again.published, again.dead) == (0, 0)
    assert len(await dead(redis)) == len(unusable)


async def test_numbers_beyond_a_float_are_off_schema_values(redis: aioredis.Redis) -> None:
    far = b'{"id": 1, "modifiedOn": 1e400}'
    keyless = b'{"id": -1e400, "modifiedOn": "2024-01-01T00:00:00Z"}'
    raw = b'{"hasMore": false, "continueFrom": "C1", "data": [' + far + b", " + keyless + b"]}"
    p = decode_page(raw, CUSTOMERS)
    assert (p.keys, p.modified, p.instants) == (["1"], [""], [b""])
    assert p.dead == [("record has no key (id)", keyless)]
    applied = await Publisher(redis, "st").apply(T, CUSTOMERS.name, None, p)
    assert (applied.published, applied.dead) == (1, 1)


async def test_an_unpaired_surrogate_does_not_make_the_page_fail(redis: aioredis.Redis) -> None:
    """A string cut in the middle of an emoji, escaped: one record must not stop its feed."""
    cut = b'{"id": 1, "name": "Bob \\ud83d", "modifiedOn": "2024-01-01T00:00:00Z"}'
    key = b'{"id": "x\\udc00"}'  # a key Redis cannot hold: unusable
    stamp = b'{"id": 2, "modifiedOn": "2024-01-01\\ud800"}'
    whole = b'{"id": 3, "name": "\\ud83d\\ude00"}'
    raw = (
        b'{"hasMore" : true ,\n "data": [ '
        + b" ,\n".join([cut, key, stamp, whole])
        + b' ] , "continueFrom": "C\\u00e91"}'
    )
    p = decode_page(raw, CUSTOMERS)
    assert (p.has_more, p.continue_from, p.keys) == (True, "C\u00e91", ["1", "2", "3"])
    assert p.data == [cut, stamp, whole]
    assert (p.modified, p.instants) == (
        ["2024-01-01T00:00:00Z", "", ""],
        [packed_instant("2024-01-01T00:00:00"), b"", b""],
    )
    assert p.dead == [("record has no key (id)", key)]
    pub = Publisher(redis, "st")
    applied = await pub.apply(T, CUSTOMERS.name, None, p)
    assert (applied.published, applied.dead) == (3, 1)
    stream = await redis.xrange(f"st:{{{T}}}:{CUSTOMERS.name}")
    assert [f[b"data"] for _, f in stream] == [cut, stamp, whole]
    again = await pub.apply(T, CUSTOMERS.name, "C\u00e91", decode_page(raw, CUSTOMERS))
    assert (again.published, again.unchanged, again.dead) == (0, 3, 0)


@pytest.mark.parametrize(
    "text",
    [
        b'{"hasMore": true, "continueFrom": "C", "data": ["\\ud800", NaN]}',
        b'{"hasMore": true, "continueFrom": "C", "data": "\\ud800"}',
        b'{"hasMore": true, "continueFrom": "C", "data": ["\\ud800"',
        b'["\\ud800"]',
        b'{"hasMore": true, "continueFrom": "C\\ud800", "data": []}',
    ],
)
def test_pages_with_an_unpaired_surrogate_that_do_not_decode_are_errors(text: bytes) -> None:
    with pytest.raises(TransientError, match="invalid export page"):
        decode_page(text, CUSTOMERS)


def test_modified_on_is_sent_as_is_when_a_string() -> None:
    p = page([{"id": 5, "modifiedOn": "yesterday"}, {"id": 6, "modifiedOn": 12}])
    assert p.modified == ["yesterday", ""]
    assert p.instants == [b"", b""]


async def test_a_version_without_a_usable_timestamp_is_not_older(redis: aioredis.Redis) -> None:
    pub = Publisher(redis, "st")
    dated = {"id": 1, "v": 1, "modifiedOn": "2024-06-01T00:00:00Z"}
    undated = {"id": 1, "v": 2, "modifiedOn": 1}
    older = {"id": 1, "v": 3, "modifiedOn": "2024-05-01T00:00:00Z"}
    await pub.apply(T, CUSTOMERS.name, None, page([dated], "C1"))
    assert (await pub.apply(T, CUSTOMERS.name, "C1", page([undated], "C2"))).published == 1
    # The newest timestamp published for the key still counts.
    assert (await pub.apply(T, CUSTOMERS.name, "C2", page([older], "C3"))).stale == 1
    assert [data for _, _, data in await events(redis)] == [dated, undated]


@pytest.mark.parametrize("precheck_min", [0, PRECHECK_MIN])
async def test_versions_sharing_a_timestamp_do_not_take_turns(
    redis: aioredis.Redis, precheck_min: int
) -> None:
    """Two versions with one modifiedOn, served in turn by repeated tails: each is published
    once, the newer is not followed by the older again."""
    pub = Publisher(redis, "st", precheck_min=precheck_min)
    same = "2024-01-01T00:00:00Z"
    v1, v2, v3 = ({"id": 1, "v": v, "modifiedOn": same} for v in (1, 2, 3))
    other = [{"id": n, "modifiedOn": same} for n in range(2, 40)]  # over PRECHECK_MIN
    pages = [[v1], [v2], [v1], [v2], [v1], [v3], [v2], [v1], [v3]]
    stale = 0
    for n, recs in enumerate(pages):
        applied = await pub.apply(T, CUSTOMERS.name, "C" if n else None, page(recs + other, "C"))
        stale += applied.stale
    assert [data["v"] for _, _, data in await events(redis) if data["id"] == 1] == [1, 2, 3]
    assert stale == 4


async def test_a_version_dated_at_the_end_of_a_day_has_a_timestamp(
    redis: aioredis.Redis,
) -> None:
    pub = Publisher(redis, "st")
    midnight = {"id": 1, "v": 2, "modifiedOn": "2024-01-02T24:00:00Z"}
    noon = {"id": 1, "v": 1, "modifiedOn": "2024-01-02T12:00:00Z"}
    later = {"id": 1, "v": 3, "modifiedOn": "2024-01-03T00:00:00.1Z"}
    await pub.apply(T, CUSTOMERS.name, None, page([midnight], "C1"))
    assert (await pub.apply(T, CUSTOMERS.name, "C1", page([noon], "C2"))).stale == 1
    assert (await pub.apply(T, CUSTOMERS.name, "C2", page([later], "C3"))).published == 1
    assert [data for _, _, data in await events(redis)] == [midnight, later]


@pytest.mark.parametrize(
    ("text", "instant"),
    [
        ("2024-01-02T03:04:05Z", "2024-01-02T03:04:05"),
        ("2024-01-02T03:04:05.1234567Z", "2024-01-02T03:04:051234567"),
        ("2024-01-02T03:04:05.120z", "2024-01-02T03:04:0512"),
        ("2024-01-02T03:04:05.000Z", "2024-01-02T03:04:05"),
        ("2024-01-02T03:04:05", "2024-01-02T03:04:05"),
        ("2024-01-02 03:04", "2024-01-02T03:04:00"),
        ("2024-01-02", "2024-01-02T00:00:00"),
        ("2024-01-02T03:04:05+00:00", "2024-01-02T03:04:05"),
        ("2024-01-02T03:04:05.5+01:30", "2024-01-02T01:34:055"),
        ("2024-01-01T23:30:00-01:00", "2024-01-02T00:30:00"),
        ("2024-01-02T03:04:05+0100", "2024-01-02T02:04:05"),
        ("0001-01-01T00:30:00+01:00", ""),  # before year 1 in UTC
        ("2024-02-28T24:00:00Z", "2024-02-29T00:00:00"),  # the end of a day: the next one's start
        ("2024-12-31T24:00", "2025-01-01T00:00:00"),
        ("2024-02-29T24:00:00.000-01:00", "2024-03-01T01:00:00"),
        ("9999-12-31T24:00:00Z", ""),
        ("2024-01-02T24:00:01Z", ""),
        ("2024-01-02T24:00:00.5Z", ""),
        ("2024-02-30T00:00:00Z", ""),
        ("2024-01-02T23:59:60Z", ""),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00"),
        ("9999-12-31T23:59:59.9999999Z", "9999-12-31T23:59:599999999"),
        ("2024-01-02T03:04:05+14:00", "2024-01-01T13:04:05"),
        ("2024-01-02T03:04:05-12:00", "2024-01-02T15:04:05"),
        ("2024-01-02T03:04:05.123456789012Z", "2024-01-02T03:04:05123456789012"),
        ("2024-01-02t03:04:05z", "2024-01-02T03:04:05"),
        ("1700000000", ""),
        ("2024-13-01T00:00:00Z", ""),
        ("2024-01-02T25:00:00Z", ""),
        ("2024-01-02T03:04:05 Z", ""),
        ("yesterday", ""),
        ("", ""),
        (None, ""),
        (1700000000, ""),
        (["2024-01-02"], ""),
    ],
)
def test_sortable_instant_table(text: object, instant: str) -> None:
    assert sortable_instant(text) == instant


def test_sortable_instants_sort_like_the_instants() -> None:
    ordered = [
        "2023-12-31T23:59:59.9999999-00:30",  # 2024-01-01T00:29:59.9999999Z
        "2024-01-01T00:30:00",
        "2024-01-01T00:30:00.0000001Z",
        "2024-01-01T00:30:00.1+00:00",
        "2024-01-01T02:30:00.11+02:00",
        "2024-01-01T00:30:00.2Z",
    ]
    instants = [sortable_instant(t) for t in ordered]
    assert all(instants)
    assert instants == sorted(instants)
    assert len(set(instants)) == len(instants)


# 5. Composite keys never collide.


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ((1, 2), "1:2"),  # as before
        (("1:2", 3), "1\\:2:3"),
        ((1, "2:3"), "1:2\\:3"),
        (("a\\", "b"), "a\\\\:b"),
        (("a", "\\b"), "a:\\\\b"),
        ((7,), "7"),
        (("x:y",), "x\\:y"),
        ((1, None), None),
        ((1, ""), None),
        ((True, 2), None),
        ((1.0, 2), None),
    ],
)
def test_encode_key_table(values: tuple[object, ...], key: str | None) -> None:
    assert encode_key(values) == key


def test_distinct_key_values_never_share_a_key() -> None:
    # An integer and its decimal text are the same part (ServiceTitan ids are integers).
    parts = ["1", "2", ":", "\\", "1:2", "2:3", "\\:", ":\\", "a\\:b", "::", "12", 3]
    seen: dict[str, tuple[str, str]] = {}
    for a in parts:
        for b in parts:
            for values in ((a, b), (a, b, a)):
                key = encode_key(values)
                assert key is not None
                text = tuple(map(str, values))
                assert seen.setdefault(key, text) == text, f"{text} and {seen[key]} share {key}"


async def test_composite_keys_that_used_to_collide_are_two_records(
    redis: aioredis.Redis,
) -> None:
    a = {"technicianId": "1:2", "jobId": 3, "modifiedOn": "2024-01-01T00:00:00Z"}
    b = {"technicianId": 1, "jobId": "2:3", "modifiedOn": "2024-01-01T00:00:00Z"}
    c = {"technicianId": 4, "jobId": 5, "modifiedOn": "2024-01-01T00:00:00Z"}
    pub = Publisher(redis, "st")
    assert (await pub.apply(T, RATINGS.name, None, page([a, b, c], "C1", RATINGS))).published == 3
    # Polled again (a repeated tail): no flip between the two.
    again = await pub.apply(T, RATINGS.name, "C1", page([a, b, c], "C1", RATINGS))
    assert (again.published, again.unchanged) == (0, 3)
    assert [(op, k) for op, k, _ in await events(redis, RATINGS)] == [
        ("created", "1\\:2:3"),
        ("created", "1:2\\:3"),
        ("created", "4:5"),
    ]
    assert RATINGS.record_key(a) == "1\\:2:3"


# 6. The envelope: a page without a usable continueFrom is delivered with "" (the scheduler
# counts it as no progress) and the publisher refuses it: nothing is applied.


@pytest.mark.parametrize(
    "envelope",
    [
        {"hasMore": True, "data": [{"id": 1}]},
        {"hasMore": True, "continueFrom": None, "data": []},
        {"hasMore": False, "continueFrom": "", "data": [{"id": 1}]},
    ],
)
async def test_a_page_without_a_continue_from_is_never_applied(
    redis: aioredis.Redis, envelope: dict[str, Any]
) -> None:
    page = decode_page(json.dumps(envelope).encode(), CUSTOMERS)
    assert page.continue_from == ""
    with pytest.raises(TransientError, match="no continueFrom"):
        await Publisher(redis, "st").apply(1, CUSTOMERS.name, None, page)
    assert await redis.keys("*") == []


def test_a_page_without_progress_is_delivered_as_sent() -> None:
    p = decode_page(b'{"hasMore": true, "continueFrom": "C", "data": []}', CUSTOMERS)
    assert (p.has_more, p.continue_from, p.keys, p.dead, p.fetched) == (True, "C", [], [], 0)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"[]",
        b'{"continueFrom": "C", "data": []}',
        b'{"hasMore": true, "continueFrom": 5, "data": []}',
        b'{"hasMore": true, "continueFrom": "C", "data": {}}',
        b'{"hasMore": true, "continueFrom": "C", "data": [',
    ],
)
def test_envelopes_that_do_not_decode_are_errors(text: bytes) -> None:
    with pytest.raises(TransientError, match="invalid export page"):
        decode_page(text, CUSTOMERS)


async def test_the_page_script_runs_under_the_readme_acl_user(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    from syncd.redis import acl as redisacl
    from tests.test_redis_acl import USER, acl_url, readme_acl_line

    await redis.execute_command(*readme_acl_line())
    restricted = aioredis.Redis.from_url(acl_url(redis_server))
    try:
        await redisacl.check(restricted, "st")
        pub = Publisher(restricted, "st")
        new = {"id": 1, "modifiedOn": "2024-02-01T00:00:00Z"}
        old = {"id": 1, "v": 0, "modifiedOn": "2024-01-01T00:00:00Z"}
        # Every command of the script: a dead letter (SADD) and a stale version (HINCRBY).
        await pub.apply(T, CUSTOMERS.name, None, page([new, {"id": None}], "C1"))
        applied = await pub.apply(T, CUSTOMERS.name, "C1", page([old], "C2"))
        assert (applied.applied, applied.stale) == (True, 1)
        assert len(await dead(redis)) == 1
    finally:
        await restricted.aclose()
        await redis.execute_command("ACL", "DELUSER", USER)


@pytest.mark.parametrize(
    ("sizes", "records", "size", "bounds"),
    [
        ([], 3, 100, [0]),
        ([10, 10, 10], 3, 100, [3]),
        ([10, 10, 10, 10], 3, 100, [3, 4]),
        ([10] * 7, 3, 100, [3, 6, 7]),
        ([60, 50, 10], 5, 100, [1, 3]),  # bytes end a chunk before records do
        ([150, 10, 200, 10], 5, 100, [1, 2, 3, 4]),  # one record over the size is a chunk
        ([50, 50, 1], 5, 100, [2, 3]),  # exactly the size fits
    ],
)
def test_chunk_bounds_table(sizes: list[int], records: int, size: int, bounds: list[int]) -> None:
    assert chunk_bounds(sizes, records, size) == bounds


async def test_a_page_in_chunks_publishes_as_one_script_would(redis: aioredis.Redis) -> None:
    # The same pages applied in one script and in chunks of 3: the same events and cursor.
    pages = [
        [{"id": i % 8, "v": n, "modifiedOn": f"2024-01-01T00:00:0{n}Z"} for i in range(11)]
        for n in range(3)
    ]
    pages[1].append({"id": {"bad": 1}})  # a dead letter, written by the last chunk
    results = []
    for prefix, chunk in (("one", 1000), ("many", 3)):
        pub = Publisher(redis, prefix, precheck_min=1000, chunk_records=chunk)
        expected = None
        applied = []
        for n, records in enumerate(pages):
            applied.append(await pub.apply(T, CUSTOMERS.name, expected, page(records, f"c{n}")))
            expected = f"c{n}"
        stream = await redis.xrange(f"{prefix}:{{{T}}}:{CUSTOMERS.name}")
        results.append(
            (applied, [f for _, f in stream], await redis.hgetall(f"{prefix}:{{{T}}}:cursors"))
        )
    assert results[0] == results[1]
    assert len(results[0][1]) == 24  # 8 keys, each in three versions


async def test_a_page_cut_between_chunks_publishes_each_version_once(
    redis: aioredis.Redis,
) -> None:
    # The first chunk ran, the second never did (a crash): the cursor stays, and the page
    # applied again later publishes the rest only.
    pub = Publisher(redis, "st", precheck_min=1000, chunk_records=4)
    records = [{"id": i, "modifiedOn": "2024-01-01T00:00:00Z"} for i in range(10)]
    prepared = await pub.prepare(T, CUSTOMERS.name, None, page(records, "c1"))
    assert len(prepared) == 3
    await pub.run_chunks(prepared, range(1))
    assert [key for _, key, _ in await events(redis)] == ["0", "1", "2", "3"]
    assert await redis.hget(f"st:{{{T}}}:cursors", CUSTOMERS.name) is None
    again = await pub.apply(T, CUSTOMERS.name, None, page(records, "c1"))
    assert (again.published, again.unchanged) == (6, 4)
    assert [key for _, key, _ in await events(redis)] == [str(i) for i in range(10)]
    assert await redis.hget(f"st:{{{T}}}:cursors", CUSTOMERS.name) == b"c1"


async def test_a_chunk_fenced_out_stops_the_page(redis: aioredis.Redis) -> None:
    # Another instance moves the cursor between two chunks: the rest is not applied.
    pub = Publisher(redis, "st", precheck_min=1000, chunk_records=2)
    records = [{"id": i, "modifiedOn": "2024-01-01T00:00:00Z"} for i in range(5)]
    prepared = await pub.prepare(T, CUSTOMERS.name, None, page(records, "c1"))
    await pub.run_chunks(prepared, range(1))
    await redis.hset(f"st:{{{T}}}:cursors", CUSTOMERS.name, "other")
    result = await pub.run_chunks(prepared, range(1, len(prepared)))
    assert result == [1, b"other"]
    assert [key for _, key, _ in await events(redis)] == ["0", "1"]


async def test_a_big_page_goes_through_threads_and_pipelined_lookups(
    redis: aioredis.Redis,
) -> None:
    # Past THREAD_MIN_RECORDS the scripts' records are made ready in a worker thread, and the
    # precheck asks PRECHECK_CHUNK keys a command: the same outcome as a small page's.
    n = max(THREAD_MIN_RECORDS, 2 * PRECHECK_CHUNK) + 7
    records = [{"id": i, "modifiedOn": "2024-01-01T00:00:00Z"} for i in range(n)]
    pub = Publisher(redis, "st", precheck_min=1)
    first = await pub.apply(T, CUSTOMERS.name, None, page(records, "c1"))
    assert (first.published, first.unchanged) == (n, 0)
    records[-1]["v"] = 2
    again = await pub.apply(T, CUSTOMERS.name, "c1", page(records, "c2"))
    assert (again.published, again.unchanged) == (1, n - 1)
    assert await redis.xlen(f"st:{{{T}}}:{CUSTOMERS.name}") == n + 1


def test_a_page_past_the_heads_pass_is_read_record_by_record() -> None:
    # Past HEADS_PASS_MAX_BYTES each record's key and timestamp are read on their own: the
    # same Page as the one-pass reading, a record that is not an object dead-lettered alike.
    filler = "x" * 1000
    records: list[Any] = [
        {"id": i, "modifiedOn": "2024-01-01T00:00:00Z", "f": filler} for i in range(20)
    ]
    records.insert(3, [1, 2])
    small = decode_page(body(records), CUSTOMERS)
    size = HEADS_PASS_MAX_BYTES // 1000 + 1
    big_records = records + [{"id": 100 + i, "f": filler} for i in range(size)]
    big = decode_page(body(big_records), CUSTOMERS)
    assert len(body(big_records)) > HEADS_PASS_MAX_BYTES
    assert big.keys[:20] == small.keys
    assert big.dead == small.dead == [("record is not a JSON object", b"[1, 2]")]
    assert big.instants[:20] == small.instants
