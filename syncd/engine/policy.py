"""Scheduling decisions, pure: what a poll's outcome does to a feed and its tenant, when a feed
is due next, whether a page moved a feed on, when a `--once` run is over.

Nothing here reads a clock, sleeps or does I/O: the scheduler passes the time and the facts
in and applies the decisions it gets back. Tested by tables in tests/test_scheduler_policy.py.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Literal

from syncd.engine.ratelimit import backoff, jittered

# A feed refused with 403/404 is tried again this much later (permissions may be granted).
PARK_S = 3600.0
# Credentials refused by the token endpoint: retry no faster than this.
AUTH_RETRY_S = 300.0
# Fresh start: spread the first polls over this window (or the poll interval, if shorter).
STARTUP_SPREAD_S = 5.0

OutcomeKind = Literal[
    "page",  # a page applied, the feed drained (hasMore false)
    "more",  # a page applied, more pages waiting
    "refused",  # the fence refused the page: another cursor was adopted
    "memory",  # Redis had no room: nothing changed, polling pauses as a whole
    "rate_limited",  # 429: the tenant pauses
    "parked",  # 403/404
    "auth",  # credentials refused
    "error",  # anything worth retrying with backoff
    "replicas",  # fewer than `wait_replicas` replicas acknowledged: the feed is held
    "no_progress",  # the API answered without moving the feed on
]


@dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one poll, as far as scheduling is concerned."""

    kind: OutcomeKind
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Rules:
    """The engine settings the decisions depend on."""

    once: bool = False
    once_max_failures: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 0.1


@dataclass(frozen=True, slots=True)
class FeedFacts:
    """What the decisions need to know about a feed before the poll's outcome."""

    failures: int = 0
    drained: bool = False  # answered hasMore false at least once since start
    stuck: bool = False  # inside a no-progress episode
    poll_interval: float = 300.0


@dataclass(frozen=True, slots=True)
class AfterPoll:
    """A feed's state after a poll, and what the scheduler should do about it."""

    failures: int
    drained: bool
    stuck: bool
    failed: bool  # --once gives up on the feed
    due: float | None  # when to poll it again; None: not again (--once: done or given up)
    error: bool  # a failure: recorded in the feed's state hash
    episode: Literal["started", "ended"] | None = None  # a no-progress episode began / ended
    newly_drained: bool = False


_SUCCESS = frozenset({"page", "more"})
_NEUTRAL = frozenset({"refused", "memory"})  # no failure, no success: try again at once
_FATAL = frozenset({"parked", "auth"})  # --once gives up at the first one
# --once bears this many times once_max_failures 429s in a row before it gives up on a feed: a
# tenant whose budget other apps share gets patience, one refused for good does not keep the
# run going for ever.
ONCE_RATE_LIMIT_PATIENCE = 5
# --once bears this many times once_max_failures short WAITs in a row of the probe that waits
# for the replicas before it gives up on them (see replicas_given_up).
ONCE_REPLICAS_PATIENCE = 5


