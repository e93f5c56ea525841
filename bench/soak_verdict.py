"""The soak's judgement: the events of each stream and the consumers' table against the
simulator's ground truth. Pure functions on plain data, tested in tests/test_soak_verdict.py.

A version of a record is its content: two events carry the same version when their `data`
decodes to equal JSON. For every (tenant, feed):

- lost: a live key whose current version (the truth) was never published;
- not_last: a live key whose current version was published, but a different version after it
  (a consumer applying the stream in order would end with the wrong one);
- duplicated: an event repeating a (key, version) published before;
- back_in_time: an event whose `modified_on` is older than one published before it for the
  same key (compared as instants; events without a readable timestamp are not ordered);
- unknown: keys with events that are neither live nor deleted in the truth;
- deletions_unpublished: deleted keys that had events, the last of which is not `op=deleted`.

The table (what the consumers wrote, one row per key): table_missing (a live key without a row,
or marked deleted), table_stale (a row whose data is not the current version), table_deleted
(a deleted key whose row is still there and not marked deleted), table_extra (rows of keys the
truth does not know).
"""

from __future__ import annotations

import calendar
import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

DELETED = "deleted"

# Every count that must be zero for the soak to pass.
STREAM_COUNTS = (
    "lost",
    "not_last",
    "duplicated",
    "back_in_time",
    "unknown",
    "deletions_unpublished",
)
TABLE_COUNTS = ("table_missing", "table_stale", "table_deleted", "table_extra")
EXAMPLES = 5  # keys kept per count, to show what went wrong


@dataclass(frozen=True)
class StreamEvent:
    """One stream entry, as far as the verdict cares."""

    id: str
    op: str
    key: str
    modified_on: str
    data: bytes


@dataclass(frozen=True)
class Row:
    """The consumers' row for one key."""

    data: bytes
    deleted: bool = False


@dataclass
class Verdict:
    """Counts (and a few example keys each) over any number of feeds."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)
    events: int = 0
    live_keys: int = 0
    deleted_keys: int = 0
    rows: int = 0

    def add(self, name: str, where: str, key: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n
        shown = self.examples.setdefault(name, [])
        if len(shown) < EXAMPLES:
            shown.append(f"{where} {key}")

    def merge(self, other: Verdict) -> None:
        for name, n in other.counts.items():
            self.counts[name] = self.counts.get(name, 0) + n
        for name, keys in other.examples.items():
            shown = self.examples.setdefault(name, [])
            shown.extend(keys[: EXAMPLES - len(shown)])
        self.events += other.events
        self.live_keys += other.live_keys
        self.deleted_keys += other.deleted_keys
        self.rows += other.rows

    def count(self, name: str) -> int:
        return self.counts.get(name, 0)

    @property
    def ok(self) -> bool:
        return not any(self.count(n) for n in (*STREAM_COUNTS, *TABLE_COUNTS))

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "events": self.events,
            "live_keys": self.live_keys,
            "deleted_keys": self.deleted_keys,
            "rows": self.rows,
            **{n: self.count(n) for n in (*STREAM_COUNTS, *TABLE_COUNTS)},
            "examples": {n: k for n, k in self.examples.items() if k},
        }


def canonical(data: bytes | str | Any) -> str:
    """A version's identity: its JSON decoded and written again with sorted keys (bytes or
    text are decoded first; anything else is taken as already decoded)."""
    value = json.loads(data) if isinstance(data, bytes | str) else data
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"(?:[Zz]|([+-])(\d{2}):?(\d{2}))?"
)


def instant(text: str | None) -> tuple[int, str] | None:
    """An ISO-8601 timestamp as (Unix seconds, fraction digits without trailing zeros), which
    sorts like the instant; no zone means UTC, `T24:00` is the next day's start. None for
    anything else (empty, a number, garbage): no timestamp."""
    m = _ISO.fullmatch(text or "")
    if m is None:
        return None
    year, month, day, hour, minute, second, frac, sign, off_h, off_m = m.groups()
    try:
        date = dt.date(int(year), int(month), int(day))  # no 30 February
    except ValueError:
        return None
    days = calendar.timegm(date.timetuple())
    h, mi, s = int(hour or 0), int(minute or 0), int(second or 0)
    if h > 24 or mi > 59 or s > 60 or (h == 24 and (mi or s or (frac or "").strip("0"))):
        return None
    seconds = days + h * 3600 + mi * 60 + s
    if sign is not None:
        offset = int(off_h) * 3600 + int(off_m) * 60
        seconds += -offset if sign == "+" else offset
    return seconds, (frac or "").rstrip("0")


def judge_stream(
    events: Sequence[StreamEvent],
    live: Mapping[str, Any],
    deleted: Iterable[str],
    *,
    where: str = "",
) -> Verdict:
    """The stream counts of one feed: `events` in stream order, `live` the truth (key -> record
    or its JSON), `deleted` the keys the truth deleted."""
    v = Verdict(events=len(events), live_keys=len(live))
    gone = set(deleted)
    v.deleted_keys = len(gone)
    truth = {k: canonical(r) for k, r in live.items()}
    seen: set[tuple[str, str]] = set()
    newest: dict[str, tuple[int, str]] = {}
    last: dict[str, str] = {}  # key -> version of its last event
    published: dict[str, set[str]] = {}
    for e in events:
        version = DELETED if e.op == DELETED else canonical(e.data)
        if (e.key, version) in seen:
            v.add("duplicated", where, f"{e.key} ({e.id})")
        seen.add((e.key, version))
        when = instant(e.modified_on)
        if when is not None:
            if e.key in newest and when < newest[e.key]:
                v.add("back_in_time", where, f"{e.key} ({e.id}: {e.modified_on})")
            else:
                newest[e.key] = when
        last[e.key] = version
        published.setdefault(e.key, set()).add(version)
    for key, version in truth.items():
        if version not in published.get(key, ()):
            v.add("lost", where, key)
        elif last[key] != version:
            v.add("not_last", where, key)
    for key in sorted(set(last) - set(truth) - gone):
        v.add("unknown", where, key)
    for key in sorted(gone & set(last)):
        if last[key] != DELETED:
            v.add("deletions_unpublished", where, key)
    return v


def judge_table(
    rows: Mapping[str, Row],
    live: Mapping[str, Any],
    deleted: Iterable[str],
    *,
    where: str = "",
) -> Verdict:
    """The table counts of one feed: `rows` by key, against the truth."""
    v = Verdict(rows=len(rows))
    gone = set(deleted)
    for key, record in live.items():
        row = rows.get(key)
        if row is None or row.deleted:
            v.add("table_missing", where, key)
        elif canonical(row.data) != canonical(record):
            v.add("table_stale", where, key)
    for key in sorted(set(rows) - set(live)):
        if key in gone:
            if not rows[key].deleted:
                v.add("table_deleted", where, key)
        else:
            v.add("table_extra", where, key)
    return v
