"""Timestamps as instants: ISO-8601 text in whatever zone and fraction length it was written
with, turned into text that sorts like the instant it names.

Two forms, both UTC and both compared as plain text:

- `sortable_instant`: `YYYY-MM-DDThh:mm:ss` and the fractional digits without trailing zeros.
  What the daemon keeps in its index (`seen`), where it decides what is older; no precision
  is dropped.
- `utc_instant`: the fixed-width `YYYY-MM-DDThh:mm:ss.fffffffZ` (seven fractional digits,
  ServiceTitan's precision of 100 ns), the `modified_at` field of every event: what consumers
  store and compare (in Python with `syncd.consumer.is_newer_or_same`, in SQL with `<=`).

A third form is the daemon's alone: `packed_instant`, eight bytes that sort like the instant,
what its index stores per key (see `syncd.engine.index`).

Pure and shared by the daemon (which computes both when it decodes a page) and the consumer
library; imports nothing of syncd.
"""

from __future__ import annotations

import datetime as dt
import functools
import re

__all__ = [
    "FRACTION_DIGITS",
    "PACKED_BYTES",
    "TICKS_PER_SECOND",
    "fixed_width",
    "packed_instant",
    "sortable_instant",
    "unpacked_instant",
    "utc_instant",
]

# Fractional digits of `utc_instant`: ServiceTitan sends 7 (.NET ticks of 100 ns). Longer
# fractions are cut, so two instants less than 100 ns apart read as the same one.
FRACTION_DIGITS = 7

# Date, optional time with optional fraction (any length), optional zone. ServiceTitan sends
# `2024-01-02T03:04:05.1234567Z`; off-schema records drop the zone or the fraction.
_ISO = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})"
    r"(?:[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?)?"
    r"(?:([Zz])|([+-])(\d{2}):?(\d{2}))?",
    re.ASCII,  # digits 0-9 only: other scripts' digits do not spell an instant
)


def sortable_instant(value: object) -> str:
    """An ISO-8601 timestamp as a string that sorts like the instant it names.

    `YYYY-MM-DDThh:mm:ss` in UTC followed by the fractional digits without trailing zeros, so
    that plain string comparison (in Python and in the page script) orders instants, whatever
    the zone or fraction length they were written with. No zone means UTC. "" for anything that
    is not such a timestamp (null, a number, garbage, an impossible date): no timestamp.
    """
    if type(value) is not str:
        return ""
    m = _ISO.fullmatch(value)
    if m is None:
        return ""
    year, month, day, hour, minute, second, frac, _z, sign, off_h, off_m = m.groups()
    try:
        when = dt.datetime(int(year), int(month), int(day))
        end_of_day = hour == "24" and minute == "00" and int(second or 0) == 0
        if end_of_day and not (frac or "").strip("0"):
            # ISO 8601's end of the day is the next day's start: the same instant, not "no
            # timestamp" (which would let an older version through after it).
            when += dt.timedelta(days=1)
            hour = second = frac = None
            year, month, day = f"{when.year:04d}", f"{when.month:02d}", f"{when.day:02d}"
        when = when.replace(hour=int(hour or 0), minute=int(minute or 0), second=int(second or 0))
        if sign is not None and (off_h != "00" or off_m != "00"):
            offset = dt.timedelta(hours=int(off_h), minutes=int(off_m))
            when = when - offset if sign == "+" else when + offset
            if not 1 <= when.year <= 9999:
                return ""
            return (
                f"{when.year:04d}-{when.month:02d}-{when.day:02d}T"
                f"{when.hour:02d}:{when.minute:02d}:{when.second:02d}" + (frac or "").rstrip("0")
            )
    except (ValueError, OverflowError):
        return ""
    return f"{year}-{month}-{day}T{hour or '00'}:{minute or '00'}:{second or '00'}" + (
        frac or ""
    ).rstrip("0")


def fixed_width(sortable: str) -> str:
    """The `utc_instant` form of a `sortable_instant` ("" stays "")."""
    if not sortable:
        return ""
    fraction = sortable[19 : 19 + FRACTION_DIGITS]
    return f"{sortable[:19]}.{fraction.ljust(FRACTION_DIGITS, '0')}Z"


def utc_instant(value: object) -> str:
    """An ISO-8601 timestamp as fixed-width UTC text, `YYYY-MM-DDThh:mm:ss.fffffffZ`, that
    orders like the instant it names ("" when `value` is not such a timestamp).

    `2024-05-01T12:00:02.4Z`, `2024-05-01T12:00:02.40+00:00` and `2024-05-01T14:00:02.4+02:00`
    all give `2024-05-01T12:00:02.4000000Z`. A value already in this form is returned as it is.
    """
    return fixed_width(sortable_instant(value))


# A packed instant: the count of 100 ns ticks since 0001-01-01T00:00:00 UTC (.NET's
# `DateTime.Ticks`, which ServiceTitan's timestamps come from), an unsigned big-endian 64-bit
# integer. Byte order is the instants' order; the page script reads the same layout
# (`syncd.engine.scripts`).
PACKED_BYTES = 8
TICKS_PER_SECOND = 10_000_000  # 10 ** FRACTION_DIGITS
_DAY = 86_400


@functools.lru_cache(maxsize=4096)
def _day_seconds(date: str) -> int:
    """Seconds from 0001-01-01 to the start of `date` (`YYYY-MM-DD`)."""
    return (dt.date.fromisoformat(date).toordinal() - 1) * _DAY


def packed_instant(sortable: str) -> bytes:
    """A `sortable_instant` as PACKED_BYTES bytes that sort like it (b"" for ""). Fractions
    are cut to FRACTION_DIGITS, as in `utc_instant`."""
    if not sortable:
        return b""
    seconds = (
        _day_seconds(sortable[:10])
        + int(sortable[11:13]) * 3600
        + int(sortable[14:16]) * 60
        + int(sortable[17:19])
    )
    fraction = sortable[19 : 19 + FRACTION_DIGITS]
    ticks = int(fraction.ljust(FRACTION_DIGITS, "0")) if fraction else 0
    return (seconds * TICKS_PER_SECOND + ticks).to_bytes(PACKED_BYTES, "big")


def unpacked_instant(packed: bytes) -> str:
    """The `utc_instant` form of a packed instant ("" for b"")."""
    if not packed:
        return ""
    seconds, ticks = divmod(int.from_bytes(packed, "big"), TICKS_PER_SECOND)
    days, rest = divmod(seconds, _DAY)
    date = dt.date.fromordinal(days + 1)
    hour, rest = divmod(rest, 3600)
    return (
        f"{date.year:04d}-{date.month:02d}-{date.day:02d}T"
        f"{hour:02d}:{rest // 60:02d}:{rest % 60:02d}.{ticks:0{FRACTION_DIGITS}d}Z"
    )
