"""Compact, deterministic state of one feed of one tenant: its records and its change log.

Nothing here holds record JSON for long. A record is (index, version, inactive flag); its bytes
are rendered on demand from (seed, tenant, feed, index, version) plus its log timestamps. The
change log is two int64 arrays: position -> record index, and record index -> its current
position. A position whose record has moved on (or been deleted) is stale and is skipped when
paging. Deleted records keep their index with position -1; keyless records (created without a
usable key) are paged like any other but are no part of the ground truth.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from array import array
from dataclasses import dataclass
from random import Random
from typing import Any, Literal

import msgspec

from syncd.catalogue import Feed
from syncd.simulator.cache import SizedCache
from syncd.simulator.offschema import FeedShape, RecordStyle, restyle
from syncd.simulator.schemagen import TICKS_PER_SECOND, Gen, compile_schema, format_ticks

# Initial records were last modified between these instants (2020-01-01 and 2024-01-01, UTC),
# so they are visible at once and their timestamps do not depend on the start time.
_BASE_TICKS = 1577836800 * TICKS_PER_SECOND
_SPAN_TICKS = (1704067200 - 1577836800) * TICKS_PER_SECOND
_DAY_TICKS = 86_400 * TICKS_PER_SECOND
_INACTIVE_EVERY = 20  # about one initial record in 20 is inactive (merged, archived)
_MAX_HISTORY = 6  # events kept in a jpm.job-history record
_DELETED = -1  # the position of a deleted record
_KEY_NULL, _KEY_MISSING = 1, 2  # how a keyless record lacks its key

MutationKind = Literal["update", "deactivate", "create", "delete"]
ActiveFilter = Literal["True", "False", "Any"]

# The spec has no record schema for these two feeds; records get the fields every feed shares.
_OPPORTUNITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "format": "int64"},
        "name": {"type": "string"},
        "status": {"type": "string"},
        "customerId": {"type": "integer", "format": "int64"},
        "locationId": {"type": "integer", "format": "int64", "nullable": True},
        "soldById": {"type": "integer", "format": "int64", "nullable": True},
        "estimatedValue": {"type": "number", "format": "decimal"},
        "summary": {"type": "string", "nullable": True},
        "followUpDate": {"type": "string", "format": "date-time", "nullable": True},
        "active": {"type": "boolean"},
        "createdOn": {"type": "string", "format": "date-time"},
        "modifiedOn": {"type": "string", "format": "date-time"},
    },
}


def _mix(*parts: object) -> int:
    text = ":".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


@dataclass(frozen=True, slots=True)
class Entry:
    """One live change-log entry chosen for a page, with what rendering needs."""

    index: int
    version: int
    position: int
    inactive: bool


@dataclass(frozen=True, slots=True)
class ChangeQuirks:
    """How a tenant's quirks shape the changes made to its feeds."""

    keyless: float  # share of created records without a usable key
    shared_timestamps: float  # share of a batch's changes stamped like the change before
    rng: Random  # the draws for both (apart from the choice of records to change)


