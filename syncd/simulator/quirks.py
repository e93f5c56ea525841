"""What the real API and its gateways do that a kind server would not: switchable per tenant.

`Quirks` holds every switch. `SimOptions.quirks` applies to all tenants, `SimOptions.tenant_quirks`
replaces it for some tenants at start, and `POST /_sim/tenants/<T>/quirks` changes one tenant at
runtime. Rates are shares of requests (or of records, where it says so), drawn from a random
stream per tenant derived from the seed, so a run is repeatable.
"""

from __future__ import annotations

import math
from random import Random
from typing import Any, Literal

import msgspec

from syncd.simulator.data import Entry, FeedLog

NoProgressCursor = Literal["same", "missing", "null", "empty"]
RateLimitBody = Literal["problem", "apim", "apim-retry-after"]

_RATES = ("stale_repeats", "duplicate_keys", "no_progress", "hang", "hang_token")


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
    # Share of export requests answered `hasMore: true`, no data, and no way forward.
    no_progress: float = 0.0
    # The continueFrom of such pages: the requested one, absent, null or "".
    no_progress_cursor: NoProgressCursor = "same"
    # Share of export requests (after auth and the rate limit) never answered.
    hang: float = 0.0
    # Share of token requests (of the tenant named by client_id) never answered.
    hang_token: float = 0.0
    # Body of 429s: ProblemDetails with Retry-After, or Azure API Management's
    # {"statusCode": 429, "message": "... Try again in N seconds."} without or with Retry-After.
    rate_limit_body: RateLimitBody = "problem"

    def check(self) -> str | None:
        """A message naming the first bad field, or None."""
        for name in _RATES:
            value = getattr(self, name)
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                return f"{name}={value!r}: must be a probability in [0, 1]"
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
        return self.stale_repeats > 0 or self.duplicate_keys > 0


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
        changes[name] = _value(raw.strip())
    return changes


def _value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("true", "on", "yes"):
        return True
    if lowered in ("false", "off", "no"):
        return False
    try:
        return float(raw)
    except ValueError:
        return raw


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
    return result
