"""The scheduler's decisions (syncd.engine.policy), by tables: no clock, no sockets."""

from __future__ import annotations

import random

import pytest

from syncd.engine.policy import (
    MAX_EMPTY_RUN,
    ONCE_RATE_LIMIT_PATIENCE,
    ONCE_REPLICAS_PATIENCE,
    TRAIL,
    AfterPoll,
    FeedFacts,
    NoProgress,
    Outcome,
    Rules,
    after_poll,
    first_delay,
    follow,
    once_finished,
    page_progress,
    rate_limit_pause,
    replicas_given_up,
    settle_first,
)

NOW = 1000.0
RUN = Rules(once=False, once_max_failures=3, backoff_base=1.0, backoff_max=60.0, jitter=0.0)
ONCE = Rules(once=True, once_max_failures=3, backoff_base=1.0, backoff_max=60.0, jitter=0.0)
FRESH = FeedFacts(poll_interval=300.0)


def _after(
    facts: FeedFacts, kind: str, rules: Rules = RUN, retry: float | None = None
) -> AfterPoll:
    return after_poll(facts, Outcome(kind, retry), NOW, rules, random.Random(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("facts", "kind", "rules", "expected"),
    [
        # Success resets failures; a drained page waits an interval, more pages go at once.
        (FeedFacts(failures=2), "more", RUN, AfterPoll(0, False, False, False, NOW, False)),
        (FRESH, "page", RUN, AfterPoll(0, True, False, False, NOW + 300, False, None, True)),
        (FeedFacts(drained=True), "page", RUN, AfterPoll(0, True, False, False, NOW + 300, False)),
        # Failures back off exponentially.
        (FeedFacts(failures=2), "error", RUN, AfterPoll(3, False, False, False, NOW + 4, True)),
        # ... however long a feed has been failing (2.0 ** 1024 overflows a float).
        (
            FeedFacts(failures=5000),
            "error",
            RUN,
            AfterPoll(5001, False, False, False, NOW + 60, True),
        ),
        (
            FeedFacts(failures=5000),
            "auth",
            RUN,
            AfterPoll(5001, False, False, False, NOW + 300, True),
        ),
        # A no-progress page is a failure that starts an episode ...
        (FRESH, "no_progress", RUN, AfterPoll(1, False, True, False, NOW + 1, True, "started")),
        # ... which goes on through further stalls and other failures, reported once ...
        (
            FeedFacts(failures=1, stuck=True),
            "no_progress",
            RUN,
            AfterPoll(2, False, True, False, NOW + 2, True),
        ),
        (
            FeedFacts(failures=2, stuck=True),
            "error",
            RUN,
            AfterPoll(3, False, True, False, NOW + 4, True),
        ),
        (
            FeedFacts(failures=2, stuck=True),
            "refused",
            RUN,
            AfterPoll(2, False, True, False, NOW, False),
        ),
        # ... and ends with the first page that moves the feed on.
        (
            FeedFacts(failures=4, stuck=True),
            "more",
            RUN,
            AfterPoll(0, False, False, False, NOW, False, "ended"),
        ),
        # Neutral outcomes neither fail nor succeed: at once again.
        (FeedFacts(failures=1), "refused", RUN, AfterPoll(1, False, False, False, NOW, False)),
        (FeedFacts(failures=1), "memory", RUN, AfterPoll(1, False, False, False, NOW, False)),
        # 429: waits what was announced.
        (FRESH, "rate_limited", RUN, AfterPoll(1, False, False, False, NOW + 7, True)),
        (FRESH, "parked", RUN, AfterPoll(1, False, False, False, NOW + 3600, True)),
        (FRESH, "auth", RUN, AfterPoll(1, False, False, False, NOW + 300, True)),
        # --once: a drained feed is done; enough failures in a row give up on it ...
        (FRESH, "page", ONCE, AfterPoll(0, True, False, False, None, False, None, True)),
        (FeedFacts(failures=1), "error", ONCE, AfterPoll(2, False, False, False, NOW + 2, True)),
        (FeedFacts(failures=2), "error", ONCE, AfterPoll(3, False, False, True, None, True)),
        # ... no-progress pages count like any failure ...
        (
            FeedFacts(failures=2, stuck=True),
            "no_progress",
            ONCE,
            AfterPoll(3, False, True, True, None, True),
        ),
        # ... 403/404 and refused credentials at once; 429s only after many more in a row.
        (FRESH, "parked", ONCE, AfterPoll(1, False, False, True, None, True)),
        (FRESH, "auth", ONCE, AfterPoll(1, False, False, True, None, True)),
        (
            FeedFacts(failures=9),
            "rate_limited",
            ONCE,
            AfterPoll(10, False, False, False, NOW + 7, True),
        ),
        (
            FeedFacts(failures=3 * ONCE_RATE_LIMIT_PATIENCE - 1),
            "rate_limited",
            ONCE,
            AfterPoll(3 * ONCE_RATE_LIMIT_PATIENCE, False, False, True, None, True),
        ),
        (  # a running daemon never gives up
            FeedFacts(failures=99),
            "rate_limited",
            RUN,
            AfterPoll(100, False, False, False, NOW + 7, True),
        ),
        # Replicas behind: the feed is held; recorded and backed off from as after one more
        # failure (not a success, not neutral: it must not be polled again at once), but not
        # the feed's failure: its failures stay as they were ...
        (FRESH, "replicas", RUN, AfterPoll(0, False, False, False, NOW + 1, True)),
        (
            FeedFacts(failures=3, drained=True),
            "replicas",
            RUN,
            AfterPoll(3, True, False, False, NOW + 8, True),
        ),
        # ... and a --once run never gives up on the feed for them (the hold's probe judges
        # the replicas: see test_once_gives_up_on_replicas): where an error would end the feed
        # (failures=2, above), they do not.
        (FeedFacts(failures=2), "replicas", ONCE, AfterPoll(2, False, False, False, NOW + 4, True)),
    ],
)
def test_after_poll(facts: FeedFacts, kind: str, rules: Rules, expected: AfterPoll) -> None:
    retry = 7.0 if kind == "rate_limited" else None
    assert _after(facts, kind, rules, retry) == expected


def test_no_progress_backs_off_like_a_failure() -> None:
    """A feed stalling over and over waits longer each time, up to backoff_max: it does not
    spend its tenant's budget."""
    facts, dues = FeedFacts(), []
    for _ in range(10):
        d = _after(facts, "no_progress")
        assert d.due is not None
        dues.append(d.due - NOW)
        facts = FeedFacts(d.failures, d.drained, d.stuck)
    assert dues == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]


