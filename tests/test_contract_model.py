"""A model of the event contract, checked against the publisher on a real Redis.

Hypothesis drives two publishers (two instances) with random pages: new pages, the same page
again from the same cursor (a repeating API, a retry after a crash that happened after the
script ran, another instance), pages fetched from a cursor another instance already moved,
duplicate keys, stale versions in many spellings of the same instants, records without a
usable key, the operator resetting the cursor, Redis refusing writes (out of memory), and an
index left in the layout before buckets, moving while pages are applied; and reconciliation
passes (their pages beside the incremental ones, records left out of them, the sweep in steps
while pages go on: a key is reported deleted once, and only when no page since the pass began
held it). After
every step Redis must hold exactly what the plain model below says: the events in order, the
dead letters, the cursor, the count of stale versions; and per key no event may go back in time.

`SYNCD_MODEL_EXAMPLES` sets the number of examples (a few seconds' worth by default).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from syncd import catalogue
from syncd.engine.index import SAME_INSTANT_KEPT
from syncd.engine.pass_scripts import PASS_START, SWEEP
from syncd.engine.publisher import Applied, Publisher
from syncd.errors import RedisFull
from syncd.keys import Keys
from syncd.servicetitan.page import decode_page
from syncd.testing.redis_server import RedisServer
from tests.index_helpers import spell, to_old_layout

EXAMPLES = int(os.environ.get("SYNCD_MODEL_EXAMPLES", "20"))
STEPS = int(os.environ.get("SYNCD_MODEL_STEPS", "25"))
TENANT = 77
MISSING = object()  # a field left out of the record

CUSTOMERS = catalogue.feed("crm.customers")
RATINGS = catalogue.feed("customer-interactions.technician-ratings")
HISTORY = catalogue.feed("jpm.job-history")

R = TypeVar("R")


# --- What ServiceTitan may send ------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One record as sent, and what the contract says about it."""

    raw: bytes
    key: str | None  # None: no usable key
    instant: int | None  # None: no usable timestamp


def reference_key(parts: list[object]) -> str | None:
    if any(p is MISSING or p is None or p == "" or isinstance(p, bool) for p in parts):
        return None
    texts = [str(p).replace("\\", "\\\\").replace(":", "\\:") for p in parts]
    return ":".join(texts)


@st.composite
def records(draw: st.DrawFn, feed: catalogue.Feed) -> Record:
    if draw(st.integers(0, 30)) == 0:
        return Record(draw(st.sampled_from([b"7", b'"text"', b"null", b"[1]"])), None, None)
    stamp = draw(
        st.one_of(
            st.tuples(st.integers(0, 9), st.integers(0, 5)).map(lambda t: (t[0], spell(*t))),
            st.sampled_from([(None, MISSING), (None, None), (None, 17), (None, "soon")]),
        )
    )
    if feed is RATINGS:
        parts: list[object] = [
            draw(st.sampled_from([1, "1:2", 2, "1", MISSING])),
            draw(st.sampled_from([3, "2:3", 2, "\\", None])),
        ]
    else:
        parts = [draw(st.sampled_from([1, 2, 3, "2", "a:b", MISSING, None, True, ""]))]
    body: dict[str, Any] = {}
    for name, value in zip(feed.key_fields, parts, strict=True):
        if value is not MISSING:
            body[name] = value
    body["v"] = draw(st.integers(0, 2))
    if stamp[1] is not MISSING:
        body["modifiedOn"] = stamp[1]
    instant = stamp[0] if feed.timestamp_field == "modifiedOn" else None
    return Record(json.dumps(body).encode(), reference_key(parts), instant)


def envelope(recs: list[Record], continue_from: str, more: bool = False) -> bytes:
    data = b",".join(r.raw for r in recs)
    head = json.dumps({"hasMore": more, "continueFrom": continue_from})[:-1].encode()
    return head + b', "data": [' + data + b"]}"


# --- The model ------------------------------------------------------------------------------


def older(instant: int | None, than: int | None) -> bool:
    return instant is not None and than is not None and instant < than


