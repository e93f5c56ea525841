"""What the real API and its gateways do that a kind server would not: switchable per tenant.

`Quirks` holds every switch. `SimOptions.quirks` applies to all tenants, `SimOptions.tenant_quirks`
replaces it for some tenants at start, and `POST /_sim/tenants/<T>/quirks` changes one tenant at
runtime. Rates are shares of requests (or of records, where it says so), drawn from a random
stream per tenant derived from the seed, so a run is repeatable.
"""

from __future__ import annotations

import json
import math
from random import Random
from typing import Any, Literal

import msgspec

from syncd.simulator.data import ChangeQuirks, Entry, FeedLog
from syncd.simulator.offschema import RecordStyle

NoProgressCursor = Literal["same", "missing", "null", "empty", "alternate"]
RateLimitBody = Literal["problem", "apim", "apim-retry-after", "text", "html"]
ErrorBody = Literal["problem", "text", "html"]
EchoCredential = Literal["none", "token", "app_key", "other_token", "other_secret"]
EchoPlace = Literal["record", "key", "timestamp", "cursor"]

# An HTTP date must stay a valid one: a year either way is far beyond any real clock error.
MAX_DATE_OFFSET_S = 366 * 86400.0

_RATES = (
    "stale_repeats",
    "duplicate_keys",
    "out_of_order",
    "shared_timestamps",
    "required_nulls",
    "enum_integers",
    "numeric_modified_on",
    "naive_timestamps",
    "keyless",
    "deletions",
    "no_progress",
    "hang",
    "hang_token",
)


