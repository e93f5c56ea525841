"""Decoding an export page: the envelope, each record's key and timestamp, duplicates.

Records stay the raw bytes ServiceTitan sent; only the key and timestamp fields are read. What
the page script needs per record is prepared here, in Python, so that the script only compares:

- the key, its parts encoded so that distinct values never collide (`encode_key`);
- the fingerprint, a short digest of the record's exact bytes;
- the timestamp as sent (the event's `modified_on`), as a packed instant (`packed_instant`: what
  the index stores and compares) and, when it differs from the text sent, the event's
  `modified_at`;
- one version per key: when a key appears twice in a page, the newest version wins.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import decimal
import functools
import hashlib
import json
import operator
import re
from dataclasses import dataclass
from typing import Any, cast

import msgspec

from syncd.catalogue import Feed, encode_key, key_part
from syncd.errors import TransientError
from syncd.instants import FRACTION_DIGITS, PACKED_BYTES, fixed_width, packed_instant
from syncd.instants import sortable_instant as sortable_instant  # re-exported


class _Envelope(msgspec.Struct):
    hasMore: bool
    data: list[msgspec.Raw]
    # Optional here so that a page without one is reported as no progress, not a decode error.
    continueFrom: str | msgspec.UnsetType | None = msgspec.UNSET


_ENVELOPE = msgspec.json.Decoder(_Envelope)

# Pages up to this size have the key and timestamp of every record read in one pass.
HEADS_PASS_MAX_BYTES = 8 * 1024 * 1024

# Length of a record fingerprint (bytes); stored values in `seen` start with it.
FINGERPRINT_BYTES = 8


@dataclass(frozen=True, slots=True)
class Page:
    """One decoded page. Usable records are parallel lists (cheaper than an object each), one
    entry per key (`keys` has no duplicates); `dead` holds (reason, raw bytes) of records that
    cannot become events; `superseded` counts versions dropped for a newer one in the page.

    Each record's packed instant (`instants`) and event `modified_at` (`modified_at`: b"" where
    it is the timestamp as sent, or there is none) are read from `modified` when first asked
    for; `stamps_of` reads those of a few records only (a re-export's changed ones)."""

    has_more: bool
    continue_from: str
    keys: list[str]
    fingerprints: list[bytes]
    modified: list[str]  # the timestamp as sent ("" when absent or not a string)
    data: list[bytes]
    dead: list[tuple[str, bytes]]
    fetch_s: float = 0.0
    superseded: int = 0
    # (instants, modified_at) of every record once read (None: not yet).
    stamps: tuple[list[bytes], list[bytes]] | None = None

    @property
    def fetched(self) -> int:
        return len(self.keys) + len(self.dead) + self.superseded

    @property
    def instants(self) -> list[bytes]:
        """The `packed_instant` of each record's timestamp (b"" without one)."""
        return self._stamps()[0]

    @property
    def modified_at(self) -> list[bytes]:
        """The event's `modified_at` where it differs from `modified` (b"": the same, or none)."""
        return self._stamps()[1]

    def stamps_of(self, indexes: list[int]) -> tuple[list[bytes], list[bytes]]:
        """`instants` and `modified_at` of the records at `indexes`, in that order."""
        if self.stamps is not None:
            instants, ats = self.stamps
            return [instants[i] for i in indexes], [ats[i] for i in indexes]
        modified = self.modified
        return stamp_columns([modified[i] for i in indexes])

    def _stamps(self) -> tuple[list[bytes], list[bytes]]:
        if self.stamps is None:
            object.__setattr__(self, "stamps", stamp_columns(self.modified))
        assert self.stamps is not None
        return self.stamps


def stamp_columns(values: list[str]) -> tuple[list[bytes], list[bytes]]:
    """`instant_columns` of timestamps as sent, "" standing for none (b"" in both columns)."""
    if "" not in values:
        return instant_columns(values)
    if values.count("") == len(values):
        return [b""] * len(values), [b""] * len(values)
    return _instant_columns(values)


_DATETIMES = list[dt.datetime]


def instant_columns(values: list[str]) -> tuple[list[bytes], list[bytes]]:
    """Each timestamp's `packed_instant` and its event `modified_at` where that differs from
    the text sent (b"" when the same or when there is no timestamp), fast for what
    ServiceTitan sends: UTC, `Z`, up to seven fractional digits, trailing zeros trimmed.

    msgspec checks a whole page's timestamps in one call (format, ranges, calendar) and reads
    them to the microsecond, exactly for up to six fractional digits. Those with seven
    (`...ss.fffffffZ`, already in the `modified_at` form) take their seventh digit from the
    text: msgspec rounds it away, up or down depending on its version, which the sixth digit
    tells. Anything else (an offset, a lowercase `z`) takes the general path.
    """
    try:
        whens = msgspec.convert(values, _DATETIMES)
    except msgspec.ValidationError:
        return _instant_columns(values)
    start = _PACK_START
    packed: list[bytes] = []
    ats: list[bytes] = []
    pack, at = packed.append, ats.append
    for when, v in zip(whens, values, strict=True):
        n = len(v)
        if (
            not 20 <= n <= 28
            or v[-1] != "Z"
            or v[10] != "T"
            or (n != 20 and (n < 22 or v[19] != "."))
        ):
            # An offset, no zone, a lowercase `z`, more than seven fractional digits, ...
            one, fixed = _instant_columns([v])
            pack(one[0])
            at(fixed[0])
            continue
        since = when - start
        micro = since.microseconds
        # Ticks of the value as read (exact up to six fractional digits).
        ticks = ((since.days * 86_400 + since.seconds) * 1_000_000 + micro) * 10
        if n == 28:
            ticks += ord(v[26]) - 48  # the seventh digit; read rounded up: minus 10
            if micro % 10 != ord(v[25]) - 48:
                ticks -= 10
            pack(ticks.to_bytes(PACKED_BYTES, "big"))
            at(b"")
        else:
            pack(ticks.to_bytes(PACKED_BYTES, "big"))
            at(f"{v[:19]}.{v[20:-1].ljust(FRACTION_DIGITS, '0')}Z".encode())
    return packed, ats


# What `packed_instant` counts from.
_PACK_START = dt.datetime(1, 1, 1, tzinfo=dt.UTC)


def _instant_columns(values: list[str]) -> tuple[list[bytes], list[bytes]]:
    packed: list[bytes] = []
    ats: list[bytes] = []
    for v in values:
        sortable = sortable_instant(v)
        packed.append(packed_instant(sortable))
        at = fixed_width(sortable)
        ats.append(b"" if at == v else at.encode())
    return packed, ats


@functools.cache
def _decoders(feed: Feed) -> tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]]:
    """Decoders reading only a record's key and timestamp fields (the rest is skipped): one
    for a single record, one for the `data` list of a whole page in a single pass. The fields
    take any JSON value, so an off-schema value never fails a record; it is judged afterwards."""
    fields: list[tuple[str, Any, Any]] = [(f, Any, None) for f in feed.key_fields]
    if feed.timestamp_field and feed.timestamp_field not in feed.key_fields:
        fields.append((feed.timestamp_field, Any, None))
    head = msgspec.defstruct(f"Head_{feed.name}", fields)
    heads = msgspec.defstruct(f"Heads_{feed.name}", [("data", list[head])])  # type: ignore[valid-type]
    # Fractions as Decimal: a number beyond a float's range (`1e400`) is then an off-schema
    # value like any other, not a failure of the whole record.
    return (
        msgspec.json.Decoder(head, float_hook=decimal.Decimal),
        msgspec.json.Decoder(heads, float_hook=decimal.Decimal),
    )