@dataclass
class Model:
    """The contract in plain terms, one feed of one tenant."""

    cursor: str | None = None
    # Per key: the last version published, the newest instant published, and the versions
    # published before it at that same instant (newest first, a few): those are older too.
    last: dict[str, tuple[bytes, int | None, tuple[bytes, ...]]] = field(default_factory=dict)
    events: list[tuple[str, str, bytes]] = field(default_factory=list)
    dead: list[bytes] = field(default_factory=list)
    stale: int = 0
    # A reconciliation pass: its phase (None, "fetch", "sweep"), its cursor, and the keys
    # marked since it began (by its pages and by the incremental ones).
    phase: str | None = None
    pass_cursor: str | None = None
    marked: set[str] = field(default_factory=set)

    def apply(
        self,
        expected: str | None,
        recs: list[Record],
        continue_from: str,
        *,
        reconcile: bool = False,
        more: bool = False,
    ) -> Applied:
        if reconcile:
            if self.phase != "fetch":
                return Applied(False)
            if self.pass_cursor != expected:
                return Applied(False, stored=self.pass_cursor)
        elif self.cursor != expected:
            return Applied(False, stored=self.cursor)
        kept, superseded = kept_versions(recs)
        if self.phase is not None:
            self.marked.update(key for key, _ in kept)
        published = unchanged = 0
        stale = superseded
        for key, rec in kept:
            outcome = self._version(key, rec)
            published += outcome == "published"
            unchanged += outcome == "unchanged"
            stale += outcome == "stale"
        dead = 0
        for rec in recs:
            if rec.key is None and rec.raw not in self.dead:
                self.dead.append(rec.raw)
                dead += 1
        self.stale += stale
        if reconcile:
            self.pass_cursor = continue_from
            if not more:
                self.phase = "sweep"
        else:
            self.cursor = continue_from
        return Applied(True, published, unchanged, dead, None, stale)

    def start_pass(self) -> None:
        if self.phase is None:
            self.phase, self.pass_cursor, self.marked = "fetch", None, set()

    def swept(self, deleted: list[str], done: bool) -> None:
        """A sweep script deleted `deleted` (in its order): each must be a key published and
        not marked since the pass began; once the sweep is done, every key left is marked."""
        for key in deleted:
            assert key in self.last, f"{key} deleted, never published (or deleted twice)"
            assert key not in self.marked, f"{key} deleted though seen during the pass"
            del self.last[key]
            self.events.append(("deleted", key, b""))
        if done:
            assert set(self.last) <= self.marked, f"not deleted: {set(self.last) - self.marked}"
            self.phase, self.marked = None, set()

    def _version(self, key: str, rec: Record) -> str:
        """One version of a key against what was published: published, unchanged or stale."""
        last = self.last.get(key)
        if last is not None and last[0] == rec.raw:
            return "unchanged"
        same = last is not None and rec.instant is not None and rec.instant == last[1]
        if last is not None and (older(rec.instant, last[1]) or (same and rec.raw in last[2])):
            return "stale"
        newest = rec.instant if rec.instant is not None or last is None else last[1]
        earlier = ((last[0], *last[2])[:SAME_INSTANT_KEPT]) if last is not None and same else ()
        self.last[key] = (rec.raw, newest, earlier)
        self.events.append(("created" if last is None else "updated", key, rec.raw))
        return "published"

    def apply_part(self, expected: str | None, recs: list[Record], sent: set[str]) -> None:
        """The first chunks of a page, holding the kept versions of the keys in `sent`: their
        events, and nothing else (no dead letters, no stale count, the cursor stays)."""
        if self.cursor != expected:
            return
        for key, rec in kept_versions(recs)[0]:
            if key in sent:
                self._version(key, rec)
                if self.phase is not None:
                    self.marked.add(key)

    def apply_pass_part(self, expected: str | None, recs: list[Record], sent: set[str]) -> None:
        """The first chunks of a pass's page: as `apply_part`, behind the pass's cursor; every
        key they hold is marked."""
        if self.phase != "fetch" or self.pass_cursor != expected:
            return
        for key, rec in kept_versions(recs)[0]:
            if key in sent:
                self._version(key, rec)
                self.marked.add(key)


