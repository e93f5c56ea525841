"""What `syncd dead` prints, built from dead letters without I/O: a table, one entry whole,
stable JSON. Every value goes through `syncd.redact` (the secrets syncd knows and what looks
like a credential masked) before it is cut or shown, and text has its control and formatting
characters escaped, so that a terminal shows them instead of obeying them (ANSI escapes, bidi
overrides, carriage returns): a dead letter holds what ServiceTitan sent or what a handler's
error said. JSON output is ASCII, every other character escaped.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, TextIO

import msgspec

from syncd import redact
from syncd.consumer.deadstream import DeadLetter
from syncd.consumer.events import text as _text
from syncd.lines import clean
from syncd.lines import fit as _cut

# How much of a record `list` shows, and how wide its other columns may grow.
EXCERPT_CHARS = 60
_COLUMN_CHARS = {"feed": 40, "reason": 40, "kind": 30, "key": 24}
# Fields `show` prints first, in this order; the others follow as stored, `data` last.
_SHOWN_FIRST = (
    *("feed", "reason", "group", "consumer", "stream", "entry_id", "deliveries", "replays"),
    *("detail", "op", "key", "modified_on", "modified_at"),
)


def shown(text: str) -> str:
    """A value as an operator may see it: secrets masked, control characters escaped."""
    return clean(redact.redact(text))


def _masked(value: Any) -> Any:
    """A decoded JSON value with every string (object keys too) redacted; a number that
    spells a known secret is masked as well."""
    if isinstance(value, str):
        return redact.redact(value)
    if isinstance(value, dict):
        return {redact.redact(str(k)): _masked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_masked(v) for v in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value if redact.redact(str(value)) == str(value) else redact.MASK
    return value


def data_value(data: bytes | None) -> Any:
    """A dead letter's `data` for JSON output: the record as a JSON value when it is JSON,
    else its text; redacted either way (None: no data)."""
    if data is None:
        return None
    try:
        return _masked(msgspec.json.decode(data))
    except msgspec.DecodeError:
        return redact.redact(data.decode("utf-8", "replace"))


def excerpt(data: bytes | None, width: int = EXCERPT_CHARS) -> str:
    """The start of a record on one line: compact JSON (or its text), redacted before it is
    cut, so that no part of a secret survives the cut."""
    value = data_value(data)
    if value is None:
        return ""
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return _cut(clean(value), width)


def when(letter: DeadLetter) -> str:
    """The instant it was dead-lettered, ISO 8601 UTC to the millisecond."""
    instant = dt.datetime.fromtimestamp(letter.time_ms / 1000, dt.UTC)
    return instant.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def kind_text(letter: DeadLetter) -> str:
    return "record" if letter.kind == "record" else f"event of {letter.group}"


def as_json(letter: DeadLetter, *, whole: bool = False) -> dict[str, Any]:
    """The stable JSON shape of a dead letter (`list --json`; `show --json` with `whole`: all
    other fields under `fields`, the record under `data`, instead of an excerpt)."""

    def field(name: str) -> str | None:
        value = letter.get(name)
        return None if value is None else redact.redact(value)

    row: dict[str, Any] = {
        "id": letter.id,
        "time": when(letter),
        "kind": letter.kind,
        "feed": redact.redact(letter.feed),
        "reason": redact.redact(letter.reason),
        "group": field("group") if letter.kind == "event" else None,
        "consumer": field("consumer"),
        "stream": field("stream"),
        "entry_id": field("entry_id"),
        "key": field("key"),
        "deliveries": letter.number("deliveries"),
        "replays": letter.number("replays") or 0,
        "detail": field("detail"),
    }
    if not whole:
        row["excerpt"] = excerpt(letter.fields.get("data"))
        return row
    named = {*row, "data"}
    row["fields"] = {
        redact.redact(name): redact.redact(_text(value))
        for name, value in letter.fields.items()
        if name not in named
    }
    row["data"] = data_value(letter.fields.get("data"))
    return row


def json_line(value: Any, *, indent: int | None = None) -> str:
    # ASCII only: every control character and every other character a terminal might act on
    # is escaped, and a JSON reader gets the exact text back.
    return json.dumps(value, ensure_ascii=True, indent=indent)


def render_table(letters: list[DeadLetter], out: TextIO) -> None:
    """One line per dead letter: id, time, feed, reason, kind, key and the record's start."""
    rows = [
        {
            "id": letter.id,
            "time (UTC)": when(letter)[:19].replace("T", " "),
            "feed": shown(letter.feed),
            "reason": shown(letter.reason),
            "kind": shown(kind_text(letter)),
            "key": shown(letter.get("key") or "-"),
            "data": excerpt(letter.fields.get("data")),
        }
        for letter in letters
    ]
    columns = list(rows[0])
    widths = {
        c: min(max(len(c), *(len(r[c]) for r in rows)), _COLUMN_CHARS.get(c, 10**6))
        for c in columns
    }
    out.write("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip() + "\n")
    for row in rows:
        cells = [_cut(row[c], widths[c]).ljust(widths[c]) for c in columns]
        out.write("  ".join(cells).rstrip() + "\n")


def render_show(letter: DeadLetter, out: TextIO) -> None:
    """Every field of one dead letter, one per line; `data` last, pretty-printed when JSON."""
    names = [n for n in _SHOWN_FIRST if n in letter.fields]
    names += [n for n in letter.fields if n not in names and n != "data"]
    lines = [("id", letter.id), ("time", when(letter)), ("kind", kind_text(letter))]
    lines += [(name, letter.get(name) or "") for name in names]
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        out.write(f"{shown(name).ljust(width)}  {shown(value)}\n")
    value = data_value(letter.fields.get("data"))
    if value is None:
        return
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, indent=2)
    out.write("data\n" + clean(text, keep_newlines=True) + "\n")
