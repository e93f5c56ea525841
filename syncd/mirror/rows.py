"""Pure decisions of the mirror: an event as the row it stages, and what an error of PostgreSQL
means for a batch (one of its records refused, or the database unavailable).

Kept apart from the I/O so that each rule is a small function tested by a table.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from syncd.consumer import Event, Failed

__all__ = ["ErrorKind", "Row", "error_kind", "refusal", "row_of", "rows_of"]

ErrorKind = Literal["record", "unavailable"]

# SQLSTATEs that a record's own content causes (class 22, data exception: JSON PostgreSQL
# refuses, such as a string holding \u0000 or a lone surrogate, a NUL byte in a key, a number
# past numeric's range; 54000: a value past a size limit). Anything else is the database's
# state, not the record's: the batch waits for it.
_RECORD_CLASSES = ("22",)
_RECORD_STATES = frozenset({"54000"})


class Row(NamedTuple):
    """One event as staged for its feed's table (the columns of the staging table)."""

    feed: str
    tenant: int
    key: str
    deleted: bool
    modified_on: str | None
    modified_at: str
    entry_ms: int
    entry_seq: int
    data: str | None  # the record's JSON text; None for a deletion that carries none


def row_of(event: Event) -> Row | str:
    """The staging row of `event`, or why it cannot be one (a reason for its dead letter).

    `deleted` events mark the key deleted (with their record, when they carry one); every other
    op, known or not, upserts the record.
    """
    deleted = event.op == "deleted"
    try:
        data = event.data.decode("utf-8") if event.data or not deleted else None
    except UnicodeDecodeError as exc:
        return f"data is not UTF-8 text (byte {exc.start})"
    # Event.version, spelt out: this runs for every event mirrored.
    ms, _, seq = event.id.partition("-")
    at = event.modified_at or ""
    return Row(
        event.feed,
        event.tenant,
        event.key,
        deleted,
        event.modified_on,
        at,
        int(ms),
        int(seq or 0),
        data,
    )


def rows_of(batch: list[Event]) -> tuple[list[tuple[Event, Row]], list[Event | Failed]]:
    """A batch's events with their rows, and those that cannot be rows (with why)."""
    rows: list[tuple[Event, Row]] = []
    failed: list[Event | Failed] = []
    for event in batch:
        row = row_of(event)
        if isinstance(row, str):
            failed.append(Failed(event, row))
        else:
            rows.append((event, row))
    return rows, failed


def error_kind(sqlstate: str | None) -> ErrorKind:
    """Whether an error with this SQLSTATE is a record's (retrying its batch without it helps)
    or the database's (the batch waits, whole, until it is back). No SQLSTATE (a lost
    connection, a client-side failure) is the database's."""
    if sqlstate and (sqlstate[:2] in _RECORD_CLASSES or sqlstate in _RECORD_STATES):
        return "record"
    return "unavailable"


def refusal(sqlstate: str | None, message: str | None, detail: str | None) -> str:
    """The reason a refused record's dead letter gives: PostgreSQL's code and words, never the
    statement's context (which quotes the record)."""
    text = (message or "refused").strip()
    if detail:
        text += f" ({detail.strip()})"
    return f"PostgreSQL refused the record: {sqlstate or '?'} {text}"