class Quirks(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The quirks in force for one tenant; the defaults are what the real API always does."""

    # With includeRecentChanges, pages start a few records before the cursor, so a drained
    # feed answers its tail again with the same continueFrom (ServiceTitan documents repeats).
    repeat_tail: bool = True
    # Share of records in that repeated tail served in their previous version (older content and
    # modifiedOn than already served). Only records changed at least once have one.
    stale_repeats: float = 0.0
    # Share of a page's records (changed at least once) also served in their previous version,
    # at a random place in the same page: one key twice with different versions.
    duplicate_keys: float = 0.0
    # Share of pages whose records come in a shuffled order (never the order of the log).
    out_of_order: float = 0.0
    # Share of the changes of one batch (a mutation of several records) after its first that
    # take the timestamp of the change before them: several records share one modifiedOn.
    shared_timestamps: float = 0.0
    # Shares of record versions off the published schema, each drawn per version (so a version
    # looks the same on every page and in the ground truth): some required fields (never the
    # key nor the timestamp) null; documented string enums as integers (the value's index);
    # the feed's timestamp (modifiedOn, or createdOn) as a number of Unix milliseconds; every
    # date-time without its zone, with 0, 3, 6, 7 or 9 fractional digits.
    required_nulls: float = 0.0
    enum_integers: float = 0.0
    numeric_modified_on: float = 0.0
    naive_timestamps: float = 0.0
    # Share of created records without a usable key (its last key field null or missing, in
    # turn). They stay in the change log, so a drained feed's repeated tail repeats them.
    keyless: float = 0.0
    # Share of the background mutator's changes that delete a record: it vanishes from every
    # later page. (`POST .../mutate?kind=delete` deletes whatever this says.)
    deletions: float = 0.0
    # Share of export requests answered `hasMore: true`, no data, and no way forward.
    no_progress: float = 0.0
    # The continueFrom of such pages: the requested one, absent, null, "", or one of two cursors
    # in turn (A -> B -> A ...: a new one each page, and never a way forward).
    no_progress_cursor: NoProgressCursor = "same"
    # Share of export requests (after auth and the rate limit) never answered.
    hang: float = 0.0
    # Share of token requests (of the tenant named by client_id) never answered.
    hang_token: float = 0.0
    # Body of 429s: ProblemDetails with Retry-After, or Azure API Management's
    # {"statusCode": 429, "message": "... Try again in N seconds."} without or with Retry-After.
    rate_limit_body: RateLimitBody = "problem"
    # Body of injected 5xx answers (export and token endpoint): ProblemDetails, a text/plain
    # reason phrase, or a gateway's HTML page (IIS for 500, HTTP.sys for 503, nginx otherwise).
    error_body: ErrorBody = "problem"
    # Export responses gzip-encoded for clients that accept it (Accept-Encoding: gzip).
    gzip: bool = False
    # Seconds added to the Date header of export answers (negative: behind): an API whose
    # clock is off from the client's.
    date_offset: float = 0.0
    # A credential written into every export page (a hostile or broken API): the request's
    # token, the app key, the live token of another tenant or another tenant's client secret;
    # in the first record (a field of its own, its key or its timestamp) or as continueFrom;
    # every character as a \\uXXXX escape unless echo_escaped is off.
    echo_credential: EchoCredential = "none"
    echo_in: EchoPlace = "record"
    echo_escaped: bool = True

    def check(self) -> str | None:
        """A message naming the first bad field, or None."""
        for name in _RATES:
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                return f"{name}={value!r}: must be a probability in [0, 1]"
        if not (math.isfinite(self.date_offset) and abs(self.date_offset) <= MAX_DATE_OFFSET_S):
            return f"date_offset={self.date_offset!r}: must be seconds within a year either way"
        return None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        result: dict[str, Any] = msgspec.to_builtins(self)
        return result

    def apply(self, changes: dict[str, Any]) -> Quirks:
        """A copy with `changes` (field name -> JSON value) applied; ValueError when invalid."""
        merged = {**self.to_json(), **changes}
        try:
            made = msgspec.convert(merged, type=Quirks)
        except msgspec.ValidationError as exc:
            raise ValueError(f"quirks: {exc}") from None
        message = made.check()
        if message is not None:
            raise ValueError(f"quirks: {message}")
        return made

    @property
    def edits_pages(self) -> bool:
        """Whether pages must be built per request instead of served from the page cache."""
        return self.stale_repeats > 0 or self.duplicate_keys > 0 or self.out_of_order > 0

    @property
    def record_style(self) -> RecordStyle | None:
        """How record versions deviate from their schema; None when they do not."""
        style = RecordStyle(
            required_nulls=self.required_nulls,
            enum_integers=self.enum_integers,
            numeric_modified_on=self.numeric_modified_on,
            naive_timestamps=self.naive_timestamps,
        )
        return None if style == _PLAIN else style

    def change_quirks(self, rng: Random) -> ChangeQuirks | None:
        """What these quirks do to changes made now, drawing from `rng`; None for nothing."""
        if self.keyless <= 0 and self.shared_timestamps <= 0:
            return None
        return ChangeQuirks(self.keyless, self.shared_timestamps, rng)


_PLAIN = RecordStyle()


def quirk_names() -> tuple[str, ...]:
    """Every quirk's field name."""
    return Quirks.__struct_fields__


def parse_assignments(text: str, where: str) -> dict[str, Any]:
    """`name=value,...` as JSON-typed values for `Quirks.apply`; ValueError naming `where`."""
    changes: dict[str, Any] = {}
    known = quirk_names()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = name.strip().replace("-", "_")
        if not sep or name not in known:
            raise ValueError(
                f"{where}: {part!r} is not NAME=VALUE with NAME one of {', '.join(known)}"
            )
        changes[name] = _value(name, raw.strip())
    return changes


def _value(name: str, raw: str) -> Any:
    """`raw` as the JSON value field `name` takes; left as text when it does not fit."""
    default = getattr(_DEFAULTS, name)
    if isinstance(default, bool):
        return _BOOLS.get(raw.lower(), raw)
    if isinstance(default, float):
        try:
            return float(raw)
        except ValueError:
            return raw
    return raw


_DEFAULTS = Quirks()
_BOOLS = {
    **dict.fromkeys(("true", "on", "yes", "1"), True),
    **dict.fromkeys(("false", "off", "no", "0"), False),
}


def edit_entries(
    log: FeedLog, entries: list[Entry], quirks: Quirks, rng: Random, tail_end: int
) -> list[Entry]:
    """The entries of a page as a quirky server would send them.

    `tail_end` is the position of the requested cursor: entries before it are the repeated tail.
    """
    result = list(entries)
    if quirks.stale_repeats > 0:
        for n, entry in enumerate(result):
            if entry.position < tail_end and rng.random() < quirks.stale_repeats:
                older = log.previous_entry(entry.index)
                if older is not None:
                    result[n] = older
    if quirks.duplicate_keys > 0:
        for entry in list(result):
            older = log.previous_entry(entry.index)
            if older is not None and older != entry and rng.random() < quirks.duplicate_keys:
                result.insert(rng.randrange(len(result) + 1), older)
    if quirks.out_of_order > 0 and len(result) > 1 and rng.random() < quirks.out_of_order:
        ordered = list(result)
        rng.shuffle(result)
        if result == ordered:
            result.append(result.pop(0))
    return result


_ECHO_MARK = "\x00syncd-sim-echo\x00"


def echo_in_page(
    body: bytes,
    secret: str,
    place: EchoPlace,
    escaped: bool,
    key_fields: tuple[str, ...],
    timestamp_field: str | None,
) -> bytes:
    """An export page `body` with `secret` in `place`: a field "echo" of its first record, that
    record's key (its last key field) or timestamp, or the continueFrom. `escaped`: every
    character written as a \\uXXXX escape. A page without records is left as it is unless the
    place is its cursor."""
    page = json.loads(body)
    if place == "cursor":
        page["continueFrom"] = _ECHO_MARK
    else:
        records = page.get("data") or []
        if not records or not isinstance(records[0], dict):
            return body
        field = {
            "record": "echo",
            "key": key_fields[-1],
            "timestamp": timestamp_field or "modifiedOn",
        }[place]
        records[0][field] = _ECHO_MARK
    text = json.dumps(page, ensure_ascii=False)
    if escaped:
        spelt = "".join(f"\\u{ord(c):04x}" for c in secret)
    else:
        spelt = json.dumps(secret, ensure_ascii=False)[1:-1]
    return text.replace(json.dumps(_ECHO_MARK)[1:-1], spelt, 1).encode()