def decode_page(body: bytes, feed: Feed, fetch_s: float = 0.0) -> Page:
    """Decode an export envelope; each record stays its raw bytes. Raises TransientError on a
    body that is not a valid envelope (the page is fetched again). A missing, null or empty
    continueFrom is delivered as "": the scheduler treats it as a page without progress and
    the publisher never stores it."""
    one, many = _decoders(feed)
    lenient = False
    try:
        env = _ENVELOPE.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        if not _LONE_SURROGATE.search(body):
            raise TransientError(f"invalid export page: {exc}") from None
        env, lenient = _lenient_envelope(body), True
    continue_from = env.continueFrom if isinstance(env.continueFrom, str) else ""
    raws = [bytes(r) for r in env.data]
    heads: list[Any] | None = None  # None: look at each record on its own
    # A big page's records are looked at one by one (what the whole-page pass does when a
    # record is not an object): no single call then holds a worker thread's lock on the
    # interpreter for long, and the event loop goes on.
    if not lenient and len(body) < HEADS_PASS_MAX_BYTES:
        with contextlib.suppress(msgspec.ValidationError):  # some record is not an object
            heads = many.decode(body).data
    keys_f, ts_field = feed.key_fields, feed.timestamp_field
    columns = None if heads is None or lenient else _columns(heads, raws, keys_f, ts_field)
    if columns is not None:  # every record has a key: a column at a time
        keys, fps, mods, odd_stamps = columns
        datas, dead = raws, list[tuple[str, bytes]]()
    else:
        keys, fps, mods, datas, dead, odd_stamps = _one_by_one(
            raws, heads, one, lenient, keys_f, ts_field
        )
    if ts_field is None or odd_stamps == len(keys):
        mods = [""] * len(keys)
    superseded = 0
    stamps = None  # read when first needed (a re-export needs those of the changed records)
    if len(set(keys)) < len(keys):
        instants, ats = stamp_columns(mods)
        keep = newest_per_key(keys, instants)
        superseded = len(keys) - len(keep)
        keys = [keys[i] for i in keep]
        fps = [fps[i] for i in keep]
        mods = [mods[i] for i in keep]
        stamps = [instants[i] for i in keep], [ats[i] for i in keep]
        datas = [datas[i] for i in keep]
    return Page(
        env.hasMore, continue_from, keys, fps, mods, datas, dead, fetch_s, superseded, stamps
    )


