"""Change events as syncd publishes them: the typed event, which streams to read, and the
parsing of stream replies. Used by `syncd.consumer` and `syncd tail`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import msgspec

from syncd import catalogue
from syncd.instants import utc_instant
from syncd.keys import DEFAULT_PREFIX, Keys

__all__ = [
    "Event",
    "Failed",
    "MalformedEvent",
    "Subscription",
    "parse_stream",
    "parse_stream_reply",
    "raw_stream_reply",
]

T = TypeVar("T")

_REQUIRED_FIELDS = ("op", "key", "data")


class MalformedEvent(ValueError):
    """A stream entry lacks a field that every event carries."""

    def __init__(self, stream: str, entry_id: str, missing: Sequence[str]) -> None:
        super().__init__(f"{stream} {entry_id}: missing field(s) {', '.join(missing)}")
        self.stream = stream
        self.entry_id = entry_id
        self.missing = tuple(missing)


class Event(msgspec.Struct, frozen=True):
    """One change event: a record created or updated in one feed of one tenant."""

    stream: str
    id: str  # the stream entry id, e.g. "1714564800123-0"
    tenant: int
    feed: str
    op: str  # "created", "updated", "upsert", or "deleted" (gone upstream: `data` is empty)
    key: str
    data: bytes  # the record's JSON exactly as ServiceTitan sent it
    modified_on: str | None  # the record's timestamp as sent (None: none)
    deliveries: int  # 1 on first delivery; 0 when read without a consumer group
    # The same instant in UTC at a fixed width, "2024-05-01T12:00:02.4500000Z", which compares
    # as text; for a record without a timestamp, the newest instant published for its key
    # (None: the key never had one). Events published before syncd 0.3.0 lack the field: it
    # is then computed from `modified_on`, the way the daemon does.
    modified_at: str | None = None
    # Set when `syncd dead replay` handed this dead-lettered event back to the group: the
    # entry id in the group's replay stream, where it is acknowledged. `stream` and `id` stay
    # the event's own, so `version` places it among its key's versions as before.
    replay_id: str | None = None

    @property
    def version(self) -> tuple[str, int, int]:
        """Where this event stands among its key's versions: `modified_at` ("" for none),
        then the entry id as a pair. syncd publishes a key's versions in this order, so under
        redelivery apply an event when `event.version >= stored_version` and store its
        version: equal timestamps are ordered by publication, and an older version delivered
        again never wins."""
        ms, _, seq = self.id.partition("-")
        return self.modified_at or "", int(ms), int(seq or 0)

    @property
    def deleted(self) -> bool:
        """Whether the record is gone upstream (found by a reconciliation pass): delete it by
        `key`. Such an event carries no record; its version is the time it was found gone."""
        return self.op == "deleted"

    def json(self) -> Any:
        """The record as plain Python objects (None for a deleted record)."""
        if self.op == "deleted":
            return None
        return msgspec.json.decode(self.data)

    def decode(self, type: type[T]) -> T:
        """The record decoded and validated into `type` (a msgspec.Struct, dataclass, dict...)."""
        return msgspec.json.decode(self.data, type=type)

    @classmethod
    def from_entry(
        cls,
        stream: str,
        entry_id: str,
        fields: Mapping[str, bytes],
        *,
        tenant: int,
        feed: str,
        deliveries: int,
    ) -> Event:
        """Build an event from a stream entry's fields; unknown fields are ignored.

        `modified_at` is the entry's own field; an entry without one (published before syncd
        0.3.0) gets it computed from `modified_on`.

        Raises MalformedEvent when `op`, `key` or `data` is missing.
        """
        missing = [name for name in _REQUIRED_FIELDS if name not in fields]
        if missing:
            raise MalformedEvent(stream, entry_id, missing)
        raw_on, raw_at = fields.get("modified_on"), fields.get("modified_at")
        modified_on = raw_on.decode("utf-8", "replace") if raw_on else None
        if raw_at is None:  # published before syncd 0.3.0
            modified_at = utc_instant(modified_on)
        else:
            modified_at = raw_at.decode("utf-8", "replace")
        return cls(
            stream=stream,
            id=entry_id,
            tenant=tenant,
            feed=feed,
            op=fields["op"].decode("utf-8", "replace"),
            key=fields["key"].decode("utf-8", "replace"),
            data=fields["data"],
            modified_on=modified_on,
            deliveries=deliveries,
            modified_at=modified_at or None,
        )


class Failed(msgspec.Struct, frozen=True):
    """An event a handler failed for a reason of its own, such as a record its database
    refuses: return it among the failures. The event comes back like any failed one, and
    should it reach the dead stream (after `max_deliveries`), the reason goes with it as
    `detail`. Such failures are no sign of an outage of the handler's dependencies."""

    event: Event
    reason: str

    @property
    def stream(self) -> str:
        return self.event.stream

    @property
    def id(self) -> str:
        return self.event.id