@pytest.mark.parametrize(
    ("sent", "has_more", "records", "continue_from", "expected"),
    [
        ("c1", True, 50, "c2", None),  # a page further on
        ("c1", True, 0, "c2", None),  # nothing in it, but a new cursor: moved on
        (None, True, 50, "c1", None),  # the first page
        ("2024-01-01", True, 10, "c1", None),  # the first page after a start date
        ("c1", False, 0, "c1", None),  # drained: the includeRecentChanges repeat is normal
        ("c1", False, 3, "c1", None),  # ... with its repeated tail
        ("c1", True, 0, "c1", NoProgress(True, 0, True, False)),  # the same cursor again
        ("c1", True, 5, "c1", NoProgress(True, 5, True, False)),  # ... records or not
        ("c1", True, 0, "", NoProgress(True, 0, False, True)),  # no cursor to resume from
        ("c1", False, 0, "", NoProgress(False, 0, False, True)),
        (None, False, 4, "", NoProgress(False, 4, False, True)),
    ],
)
def test_page_progress(
    sent: str | None, has_more: bool, records: int, continue_from: str, expected: object
) -> None:
    assert page_progress(sent, has_more, records, continue_from) == expected


@pytest.mark.parametrize(
    ("trail", "sent", "has_more", "continue_from", "expected"),
    [
        # A -> B -> A: the cursor this run asked with two pages ago comes back.
        (("A",), "B", True, "A", NoProgress(True, 0, True, False)),
        (("2024-01-01", "A", "B"), "C", True, "A", NoProgress(True, 0, True, False)),
        (("A",), "B", True, "C", None),  # a new one: moved on
        # A drained feed's repeat is no loop, whatever the trail says.
        (("A",), "B", False, "A", None),
    ],
)
def test_page_progress_loops(
    trail: tuple[str, ...], sent: str, has_more: bool, continue_from: str, expected: object
) -> None:
    assert page_progress(sent, has_more, 0, continue_from, trail) == expected


