"""`modified_at`: every event's instant as fixed-width UTC text, which consumers compare as text.

`modified_on` stays as ServiceTitan sent it, and its text does not order instants (fractions of
different lengths, offsets). `modified_at` does; `is_newer_or_same`, the README's SQL rule and
the daemon agree on it."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import random
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import catalogue
from syncd.consumer import Consumer, Event, is_newer_or_same
from syncd.daemon import Daemon
from syncd.engine.publisher import PRECHECK_MIN, Publisher
from syncd.instants import FRACTION_DIGITS, fixed_width, sortable_instant, utc_instant
from syncd.keys import Keys
from syncd.servicetitan.page import decode_page
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, stream_events
from tests.engine_helpers import settings as make_settings

ROOT = Path(__file__).resolve().parent.parent
CUSTOMERS = catalogue.feed("crm.customers")
HISTORY = catalogue.feed("jpm.job-history")  # no timestamp at all
T = 5151
FIXED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z")


@pytest.mark.parametrize(
    ("sent", "modified_at"),
    [
        ("2024-05-01T12:00:02.4Z", "2024-05-01T12:00:02.4000000Z"),
        ("2024-05-01T12:00:02.45Z", "2024-05-01T12:00:02.4500000Z"),
        ("2024-05-01T12:00:02.1234567Z", "2024-05-01T12:00:02.1234567Z"),  # ServiceTitan's
        ("2024-05-01T12:00:02.123456789Z", "2024-05-01T12:00:02.1234567Z"),  # cut to 100 ns
        ("2024-05-01T12:00:02.500Z", "2024-05-01T12:00:02.5000000Z"),
        ("2024-05-01T12:00:02Z", "2024-05-01T12:00:02.0000000Z"),
        ("2024-05-01T12:00:02z", "2024-05-01T12:00:02.0000000Z"),
        ("2024-05-01T12:00:02.45+00:00", "2024-05-01T12:00:02.4500000Z"),
        ("2024-05-01T14:00:02.45+02:00", "2024-05-01T12:00:02.4500000Z"),
        ("2024-05-01T07:30:02.45-04:30", "2024-05-01T12:00:02.4500000Z"),
        ("2024-05-01T14:00:02+0200", "2024-05-01T12:00:02.0000000Z"),
        ("2024-01-01T01:00:00+02:00", "2023-12-31T23:00:00.0000000Z"),  # the day (year) before
        ("2024-05-01T12:00:02", "2024-05-01T12:00:02.0000000Z"),  # no zone: UTC
        ("2024-05-01 12:00:02.45", "2024-05-01T12:00:02.4500000Z"),
        ("2024-05-01T12:00Z", "2024-05-01T12:00:00.0000000Z"),
        ("2024-05-01", "2024-05-01T00:00:00.0000000Z"),
        ("2024-05-01T24:00:00Z", "2024-05-02T00:00:00.0000000Z"),  # the next day's start
        ("2024-05-01T12:00:02.4500000Z", "2024-05-01T12:00:02.4500000Z"),  # already fixed
        ("", ""),
        ("yesterday", ""),
        ("2024-02-30T12:00:00Z", ""),
        (None, ""),
        (1714564802450, ""),  # a number: no timestamp
    ],
)
def test_modified_at_of(sent: Any, modified_at: str) -> None:
    assert utc_instant(sent) == modified_at
    assert fixed_width(sortable_instant(sent)) == modified_at
    if modified_at:
        assert FIXED.fullmatch(modified_at)
        assert len(modified_at) == 20 + FRACTION_DIGITS + 1


@pytest.mark.parametrize(
    ("incoming", "stored", "apply"),
    [
        # Fractions of different lengths: as text, ".4Z" sorts after ".45Z".
        ("2024-05-01T12:00:02.45Z", "2024-05-01T12:00:02.4Z", True),
        ("2024-05-01T12:00:02.4Z", "2024-05-01T12:00:02.45Z", False),
        ("2024-05-01T12:00:02.40Z", "2024-05-01T12:00:02.4Z", True),  # the same instant
        ("2024-05-01T12:00:02Z", "2024-05-01T12:00:02.0000001Z", False),
        # Offsets: as text, "14:00+02:00" sorts after "12:30Z" though it is 12:00Z.
        ("2024-05-01T14:00:00+02:00", "2024-05-01T12:30:00Z", False),
        ("2024-05-01T08:00:00-05:00", "2024-05-01T12:30:00Z", True),  # 13:00Z
        ("2024-05-01T12:30:00Z", "2024-05-01T08:00:00-05:00", False),
        ("2024-05-01T14:30:00+02:00", "2024-05-01T12:30:00Z", True),  # the same instant
        ("2024-05-01T00:30:00+01:00", "2024-04-30T23:45:00Z", False),  # across midnight
        # modified_at values, and a mix.
        ("2024-05-01T12:00:02.4500000Z", "2024-05-01T12:00:02.4000000Z", True),
        ("2024-05-01T12:00:02.4000000Z", "2024-05-01T12:00:02.4500000Z", False),
        ("2024-05-01T12:00:02.4500000Z", "2024-05-01T14:00:02.45+02:00", True),
        ("2024-05-01T12:00:02.4000000Z", "2024-05-01T14:00:02.45+02:00", False),
        # Nothing comparable stored, or an event without a timestamp: applied.
        ("2024-05-01T12:00:00Z", None, True),
        ("2024-05-01T12:00:00Z", "", True),
        ("2024-05-01T12:00:00Z", "not a date", True),
        (None, "2024-05-01T12:00:00Z", True),
        ("", "2024-05-01T12:00:00Z", True),
        ("not a date", "2024-05-01T12:00:00Z", True),
    ],
)
def test_newer_or_same_reads_instants(
    incoming: str | None, stored: str | None, apply: bool
) -> None:
    assert is_newer_or_same(incoming, stored) is apply
    # The same decision from the events' `modified_at`, compared as text.
    new, old = utc_instant(incoming), utc_instant(stored)
    assert (not new or not old or new >= old) is apply


EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
TICKS_PER_S = 10**FRACTION_DIGITS


def render(ticks: int, offset_min: int, digits: int, zulu: bool) -> str:
    """The instant `ticks` (100 ns since 1970) as ISO 8601 text at an offset, with a fraction of
    `digits` digits (at least as many as it needs) and `Z` or `+00:00` at offset 0."""
    seconds, fraction = divmod(ticks, TICKS_PER_S)
    local = EPOCH + dt.timedelta(seconds=seconds, minutes=offset_min)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{fraction:07d}".rstrip("0")
    frac = frac.ljust(max(digits, len(frac)), "0")
    if frac:
        text += "." + frac
    if offset_min == 0 and zulu:
        return text + "Z"
    sign = "+" if offset_min >= 0 else "-"
    hours, minutes = divmod(abs(offset_min), 60)
    return f"{text}{sign}{hours:02d}:{minutes:02d}"


STAMPS = st.tuples(
    st.integers(0, 4_000_000_000 * TICKS_PER_S),  # 1970 to 2096, to 100 ns
    st.integers(-14 * 60, 14 * 60),
    st.integers(0, 9),
    st.booleans(),
)


@settings(max_examples=300, deadline=None, database=None, derandomize=True)
@given(STAMPS, STAMPS)
def test_modified_at_orders_as_text_like_the_instants(a: Any, b: Any) -> None:
    text_a, text_b = render(*a), render(*b)
    at_a, at_b = utc_instant(text_a), utc_instant(text_b)
    seconds, fraction = divmod(a[0], TICKS_PER_S)
    utc = (EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    assert at_a == f"{utc}.{fraction:07d}Z"
    assert (at_a <= at_b) == (a[0] <= b[0])
    assert is_newer_or_same(text_a, text_b) == (a[0] >= b[0])
    assert is_newer_or_same(at_a, text_b) == (a[0] >= b[0])


def readme_sql() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Consuming events") :]
    (sql,) = re.findall(r"```sql\n(.*?)```", section, re.S)[:1]
    return sql


# Versions of one key as pages bring them: timestamps that tie, go missing, and come back.
VERSIONS = [
    [{"id": 7, "v": 1, "modifiedOn": "2024-05-01T12:00:02.4Z"}],
    [{"id": 7, "v": 2, "modifiedOn": "2024-05-01T14:00:02.4+02:00"}],  # the same instant
    [{"id": 7, "v": 3, "modifiedOn": None}],  # none: keeps the key's
    [{"id": 7, "v": 4, "modifiedOn": "soon"}],  # unreadable: none
    [{"id": 7, "v": 5, "modifiedOn": "2024-05-01T12:00:02.45Z"}],
    [{"id": 7, "v": 6}],
    [{"id": 7, "v": 7, "modifiedOn": "2024-05-01T12:00:02.45Z"}],  # ties again
]
HISTORY_VERSIONS = [[{"jobId": 7, "v": v, "history": [v]}] for v in range(1, 6)]


@pytest.mark.parametrize(
    ("feed", "pages"), [(CUSTOMERS, VERSIONS), (HISTORY, HISTORY_VERSIONS)], ids=["ts", "none"]
)
async def test_redelivered_events_never_bring_an_older_version_back(
    redis: aioredis.Redis, feed: catalogue.Feed, pages: list[list[dict[str, Any]]]
) -> None:
    # Whatever order at-least-once delivery hands a key's events over in (each at least once,
    # some again), `Event.version` and the README's SQL both end on the last one published:
    # versions that share a timestamp, and records without one, included.
    pub = Publisher(redis, "st")
    cursor = None
    for n, records in enumerate(pages):
        page = decode_page(body(records, f"C{n}"), feed)
        assert (await pub.apply(T, feed.name, cursor, page)).published == 1
        cursor = f"C{n}"
    consumer = Consumer(redis, "g", "c", streams=Keys("st", T).stream(feed.name), batch=100)
    events = await consumer.read()
    assert [e.json()["v"] for e in events] == list(range(1, len(pages) + 1))
    assert [e.version for e in events] == sorted(e.version for e in events)

    sql = readme_sql()
    rng = random.Random(11)
    orders = [list(range(len(events))), list(reversed(range(len(events))))]
    for _ in range(200):
        order = [*range(len(events)), *rng.choices(range(len(events)), k=rng.randrange(4))]
        rng.shuffle(order)
        orders.append(order)
    # SQLite compares text bytewise, as PostgreSQL's "C" collation does.
    create, insert = sql.replace('COLLATE "C"', "COLLATE BINARY").split(";")[:2]
    with contextlib.closing(sqlite3.connect(":memory:")) as db:
        db.execute(create)
        for order in orders:
            db.execute("DELETE FROM customers")
            stored: tuple[tuple[str, int, int], int] | None = None
            for i in order:
                event = events[i]
                if stored is None or event.version >= stored[0]:
                    stored = (event.version, event.json()["v"])
                before = db.total_changes
                values = (event.key, *event.version, event.data.decode())
                db.execute(insert, {str(n): v for n, v in enumerate(values, 1)})
                assert (db.total_changes > before) is (stored[1] == event.json()["v"]), order
            (data,) = db.execute("SELECT data FROM customers").fetchone()
            assert stored is not None
            assert json.loads(data)["v"] == stored[1] == len(pages), order


# -- the daemon writes it --------------------------------------------------------------


def body(records: list[Any], cursor: str) -> bytes:
    return json.dumps({"hasMore": False, "continueFrom": cursor, "data": records}).encode()


STAMPED = [
    {"id": 1, "modifiedOn": "2024-05-01T12:00:02.4Z"},
    {"id": 2, "modifiedOn": "2024-05-01T12:00:02.45Z"},
    {"id": 3, "modifiedOn": "2024-05-01T14:00:02.1234567+02:00"},
    {"id": 4, "modifiedOn": "2024-05-01T12:00:02.123456789Z"},
    {"id": 5, "modifiedOn": "2024-05-01T12:00:02"},
    {"id": 6, "modifiedOn": None},
    {"id": 7, "modifiedOn": 1714564802},
    {"id": 8, "modifiedOn": "soon"},
    {"id": 9},
]


@pytest.mark.parametrize(
    ("detect", "filler"), [(True, 0), (True, PRECHECK_MIN), (False, 0)], ids=str
)
async def test_every_published_event_carries_modified_at(
    redis: aioredis.Redis, detect: bool, filler: int
) -> None:
    others = [{"id": 100 + i, "modifiedOn": "2023-01-01T00:00:00Z"} for i in range(filler)]
    pub = Publisher(redis, "st")
    page = decode_page(body([*others, *STAMPED], "C1"), CUSTOMERS)
    applied = await pub.apply(T, CUSTOMERS.name, None, page, change_detection=detect)
    assert applied.published == len(STAMPED) + filler

    events = await stream_events(redis, T, CUSTOMERS.name)
    by_key = {e["key"].decode(): e for e in events}
    for record in STAMPED:
        fields = by_key[str(record["id"])]
        sent = record.get("modifiedOn")
        assert fields["modified_on"] == (sent.encode() if isinstance(sent, str) else b"")
        assert fields["modified_at"].decode() == utc_instant(sent)
    assert by_key["3"]["modified_at"] == b"2024-05-01T12:00:02.1234567Z"
    assert by_key["9"]["modified_at"] == b""
    assert all("modified_at" in e for e in events)

    # ...and the consumer hands it over.
    consumer = Consumer(redis, "g", "c", streams=Keys("st", T).stream(CUSTOMERS.name), batch=100)
    read = {e.key: e for e in await consumer.read()}
    assert read["2"].modified_at == "2024-05-01T12:00:02.4500000Z"
    assert read["2"].modified_on == "2024-05-01T12:00:02.45Z"
    assert read["9"].modified_at is None
    assert is_newer_or_same(read["2"].modified_at, read["1"].modified_at)
    assert not is_newer_or_same(read["1"].modified_at, read["2"].modified_at)


async def test_a_version_without_a_timestamp_carries_its_keys_instant(
    redis: aioredis.Redis,
) -> None:
    # A later version without a timestamp keeps the key's instant, in the index and in its
    # event: a key's events never go back in (modified_at, entry id) order.
    pub = Publisher(redis, "st")
    first = [{"id": 1, "v": 1, "modifiedOn": "2024-05-01T12:00:02Z"}]
    later = [{"id": 1, "v": 2, "modifiedOn": None}]
    await pub.apply(T, CUSTOMERS.name, None, decode_page(body(first, "C1"), CUSTOMERS))
    await pub.apply(T, CUSTOMERS.name, "C1", decode_page(body(later, "C2"), CUSTOMERS))
    events = await stream_events(redis, T, CUSTOMERS.name)
    assert [(e["op"], e["modified_at"]) for e in events] == [
        (b"created", b"2024-05-01T12:00:02.0000000Z"),
        (b"updated", b"2024-05-01T12:00:02.0000000Z"),
    ]
    assert events[1]["modified_on"] == b""


async def test_a_feed_without_timestamps_has_it_empty(redis: aioredis.Redis) -> None:
    pub = Publisher(redis, "st")
    records = [{"jobId": 1, "history": []}]
    await pub.apply(T, HISTORY.name, None, decode_page(body(records, "C1"), HISTORY))
    (event,) = await stream_events(redis, T, HISTORY.name)
    assert (event["modified_on"], event["modified_at"]) == (b"", b"")


def test_an_event_published_before_the_field_existed_gets_it_computed() -> None:
    stream = Keys("st", T).stream(CUSTOMERS.name)
    fields = {
        "op": b"updated",
        "key": b"1",
        "data": b"{}",
        "modified_on": b"2024-05-01T14:00+02:00",
    }
    old = Event.from_entry(stream, "1-0", fields, tenant=T, feed=CUSTOMERS.name, deliveries=1)
    assert old.modified_at == "2024-05-01T12:00:00.0000000Z"
    new = Event.from_entry(
        stream,
        "1-1",
        {**fields, "modified_at": b""},
        tenant=T,
        feed=CUSTOMERS.name,
        deliveries=1,
    )
    assert new.modified_at is None  # the daemon said: no timestamp


async def test_a_daemon_publishes_modified_at_for_every_event(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    tenant, feed = 5252, "crm.customers"
    async with run_simulator(tenants=[tenant], records=40, page_size=15, seed=3) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [feed])
        assert await Daemon(make_settings(data), once=True).run() == 0
    events = await stream_events(redis, tenant, feed)
    assert len(events) >= 40
    for event in events:
        modified_at = event["modified_at"].decode()
        assert modified_at == utc_instant(event["modified_on"].decode())
        assert FIXED.fullmatch(modified_at)