def _columns(
    heads: list[Any], raws: list[bytes], keys_f: tuple[str, ...], ts_field: str | None
) -> tuple[list[str], list[bytes], list[str], int] | None:
    """Keys, fingerprints and timestamps of a page whose every record was read in one pass,
    or None when some record has no usable key (the page is then looked at one record at a
    time, which dead-letters it)."""
    if len(keys_f) == 1:
        part = key_part
        values = list(map(operator.attrgetter(keys_f[0]), heads))
        found = [str(v) if type(v) is int else part(v) for v in values]
    else:
        fields = operator.attrgetter(*keys_f)
        found = [encode_key(fields(head)) for head in heads]
    if None in found:
        return None
    keys = cast(list[str], found)
    blake2b = hashlib.blake2b
    # The fingerprint: a short digest of the record's exact bytes.
    fps = [blake2b(data, digest_size=FINGERPRINT_BYTES).digest() for data in raws]
    if ts_field is None:
        return keys, fps, [], 0
    mods = list(map(operator.attrgetter(ts_field), heads))
    odd_stamps = len(mods) - sum(type(ts) is str for ts in mods)
    if odd_stamps:  # timestamps that are not strings
        mods = [ts if type(ts) is str else "" for ts in mods]
    return keys, fps, mods, odd_stamps


def _one_by_one(
    raws: list[bytes],
    heads: list[Any] | None,
    one: msgspec.json.Decoder[Any],
    lenient: bool,
    keys_f: tuple[str, ...],
    ts_field: str | None,
) -> tuple[list[str], list[bytes], list[str], list[bytes], list[tuple[str, bytes]], int]:
    """Keys, fingerprints, timestamps and data of the records that have a key, the dead
    letters, and how many timestamps are not strings: a record at a time (`heads`: each
    record's key and timestamp fields, None: decode each on its own)."""
    single = keys_f[0] if len(keys_f) == 1 else None
    no_key = f"record has no key ({'+'.join(keys_f)})"
    keys: list[str] = []
    fps: list[bytes] = []
    mods: list[str] = []
    datas: list[bytes] = []
    dead: list[tuple[str, bytes]] = []
    odd_stamps = 0  # timestamps that are not strings
    # The loop runs per record: no attribute or global lookups in it beyond what is needed.
    blake2b = hashlib.blake2b
    part = key_part
    for i, data in enumerate(raws):
        if heads is not None:
            head = heads[i]
        else:
            try:
                head = msgspec.convert(json.loads(data), one.type) if lenient else one.decode(data)
            except (msgspec.ValidationError, UnicodeError):  # the latter: a lenient non-object
                dead.append(("record is not a JSON object", data))
                continue
        if single is not None:
            value = getattr(head, single)
            key = str(value) if type(value) is int else part(value)
        else:
            key = encode_key([getattr(head, k) for k in keys_f])
        if key is None or (lenient and not _unicode(key)):
            dead.append((no_key, data))
            continue
        keys.append(key)
        # The fingerprint: a short digest of the record's exact bytes.
        fps.append(blake2b(data, digest_size=FINGERPRINT_BYTES).digest())
        if ts_field is not None:
            ts = getattr(head, ts_field)
            if type(ts) is not str or (lenient and not _unicode(ts)):
                ts = ""
                odd_stamps += 1
            mods.append(ts)
        datas.append(data)
    return keys, fps, mods, datas, dead, odd_stamps


