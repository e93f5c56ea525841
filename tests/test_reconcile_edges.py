"""Reconciliation passes and the index at their edges: races between a page's precheck and its
script, buckets far over their load, index values the layout before buckets left malformed.
Direct on the scripts and the publisher, on a real Redis."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis

from syncd import catalogue
from syncd.engine.pass_scripts import PASS_START, SWEEP
from syncd.engine.publisher import Publisher
from syncd.keys import Keys
from syncd.servicetitan.page import Page, decode_page
from tests.index_helpers import entries, to_old_layout

FEED = catalogue.feed("crm.customers")
T = 4242
KEYS = Keys("st", T)


def page_of(ids: list[Any], cursor: str, *, more: bool = False, version: int = 0) -> Page:
    records = [
        {"id": i, "v": version, "modifiedOn": f"2024-03-01T10:00:{n % 60:02d}.{n:07d}Z"}
        for n, i in enumerate(ids)
    ]
    body = json.dumps({"hasMore": more, "continueFrom": cursor, "data": records}).encode()
    return decode_page(body, FEED)


async def start_pass(r: aioredis.Redis) -> list[Any]:
    got: list[Any] = await r.eval(
        PASS_START, 2, KEYS.index(FEED.name), KEYS.seen(FEED.name), "1700000000.000"
    )
    return got


async def sweep_all(r: aioredis.Redis, budget: int = 2000) -> list[bytes]:
    """The sweep to its end: the keys it reported deleted."""
    meta, stream = KEYS.index(FEED.name), KEYS.stream(FEED.name)
    before = await r.xlen(stream)
    for _ in range(10_000):
        at = await r.hget(meta, "sweep")
        result = await r.eval(
            SWEEP,
            3,
            meta,
            stream,
            KEYS.state,
            int(at or 0),
            budget,
            "2030-01-01T00:00:00.000000Z",
            "2030-01-01T00:00:00.0000000Z",
            FEED.name,
            "1700000001.000",
        )
        assert int(result[0]) == 0, result
        if int(result[1]):
            break
    fresh = (await r.xrange(stream))[before:]
    assert all(f[b"op"] == b"deleted" for _, f in fresh)
    return [f[b"key"] for _, f in fresh]


async def test_a_pass_page_looked_up_before_a_new_pass_began_is_not_its_first_page(
    redis: aioredis.Redis,
) -> None:
    """Two processes run passes (the daemon's and `syncd reconcile`, say). One looks up the
    index for its first page while no pass is under way (the last one has just ended); before
    its script runs, the other begins the next pass. The page's records were judged against the
    last pass's mark: unchanged and marked, they were not sent. Applied as the new pass's first
    page, they would never be marked by it, and the sweep would report all of them deleted
    though every one of them is upstream."""
    ids = list(range(1, 101))
    pub = Publisher(redis, "st", precheck_min=0)
    assert (await pub.apply(T, FEED.name, None, page_of(ids, "c1"))).published == 100
    # A pass runs to its end: every key is seen, none deleted.
    assert (await start_pass(redis))[0] == 1
    assert (await pub.apply(T, FEED.name, None, page_of(ids, "p1"), reconcile=True)).applied
    assert await sweep_all(redis) == []
    # The other process: its first page of a pass, looked up now ...
    other = Publisher(redis, "st", precheck_min=0)
    prepared = await other.prepare(
        T, FEED.name, None, page_of(ids, "q1"), change_detection=True, reconcile=True
    )
    # ... the next pass begins ...
    assert (await start_pass(redis))[0] == 1
    # ... and the page's script runs.
    result = await other.run_chunks(prepared)
    if int(result[0]) == 0:
        # Taken as the new pass's page (it drained the feed): its keys must be marked.
        deleted = await sweep_all(redis)
        assert deleted == [], f"{len(deleted)} keys still upstream reported deleted"
    # Whatever happened to that page, a pass that runs on is right about every key.
    while (await redis.hget(KEYS.index(FEED.name), "pass")) == b"fetch":
        cursor = await redis.hget(KEYS.index(FEED.name), "pass_cursor")
        expected = None if cursor is None else cursor.decode()
        await pub.apply(T, FEED.name, expected, page_of(ids, "p2"), reconcile=True)
    assert await sweep_all(redis) == []
    assert len(await entries(redis, KEYS, FEED.name)) == 100


async def test_a_pass_page_without_records_is_not_refused_for_its_mark(
    redis: aioredis.Redis,
) -> None:
    """An empty page looks up no key, and judges none: whatever mark it holds, it applies."""
    pub = Publisher(redis, "st", precheck_min=0)
    assert (await pub.apply(T, FEED.name, None, page_of([1, 2], "c1"))).published == 2
    assert (await start_pass(redis))[0] == 1
    assert (await pub.apply(T, FEED.name, None, page_of([], "p1"), reconcile=True)).applied
    assert sorted(await sweep_all(redis)) == [b"1", b"2"]


# --- Buckets far over their load ---------------------------------------------------------------
#
# A decimal key is its own hash: ids that share their low bits (multiples of 256 here) share
# a bucket until the index has grown past them, however many there are. The scripts must
# still work on such a bucket whole (Lua's `unpack` takes a few thousand values at most).

STRIDE = 256


async def test_a_sweep_deletes_a_bucket_of_thousands_of_keys_once(redis: aioredis.Redis) -> None:
    ids = [STRIDE * k for k in range(1, 10_001)]
    pub = Publisher(redis, "st", precheck_min=10**9)
    cursor = None
    for n in range(0, len(ids), 1000):
        page = page_of(ids[n : n + 1000], f"c{n}")
        assert (await pub.apply(T, FEED.name, cursor, page)).applied
        cursor = f"c{n}"
    assert await redis.hlen(KEYS.bucket(FEED.name, 0)) == len(ids)
    # Every record is gone upstream: the pass's one page is empty.
    assert (await start_pass(redis))[0] == 1
    assert (await pub.apply(T, FEED.name, None, page_of([], "p1"), reconcile=True)).applied
    meta, stream = KEYS.index(FEED.name), KEYS.stream(FEED.name)
    before = await redis.xlen(stream)
    for _ in range(3):  # a sweep refused by Redis is run again, as the reconciler does
        try:
            await sweep_all(redis)
            break
        except aioredis.ResponseError:
            continue
    deleted = [f[b"key"] for _, f in (await redis.xrange(stream))[before:]]
    assert len(deleted) == len(set(deleted)), "a key was reported deleted more than once"
    assert sorted(int(k) for k in deleted) == ids
    assert await redis.hget(meta, "pass") is None
    assert await entries(redis, KEYS, FEED.name) == {}


async def test_an_index_splits_a_bucket_of_thousands_of_keys(redis: aioredis.Redis) -> None:
    # 48 x 256 keys: the index reaches level 8, where bucket 0 (every key) splits in two.
    ids = [STRIDE * k for k in range(1, 13_001)]
    pub = Publisher(redis, "st", precheck_min=10**9)
    cursor = None
    for n in range(0, len(ids), 1000):
        page = page_of(ids[n : n + 1000], f"c{n}")
        assert (await pub.apply(T, FEED.name, cursor, page)).applied, n
        cursor = f"c{n}"
    meta = await redis.hgetall(KEYS.index(FEED.name))
    assert int(meta[b"count"]) == len(ids)
    assert int(meta[b"level"]) == 8
    assert len(await entries(redis, KEYS, FEED.name)) == len(ids)
    assert await redis.xlen(KEYS.stream(FEED.name)) == len(ids)


# --- Values of the layout before buckets, malformed -------------------------------------------


async def test_a_malformed_value_of_the_layout_before_buckets_does_not_stop_the_feed(
    redis: aioredis.Redis,
) -> None:
    """A `seen` value whose instant text is not one, or shorter than a fingerprint (a hand
    edit, a restore gone wrong): the key still moves (read as having no instant), pages
    holding it apply, and a pass can begin."""
    ids = list(range(1, 41))
    pub = Publisher(redis, "st", precheck_min=0, migrate_chunks=0)
    assert (await pub.apply(T, FEED.name, None, page_of(ids, "c1"))).published == 40
    await to_old_layout(redis, KEYS, FEED.name)
    seen = KEYS.seen(FEED.name)
    good = await redis.hget(seen, "1")
    assert good is not None
    await redis.hset(seen, "2", good[:8] + b"not-an-instant")
    await redis.hset(seen, "3", good[:8] + b"2024-03-01Tab:cd:ef")
    await redis.hset(seen, "4", good[:8] + b"|" + good[:8])
    await redis.hset(seen, "6", b"short")
    # A page holding them applies (against no instant, other content is newer: published) ...
    page = page_of([2, 3, 4], "c2", version=1)
    applied = await pub.apply(T, FEED.name, "c1", page)
    assert (applied.applied, applied.published) == (True, 3)
    # ... the rest moves ...
    while await pub.migrate(T, FEED.name, chunks=1, per_script=7):
        pass
    assert not await redis.exists(seen)
    got = await entries(redis, KEYS, FEED.name)
    assert len(got) == 40
    assert all(len(e.fingerprint) == 8 for e in got.values())
    # ... and a pass begins, sees every key, deletes none.
    assert (await start_pass(redis))[0] == 1
    assert (await pub.apply(T, FEED.name, None, page_of(ids, "p1"), reconcile=True)).applied
    assert await sweep_all(redis) == []


# --- The deleted event's version --------------------------------------------------------------


async def test_a_deleted_event_is_newer_than_the_last_version_even_one_dated_ahead(
    redis: aioredis.Redis,
) -> None:
    """The README: a delete is a version like any other, newer than every version published
    before it. A record dated ahead of the sweep's clock (a client's clock, a skewed host) must
    not outrank its own deletion: consumers and the mirror would keep it for ever."""
    from syncd.consumer import Event

    body = json.dumps(
        {
            "hasMore": False,
            "continueFrom": "c1",
            "data": [
                {"id": 1, "modifiedOn": "2099-05-01T00:00:00.1234567Z"},
                {"id": 2, "modifiedOn": "2024-05-01T00:00:00Z"},
                {"id": 3},
            ],
        }
    ).encode()
    pub = Publisher(redis, "st", precheck_min=0)
    assert (await pub.apply(T, FEED.name, None, decode_page(body, FEED))).published == 3
    assert (await start_pass(redis))[0] == 1
    assert (await pub.apply(T, FEED.name, None, page_of([], "p1"), reconcile=True)).applied
    assert sorted(await sweep_all(redis)) == [b"1", b"2", b"3"]
    stream = KEYS.stream(FEED.name)
    latest: dict[str, Event] = {}
    for entry_id, fields in await redis.xrange(stream):
        event = Event.from_entry(
            stream,
            entry_id.decode(),
            {k.decode(): v for k, v in fields.items()},
            tenant=T,
            feed=FEED.name,
            deliveries=1,
        )
        if event.key in latest:
            assert event.version > latest[event.key].version, event
        latest[event.key] = event
    assert all(e.deleted for e in latest.values())


# --- The daemon's passes ----------------------------------------------------------------------


def daemon_passes(r: aioredis.Redis, **tenant: Any) -> tuple[Any, Any]:
    """The daemon's passes (syncd.daemon.passes) on `r`, with one tenant of `tenant`'s state
    (its feed polled as usual unless said otherwise), whose API must not be asked."""
    import time
    from types import SimpleNamespace

    from syncd.daemon.passes import Passes
    from syncd.engine.ratelimit import TokenBucket

    async def fetch(*_: Any, **__: Any) -> Any:
        raise AssertionError("the pass asked the API")

    passes = Passes.__new__(Passes)
    passes.publisher = Publisher(r, "st")
    passes.metrics = SimpleNamespace(
        passes=SimpleNamespace(due=lambda *_: None, completed=lambda *_: None)
    )
    passes.scheduler = SimpleNamespace(
        client=SimpleNamespace(fetch=fetch),
        clock=time.monotonic,
        stopping=False,
        held=tenant.pop("memory_full", False),  # all polling held (Redis short of memory)
    )
    feed = SimpleNamespace(paused=tenant.pop("paused", None))
    t = SimpleNamespace(
        bucket=TokenBucket(rate=10.0, burst=2.0),
        inflight=0,
        removed=False,
        paused_until=0.0,
        feeds={FEED.name: feed},
        tokens=SimpleNamespace(tenant=T),
        settings=SimpleNamespace(id=T, include_recent_changes=True),
    )
    for name, value in tenant.items():
        setattr(t, name, value)
    return passes, t


async def test_the_pass_of_a_tenant_no_longer_polled_here_ends(redis: aioredis.Redis) -> None:
    """A tenant removed while its pass waits for spare budget (a reload dropped it, its fleet
    lease went to another instance): the pass stops, else it would wait for ever and no pass
    of any other tenant would run again (the daemon runs one pass at a time)."""
    import asyncio

    passes, t = daemon_passes(redis, removed=True)
    await asyncio.wait_for(passes._run_pass(t, FEED.name), timeout=5)
    # The pass stays where it was, for whoever polls the tenant now.
    assert await redis.hget(KEYS.index(FEED.name), "pass") == b"fetch"


@pytest.mark.parametrize(
    "held",
    [
        {"paused": "group g lags 5000 events"},  # backpressure on the feed
        {"memory_full": True},  # Redis near maxmemory: all polling paused
        {"paused_until": 1e18},  # the API answered 429: the tenant waits out its Retry-After
    ],
)
@pytest.mark.parametrize("phase", ["fetch", "sweep"])
async def test_the_daemon_holds_a_pass_while_the_tenant_or_feed_is_held(
    redis: aioredis.Redis, held: dict[str, Any], phase: str
) -> None:
    """What holds a feed's polls holds its pass: it asks nothing of the API a 429 told to wait,
    and publishes nothing (drift, deletes) while consumers lag or Redis is short of memory."""
    import asyncio

    pub = Publisher(redis, "st", precheck_min=0)
    assert (await pub.apply(T, FEED.name, None, page_of([1, 2, 3], "c1"))).published == 3
    assert (await start_pass(redis))[0] == 1
    if phase == "sweep":
        assert (await pub.apply(T, FEED.name, None, page_of([], "p1"), reconcile=True)).applied
    before = await redis.xlen(KEYS.stream(FEED.name))
    passes, t = daemon_passes(redis, **held)
    if phase == "sweep" and "paused_until" in held:
        # A 429 is the API's: the sweep asks nothing of it, and goes on.
        await asyncio.wait_for(passes._run_pass(t, FEED.name), timeout=5)
        assert await redis.xlen(KEYS.stream(FEED.name)) == before + 3
        return
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(passes._run_pass(t, FEED.name), timeout=1.0)
    assert await redis.xlen(KEYS.stream(FEED.name)) == before
    assert await redis.hget(KEYS.index(FEED.name), "pass") == phase.encode()


# --- An API that makes no progress ------------------------------------------------------------


@pytest.mark.parametrize("cursor", ["same", "alternate"])
async def test_a_pass_on_an_api_that_makes_no_progress_gives_up(
    redis: aioredis.Redis, redis_server: Any, monkeypatch: pytest.MonkeyPatch, cursor: str
) -> None:
    """`hasMore: true`, no records, and a continueFrom asked with before (the simulator's
    `no_progress` quirk): the incremental polls call that no progress; a pass must too, and
    give up (resumable), rather than ask the same pages for ever (and, in the daemon, hold
    every other pass back)."""
    import asyncio
    import io

    from syncd.cli.reconcile import reconcile
    from syncd.daemon import Daemon
    from syncd.engine import reconcile as reconcile_module
    from syncd.testing.simulator import run_simulator
    from tests.engine_helpers import config_dict, settings

    monkeypatch.setattr(reconcile_module, "backoff", lambda *_, **__: 0.01)
    tenant = 9201
    async with run_simulator(tenants=[tenant], records=60, page_size=20, seed=2) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [tenant], [FEED.name])
        assert await Daemon(settings(data), once=True).run() == 0
        sim.set_quirks(tenant, no_progress=1.0, no_progress_cursor=cursor)
        out = io.StringIO()
        run = reconcile(settings(data), tenant, FEED.name, share=1.0, out=out, progress=False)
        code = await asyncio.wait_for(run, timeout=30)
    assert code == 1
    assert "pass not completed" in out.getvalue()
    keys = Keys("st", tenant)
    assert await redis.hget(keys.index(FEED.name), "pass") == b"fetch"
    assert not [f for _, f in await redis.xrange(keys.stream(FEED.name)) if f[b"op"] == b"deleted"]


# --- Changes the API does not show yet --------------------------------------------------------


async def test_a_record_changed_shortly_before_a_pass_without_recent_changes_is_not_deleted(
    redis: aioredis.Redis, redis_server: Any
) -> None:
    """`include_recent_changes = false`: the API shows a change only once it is some minutes
    old (`recent_delay`), and meanwhile the record's version before it is gone from the export
    too (a change moves the record to the export's end). A pass that drains before a record's
    change shows must not take the record for deleted: it is upstream, only hidden, and its
    `deleted` event would outrank the `created` one published once the change shows."""
    import asyncio
    import io

    from syncd.cli.reconcile import reconcile
    from syncd.daemon import Daemon
    from syncd.testing.simulator import run_simulator
    from tests.engine_helpers import config_dict, settings

    tenant = 9202
    async with run_simulator(
        tenants=[tenant], records=60, page_size=20, seed=3, recent_delay=4.0
    ) as sim:
        data = config_dict(
            redis_server.url,
            sim.url,
            sim.app_key,
            [tenant],
            [FEED.name],
            include_recent_changes=False,
        )
        assert await Daemon(settings(data), once=True).run() == 0
        await asyncio.sleep(4.5)  # the first records' creation shows
        assert await Daemon(settings(data), once=True).run() == 0
        changed = sim.mutate(tenant, FEED.name, "update", 5)
        out = io.StringIO()
        code = await reconcile(
            settings(data), tenant, FEED.name, share=1.0, out=out, progress=False, as_json=True
        )
        assert code == 0, out.getvalue()
    events = await redis.xrange(Keys("st", tenant).stream(FEED.name))
    deleted = sorted(f[b"key"].decode() for _, f in events if f[b"op"] == b"deleted")
    assert deleted == [], f"changed {sorted(changed)}, reported deleted {deleted}"


async def test_a_key_without_timestamps_that_comes_back_after_its_delete_is_newer(
    redis: aioredis.Redis,
) -> None:
    """Job history has no timestamp: its events' modified_at is empty and the entry id alone
    orders a key's versions. A `deleted` event dated by the sweep's clock would outrank every
    version of the key published after it: a key that comes back (`created` again, as the
    README says) would stay deleted for every consumer and the mirror."""
    from syncd.consumer import Event

    history = catalogue.feed("jpm.job-history")
    stream = KEYS.stream(history.name)

    def jobs(ids: list[int], cursor: str, v: int) -> Page:
        body = {
            "hasMore": False,
            "continueFrom": cursor,
            "data": [{"jobId": i, "v": v} for i in ids],
        }
        return decode_page(json.dumps(body).encode(), history)

    pub = Publisher(redis, "st", precheck_min=0)
    assert (await pub.apply(T, history.name, None, jobs([1, 2], "c1", 0))).published == 2
    meta, old = KEYS.index(history.name), KEYS.seen(history.name)
    assert (await redis.eval(PASS_START, 2, meta, old, "1700000000.000"))[0] == 1
    assert (await pub.apply(T, history.name, None, jobs([2], "p1", 0), reconcile=True)).applied
    result = await redis.eval(
        SWEEP,
        3,
        meta,
        stream,
        KEYS.state,
        0,
        100,
        "2030-01-01T00:00:00.000000Z",
        "2030-01-01T00:00:00.0000000Z",
        history.name,
        "1700000001.000",
    )
    assert int(result[2]) == 1
    # Job 1 comes back.
    assert (await pub.apply(T, history.name, "c1", jobs([1], "c2", 1))).published == 1
    events = [
        Event.from_entry(
            stream,
            entry_id.decode(),
            {k.decode(): v for k, v in fields.items()},
            tenant=T,
            feed=history.name,
            deliveries=1,
        )
        for entry_id, fields in await redis.xrange(stream)
    ]
    ones = [e for e in events if e.key == "1"]
    assert [e.op for e in ones] == ["created", "deleted", "created"]
    assert ones[0].version < ones[1].version < ones[2].version


async def test_on_spare_waits_while_the_tenant_is_busy_and_stops_when_it_is_gone() -> None:
    import asyncio

    from syncd.engine.ratelimit import TokenBucket
    from syncd.engine.reconcile import PassFailed, on_spare

    bucket = TokenBucket(rate=10, burst=2, updated=0.0)
    state = {"busy": True, "gone": False}
    pace = on_spare(
        bucket,
        lambda: state["busy"],
        gone=lambda: state["gone"],
        clock=lambda: 100.0,  # the bucket full all along
        poll_s=0.01,
    )
    waiting = asyncio.create_task(pace())
    await asyncio.sleep(0.1)
    assert not waiting.done()  # a poll under way (or held): no token taken
    assert bucket.tokens == 2
    state["busy"] = False
    await asyncio.wait_for(waiting, 1)
    assert bucket.tokens == 1  # one spare token, taken once the tenant was idle
    state["gone"] = True
    with pytest.raises(PassFailed):
        await asyncio.wait_for(pace(), 1)


async def test_a_sweep_step_from_a_stale_position_is_refused_and_publishes_nothing(
    redis: aioredis.Redis,
) -> None:
    """Two processes sweep one pass (a takeover mid-sweep): a step sent from where the sweep
    was before the other's step is refused by the fence, with where it is now, and writes
    nothing: no key is reported deleted twice."""
    pub = Publisher(redis, "st", precheck_min=0)
    ids = list(range(1, 301))
    assert (await pub.apply(T, FEED.name, None, page_of(ids, "c1"))).published == 300
    assert int((await start_pass(redis))[0]) == 1
    seen = page_of(ids[::2], "p1")  # the pass sees every other key: 150 are gone
    assert (await pub.apply(T, FEED.name, None, seen, reconcile=True)).applied
    meta, stream = KEYS.index(FEED.name), KEYS.stream(FEED.name)

    async def step(at: int) -> list[Any]:
        got: list[Any] = await redis.eval(
            SWEEP, 3, meta, stream, KEYS.state, at, 40, "2030-01-01T00:00:00.000000Z",
            "2030-01-01T00:00:00.0000000Z", FEED.name, "1700000001.000",
        )  # fmt: skip
        return got

    first = await step(0)
    assert int(first[0]) == 0
    assert int(first[3]) > 0
    before = await redis.xlen(stream)
    stale = await step(0)  # the other process, from where the sweep was
    assert [int(v) for v in stale] == [1, int(first[3])]
    assert await redis.xlen(stream) == before
    rest = await sweep_all(redis, budget=40)
    events = [f for _, f in await redis.xrange(stream) if f[b"op"] == b"deleted"]
    assert len(events) == len({f[b"key"] for f in events}) == 150
    assert len(rest) == 150 - int(first[2])