def kept_versions(recs: list[Record]) -> tuple[list[tuple[str, Record]], int]:
    """The version kept of each key of a page, in page order (of the kept version), and how
    many versions were superseded by another of their key in the page."""
    # Per key: the version kept, the newest instant so far, its position in the page.
    kept: dict[str, tuple[Record, int | None, int]] = {}
    superseded = 0
    for pos, rec in enumerate(recs):
        if rec.key is None:
            continue
        if rec.key in kept:
            superseded += 1
            newest = kept[rec.key][1]
            if older(rec.instant, newest):
                continue
            kept[rec.key] = (rec, rec.instant if rec.instant is not None else newest, pos)
        else:
            kept[rec.key] = (rec, rec.instant, pos)
    ordered = sorted(kept.items(), key=lambda kv: kv[1][2])
    return [(key, rec) for key, (rec, _, _) in ordered], superseded


# --- The machine ------------------------------------------------------------------------------


class ContractMachine(RuleBasedStateMachine):
    url: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.r = aioredis.Redis.from_url(self.url)
        self.run(self.r.flushall())
        self.model = Model()
        self.feed = CUSTOMERS
        self.pubs: list[Publisher] = []
        self.believed: list[str | None] = [None, None]
        self.history: dict[str | None, list[tuple[list[Record], str]]] = {}
        self.tokens = 0
        self.passes = 0
        self.pass_pages: list[str] = []

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.r.config_set("maxmemory", 0))
        self.run(self.r.aclose())
        self.loop.close()

    @initialize(
        feed=st.sampled_from([CUSTOMERS.name, RATINGS.name, HISTORY.name]),
        prechecks=st.tuples(st.sampled_from([0, 1000]), st.sampled_from([0, 3, 1000])),
        chunks=st.tuples(st.sampled_from([1, 2, 1000]), st.sampled_from([1, 3, 1000])),
        moves=st.tuples(st.sampled_from([0, 1]), st.sampled_from([0, 8])),
    )
    def setup(
        self,
        feed: str,
        prechecks: tuple[int, int],
        chunks: tuple[int, int],
        moves: tuple[int, int],
    ) -> None:
        self.feed = catalogue.feed(feed)
        # precheck_min 0: every page is looked at before the script; 1000: never. Chunks of
        # 1 or a few records: pages of several scripts; 1000: one script a page. An index of
        # the layout before buckets moves only as pages write its keys (0), or also a few
        # keys after each page.
        self.pubs = [
            Publisher(self.r, "st", precheck_min=n, chunk_records=c, migrate_chunks=m)
            for n, c, m in zip(prechecks, chunks, moves, strict=True)
        ]

    def _new_page(
        self, data: st.DataObject, expected: str | None, repeat: bool
    ) -> tuple[list[Record], str]:
        recs = data.draw(st.lists(records(self.feed), max_size=8), label="records")
        if repeat and expected is not None:
            continue_from = expected  # the API answers with the cursor it was given
        else:
            self.tokens += 1
            continue_from = f"c{self.tokens}"
        self.history.setdefault(expected, []).append((recs, continue_from))
        return recs, continue_from

    def _apply(self, i: int, expected: str | None, recs: list[Record], cf: str) -> None:
        page = decode_page(envelope(recs, cf), self.feed)
        got = self.run(self.pubs[i].apply(TENANT, self.feed.name, expected, page))
        want = self.model.apply(expected, recs, cf)
        assert got == want, f"instance {i} from {expected!r}: got {got}, model says {want}"
        self.believed[i] = cf if got.applied else got.stored

    @rule(i=st.integers(0, 1), repeat=st.booleans(), data=st.data())
    def fetch_and_apply(self, i: int, repeat: bool, data: st.DataObject) -> None:
        expected = self.believed[i]
        recs, cf = self._new_page(data, expected, repeat)
        self._apply(i, expected, recs, cf)

    @rule(i=st.integers(0, 1), data=st.data())
    def earlier_versions_in_a_repeated_tail(self, i: int, data: st.DataObject) -> None:
        """The API repeats the cursor with records sent before: versions already published or
        superseded, at older or equal timestamps (they must not take turns with newer ones)."""
        sent = [r for pages in self.history.values() for recs, _ in pages for r in recs]
        if not sent:
            return
        last = self.model.last
        # Mostly versions at the newest instant of their key: the ones that could take turns.
        ties = [r for r in sent if r.key in last and r.instant == last[r.key][1] is not None]
        if ties and data.draw(st.booleans(), label="ties"):
            sent = ties
        expected = self.believed[i]
        recs = data.draw(st.lists(st.sampled_from(sent), min_size=1, max_size=4), label="tail")
        if data.draw(st.booleans(), label="changed at the same instant"):
            # Another version sharing the timestamp of the first (content changed, the
            # timestamp not): it is a change, and the first is then older than it.
            body = json.loads(recs[0].raw)
            if isinstance(body, dict):
                body["v"] = data.draw(st.integers(3, 5), label="v")
                recs.append(Record(json.dumps(body).encode(), recs[0].key, recs[0].instant))
        cf = expected if expected is not None else "c0"
        self.history.setdefault(expected, []).append((recs, cf))
        self._apply(i, expected, recs, cf)

    @rule(i=st.integers(0, 1), data=st.data())
    def same_page_again(self, i: int, data: st.DataObject) -> None:
        """The same page from the same cursor: a repeating API, another instance, a restart."""
        if not self.history:
            return
        expected = data.draw(st.sampled_from(sorted(self.history, key=str)), label="from")
        recs, cf = data.draw(st.sampled_from(self.history[expected]), label="page")
        self._apply(i, expected, recs, cf)

    @rule(i=st.integers(0, 1), repeat=st.booleans(), data=st.data())
    def crash_after_the_script(self, i: int, repeat: bool, data: st.DataObject) -> None:
        """The script ran but the caller never learned it: it retries the same page."""
        expected = self.believed[i]
        recs, cf = self._new_page(data, expected, repeat)
        self._apply(i, expected, recs, cf)
        self._apply(i, expected, recs, cf)

    @rule(i=st.integers(0, 1), data=st.data())
    def crash_before_the_script(self, i: int, data: st.DataObject) -> None:
        """Fetched, never applied: it may be fetched (and applied) again later."""
        self._new_page(data, self.believed[i], data.draw(st.booleans(), label="repeat"))

    @rule(i=st.integers(0, 1), data=st.data())
    def crash_between_chunks(self, i: int, data: st.DataObject) -> None:
        """The page's first chunks ran, the rest never did (a crash, a lost connection, Redis
        full): the cursor stays; the page may be fetched and applied again later."""
        expected = self.believed[i]
        recs, cf = self._new_page(data, expected, data.draw(st.booleans(), label="repeat"))
        page = decode_page(envelope(recs, cf), self.feed)
        pub = self.pubs[i]
        prepared = self.run(pub.prepare(TENANT, self.feed.name, expected, page))
        if len(prepared) < 2:
            return
        ran = data.draw(st.integers(1, len(prepared) - 1), label="chunks run")
        self.run(pub.run_chunks(prepared, range(ran)))
        sent = {str(key) for n in range(ran) for key in prepared.chunk(n)[14::4]}
        self.model.apply_part(expected, recs, sent)

    @precondition(lambda self: self.passes == 0)
    @rule(hashtable=st.booleans())
    def upgraded_from_the_layout_before_buckets(self, hashtable: bool) -> None:
        """The index as an earlier syncd left it (which never ran a pass): one hash per feed
        (as a hash table, a scan of it returns a few keys at a time), read until its keys
        have moved."""
        self.run(to_old_layout(self.r, Keys("st", TENANT), self.feed.name, hashtable=hashtable))

    # A reconciliation pass: its pages beside the incremental ones, then the sweep in steps.
    # The API's pages of the pass hold any records (those left out are gone upstream).

    @rule()
    def pass_starts(self) -> None:
        keys = Keys("st", TENANT)
        meta, old = keys.index(self.feed.name), keys.seen(self.feed.name)
        while self.run(self.pubs[0].migrate(TENANT, self.feed.name)):
            pass  # a pass begins once the index has left the layout before buckets
        began, _ = self.run(self.r.eval(PASS_START, 2, meta, old, "1700000000.000"))
        assert bool(int(began)) == (self.model.phase is None)
        self.model.start_pass()
        self.passes += 1

    @rule(i=st.integers(0, 1), more=st.booleans(), stale=st.booleans(), data=st.data())
    def pass_page(self, i: int, more: bool, stale: bool, data: st.DataObject) -> None:
        expected = self.model.pass_cursor
        if stale:  # a process that fetched from where the pass was before
            expected = data.draw(st.sampled_from([None, "p0", *self.pass_pages]), label="from")
        recs = data.draw(st.lists(records(self.feed), max_size=8), label="records")
        self.tokens += 1
        cf = f"p{self.tokens}"
        self.pass_pages.append(cf)
        page = decode_page(envelope(recs, cf, more), self.feed)
        got = self.run(self.pubs[i].apply(TENANT, self.feed.name, expected, page, reconcile=True))
        want = self.model.apply(expected, recs, cf, reconcile=True, more=more)
        assert got == want, f"pass page from {expected!r}: got {got}, model says {want}"

    @rule(i=st.integers(0, 1), more=st.booleans(), data=st.data())
    def pass_page_cut_between_chunks(self, i: int, more: bool, data: st.DataObject) -> None:
        """A pass's page whose first chunks ran and the rest never did (a crash, Redis full):
        its cursor stays, and the page is fetched again."""
        expected = self.model.pass_cursor
        recs = data.draw(st.lists(records(self.feed), max_size=8), label="records")
        self.tokens += 1
        cf = f"p{self.tokens}"
        page = decode_page(envelope(recs, cf, more), self.feed)
        pub = self.pubs[i]
        prepared = self.run(pub.prepare(TENANT, self.feed.name, expected, page, reconcile=True))
        if len(prepared) < 2:
            return
        ran = data.draw(st.integers(1, len(prepared) - 1), label="chunks run")
        self.run(pub.run_chunks(prepared, range(ran)))
        sent = {str(key) for n in range(ran) for key in prepared.chunk(n)[14::4]}
        self.model.apply_pass_part(expected, recs, sent)

    @rule(budget=st.integers(1, 40))
    def sweep_step(self, budget: int) -> None:
        keys = Keys("st", TENANT)
        meta = keys.index(self.feed.name)
        at = self.run(self.r.hget(meta, "sweep"))
        before = self.run(self.r.xlen(keys.stream(self.feed.name)))
        result = self.run(
            self.r.eval(
                SWEEP,
                3,
                meta,
                keys.stream(self.feed.name),
                keys.state,
                int(at or 0),
                budget,
                "2026-12-07T10:00:00.000000Z",
                "2026-12-07T10:00:00.0000000Z",
                self.feed.name,
                "1700000001.000",
            )
        )
        if self.model.phase != "sweep":
            assert int(result[0]) == 2
            return
        assert int(result[0]) == 0
        fresh = self.run(self.r.xrange(keys.stream(self.feed.name)))[before:]
        assert all(f[b"op"] == b"deleted" for _, f in fresh)
        self.model.swept([f[b"key"].decode() for _, f in fresh], bool(int(result[1])))

    # Many keys at once: the index splits buckets (during a sweep too); ids of a stride share
    # their low bits, and so a bucket, until the index has grown past them.

    def _many(self, data: st.DataObject) -> list[Record]:
        n = data.draw(st.integers(20, 120), label="keys")
        start = data.draw(st.integers(10, 300), label="first id")
        step = data.draw(st.sampled_from([1, 2, 64, 97]), label="stride")
        v = data.draw(st.integers(0, 2), label="v")
        instant = data.draw(st.one_of(st.none(), st.integers(0, 9)), label="instant")
        recs = []
        for j in range(n):
            parts: list[object] = [start + step * j]
            if len(self.feed.key_fields) == 2:
                parts.append(data.draw(st.sampled_from([1, 2]), label="job"))
            body: dict[str, Any] = dict(zip(self.feed.key_fields, parts, strict=True))
            body["v"] = v
            if instant is not None:
                body["modifiedOn"] = spell(instant, 0)
            timed = instant if self.feed.timestamp_field == "modifiedOn" else None
            recs.append(Record(json.dumps(body).encode(), reference_key(parts), timed))
        return recs

    @rule(i=st.integers(0, 1), data=st.data())
    def many_keys(self, i: int, data: st.DataObject) -> None:
        expected = self.believed[i]
        recs = self._many(data)
        self.tokens += 1
        cf = f"c{self.tokens}"
        self.history.setdefault(expected, []).append((recs, cf))
        self._apply(i, expected, recs, cf)

    @rule(i=st.integers(0, 1), more=st.booleans(), data=st.data())
    def pass_page_of_many_keys(self, i: int, more: bool, data: st.DataObject) -> None:
        expected = self.model.pass_cursor
        recs = self._many(data)
        self.history.setdefault(None, []).append((recs, "unused"))  # their instants, known
        self.tokens += 1
        cf = f"p{self.tokens}"
        self.pass_pages.append(cf)
        page = decode_page(envelope(recs, cf, more), self.feed)
        got = self.run(self.pubs[i].apply(TENANT, self.feed.name, expected, page, reconcile=True))
        want = self.model.apply(expected, recs, cf, reconcile=True, more=more)
        assert got == want, f"pass page from {expected!r}: got {got}, model says {want}"

    @rule(per_script=st.integers(1, 3))
    def index_moves_a_few_keys(self, per_script: int) -> None:
        self.run(self.pubs[0].migrate(TENANT, self.feed.name, chunks=1, per_script=per_script))

    @rule()
    def operator_resets_the_cursor(self) -> None:
        """`syncd reset-cursor` (or `backfill`) while both instances may hold pages in flight:
        those are refused, the feed starts over, and what was published stays published once."""
        self.run(self.r.hdel(f"st:{{{TENANT}}}:cursors", self.feed.name))
        self.model.cursor = None

    @rule(i=st.integers(0, 1), data=st.data())
    def redis_out_of_memory(self, i: int, data: st.DataObject) -> None:
        expected = self.believed[i]
        recs, cf = self._new_page(data, expected, False)
        page = decode_page(envelope(recs, cf), self.feed)
        self.run(self.r.config_set("maxmemory", 1))
        try:
            with pytest.raises(RedisFull):
                self.run(self.pubs[i].apply(TENANT, self.feed.name, expected, page))
        finally:
            self.run(self.r.config_set("maxmemory", 0))

    async def _read(self) -> list[Any]:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xrange(f"st:{{{TENANT}}}:{self.feed.name}")
            pipe.xrange(f"st:{{{TENANT}}}:dead")
            pipe.hget(f"st:{{{TENANT}}}:cursors", self.feed.name)
            pipe.hget(f"st:{{{TENANT}}}:state", f"{self.feed.name}:stale")
            return await pipe.execute()  # type: ignore[no-any-return]

    @invariant()
    def redis_holds_what_the_model_says(self) -> None:
        if not self.pubs:
            return
        stream, dead, cursor, stale = self.run(self._read())
        got = [(f[b"op"].decode(), f[b"key"].decode(), f[b"data"]) for _, f in stream]
        assert got == self.model.events
        assert [f[b"data"] for _, f in dead] == self.model.dead
        assert (cursor.decode() if cursor is not None else None) == self.model.cursor
        assert int(stale or 0) == self.model.stale

    @invariant()
    def no_key_goes_back_in_time(self) -> None:
        instants = {
            r.raw: r.instant for recs in self.history.values() for rs, _ in recs for r in rs
        }
        newest: dict[str, int] = {}
        for op, key, raw in self.model.events:
            if op == "deleted":  # gone: a key that comes back is created again
                newest.pop(key, None)
                continue
            instant = instants.get(raw)
            if instant is None:
                continue
            assert instant >= newest.get(key, instant), f"{key} went back in time"
            newest[key] = instant


@pytest.fixture(scope="module")
def model_redis() -> Iterator[RedisServer]:
    """A server of its own: the machine sets `maxmemory` on it to make Redis refuse writes."""
    server = RedisServer(extra_args=["--appendonly", "no", "--maxmemory-policy", "noeviction"])
    server.start()
    yield server
    server.stop()


# A failing run spends minutes shrinking to a short example: room for that, and for long runs.
@pytest.mark.timeout(max(900, EXAMPLES))
def test_publisher_agrees_with_the_contract_model(model_redis: RedisServer) -> None:
    ContractMachine.url = model_redis.url
    from hypothesis.stateful import run_state_machine_as_test

    run_state_machine_as_test(
        ContractMachine,
        settings=settings(
            max_examples=EXAMPLES,
            stateful_step_count=STEPS,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
        ),
    )
