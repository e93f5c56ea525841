"""Pure parts of the simulator: throttles, cursors, timestamps, change log, page cache."""

from __future__ import annotations

from random import Random

import msgspec
import pytest

from syncd import catalogue
from syncd.simulator.app import parse_date
from syncd.simulator.cache import SizedCache
from syncd.simulator.cursor import CursorCodec
from syncd.simulator.data import FeedLog
from syncd.simulator.limits import SlidingWindow, TokenBucket, retry_after_seconds
from syncd.simulator.options import SimOptions
from syncd.simulator.pages import Page, Pager
from syncd.simulator.schemagen import format_ticks


class Envelope(msgspec.Struct):
    hasMore: bool
    continueFrom: str
    data: list[msgspec.Raw]


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        ([0.0, 0.0, 0.0], [0.0, 0.0, 0.5]),  # burst of 2, then wait half a second
        ([0.0, 0.0, 0.25, 0.5], [0.0, 0.0, 0.25, 0.0]),
        ([0.0, 0.0, 10.0, 10.0, 10.0], [0.0, 0.0, 0.0, 0.0, 0.5]),  # refills only to the burst
    ],
)
def test_token_bucket(times: list[float], expected: list[float]) -> None:
    bucket = TokenBucket(2.0)
    assert [round(bucket.take(t), 6) for t in times] == expected


def test_sliding_window() -> None:
    window = SlidingWindow(2, window=60.0)
    for now in (0.0, 10.0):
        assert window.wait(now) == 0.0
        window.record(now)
    assert window.wait(30.0) == 30.0
    assert window.wait(60.0) == 0.0


@pytest.mark.parametrize(("wait", "seconds"), [(0.01, 1), (1.0, 1), (1.2, 2), (59.5, 60)])
def test_retry_after_seconds(wait: float, seconds: int) -> None:
    assert retry_after_seconds(wait) == seconds


def test_cursor_round_trip_and_tamper() -> None:
    codec = CursorCodec(seed=1)
    token = codec.encode(1001, 7, 123_456)
    assert codec.decode(token) == (1001, 7, 123_456)
    assert CursorCodec(seed=1).decode(token) == (1001, 7, 123_456)
    assert CursorCodec(seed=2).decode(token) is None
    assert "123456" not in token
    flipped = token[:5] + ("A" if token[5] != "A" else "B") + token[6:]
    for bad in (flipped, token[:-2], "", "not a token", "2020-01-01"):
        assert codec.decode(bad) is None


@pytest.mark.parametrize(
    ("ticks", "text"),
    [
        (16267269382876004, "2021-07-19T20:35:38.2876004Z"),
        (16267269380000000, "2021-07-19T20:35:38Z"),
        (16267269381200000, "2021-07-19T20:35:38.12Z"),
    ],
)
def test_format_ticks(ticks: int, text: str) -> None:
    assert format_ticks(ticks) == text


@pytest.mark.parametrize(
    ("text", "ticks"),
    [
        ("2021-07-19", 16266528000000000),
        ("2021-07-19T20:35:38Z", 16267269380000000),
        ("2021-07-19T20:35:38.287600Z", 16267269382876000),
        ("2021-07-19T22:35:38+02:00", 16267269380000000),
        ("garbage", None),
        ("2021-13-45", None),
        ("", None),
    ],
)
def test_parse_date(text: str, ticks: int | None) -> None:
    assert parse_date(text) == ticks


def make_log(records: int = 50) -> FeedLog:
    return FeedLog(catalogue.feed("crm.customers"), 7, 1001, 0, records, SizedCache(10**8))


def test_log_timestamps_increase_and_mutations_move_records() -> None:
    log = make_log()
    stamps = [log.ticks_at(p) for p in range(len(log.log))]
    assert stamps == sorted(set(stamps))
    keys = log.mutate("update", 3, Random(1), now_ticks=stamps[-1] - 5)
    assert len(keys) == 3
    assert len(log.stale) == 3
    moved = [log.ticks_at(p) for p in range(50, 53)]
    assert moved[0] == stamps[-1] + 1
    assert moved == sorted(set(moved))
    entries, end = log.scan(0, len(log.log), 1000, "Any")
    assert len(entries) == 50
    assert end == 53
    assert [e.position for e in entries][-3:] == [50, 51, 52]
    assert log.position_at_or_after(stamps[10]) == 10
    assert log.position_at_or_after(stamps[10] + 1) == 11


