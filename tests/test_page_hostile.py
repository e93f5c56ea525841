"""The page decoder's fast paths on hostile input: `instant_columns` against the general path
`_instant_columns` on timestamps spelt every way msgspec or the general path might accept,
and `decode_page` (columns at a time, fast timestamps) against the same with the one-by-one
path and the general timestamp path forced, on hostile pages of single- and multi-key feeds,
feeds without a timestamp and with `createdOn`."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from syncd import catalogue
from syncd.errors import TransientError
from syncd.servicetitan import page as page_mod
from syncd.servicetitan.page import Page, decode_page, instant_columns

# --- Timestamps ------------------------------------------------------------------------------


def outcome(f: Callable[[list[str]], Any], values: list[str]) -> Any:
    """What `f` gives, or the type of what it raises (both paths must agree on either)."""
    try:
        return f(values)
    except Exception as exc:
        return type(exc)


DIGITS = "0123456789"


@st.composite
def spelt(draw: st.DrawFn) -> str:
    """Timestamps near and beyond RFC 3339: every part may be out of range, separators and
    zones of every kind, 0 to 12 fractional digits, and a character swapped for an odd one."""
    year = draw(st.sampled_from(["0000", "0001", "0999", "1000", "1969", "2024", "9999"]))
    month = draw(st.sampled_from(["00", "01", "02", "12", "13"]))
    day = draw(st.sampled_from(["00", "01", "28", "29", "30", "31", "32"]))
    hour = draw(st.sampled_from(["00", "12", "23", "24"]))
    minute = draw(st.sampled_from(["00", "59", "60"]))
    second = draw(st.sampled_from(["00", "59", "60", "61", ""]))
    sep = draw(st.sampled_from(["T", "T", "T", "t", " ", "_"]))
    n = draw(st.integers(0, 12))
    frac = "".join(draw(st.lists(st.sampled_from(DIGITS), min_size=n, max_size=n)))
    dot = draw(st.sampled_from([".", ".", ".", ","]))
    zone = draw(
        st.sampled_from(
            ["Z", "Z", "Z", "z", "", "+00:00", "-00:00", "+0000", "+01:30", "-23:59", "+24:00"]
        )
    )
    text = f"{year}-{month}-{day}{sep}{hour}:{minute}" + (f":{second}" if second else "")
    if n or draw(st.integers(0, 10)) == 0:
        text += dot + frac
    text += zone
    if text and draw(st.integers(0, 6)) == 0:  # one character swapped for an odd one
        i = draw(st.integers(0, len(text) - 1))
        odd = draw(
            st.sampled_from(
                ["\u0665", "\uff15", "\U0001d7d3", "x", " ", "Z", ".", "+", "-", "", "00"]
            )
        )
        text = text[:i] + odd + text[i + 1 :]
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(spelt(), max_size=6))
@example(["2024-01-01T00:00:00.1234565Z", "2024-01-01T00:00:00.5Z", "2024-01-01T00:00:00Z"])
@example(["9999-12-31T23:59:59.9999995Z", "9999-12-31T23:59:59.999999Z"])
@example(["0001-01-01T00:00:00.0000004Z", "0001-01-01T00:00:00.1Z"])
@example(["2024-01-01T00:00:00.000000Z", "2024-01-01T00:00:00.0Z"])
@example(["2024-01-01T00:00:00.123456789Z", "2024-01-01T00:00:00.12345678Z"])
@example(["2024-01-01t00:00:00.5Z", "2024-01-01 00:00:00.5Z", "2024-01-01T00:00:00.5z"])
def test_instant_columns_agree_with_the_general_path(values: list[str]) -> None:
    assert outcome(instant_columns, values) == outcome(page_mod._instant_columns, values)


def test_instant_columns_agree_with_the_general_path_for_every_fraction_length() -> None:
    """Every fraction length 0 to 9 with digits that round up, down and trail zeros."""
    for head in ["0001-01-01T00:00:00", "2024-02-29T23:59:59", "9999-12-31T23:59:59"]:
        for frac in ["", "0", "5", "9", "10", "99", "999999", "9999994", "9999995", "99999999"]:
            for z in ["Z", "z", "+00:00", ""]:
                v = f"{head}.{frac}{z}" if frac else head + z
                values = [v, "2024-01-01T00:00:00.5Z"]
                assert instant_columns(values) == page_mod._instant_columns(values), v


# --- Pages -----------------------------------------------------------------------------------

FEEDS = [
    catalogue.feed("crm.customers"),  # id, modifiedOn
    catalogue.feed("customer-interactions.technician-ratings"),  # technicianId + jobId
    catalogue.feed("jpm.job-history"),  # jobId, no timestamp
    catalogue.feed("jpm.job-canceled-logs"),  # id, createdOn
    catalogue.feed("payroll.payroll-settings"),  # employeeId
]

# JSON texts of key values (each a token as sent): usable and not.
KEY_TEXTS = [
    "1", "2", "-0", "7", "18446744073709551616", "-9223372036854775809",
    "123456789012345678901234567890", "1.0", "1e2", "1e400", "true", "false", "null",
    '""', '"1"', '"a:b"', '"a\\\\b"', '"a\\\\:b"', '"\\u00e9"', '" "', '"1:2"', '{"id": 1}',
    "[1]", "[]", "{}",
]  # fmt: skip
STAMP_TEXTS = st.one_of(
    spelt().map(json.dumps),
    st.sampled_from(["null", "17", "1.5", "true", '{"at": 1}', '["2024-01-01T00:00:00Z"]']),
)
LONE = '"\\ud83d"'  # an unpaired surrogate escape: the lenient path


@st.composite
def record_text(draw: st.DrawFn, feed: catalogue.Feed, pool: list[str]) -> str:
    """One record as JSON text: its key fields (from a small pool: duplicates), maybe its
    timestamp, other fields; sometimes not an object, sometimes with an unpaired surrogate."""
    if draw(st.integers(0, 25)) == 0:
        return draw(st.sampled_from(["7", '"text"', "null", "[1]", "true", LONE]))
    fields: list[tuple[str, str]] = []
    for name in feed.key_fields:
        if draw(st.integers(0, 30)):  # sometimes left out
            fields.append((name, draw(st.sampled_from(pool))))
    ts = feed.timestamp_field or "modifiedOn"
    if draw(st.integers(0, 10)):
        fields.append((ts, draw(STAMP_TEXTS)))
    if draw(st.booleans()):
        fields.append(("name", draw(st.sampled_from(['"x"', '"y"', LONE, '"\\u00e9"', "1"]))))
    if draw(st.integers(0, 20)) == 0 and fields:  # a field twice: the last one counts
        fields.append(draw(st.sampled_from(fields)))
    draw(st.randoms()).shuffle(fields)
    sep = draw(st.sampled_from([", ", ",", " ,\n "]))
    return "{" + sep.join(f'"{k}": {v}' for k, v in fields) + "}"


@st.composite
def page_body(draw: st.DrawFn, feed: catalogue.Feed) -> bytes:
    pool = draw(st.lists(st.sampled_from(KEY_TEXTS), min_size=1, max_size=5, unique=True))
    recs = draw(st.lists(record_text(feed, pool), max_size=14))
    more = draw(st.booleans())
    cf = draw(st.sampled_from(['"c1"', "null", '""']))
    head = f'{{"hasMore": {json.dumps(more)}, "continueFrom": {cf}, "data": ['
    return (head + ", ".join(recs) + "]}").encode()


@contextlib.contextmanager
def general_paths() -> Iterator[None]:
    """decode_page with the one-by-one path and the general timestamp path only."""
    columns, fast = page_mod._columns, page_mod.instant_columns
    page_mod._columns = lambda *a: None
    page_mod.instant_columns = page_mod._instant_columns
    try:
        yield
    finally:
        page_mod._columns, page_mod.instant_columns = columns, fast


def decoded(body: bytes, feed: catalogue.Feed, decode: Callable[..., Page] = decode_page) -> Any:
    try:
        return decode(body, feed)
    except (TransientError, ValueError) as exc:
        return type(exc)


def as_tuple(p: Any) -> Any:
    if not isinstance(p, tuple) and hasattr(p, "keys") and hasattr(p, "dead"):
        return (
            p.has_more, p.continue_from, p.keys, p.fingerprints, p.modified, p.data, p.dead,
            p.fetch_s, p.instants, p.superseded, p.modified_at,
        )  # fmt: skip
    return p


@pytest.mark.parametrize("feed", FEEDS, ids=lambda f: f.name)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_page_decodes_as_it_does_one_record_at_a_time(
    feed: catalogue.Feed, data: st.DataObject
) -> None:
    body = data.draw(page_body(feed))
    fast = decoded(body, feed)
    with general_paths():
        slow = decoded(body, feed)
    assert as_tuple(fast) == as_tuple(slow)


def test_pages_of_hostile_keys_decode_as_one_at_a_time() -> None:
    """Targeted pages: every record keyed (the columns' path), duplicates of a composite key
    whose parts hold `:` and `\\`, keys beyond 64 bits, timestamps not strings."""
    ratings = catalogue.feed("customer-interactions.technician-ratings")
    customers = catalogue.feed("crm.customers")
    bodies = [
        (ratings, b'{"hasMore": false, "continueFrom": "c", "data": ['
         b'{"technicianId": "1:2", "jobId": 3, "modifiedOn": "2024-01-01T00:00:00.5Z"},'
         b'{"technicianId": 1, "jobId": "2:3", "modifiedOn": "2024-01-01T00:00:00.4Z"},'
         b'{"technicianId": "1:2", "jobId": 3, "modifiedOn": "2024-01-01T00:00:00.49Z"},'
         b'{"technicianId": "a\\\\", "jobId": ":b", "modifiedOn": 5},'
         b'{"technicianId": "a", "jobId": "\\\\:b", "modifiedOn": "2024-01-01T00:00:00Z"}]}'),
        (customers, b'{"hasMore": true, "continueFrom": "c", "data": ['
         b'{"id": 18446744073709551616, "modifiedOn": "2024-01-01T00:00:00.1234567Z"},'
         b'{"id": "18446744073709551616", "modifiedOn": "2024-01-01T00:00:00.1234568Z"},'
         b'{"id": -0, "modifiedOn": null}, {"id": "0", "modifiedOn": "2024-01-01"}]}'),
        (customers, b'{"hasMore": true, "continueFrom": "c", "data": ['
         b'{"id": 1, "modifiedOn": "2024-01-01T00:00:00.5+00:00"},'
         b'{"id": 1, "modifiedOn": "2024-01-01T00:00:00.5Z"},'
         b'{"id": 1, "modifiedOn": "2024-01-01T00:00:00.50Z"}]}'),
    ]  # fmt: skip
    for feed, body in bodies:
        fast = decode_page(body, feed)
        with general_paths():
            slow = decode_page(body, feed)
        assert fast == slow