def after_poll(
    feed: FeedFacts, outcome: Outcome, now: float, rules: Rules, rng: random.Random
) -> AfterPoll:
    """Apply one poll's outcome to a feed: failures, drained, --once verdict, next due time.

    429s count as failures for the backoff, and fail a --once run only after many more in a
    row than other failures (ONCE_RATE_LIMIT_PATIENCE): other apps may share the tenant's
    budget. A no-progress page is a failure like a 5xx: it backs off and counts toward
    `once_max_failures`, and its episode is reported once, when it starts and ends. Replicas
    behind are not the feed's failure: recorded and backed off from, they leave its failures
    as they were and never fail it (the scheduler's hold judges the replicas, see
    replicas_given_up).
    """
    kind = outcome.kind
    if kind in _SUCCESS:
        failures, error = 0, False
    elif kind in _NEUTRAL:
        failures, error = feed.failures, False
    elif kind == "replicas":  # recorded, not counted against the feed
        failures, error = feed.failures, True
    else:
        failures, error = feed.failures + 1, True
    drained = feed.drained or kind == "page"
    stuck = kind == "no_progress" or (feed.stuck and kind not in _SUCCESS)
    episode: Literal["started", "ended"] | None = None
    if stuck and not feed.stuck:
        episode = "started"
    elif feed.stuck and not stuck:
        episode = "ended"
    failed = False
    if rules.once and error and kind != "replicas":
        limit = rules.once_max_failures
        if kind == "rate_limited":
            limit *= ONCE_RATE_LIMIT_PATIENCE
        failed = kind in _FATAL or failures >= limit
    due: float | None = None
    if not failed and not (rules.once and drained):
        due = next_due(
            outcome,
            now,
            poll_interval=feed.poll_interval,
            failures=failures,
            backoff_base=rules.backoff_base,
            backoff_max=rules.backoff_max,
            jitter=rules.jitter,
            rng=rng,
        )
    return AfterPoll(
        failures=failures,
        drained=drained,
        stuck=stuck,
        failed=failed,
        due=due,
        error=error,
        episode=episode,
        newly_drained=drained and not feed.drained,
    )


def next_due(
    outcome: Outcome,
    now: float,
    *,
    poll_interval: float,
    failures: int,
    backoff_base: float,
    backoff_max: float,
    jitter: float,
    rng: random.Random,
) -> float:
    """When a feed is due again after `outcome`."""
    kind = outcome.kind
    if kind in ("more", "refused", "memory"):
        return now
    if kind == "page":
        return now + jittered(poll_interval, jitter, rng)
    if kind == "rate_limited":
        wait = outcome.retry_after
        if wait is None:
            wait = backoff(failures, base=backoff_base, cap=backoff_max, jitter=jitter, rng=rng)
        return now + wait
    if kind == "parked":
        return now + PARK_S
    if kind == "auth":
        return now + max(AUTH_RETRY_S, backoff(failures, base=backoff_base, cap=backoff_max))
    if kind == "replicas":  # not a failure of the feed's, but not to be tried again at once
        failures += 1
    return now + backoff(failures, base=backoff_base, cap=backoff_max, jitter=jitter, rng=rng)


def rate_limit_pause(
    paused_until: float,
    now: float,
    retry_after: float | None,
    failures: int,
    rules: Rules,
    rng: random.Random,
) -> tuple[float, float]:
    """A 429 for a tenant: (its new pause end, the wait). Without a usable announced wait, back
    off rather than retry at full speed; a pause already longer is kept."""
    wait = retry_after
    if wait is None or wait <= 0:
        wait = backoff(
            failures + 1,
            base=rules.backoff_base,
            cap=rules.backoff_max,
            jitter=rules.jitter,
            rng=rng,
        )
    return max(paused_until, now + wait), wait


def replicas_given_up(rules: Rules, attempts: int) -> bool:
    """Whether a --once run stops waiting for replicas that have not caught up through
    `attempts` settles in a row (each a WAIT of up to `wait_timeout`).

    Replicas that catch up now and then keep the run going: each time they do, the feeds held
    go on and the count starts again. Replicas that do not are given as much patience as a
    rate-limited tenant (once_max_failures x ONCE_REPLICAS_PATIENCE); a running daemon waits
    for them for ever.
    """
    return rules.once and attempts >= rules.once_max_failures * ONCE_REPLICAS_PATIENCE


def settle_first(waits: bool, settled: bool) -> bool:
    """Whether a poll first makes sure replicas hold the feed's stored cursor (and everything
    written before it) instead of fetching from it at once.

    With `[redis] wait_replicas`, a cursor is safe to fetch past only once that many replicas
    acknowledged it: after a page applied and waited for, or a fenced page whose stored cursor
    was waited for, it is; a cursor read from Redis at start (a page of an earlier run may have
    failed its WAIT) or left by a page whose WAIT failed is not, and is settled first.
    """
    return waits and not settled