def test_render_is_deterministic() -> None:
    first, second = make_log(), make_log()
    entry = first.live_entry(3)
    assert first.render(entry) == second.render(entry)
    assert first.render(entry) != first.render(first.live_entry(4))


def test_pager_invalidates_only_touched_pages() -> None:
    log = make_log(100)
    pager = Pager(CursorCodec(0), 10, 60.0, SizedCache[Page](10**8))
    now = 2_000_000_000 * 10_000_000
    pages = pager.prerender(log, "Any", 2, now)
    assert pages == 10 + 13  # recent-changes pages advance by page size minus overlap
    assert pager.cached(log, 0, False, "Any", now) is not None
    log.stale.append(55)  # as if the record at position 55 had changed
    assert pager.cached(log, 50, False, "Any", now) is None
    assert pager.cached(log, 0, False, "Any", now) is not None
    last = pager.cached(log, 90, False, "Any", now)
    assert last is not None
    assert not last.has_more


def test_options_defaults_and_validation() -> None:
    assert SimOptions().effective_overlap == 50
    assert SimOptions(page_size=30).effective_overlap == 3
    assert SimOptions(page_size=5).effective_overlap == 1
    assert SimOptions(overlap=0).effective_overlap == 0
    assert SimOptions(page_size=1).effective_overlap == 0
    assert SimOptions(page_size=10, overlap=20).effective_overlap == 9
    with pytest.raises(ValueError, match="fault_drop"):
        SimOptions(fault_drop=1.5).validate()


@pytest.mark.parametrize("recent", [False, True])
@pytest.mark.parametrize("seed", range(12))
def test_paging_under_random_changes_misses_nothing(recent: bool, seed: int) -> None:
    """Interleave pages and changes at random; the final version of every record is served."""
    rng = Random(seed)
    log = make_log(60)
    pager = Pager(CursorCodec(0), 7, 1.0, SizedCache[Page](10**8))
    delay = 10_000_000
    now = 2_000_000_000 * 10_000_000
    served: list[bytes] = []
    position = 0

    def fetch(now: int) -> bool:
        nonlocal position
        start = log.overlap_start(position, 2, "Any") if recent and position else position
        page = pager.page_now(log, start, recent, "Any", now)
        body = msgspec.json.decode(page.body, type=Envelope)
        served.extend(bytes(raw) for raw in body.data)
        decoded = CursorCodec(0).decode(body.continueFrom)
        assert decoded is not None
        position = decoded[2]
        return body.hasMore

    for _ in range(40):
        now += rng.randrange(0, delay // 2)
        if rng.random() < 0.5:
            kind = rng.choice(("update", "deactivate", "create"))
            log.mutate(kind, rng.randrange(1, 6), rng, now)
        fetch(now)
    now += 2 * delay
    while fetch(now):
        pass
    truth = msgspec.json.decode(log.ground_truth(), type=list[msgspec.Raw])
    assert {bytes(raw) for raw in truth} <= set(served)
    if not recent:
        assert len(served) == len(set(served)), "each version at most once"


@pytest.mark.parametrize("feed", ["jpm.job-history", "crm.customers", "jpm.job-canceled-logs"])
def test_every_update_changes_the_bytes(feed: str) -> None:
    """Change detection downstream must see every new version, even without `modifiedOn`."""
    log = FeedLog(catalogue.feed(feed), 3, 1001, 0, 30, SizedCache(10**8))
    before = [log.render(log.live_entry(i)) for i in range(30)]
    log.mutate("update", 30, Random(0), 2_000_000_000 * 10_000_000)
    after = [log.render(log.live_entry(i)) for i in range(30)]
    assert all(old != new for old, new in zip(before, after, strict=True))
