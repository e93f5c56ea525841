"""Records off their published schema, as real ServiceTitan data sometimes is.

A `RecordStyle` says which share of record versions come with which deviation; whether one
version deviates, and how, is a pure function of that version's seed, so a version renders the
same bytes on every page and in the ground truth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from random import Random
from typing import Any

_TICKS_PER_MS = 10_000
# ServiceTitan writes up to 7 fractional digits with trailing zeros trimmed; these lengths are
# what other serialisers write (none, milliseconds, microseconds, 7 untrimmed, nanoseconds).
FRACTION_DIGITS = (0, 3, 6, 7, 9)
_ZULU = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,7}))?Z")
_MAX_NULLS = 3


@dataclass(frozen=True, slots=True)
class RecordStyle:
    """Shares of record versions with each deviation (all in [0, 1])."""

    required_nulls: float = 0.0  # some required fields (never the key) null
    enum_integers: float = 0.0  # every documented string enum as its integer value
    numeric_modified_on: float = 0.0  # the feed's timestamp as a number (Unix milliseconds)
    naive_timestamps: float = 0.0  # date-times without a zone, fractions of other lengths


@dataclass(frozen=True, slots=True)
class FeedShape:
    """What of a feed's schema the deviations need."""

    required: tuple[str, ...]  # required fields that may be nulled (not key, not timestamp)
    enums: tuple[tuple[str, tuple[str, ...]], ...]  # top-level string enums and their values
    timestamp: str | None  # modifiedOn, createdOn where that is the feed's, or None

    @classmethod
    def of(
        cls, schema: dict[str, Any], key_fields: tuple[str, ...], timestamp: str | None
    ) -> FeedShape:
        """The shape of records following `schema`."""
        props: dict[str, Any] = schema.get("properties", {})
        skip = {*key_fields, timestamp}
        required = tuple(n for n in schema.get("required", ()) if n in props and n not in skip)
        enums = []
        for name, sub in props.items():
            inner = sub["oneOf"][0] if "oneOf" in sub else sub
            values = inner.get("enum")
            if values and all(isinstance(v, str) for v in values):
                enums.append((name, tuple(values)))
        return cls(required, tuple(enums), timestamp)


def restyle(
    record: dict[str, Any], style: RecordStyle, shape: FeedShape, seed: int, stamp: int
) -> None:
    """Apply to `record`, in place, the deviations its version draws under `style`.

    `seed` identifies the version; `stamp` is its timestamp in 100 ns ticks.
    """
    rng = Random(seed)
    # One draw per deviation, always all four: whether one applies does not depend on the others.
    nulls, enums, numeric, naive = (rng.random() for _ in range(4))
    if naive < style.naive_timestamps:
        _strip_zones(record, rng)
    if numeric < style.numeric_modified_on and shape.timestamp in record:
        record[shape.timestamp] = stamp // _TICKS_PER_MS
    if enums < style.enum_integers:
        for name, values in shape.enums:
            value = record.get(name)
            if isinstance(value, str) and value in values:
                record[name] = values.index(value)
    if nulls < style.required_nulls and shape.required:
        count = 1 + int(rng.random() * min(_MAX_NULLS, len(shape.required)))
        for name in rng.sample(shape.required, count):
            record[name] = None


def naive_timestamp(text: str, digits: int) -> str:
    """A ServiceTitan date-time ("...Z") without its zone and with `digits` fractional digits.

    Fewer digits than the value has truncate it; more pad it with zeros.
    """
    match = _ZULU.fullmatch(text)
    if match is None:
        return text
    head, fraction = match.group(1), (match.group(2) or "").ljust(9, "0")
    return head if digits == 0 else f"{head}.{fraction[:digits]}"


def _strip_zones(value: Any, rng: Random) -> Any:
    """Every date-time in `value` (nested too) without its zone; changes containers in place."""
    if isinstance(value, dict):
        for key, item in value.items():
            value[key] = _strip_zones(item, rng)
    elif isinstance(value, list):
        for n, item in enumerate(value):
            value[n] = _strip_zones(item, rng)
    elif isinstance(value, str) and value.endswith("Z"):
        return naive_timestamp(value, rng.choice(FRACTION_DIGITS))
    return value