# An escaped UTF-16 surrogate: alone (half of an emoji cut off), msgspec refuses the whole page.
_LONE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


class _LenientEnvelope(msgspec.Struct):
    hasMore: bool
    data: list[Any]
    continueFrom: str | msgspec.UnsetType | None = msgspec.UNSET


def _lenient_envelope(body: bytes) -> _Envelope:
    """The envelope of a page that msgspec refuses only for an unpaired surrogate escape
    (`"\\ud83d"`, which .NET may write for a string cut in the middle of an emoji): read with
    the standard library, each record still the exact bytes sent. Without this one such record
    would make its page, and so its feed, fail for good."""
    try:
        text = body.decode()
        env = msgspec.convert(json.loads(text, parse_constant=_no_constant), _LenientEnvelope)
    except (ValueError, msgspec.ValidationError) as exc:
        raise TransientError(f"invalid export page: {exc}") from None
    if isinstance(env.continueFrom, str) and not _unicode(env.continueFrom):
        raise TransientError("invalid export page: continueFrom holds an unpaired surrogate")
    # Find each element of the top-level "data" array (the last one, as json.loads keeps).
    scan = json.JSONDecoder().raw_decode
    found: list[bytes] = []
    i = _skip(text, _skip(text, 0) + 1)  # past "{"
    while text[i] != "}":
        key, i = scan(text, i)
        i = _skip(text, _skip(text, i) + 1)  # past ":"
        if key == "data":
            found = []
            i = _skip(text, i + 1)  # past "["
            while text[i] != "]":
                _, end = scan(text, i)
                found.append(text[i:end].encode())
                i = _skip(text, end)
                if text[i] == ",":
                    i = _skip(text, i + 1)
            i += 1
        else:
            _, i = scan(text, i)
        i = _skip(text, i)
        if text[i] == ",":
            i = _skip(text, i + 1)
    raws = [msgspec.Raw(r) for r in found]
    return _Envelope(env.hasMore, raws, env.continueFrom)


def _skip(text: str, i: int) -> int:
    """The index of the first character at or after `i` that is not JSON whitespace."""
    while text[i] in " \t\n\r":
        i += 1
    return i


def _unicode(text: str) -> bool:
    """Whether `text` can be written to Redis (holds no unpaired surrogate)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def newer_or_same(instant: bytes, than: bytes) -> bool:
    """Whether a version dated `instant` may replace one dated `than` (packed instants):
    unless both have a timestamp and it is older."""
    return not instant or not than or instant >= than


def newest_per_key(keys: list[str], instants: list[bytes]) -> list[int]:
    """Indexes of the version to keep for each key, in page order: what applying the versions
    one after the other would leave. A version replaces the one kept unless it is older than
    the newest timestamp seen so far for its key; among equal timestamps (or without one) the
    later in the page wins."""
    winner: dict[str, tuple[int, bytes]] = {}
    for i, key in enumerate(keys):
        ts = instants[i]
        kept = winner.get(key)
        if kept is None:
            winner[key] = (i, ts)
        elif newer_or_same(ts, kept[1]):
            winner[key] = (i, ts or kept[1])
    return sorted(i for i, _ in winner.values())