class Subscription(msgspec.Struct, frozen=True):
    """Feeds of one tenant to read: the named ones, or every catalogue feed when `feeds` is None."""

    tenant: int
    feeds: Sequence[str] | None = None

    def __post_init__(self) -> None:
        known = catalogue.feeds()
        unknown = [name for name in self.feeds or () if name not in known]
        if unknown:
            raise ValueError(f"tenant {self.tenant}: unknown feed(s) {', '.join(unknown)}")

    def feed_names(self) -> list[str]:
        """The subscribed feed names, in catalogue order when all feeds are meant."""
        return list(catalogue.feeds() if self.feeds is None else dict.fromkeys(self.feeds))

    def streams(self, prefix: str = DEFAULT_PREFIX) -> list[str]:
        """The event stream names of the subscribed feeds."""
        keys = Keys(prefix, self.tenant)
        return [keys.stream(feed) for feed in self.feed_names()]


class StreamRef(NamedTuple):
    """What a consumer knows of a stream it reads: its tenant, feed and dead stream, and for
    a replay stream (see `syncd.consumer.replay`) the event stream it hands events back to."""

    tenant: int
    feed: str
    dead: str
    origin: str = ""


def parse_stream(name: str, prefix: str) -> StreamRef:
    head = f"{prefix}:{{"
    tenant_text, sep, feed = name.removeprefix(head).partition("}:")
    if name.startswith(head) and sep and tenant_text.isdigit():
        keys = Keys(prefix, int(tenant_text))
        if keys.stream(feed) == name and feed in catalogue.feeds():
            return StreamRef(keys.tenant, feed, keys.dead)
    raise ValueError(
        f"{name!r} is not a syncd event stream: expected {prefix}:{{<tenant>}}:<feed> "
        "with a catalogue feed"
    )


def text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def fields_of(raw: Mapping[Any, Any]) -> dict[str, bytes]:
    # Clients made with decode_responses=True hand back str; events carry bytes either way.
    # Written out rather than through text(): this runs for every field of every entry read.
    return {
        (k.decode("utf-8", "replace") if type(k) is bytes else str(k)): (
            v if type(v) is bytes else str(v).encode()
        )
        for k, v in raw.items()
    }


def parse_stream_reply(reply: Any) -> list[tuple[str, list[tuple[str, dict[str, bytes]]]]]:
    """(stream, [(entry id, fields)]) pairs of an XREAD/XREADGROUP reply.

    Accepts every reply shape redis-py produces (RESP2 or RESP3, legacy or unified responses,
    with or without decode_responses).
    """
    return [
        (stream, [(text(eid), fields_of(raw)) for eid, raw in entries])
        for stream, entries in raw_stream_reply(reply)
    ]


RawEntry = tuple[bytes | str, Mapping[Any, Any]]
"""A stream entry as redis-py hands it over: its id and its fields, each bytes or str."""


def raw_stream_reply(reply: Any) -> list[tuple[str, list[RawEntry]]]:
    """`parse_stream_reply` without turning each entry's fields into a dict of its own (see
    `event_of_raw`, which reads most entries as they are)."""
    if not reply:
        return []
    pairs = reply.items() if isinstance(reply, dict) else reply
    out = []
    for stream, entries in pairs:
        # RESP3 replies come wrapped in one more list by redis-py's legacy parser.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
        out.append((text(stream), [entry for entry in entries or () if entry[1] is not None]))
    return out


def event_of_raw(
    stream: str, entry_id: bytes | str, raw: Mapping[Any, Any], tenant: int, feed: str
) -> Event | None:
    """The event of an entry of an event stream as redis-py hands it over, read without
    copying its fields, when it is as syncd writes it (bytes, `op`, `key`, `data` and
    `modified_at` present); None for any other, which `Event.from_entry` reads (or refuses)
    from `fields_of(raw)`. Every entry a consumer reads passes here: kept to lookups."""
    get = raw.get
    op, key, data, at = get(b"op"), get(b"key"), get(b"data"), get(b"modified_at")
    if op is None or key is None or data is None or at is None or type(data) is not bytes:
        return None
    on = get(b"modified_on")
    return Event(
        stream,
        entry_id.decode("utf-8", "replace") if type(entry_id) is bytes else str(entry_id),
        tenant,
        feed,
        op.decode("utf-8", "replace"),
        key.decode("utf-8", "replace"),
        data,
        on.decode("utf-8", "replace") if on else None,
        1,
        at.decode("utf-8", "replace") or None,
    )