class FeedLog:
    """Records and change log of one (tenant, feed)."""

    def __init__(
        self,
        feed: Feed,
        feed_no: int,
        tenant: int,
        seed: int,
        records: int,
        cache: SizedCache[bytes],
    ) -> None:
        self.feed = feed
        self.feed_no = feed_no
        self.tenant = tenant
        self.schema = feed.schema if feed.schema is not None else _OPPORTUNITY_SCHEMA
        props = self.schema.get("properties", {})
        self.has_active = "active" in props
        self._has_created = "createdOn" in props
        self._has_merged = "mergedToId" in props
        self._ts_field = feed.timestamp_field if feed.timestamp_field in props else None
        self._gen: Gen = compile_schema(self.schema)
        history = props.get("history", {}).get("items") if self._ts_field is None else None
        self._history: Gen | None = compile_schema(history) if history else None
        self._rng = Random()
        self._seed_base = _mix(seed, tenant, feed.name) << 64
        self._jitter_salt = _mix("jitter", seed, tenant, feed.name)
        self._id_base = 10_000_000 + (_mix("ids", feed.name) % 900) * 1_000_000
        self._cache = cache
        self._cache_id = (tenant, feed_no)
        self._style_salt = _mix("style", seed, tenant, feed.name)

        self.initial = records
        self._step = max(2, _SPAN_TICKS // max(records, 1))
        self.versions = array("I", bytes(4 * records))
        self.current = array("i", range(records))  # record index -> its live position
        self.log = array("i", range(records))  # position -> record index
        self.inactive = bytearray(records)
        if self.has_active:
            for index in range(records):
                if (index * 2654435761 + self._jitter_salt) % _INACTIVE_EVERY == 0:
                    self.inactive[index] = 1
        self._late_ticks = array("q")  # timestamps of positions >= initial
        self._late_created = array("q")  # createdOn of records >= initial
        self.stale = array("q")  # positions made stale, in the order it happened
        self._previous: dict[int, Entry] = {}  # record index -> its version before the last change
        self.keyless = bytearray(records)  # record index -> 0, or how it lacks its key
        self.keyless_created = 0
        self.keyless_served = 0  # keyless records sent in well-formed pages, repeats included
        self.keyless_seen: set[int] = set()  # the keyless records ever sent
        self.deleted: list[int] = []  # indexes of deleted records, in the order of deletion
        self.deleted_at: list[int] = []  # when each was deleted (ticks, as timestamps are)

    @functools.cached_property
    def shape(self) -> FeedShape:
        """What off-schema rendering needs of the schema (only computed when it is used)."""
        return FeedShape.of(self.schema, self.feed.key_fields, self._ts_field)

    # -- time -------------------------------------------------------------------------------

    def ticks_at(self, position: int) -> int:
        """Timestamp (100 ns ticks) of the change at `position`; never decreases with position.

        Changes of one batch may share a timestamp (the `shared_timestamps` quirk); otherwise
        each change is at least one tick after the one before.
        """
        if position < self.initial:
            jitter = (position * 2654435761 + self._jitter_salt) % (self._step // 2)
            return _BASE_TICKS + position * self._step + jitter
        return self._late_ticks[position - self.initial]

    def created_ticks(self, index: int) -> int:
        """When record `index` was created."""
        if index < self.initial:
            back = (index * 40503 + self._jitter_salt) % (400 * _DAY_TICKS)
            return self.ticks_at(index) - back
        return self._late_created[index - self.initial]

    def visible_end(self, now_ticks: int, delay_ticks: int) -> int:
        """First position not yet visible without includeRecentChanges."""
        return self.initial + bisect.bisect_right(self._late_ticks, now_ticks - delay_ticks)

    def position_at_or_after(self, ticks: int) -> int:
        """First position whose timestamp is >= `ticks`."""
        lo, hi = 0, self.initial
        while lo < hi:
            mid = (lo + hi) // 2
            if self.ticks_at(mid) < ticks:
                lo = mid + 1
            else:
                hi = mid
        if lo < self.initial:
            return lo
        return self.initial + bisect.bisect_left(self._late_ticks, ticks)

    # -- paging -----------------------------------------------------------------------------

    def _matches(self, index: int, active: ActiveFilter) -> bool:
        if active == "Any" or not self.has_active:
            return True
        return (self.inactive[index] == 0) == (active == "True")

    def overlap_start(self, position: int, count: int, active: ActiveFilter) -> int:
        """Position `count` live entries before `position` (where a recent-changes page starts)."""
        position = min(position, len(self.log))
        log, current = self.log, self.current
        budget = max(1000, 20 * count)
        found = 0
        while position > 0 and found < count and budget > 0:
            position -= 1
            budget -= 1
            index = log[position]
            if current[index] == position and self._matches(index, active):
                found += 1
        return position

    def scan(
        self, start: int, limit: int, size: int, active: ActiveFilter
    ) -> tuple[list[Entry], int]:
        """Up to `size` live entries in [start, limit), and the position after the last one."""
        log, current, versions, inactive = self.log, self.current, self.versions, self.inactive
        check = active != "Any" and self.has_active
        want = 0 if active == "True" else 1
        entries: list[Entry] = []
        position = start
        while position < limit and len(entries) < size:
            index = log[position]
            if current[index] == position and (not check or inactive[index] == want):
                entries.append(Entry(index, versions[index], position, inactive[index] == 1))
            position += 1
        return entries, max(position, start)

    # -- records ----------------------------------------------------------------------------

    def key_values(self, index: int) -> tuple[int, ...]:
        """The record's key field values: the last one is unique, earlier ones vary."""
        head = tuple(1000 + (index * 7919 + n) % 97 for n in range(len(self.feed.key_fields) - 1))
        return (*head, self._id_base + index)

    def key(self, index: int) -> str:
        """The record key as syncd writes it (`a:b` for composite keys)."""
        return ":".join(str(v) for v in self.key_values(index))

    def render(self, entry: Entry, style: RecordStyle | None = None) -> bytes:
        """JSON bytes of one record version in `style`; cached, and identical every time."""
        cache_key: tuple[object, ...] = (self._cache_id, entry.index, entry.version)
        if style is not None:
            cache_key = (*cache_key, style)
        body = self._cache.get(cache_key)
        if body is None:
            record = self._build(entry)
            if style is not None:
                seed = self._style_salt ^ ((entry.index << 24) + entry.version)
                restyle(record, style, self.shape, seed, self.ticks_at(entry.position))
            body = msgspec.json.encode(record)
            self._cache.put(cache_key, body, len(body))
        return body

    def _build(self, entry: Entry) -> dict[str, Any]:
        rng = self._rng
        rng.seed(self._seed_base + (entry.index << 24) + entry.version)
        record: dict[str, Any] = self._gen(rng)
        for field, value in zip(self.feed.key_fields, self.key_values(entry.index), strict=True):
            record[field] = value
        lacks_key = self.keyless[entry.index]
        if lacks_key:
            last = self.feed.key_fields[-1]
            if lacks_key == _KEY_NULL:
                record[last] = None
            else:
                del record[last]
        if self._has_created:
            record["createdOn"] = format_ticks(self.created_ticks(entry.index))
        if self._ts_field is not None:
            record[self._ts_field] = format_ticks(self.ticks_at(entry.position))
        if self.has_active:
            record["active"] = not entry.inactive
        if self._has_merged:
            merged = self._id_base + (entry.index * 31 + 7) % max(self.initial, 1)
            record["mergedToId"] = merged if entry.inactive else None
        if self._history is not None:
            record["history"] = self._history_events(entry)
        return record

    def _history_events(self, entry: Entry) -> list[dict[str, Any]]:
        """One event per version, the newest dated at the change.

        jpm.job-history has no timestamp field, so without this two versions could render the
        same bytes, and a change would be invisible to change detection.
        """
        assert self._history is not None
        rng = self._rng
        first = entry.version - min(entry.version, _MAX_HISTORY - 1)
        created = self.created_ticks(entry.index)
        events = []
        for number in range(first, entry.version + 1):
            rng.seed(self._seed_base + (entry.index << 24) + number + (1 << 23))
            event: dict[str, Any] = self._history(rng)
            event["id"] = (self._id_base + entry.index) * 100 + number % 100
            event["date"] = format_ticks(created + number * _DAY_TICKS // 24)
            events.append(event)
        events[-1]["date"] = format_ticks(self.ticks_at(entry.position))
        return events

    def live_entry(self, index: int) -> Entry:
        """The current version of record `index`."""
        return Entry(index, self.versions[index], self.current[index], self.inactive[index] == 1)

    def previous_entry(self, index: int) -> Entry | None:
        """The version of record `index` before its last change; None if it never changed."""
        return self._previous.get(index)

    def usable(self, index: int) -> bool:
        """Whether record `index` belongs to the ground truth: neither deleted nor keyless."""
        return self.current[index] != _DELETED and not self.keyless[index]

    def ground_truth(self, style: RecordStyle | None = None) -> bytes:
        """A JSON array of the current version of every usable record, by record index."""
        live = (self.live_entry(i) for i in range(len(self.current)) if self.usable(i))
        return b"[" + b",".join(self.render(entry, style) for entry in live) + b"]"

    def deleted_keys(self) -> list[str]:
        """Keys of the deleted records, in the order of deletion."""
        return [self.key(i) for i in self.deleted]

    def deletions(self) -> dict[str, str]:
        """When each deleted record was deleted, by key (the timestamps' format)."""
        return {
            self.key(i): format_ticks(at)
            for i, at in zip(self.deleted, self.deleted_at, strict=True)
        }

    def keyless_records(self, style: RecordStyle | None = None) -> list[bytes]:
        """Every keyless record as served, oldest first."""
        created = range(self.initial, len(self.current))
        return [self.render(self.live_entry(i), style) for i in created if self.keyless[i]]

    def count_served(self, keyless: tuple[int, ...]) -> None:
        """Note that a page holding the keyless records `keyless` was sent."""
        self.keyless_served += len(keyless)
        self.keyless_seen.update(keyless)

    # -- changes ----------------------------------------------------------------------------

    def _append(self, index: int, now_ticks: int, same: bool) -> int:
        """Log a change of `index`; `same`: at the timestamp of the change before it."""
        last = self.ticks_at(len(self.log) - 1) if self.log else 0
        self._late_ticks.append(last if same else max(now_ticks, last + 1))
        position = len(self.log)
        self.log.append(index)
        return position

    def mutate(
        self,
        kind: MutationKind,
        count: int,
        rng: Random,
        now_ticks: int,
        quirks: ChangeQuirks | None = None,
    ) -> list[str]:
        """Apply `count` changes of `kind` now; the keys of the records changed, created or
        deleted (a keyless record created has none)."""
        if kind == "deactivate" and not self.has_active:
            kind = "update"
        if kind == "create" or (not self.current and kind != "delete"):
            keys = []
            for n in range(count):
                index = len(self.current)
                self.versions.append(0)
                self.inactive.append(0)
                self.keyless.append(self._keyless_form(quirks))
                self._late_created.append(now_ticks)
                self.current.append(self._append(index, now_ticks, n > 0 and _shares(quirks)))
                if not self.keyless[index]:
                    keys.append(self.key(index))
            return keys
        chosen = self._choose(kind, count, rng)
        for n, index in enumerate(chosen):
            self.stale.append(self.current[index])
            if kind == "delete":
                self.current[index] = _DELETED
                self._previous.pop(index, None)
                self.deleted.append(index)
                self.deleted_at.append(now_ticks)
                continue
            self._previous[index] = self.live_entry(index)
            self.versions[index] += 1
            if kind == "deactivate":
                self.inactive[index] = 1
            self.current[index] = self._append(index, now_ticks, n > 0 and _shares(quirks))
        return [self.key(i) for i in chosen]

    def _choose(self, kind: MutationKind, count: int, rng: Random) -> list[int]:
        """`count` distinct usable records to change (fewer if there are not enough)."""
        total = len(self.current)
        if kind == "deactivate":
            candidates = rng.sample(range(total), min(total, 4 * count + 8))
            return [i for i in candidates if not self.inactive[i] and self.usable(i)][:count]
        if not self.deleted and not self.keyless_created:
            return rng.sample(range(total), min(total, count))
        eligible = [i for i in range(total) if self.usable(i)]
        return rng.sample(eligible, min(len(eligible), count))

    def _keyless_form(self, quirks: ChangeQuirks | None) -> int:
        """0 for a record with its key; else how it lacks it (null and missing alternate)."""
        if quirks is None or quirks.keyless <= 0 or quirks.rng.random() >= quirks.keyless:
            return 0
        self.keyless_created += 1
        return _KEY_NULL if self.keyless_created % 2 else _KEY_MISSING


def _shares(quirks: ChangeQuirks | None) -> bool:
    """Whether a change after the first of its batch takes the timestamp of the one before."""
    if quirks is None or quirks.shared_timestamps <= 0:
        return False
    return quirks.rng.random() < quirks.shared_timestamps
