"""The page decoder's fast paths give what the general ones give: timestamps a page at a time
(`instant_columns`) against one at a time, and records a column at a time (`_columns`)
against one by one."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.catalogue import feeds
from syncd.instants import packed_instant, sortable_instant, utc_instant
from syncd.servicetitan import page as page_mod
from syncd.servicetitan.page import decode_page, instant_columns

MOMENTS = st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30))


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """ServiceTitan's form (UTC, `Z`, 0 to 7 fractional digits, zeros trimmed) and others:
    more digits, offsets, no zone, a lowercase `z`, a space, garbage."""
    when = draw(MOMENTS)
    head = when.strftime("%Y-%m-%dT%H:%M:%S")
    digits = draw(st.integers(0, 9))
    frac = "".join(draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits)))
    if draw(st.booleans()):
        frac = frac.rstrip("0")
    text = head + ("." + frac if frac else "")
    zone = draw(st.sampled_from(["Z", "Z", "Z", "z", "", "+00:00", "-05:30", "+14:00"]))
    text += zone
    if draw(st.integers(0, 20)) == 0:
        text = text.replace("T", " ")
    if draw(st.integers(0, 30)) == 0:
        text = draw(st.sampled_from(["", "garbage", "2024-02-30T00:00:00Z", "2024-01-01"]))
    return text


@settings(max_examples=300)
@given(st.lists(timestamps(), max_size=20))
def test_instant_columns_read_every_timestamp_as_the_general_path_does(values: list[str]) -> None:
    assert instant_columns(values) == page_mod._instant_columns(values)


def test_trimmed_fractions_keep_every_digit() -> None:
    values = ["2024-05-01T12:00:02Z", "2024-05-01T12:00:02.4Z", "2024-05-01T12:00:02.123456Z"]
    packed, ats = instant_columns(values)
    assert ats == [
        b"2024-05-01T12:00:02.0000000Z",
        b"2024-05-01T12:00:02.4000000Z",
        b"2024-05-01T12:00:02.1234560Z",
    ]
    assert packed == [packed_instant(sortable_instant(v)) for v in values]
    assert packed[0] < packed[2] < packed[1]


RECORD_KEYS = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=6),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
)


@settings(max_examples=200)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": RECORD_KEYS, "modifiedOn": st.one_of(timestamps(), st.integers(), st.none())},
            optional={"name": st.text(max_size=5)},
        ),
        max_size=12,
    )
)
def test_records_a_column_at_a_time_read_as_one_by_one(records: list[dict[str, object]]) -> None:
    feed = feeds()["crm.customers"]
    body = json.dumps({"hasMore": False, "continueFrom": "c", "data": records}).encode()
    page = decode_page(body, feed)
    one, many = page_mod._decoders(feed)
    raws = [json.dumps(r).encode() for r in records]
    heads = many.decode(body).data
    keys, fps, mods, datas, dead, odd = page_mod._one_by_one(
        raws, heads, one, False, feed.key_fields, feed.timestamp_field
    )
    columns = page_mod._columns(heads, raws, feed.key_fields, feed.timestamp_field)
    if columns is None:
        assert dead, "the columns give up only on a record without a key"
    else:
        assert (keys, fps, mods, odd) == columns
        assert datas == raws
        assert not dead
    # Whichever path it took, the page holds each record with a key once, newest version wins.
    assert len(page.keys) + len(page.dead) + page.superseded == len(records)
    assert set(page.keys) == set(keys)


# Digits of other scripts spell no instant: read as one, a fullwidth year failed the page for
# good, and a fullwidth hour or fraction went into the event's `modified_at`.
ODD = [
    "\uff12\uff10\uff12\uff14-01-01T00:00:00Z",  # fullwidth year
    "2024-01-01T\uff11\uff12:00:00Z",  # fullwidth hour
    "2024-01-01T00:00:00.\u0665Z",  # Arabic-Indic fraction digit
]


@pytest.mark.parametrize("stamp", ODD)
def test_a_timestamp_of_non_ascii_digits_is_no_timestamp(stamp: str) -> None:
    body = json.dumps(
        {"hasMore": False, "continueFrom": "c", "data": [{"id": 1, "modifiedOn": stamp}]}
    ).encode()
    page = decode_page(body, feeds()["crm.customers"])
    assert page.keys == ["1"]
    assert page.instants == [b""]
    assert utc_instant(stamp) == ""


@settings(max_examples=200)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": st.integers(0, 30), "modifiedOn": st.one_of(timestamps(), st.integers())}
        ),
        max_size=12,
    ),
    st.data(),
)
def test_the_stamps_of_some_records_are_those_of_the_whole_page(
    records: list[dict[str, object]], data: st.DataObject
) -> None:
    """A re-export reads the timestamps of its changed records only (`stamps_of`): what it
    reads is what reading the whole page gives, duplicate keys and odd timestamps included."""
    feed = feeds()["crm.customers"]
    body = json.dumps({"hasMore": False, "continueFrom": "c", "data": records}).encode()
    some = decode_page(body, feed)
    indexes = data.draw(st.lists(st.integers(0, max(len(some.keys) - 1, 0)), max_size=6))
    indexes = [i for i in indexes if i < len(some.keys)]
    partial = some.stamps_of(indexes)
    whole = decode_page(body, feed)
    instants, ats = whole.instants, whole.modified_at
    assert partial == ([instants[i] for i in indexes], [ats[i] for i in indexes])
    assert whole.stamps_of(indexes) == partial
    assert (some.instants, some.modified_at) == (instants, ats)
