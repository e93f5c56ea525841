"""Pure decisions of the consumer loop: what a Redis error means, which events a handler
failed, when the handler's own dependencies look down, where a lost group starts again, and
how newer versions win.

Kept apart from `syncd.consumer` so that each rule is a small function tested by a table.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, Protocol, TypeVar

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ClusterError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from syncd.consumer.events import Failed
from syncd.instants import utc_instant

__all__ = [
    "Backoff",
    "ErrorKind",
    "UnknownResult",
    "classify",
    "entry_order",
    "error_code",
    "failed_events",
    "failure_reasons",
    "is_newer_or_same",
    "regroup_at",
    "shares_of",
]

ErrorKind = Literal["nogroup", "unavailable", "error"]

# Error codes after which the same command succeeds once the server (or cluster) settles:
# a failover (READONLY, MASTERDOWN), resharding (TRYAGAIN, CLUSTERDOWN, MOVED, ASK), a server
# loading its data (LOADING), a long script (BUSY), lost replicas (NOREPLICAS), a full memory
# (OOM), a server that lost its configuration of us (NOAUTH after a restart with a password) or
# a blocked read cut short by a role change (UNBLOCKED).
_TRANSIENT_CODES = frozenset(
    {
        "READONLY",
        "MASTERDOWN",
        "TRYAGAIN",
        "CLUSTERDOWN",
        "MOVED",
        "ASK",
        "LOADING",
        "BUSY",
        "NOREPLICAS",
        "OOM",
        "NOAUTH",
        "UNBLOCKED",
    }
)
_PIPELINE_MARK = " of pipeline caused error: "


def error_code(exc: BaseException) -> str:
    """The Redis error code (`NOGROUP`, `READONLY`...) of an error reply, "" when it has none.

    redis-py prefixes errors raised from a pipeline with "Command # n (...) of pipeline caused
    error: "; the code is what follows.
    """
    text = str(exc.args[0]) if exc.args else ""
    _, mark, rest = text.partition(_PIPELINE_MARK)
    if mark:
        # Some redis-py versions put the original arguments' tuple there: ("NOGROUP ...",)
        text = rest.lstrip("(\"'")
    word = text.split(" ", 1)[0]
    return word if word.isupper() and word.isalpha() else ""


def classify(exc: BaseException) -> ErrorKind:
    """What the consumer loop does about an error from Redis.

    `nogroup`: the group (or the whole stream) is gone: create it again. `unavailable`: the
    server cannot answer now (restart, failover, resharding): back off and retry. `error`:
    anything else, also retried with backoff, but logged with its traceback.
    """
    code = error_code(exc)
    if code == "NOGROUP":
        return "nogroup"
    if code in _TRANSIENT_CODES:
        return "unavailable"
    transient = (
        RedisConnectionError,
        RedisTimeoutError,
        ReadOnlyError,
        BusyLoadingError,
        ClusterDownError,
        TryAgainError,
        ClusterError,
        ConnectionError,
        TimeoutError,
    )
    return "unavailable" if isinstance(exc, transient) else "error"


class _Keyed(Protocol):
    @property
    def stream(self) -> str: ...

    @property
    def id(self) -> str: ...


E = TypeVar("E", bound=_Keyed)


class UnknownResult(TypeError):
    """A handler returned something that does not say which events failed: a dict (such as
    `{event.id: reason}`), a str or bytes on their own, a number, True, an event outside a
    collection. Nothing of its batch may be acknowledged on its word."""

    def __init__(self, result: object) -> None:
        kind = type(result).__name__
        hint = ""
        if isinstance(result, Mapping):
            hint = " (to fail the ids a dict holds as keys, return list(it))"
        super().__init__(
            f"the handler returned a {kind}{hint}: return None when every event was handled, "
            "or a list of the failed events (or of their entry ids)"
        )
        self.kind = kind


def failed_events(batch: Sequence[E], result: object) -> list[E]:
    """The events of `batch` a handler reported as failed by returning them (or their ids).

    None: the handler handled the whole batch. A collection or iterator (list, tuple, set,
    generator...) of events, `Failed` events or entry ids (str or bytes) names the failed ones;
    the others were handled. Raises UnknownResult for any other value (see there), and
    ValueError when the handler named something that is not an event of the batch (a record
    key, an event of another batch): in both cases what it meant to fail is unknown, so
    nothing may be acknowledged on its word.
    """
    if result is None:
        return []
    if isinstance(result, str | bytes | bytearray | memoryview | Mapping) or not isinstance(
        result, Iterable
    ):
        raise UnknownResult(result)
    by_pair = {(e.stream, e.id): e for e in batch}
    by_id = {e.id: e for e in batch}
    failed: dict[tuple[str, str], E] = {}
    unknown: list[object] = []
    for item in result:
        if isinstance(item, bytes):
            item = item.decode("utf-8", "replace")
        if isinstance(item, str):
            found = [e for e in batch if e.id == item] if item in by_id else []
        elif hasattr(item, "stream") and hasattr(item, "id"):
            event = by_pair.get((str(item.stream), str(item.id)))
            found = [event] if event is not None else []
        else:
            found = []
        if not found:
            unknown.append(item)
        for event in found:
            failed[(event.stream, event.id)] = event
    if unknown:
        shown = ", ".join(repr(getattr(i, "id", i))[:40] for i in unknown[:3])
        raise ValueError(
            f"the handler reported {len(unknown)} failure(s) that are not events of its "
            f"batch ({shown}): return the failed events or their entry ids"
        )
    return [e for e in batch if (e.stream, e.id) in failed]


def failure_reasons(result: object) -> dict[tuple[str, str], str]:
    """(stream, entry id) -> reason of the failures a handler gave a reason for (`Failed`),
    in a result `failed_events` accepted."""
    if not isinstance(result, Iterable) or isinstance(result, str | bytes | Mapping):
        return {}
    return {(f.stream, f.id): f.reason for f in result if isinstance(f, Failed)}


class Backoff:
    """Doubling delays between `low` and `high` seconds; `reset` after a success."""

    def __init__(self, low: float = 0.5, high: float = 30.0) -> None:
        self.low = low
        self.high = high
        self.delay = low

    def next(self) -> float:
        """The delay to wait now; the one after it doubles."""
        delay = self.delay
        self.delay = min(self.delay * 2, self.high)
        return delay

    def reset(self) -> None:
        self.delay = self.low


def regroup_at(seen: str | None, held: bool, length: int, start: str) -> tuple[str, str]:
    """Where a lost group is created again on one stream, and what that does (for the log).

    `seen` is the newest entry id the consumer was handed on the stream (None: none yet),
    `held` whether the stream still holds that entry, `length` how many entries the stream
    holds and `start` the consumer's `start`; see `Consumer.recover_groups`.
    """
    if seen is not None and held:
        return seen, "resumes after the newest event this consumer was handed"
    if seen is not None:
        return "0", f"a new stream: its {length} entries are all news"
    if start == "beginning":
        return "0", f"replays the {length} entries the stream holds"
    return "$", "skips what was added while the group was missing"


def is_newer_or_same(incoming: str | None, stored: str | None) -> bool:
    """Whether the instant `incoming` is newer than or equal to `stored`, compared as the
    instants they name: `modified_at` values (fixed-width UTC text) or `modified_on` values (any
    ISO 8601 text, whatever its offset or fraction length, read exactly as the daemon computes
    `modified_at`; a fraction is compared to 100 ns). A missing or unreadable value on either
    side answers True.

    Timestamps alone do not order a key's versions (two may share one; a key may have none):
    to apply redelivered events, compare `Event.version`, which adds the entry id.
    """
    new = utc_instant(incoming) if incoming else ""
    old = utc_instant(stored) if stored else ""
    return not new or not old or new >= old


def shares_of(heads: Mapping[str, Sequence[str]], limit: int) -> dict[str, int]:
    """How many of the `limit` oldest entries fall to each stream, given the next entry ids
    of each (`heads`: stream -> ids in stream order); streams with none are left out. Across
    streams, entry ids are publication times: oldest first, ties in the order of `heads`."""
    merged = sorted(
        (entry_order(entry_id), rank, stream)
        for rank, (stream, ids) in enumerate(heads.items())
        for entry_id in ids
    )
    shares: dict[str, int] = {}
    for _, _, stream in merged[:limit]:
        shares[stream] = shares.get(stream, 0) + 1
    return shares


def entry_order(entry_id: str) -> tuple[int, int]:
    """A stream entry id as a sortable pair: within one stream, later entries are newer."""
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