@pytest.mark.parametrize(
    ("trail", "empty_run", "sent", "has_more", "records", "expected"),
    [
        ((), 0, "A", True, 5, (("A",), 0, None)),  # the run remembers what it asked with
        (("A",), 3, "B", True, 0, (("A", "B"), 4, None)),  # an empty page lengthens it
        (("A",), 3, "B", True, 1, (("A", "B"), 0, None)),  # a record ends the empty run
        (("A", "B"), 7, "C", False, 0, ((), 0, None)),  # a drained page ends the run
        (("A",), 0, None, True, 2, (("A",), 0, None)),  # nothing sent: nothing to remember
        # Only the latest TRAIL cursors are kept.
        (
            tuple(map(str, range(TRAIL))),
            0,
            "X",
            True,
            1,
            ((*map(str, range(1, TRAIL)), "X"), 0, None),
        ),
        # Fresh cursors and no data, for ever: moved on, but no progress after enough of them.
        (
            ("A",),
            MAX_EMPTY_RUN - 1,
            "B",
            True,
            0,
            (("A", "B"), MAX_EMPTY_RUN, NoProgress(True, 0, False, False, MAX_EMPTY_RUN)),
        ),
        (
            ("A",),
            MAX_EMPTY_RUN + 5,
            "B",
            True,
            0,
            (("A", "B"), MAX_EMPTY_RUN + 6, NoProgress(True, 0, False, False, MAX_EMPTY_RUN + 6)),
        ),
    ],
)
def test_follow(
    trail: tuple[str, ...],
    empty_run: int,
    sent: str | None,
    has_more: bool,
    records: int,
    expected: object,
) -> None:
    assert follow(trail, empty_run, sent, has_more, records) == expected


@pytest.mark.parametrize(
    ("paused_until", "retry_after", "failures", "expected"),
    [
        (0.0, 3.0, 0, (NOW + 3, 3.0)),  # the announced wait
        (NOW + 10, 3.0, 0, (NOW + 10, 3.0)),  # a longer pause already running is kept
        (0.0, None, 0, (NOW + 1, 1.0)),  # nothing announced: back off ...
        (0.0, None, 3, (NOW + 8, 8.0)),  # ... more after each failure
        (0.0, None, 5000, (NOW + 60, 60.0)),  # ... up to backoff_max, however many
        (0.0, 0.0, 0, (NOW + 1, 1.0)),  # "retry at once" is not taken at its word
    ],
)
def test_rate_limit_pause(
    paused_until: float, retry_after: float | None, failures: int, expected: tuple[float, float]
) -> None:
    got = rate_limit_pause(paused_until, NOW, retry_after, failures, RUN, random.Random(1))
    assert got == expected


@pytest.mark.parametrize(
    ("has_cursor", "once", "stored", "low", "high"),
    [
        (False, False, None, 0.0, 0.0),  # a new feed backfills at once
        (True, True, 120.0, 0.0, 0.0),  # --once polls everything at once
        (True, False, 120.0, 120.0, 120.0),  # resumed: the delay its stored state gives
        (True, False, None, 0.0, 5.0),  # resumed, nothing stored: spread over a few seconds
    ],
)
def test_first_delay(
    has_cursor: bool, once: bool, stored: float | None, low: float, high: float
) -> None:
    assert low <= first_delay(has_cursor, once, stored, 300.0, random.Random(2)) <= high


@pytest.mark.parametrize(
    ("feeds", "expected"),
    [
        ([], True),
        ([(True, False, False), (False, True, False)], True),
        ([(True, False, False), (False, False, False)], False),  # one still syncing
        ([(True, False, True)], False),  # drained, but a poll is still under way
        ([(False, True, True)], False),
    ],
)
def test_once_finished(feeds: list[tuple[bool, bool, bool]], expected: bool) -> None:
    assert once_finished(feeds) is expected


@pytest.mark.parametrize(
    ("rules", "attempts", "expected"),
    [
        # --once bears once_max_failures x ONCE_REPLICAS_PATIENCE short settles in a row ...
        (ONCE, 3 * ONCE_REPLICAS_PATIENCE - 1, False),
        (ONCE, 3 * ONCE_REPLICAS_PATIENCE, True),
        # ... a running daemon waits for the replicas however long they take.
        (RUN, 10_000, False),
    ],
)
def test_once_gives_up_on_replicas(rules: Rules, attempts: int, expected: bool) -> None:
    assert replicas_given_up(rules, attempts) is expected


@pytest.mark.parametrize(
    ("waits", "settled", "expected"),
    [
        (False, False, False),  # no wait_replicas: a cursor is fetched from as it is
        (False, True, False),
        # With wait_replicas, a cursor read from Redis or left by a page whose WAIT failed is
        # settled (replicas hold it) before anything is fetched past it ...
        (True, False, True),
        # ... one acknowledged (page applied and waited for, or settled) is fetched from.
        (True, True, False),
    ],
)
def test_settle_first(waits: bool, settled: bool, expected: bool) -> None:
    assert settle_first(waits, settled) is expected