# Cursors a feed remembers of its current run of `hasMore: true` pages: a continueFrom that the
# run already asked with (A -> B -> A) is a loop, not progress.
TRAIL = 32
# `hasMore: true` pages in a row without a record, each with a new cursor: from this many on, the
# feed still moves on but backs off like a failure, so that an API handing out fresh cursors and
# no data for ever neither takes the tenant's whole budget nor keeps a --once run going.
MAX_EMPTY_RUN = 100


@dataclass(frozen=True, slots=True)
class NoProgress:
    """A page that does not move its feed on, and what the API sent."""

    has_more: bool
    records: int
    cursor_repeated: bool  # continueFrom equals a `from` of this run of pages (or this page's)
    cursor_missing: bool  # continueFrom empty: there is nothing to resume from
    empty_pages: int = 0  # applied, but the latest of this many empty pages in a row


def page_progress(
    sent_from: str | None,
    has_more: bool,
    records: int,
    continue_from: str,
    trail: Collection[str] = (),
) -> NoProgress | None:
    """None when a page moves its feed on; else why it does not.

    `hasMore: true` with the cursor it was asked with, or with one its run of pages asked with
    before (`trail`), would be asked again for ever. A drained feed answering `hasMore: false`
    with the same cursor is the normal includeRecentChanges repeat. An empty continueFrom leaves
    nothing to resume from, whatever hasMore says.
    """
    missing = not continue_from
    repeated = has_more and (
        (sent_from is not None and continue_from == sent_from) or continue_from in trail
    )
    if not (missing or repeated):
        return None
    return NoProgress(has_more, records, repeated, missing)


def follow(
    trail: tuple[str, ...], empty_run: int, sent_from: str | None, has_more: bool, records: int
) -> tuple[tuple[str, ...], int, NoProgress | None]:
    """After a page applied: the feed's trail (cursors its run of `hasMore: true` pages asked
    with, the latest TRAIL), its run of empty pages, and whether that run is too long to count
    as progress (see MAX_EMPTY_RUN). A drained page ends the run."""
    if not has_more:
        return (), 0, None
    if sent_from is not None:
        trail = (*trail, sent_from)[-TRAIL:]
    empty_run = empty_run + 1 if records == 0 else 0
    if empty_run < MAX_EMPTY_RUN:
        return trail, empty_run, None
    return trail, empty_run, NoProgress(True, 0, False, False, empty_run)


def resume_delay(
    now_unix: float,
    last_ok: float | None,
    more: bool,
    interval: float,
    rng: random.Random,
) -> float:
    """Seconds until a resumed feed is first due after a (re)start.

    A feed that had more pages waiting goes at once; a drained one keeps its rhythm (due an
    interval after its last success); overdue or unknown ones spread over a few seconds.
    """
    if more:
        return 0.0
    spread = rng.uniform(0, min(interval, STARTUP_SPREAD_S))
    if last_ok is None:
        return spread
    due_in = last_ok + interval - now_unix
    if due_in <= 0:
        return spread
    return min(due_in, interval)


def first_delay(
    has_cursor: bool, once: bool, stored_delay: float | None, interval: float, rng: random.Random
) -> float:
    """Seconds after now that a newly scheduled feed is first due.

    New feeds backfill at once (and --once polls everything at once); resumed ones take the
    delay their stored state gives (see resume_delay), else spread over a few seconds so that
    a restart does not fire every drained feed in the same second.
    """
    if not has_cursor or once:
        return 0.0
    if stored_delay is not None:
        return stored_delay
    return rng.uniform(0, min(interval, STARTUP_SPREAD_S))


def once_finished(feeds: Iterable[tuple[bool, bool, bool]]) -> bool:
    """Whether a --once run is over: every feed, as (drained, failed, running), is drained or
    given up, and none is being polled."""
    return all((drained or failed) and not running for drained, failed, running in feeds)
