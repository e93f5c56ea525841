"""The fleet against real Redis: several Fleet objects in one process, callbacks recording what
each instance would poll."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import msgspec
import pytest
import redis.asyncio as aioredis
import structlog
from redis.asyncio.cluster import RedisCluster

from syncd.cli import commands
from syncd.daemon.fleet import fleet_status
from syncd.fleet.compare import MAX_DIFFERENCES, Difference, Profile, Published
from syncd.fleet.fleet import LOGGED_DIFFERENCES, Fleet
from syncd.fleet.state import (
    ACQUIRE,
    holder,
    parse_holder,
    read_holders,
    read_members,
    read_owners,
)
from syncd.keys import FleetKeys, Keys
from syncd.redis.conn import RedisClient
from syncd.testing.redis_server import RedisClusterServers, RedisServer
from syncd.testing.tcpproxy import proxy
from tests.engine_helpers import config_dict, settings

PREFIX = "st"
CRM, JOBS, INV = "crm.customers", "jpm.jobs", "inventory.purchase-orders"


@dataclass
class Board:
    """Who polls what, across all instances of a test: two at once is an overlap."""

    polling: dict[int, set[str]] = field(default_factory=dict)
    overlaps: list[tuple[int, set[str]]] = field(default_factory=list)

    def start(self, tenant: int, instance: str) -> None:
        holders = self.polling.setdefault(tenant, set())
        holders.add(instance)
        if len(holders) > 1:
            self.overlaps.append((tenant, set(holders)))

    def stop(self, tenant: int, instance: str) -> None:
        self.polling.get(tenant, set()).discard(instance)

    def of(self, instance: str) -> set[int]:
        return {t for t, hs in self.polling.items() if instance in hs}

    def owner_map(self) -> dict[int, set[str]]:
        return {t: set(hs) for t, hs in self.polling.items() if hs}


@dataclass
class Member:
    fleet: Fleet
    client: RedisClient
    task: asyncio.Task[None] | None = None
    released: list[int] = field(default_factory=list)
    hold_release: asyncio.Event | None = None  # set: on_release returns (in-flight work done)
    on_release_hook: Callable[[int], object] | None = None


class Harness:
    def __init__(self, board: Board) -> None:
        self.board = board
        self.members: dict[str, Member] = {}

    def add(
        self,
        name: str,
        client: RedisClient,
        tenants: range | list[int],
        lease: float,
        *,
        profiles: Mapping[int, Profile] | None = None,
        label: str | None = None,
        run: bool = True,
    ) -> Member:
        """An instance; `label` names it on the board (two processes under one name), `run`
        False leaves its rounds to the test."""
        board = self.board
        label = label or name
        member: Member

        async def on_acquire(tenant: int) -> None:
            board.start(tenant, label)

        async def on_release(tenant: int) -> None:
            m = member
            if m.on_release_hook is not None:
                m.on_release_hook(tenant)
            if m.hold_release is not None:
                await m.hold_release.wait()
            m.released.append(tenant)
            board.stop(tenant, label)

        fleet = Fleet(
            client,
            PREFIX,
            name,
            lease,
            on_acquire=on_acquire,
            on_release=on_release,
            tenants=tenants,
            profiles=profiles,
        )
        member = Member(fleet, client)
        if run:
            member.task = asyncio.create_task(fleet.run())
        self.members[label] = member
        return member

    def run(self, label: str) -> None:
        m = self.members[label]
        m.task = asyncio.create_task(m.fleet.run())

    async def stop(self, name: str) -> None:
        m = self.members.pop(name)
        m.fleet.stop()
        assert m.task is not None
        await m.task

    async def kill(self, name: str) -> None:
        """Like SIGKILL: the instance vanishes without releasing anything."""
        m = self.members.pop(name)
        assert m.task is not None
        m.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await m.task
        for t in self.board.of(name):
            self.board.stop(t, name)

    async def close(self) -> None:
        for m in list(self.members.values()):
            if m.task is not None:
                m.task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await m.task
            for task in list(m.fleet._tasks.values()):  # of a member whose rounds the test ran
                task.cancel()
        self.members.clear()

    def counts(self) -> dict[str, int]:
        return {name: len(self.board.of(name)) for name in self.members}


async def eventually(cond: Callable[[], bool], timeout: float = 30.0, what: str = "") -> float:
    """Poll until cond() holds; the seconds it took. Generous deadlines: the machine is shared."""
    started = time.monotonic()
    while not cond():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


def balanced(h: Harness, tenants: int) -> bool:
    """Every tenant polled by exactly one live instance, each within one of ceil(N/M)."""
    owners = h.board.owner_map()
    if set(owners) != set(range(1, tenants + 1)) and tenants:
        return False
    if any(len(hs) != 1 or not hs <= set(h.members) for hs in owners.values()):
        return False
    per = h.counts().values()
    return max(per) - min(per) <= 1 and max(per) <= math.ceil(tenants / len(h.members))


@pytest.fixture
async def clients(
    redis: aioredis.Redis, redis_server: RedisServer
) -> AsyncIterator[Callable[[], aioredis.Redis]]:
    made: list[aioredis.Redis] = []

    def make() -> aioredis.Redis:
        c = aioredis.Redis.from_url(redis_server.url)
        made.append(c)
        return c

    yield make
    for c in made:
        await c.aclose()


@pytest.fixture
async def harness(clients: Callable[[], aioredis.Redis]) -> AsyncIterator[Harness]:
    """The instances of a test; they stop before `clients` closes their connections."""
    h = Harness(Board())
    yield h
    await h.close()


async def test_joins_and_leaves_balance_and_never_overlap(
    harness: Harness, clients: Callable[[], aioredis.Redis]
) -> None:
    n, lease = 20, 1.5
    harness.add("a", clients(), range(1, n + 1), lease)
    await eventually(lambda: harness.counts() == {"a": n}, what="a alone owns everything")
    harness.add("b", clients(), range(1, n + 1), lease)
    harness.add("c", clients(), range(1, n + 1), lease)
    await eventually(lambda: balanced(harness, n), what="three instances balanced")
    assert sorted(harness.counts().values()) == [6, 7, 7]
    # The newcomers take only what they need: a gave up exactly its surplus, nobody else moved.
    assert len(harness.members["a"].released) == n - harness.counts()["a"]
    assert harness.members["b"].released == harness.members["c"].released == []
    await harness.stop("c")
    await eventually(lambda: balanced(harness, n), what="two instances balanced after a leave")
    assert harness.counts() == {"a": 10, "b": 10}
    assert harness.board.overlaps == []


async def test_a_member_that_stops_renewing_loses_its_tenants_after_the_lease(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis: aioredis.Redis
) -> None:
    n, lease = 12, 1.5
    harness.add("a", clients(), range(1, n + 1), lease)
    harness.add("b", clients(), range(1, n + 1), lease)
    await eventually(lambda: balanced(harness, n), what="balanced")
    orphans = harness.board.of("b")
    await harness.kill("b")
    # The leases stay with the dead member until they run out: nobody takes them sooner.
    owners = await read_owners(redis, PREFIX, sorted(orphans))
    assert set(owners.values()) <= {"b"}
    await eventually(lambda: harness.counts() == {"a": n}, what="a took over b's tenants")
    assert await read_owners(redis, PREFIX, list(range(1, n + 1))) == dict.fromkeys(
        range(1, n + 1), "a"
    )
    assert "b" not in await read_members(redis, PREFIX)


async def test_graceful_stop_hands_over_at_once_after_in_flight_work(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis: aioredis.Redis
) -> None:
    # A lease far longer than the test: a takeover can only come from the release itself.
    n, lease = 10, 60.0
    harness.add("a", clients(), range(1, n + 1), lease)
    b = harness.add("b", clients(), range(1, n + 1), lease)
    await eventually(lambda: balanced(harness, n), what="balanced through epochs, not expiry")
    handed = harness.board.of("b")
    b.hold_release = asyncio.Event()
    seen_owners: list[dict[int, str]] = []
    stopping = asyncio.create_task(harness.stop("b"))
    await eventually(lambda: bool(b.fleet.active) is False, what="b stopped polling")
    # While b's pages are still in flight its leases stay: a does not start on them yet.
    seen_owners.append(await read_owners(redis, PREFIX, sorted(handed)))
    assert set(seen_owners[0].values()) == {"b"}
    assert harness.board.of("a").isdisjoint(handed)
    b.hold_release.set()
    await stopping
    await eventually(lambda: harness.counts() == {"a": n}, timeout=20, what="a took over")
    assert sorted(b.released) == sorted(handed)
    assert "b" not in await read_members(redis, PREFIX)


async def test_a_member_cut_off_from_redis_stops_before_its_leases_run_out(
    harness: Harness,
    clients: Callable[[], aioredis.Redis],
    redis: aioredis.Redis,
    redis_server: RedisServer,
) -> None:
    n, lease = 10, 3.0
    async with proxy(redis_server.port) as line:
        cut_client = aioredis.Redis.from_url(line.url, socket_timeout=30)
        try:
            a = harness.add("a", cut_client, range(1, n + 1), lease)
            harness.add("b", clients(), range(1, n + 1), lease)
            await eventually(lambda: balanced(harness, n), what="balanced")
            cut_tenants = harness.board.of("a")
            remaining: dict[int, tuple[bytes | None, int]] = {}

            async def look(tenant: int) -> None:
                key = Keys(PREFIX, tenant).owner
                remaining[tenant] = (await redis.get(key), await redis.pttl(key))

            pending: list[asyncio.Task[None]] = []
            a.on_release_hook = lambda t: pending.append(asyncio.create_task(look(t)))
            line.cut(close=True)
            await eventually(lambda: not harness.board.of("a"), what="a stopped polling")
            await asyncio.gather(*pending)
            # a let go while its leases still stood: no moment with two pollers.
            assert set(remaining) == cut_tenants
            assert all(
                owner is not None and parse_holder(owner) == ("a", a.fleet.token) and ttl > 0
                for owner, ttl in remaining.values()
            ), remaining
            await eventually(lambda: harness.counts()["b"] == n, what="b took over")
            assert harness.board.overlaps == []
            line.restore()
            await eventually(lambda: balanced(harness, n), what="a back in the fleet")
        finally:
            await harness.close()
            await cut_client.aclose()


async def test_disagreeing_configurations_are_reported_and_followed(
    harness: Harness, clients: Callable[[], aioredis.Redis]
) -> None:
    lease = 1.5
    with structlog.testing.capture_logs() as logs:
        a = harness.add("a", clients(), [1, 2, 3, 4], lease)
        b = harness.add("b", clients(), [3, 4, 5, 6], lease)

        def settled() -> bool:
            owners = harness.board.owner_map()
            return (
                set(owners) == {1, 2, 3, 4, 5, 6}
                and all(len(hs) == 1 for hs in owners.values())
                and {1, 2} <= harness.board.of("a")
                and {5, 6} <= harness.board.of("b")
                and a.fleet.view.disagreements == {1: ["b"], 2: ["b"], 5: ["a"], 6: ["a"]}
            )

        await eventually(settled, what="each tenant with an instance that knows it")
        reported = [e for e in logs if e["event"] == "fleet_config_disagrees"]
        assert reported
        assert reported[0]["tenants"] == 4
        # A reload on one instance adds and removes tenants for the whole fleet.
        a.fleet.set_tenants([1, 2, 3, 4, 5, 6, 7])
        b.fleet.set_tenants([1, 2, 3, 4, 5, 6, 7])
        await eventually(
            lambda: set(harness.board.owner_map()) == set(range(1, 8)) and balanced(harness, 7),
            what="tenant 7 added",
        )
        assert any(e["event"] == "fleet_config_agrees" for e in logs)
        a.fleet.set_tenants([1, 2, 3, 4, 5, 6])
        b.fleet.set_tenants([1, 2, 3, 4, 5, 6])
        await eventually(lambda: balanced(harness, 6), what="tenant 7 removed")


def feed_profiles(tenants: list[int], *feeds: str, interval: float = 300.0) -> dict[int, Profile]:
    opts = {"poll_interval": interval, "change_detection": True}
    return {
        t: Profile(feeds={f: dict(opts) for f in feeds}, options={"start": None}) for t in tenants
    }


async def test_feed_lists_that_differ_are_reported_within_one_round_and_followed(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis_server: RedisServer
) -> None:
    """Two instances share four tenants; b also lists jpm.jobs. The first round after b joined
    names the feed, the tenants and the instances; every tenant goes to b, which polls the
    extra feed, until a lists it too; then they share again."""
    tenants, lease = [1, 2, 3, 4], 1.5
    with structlog.testing.capture_logs() as logs:
        a = harness.add(
            "a", clients(), tenants, lease, profiles=feed_profiles(tenants, CRM), run=False
        )
        b = harness.add(
            "b", clients(), tenants, lease, profiles=feed_profiles(tenants, CRM, JOBS), run=False
        )
        await a.fleet.round()
        await eventually(lambda: harness.counts()["a"] == 4, what="a alone polls all four")
        await b.fleet.round()  # b joins
        before = len(logs)
        await a.fleet.round()  # one round of a's after b joined
        reported = [e for e in logs[before:] if e["event"] == "fleet_config_disagrees"]
        assert len(reported) == 1, logs[before:]
        assert reported[0]["tenants"] == 4
        assert reported[0]["differences"] == [
            {
                "feed": JOBS,
                "listed_by": ["b"],
                "missing_from": ["a"],
                "tenants": 4,
                "sample": tenants,
            }
        ]
        assert reported[0]["unpolled"] == 0
        # The tenants go to the instance that lists every feed: a hands them over.
        assert a.fleet.view.plan is not None
        assert a.fleet.view.plan.owners == dict.fromkeys(tenants, "b")
        assert a.fleet.view.unpolled == {}
        harness.run("a")
        harness.run("b")
        await eventually(lambda: harness.counts() == {"a": 0, "b": 4}, what="b polls every tenant")

        # The fleet as `syncd status --fleet` shows it, from any host.
        data = config_dict(redis_server.url, "http://127.0.0.1:1", "k", tenants, [CRM])
        data["fleet"] = {"enabled": True}
        out = io.StringIO()
        assert await commands.status(settings(data), as_json=True, out=out, fleet_only=True) == 0
        rows = {r["instance"]: r for r in json.loads(out.getvalue())}
        assert rows["a"]["differences"] == rows["b"]["differences"] == reported[0]["differences"]
        assert (rows["a"]["tenants"], rows["b"]["tenants"]) == (0, 4)
        out = io.StringIO()
        assert await commands.status(settings(data), as_json=False, out=out, fleet_only=True) == 0
        assert f"feed {JOBS} listed by b, not by a: tenants 1, 2, 3, 4" in out.getvalue()
        assert "NOT POLLED" not in out.getvalue()

        # A reload of a that adds the feed: the configurations agree and the tenants are shared.
        a.fleet.set_tenants(tenants, feed_profiles(tenants, CRM, JOBS))
        await eventually(lambda: balanced(harness, 4), what="shared again")
        assert any(e["event"] == "fleet_config_agrees" for e in logs[before:])
        assert a.fleet.view.compared.differences == []
        assert harness.board.overlaps == []


async def test_feed_lists_neither_containing_the_other_are_reported_as_unpolled(
    harness: Harness, clients: Callable[[], aioredis.Redis]
) -> None:
    tenants, lease = [1, 2], 1.5
    with structlog.testing.capture_logs() as logs:
        a = harness.add("a", clients(), tenants, lease, profiles=feed_profiles(tenants, CRM, JOBS))
        harness.add("b", clients(), tenants, lease, profiles=feed_profiles(tenants, CRM, INV))
        await eventually(lambda: balanced(harness, 2), what="one tenant each")
        await eventually(lambda: len(a.fleet.view.unpolled) == 2, what="unpolled feeds seen")
        owner = {t: next(iter(hs)) for t, hs in harness.board.owner_map().items()}
        lacks = {"a": (INV,), "b": (JOBS,)}
        assert a.fleet.view.unpolled == {t: lacks[o] for t, o in owner.items()}
        assert any(e["event"] == "fleet_feeds_unpolled" for e in logs)


async def test_option_differences_are_reported_by_name(
    harness: Harness, clients: Callable[[], aioredis.Redis]
) -> None:
    tenants, lease = [1, 2], 1.5
    a = harness.add("a", clients(), tenants, lease, profiles=feed_profiles(tenants, CRM))
    harness.add("b", clients(), tenants, lease, profiles=feed_profiles(tenants, CRM, interval=60.0))
    await eventually(lambda: balanced(harness, 2), what="shared: options do not move tenants")
    await eventually(lambda: bool(a.fleet.view.compared.differences), what="difference seen")
    [diff] = a.fleet.view.compared.differences
    assert diff.describe() == {
        "feed": CRM,
        "option": "poll_interval",
        "values": {"a": 300.0, "b": 60.0},
        "tenants": 2,
        "sample": tenants,
    }


def own_starts(tenants: list[int], later: int = 0) -> dict[int, Profile]:
    """Each tenant with a `start` of its own (`later` days later): no two share a profile."""
    first = datetime.date(2024, 1, 1) + datetime.timedelta(later)
    return {
        t: Profile(
            feeds=feed_profiles([t], CRM, JOBS)[t].feeds,
            options={"start": (first + datetime.timedelta(t)).isoformat()},
        )
        for t in tenants
    }


async def test_the_same_configuration_is_compared_by_digest_without_reading_it(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis: aioredis.Redis
) -> None:
    """Instances whose heartbeats announce the same configuration digest agree without reading
    each other's configuration: documents that say otherwise (overwritten here, each its own
    way) are not read, by the instances or by `syncd status --fleet`. Once b's really differs,
    the first round of a's after b announced it names the difference."""
    tenants, lease = list(range(1, 41)), 30.0
    a = harness.add("a", clients(), tenants, lease, profiles=own_starts(tenants), run=False)
    b = harness.add("b", clients(), tenants, lease, profiles=own_starts(tenants), run=False)
    await a.fleet.round()
    await b.fleet.round()
    for name, listed in (("a", [CRM]), ("b", [CRM, JOBS, INV])):
        other = msgspec.json.encode(Published.of(feed_profiles(tenants, *listed)))
        assert await redis.set(FleetKeys(PREFIX).config(name), other, keepttl=True)
    with structlog.testing.capture_logs() as logs:
        await b.fleet.round()
        await a.fleet.round()
        status = await fleet_status(redis, PREFIX, tenants)
    assert a.fleet.view.plan is not None
    assert a.fleet.view.compared.differences == b.fleet.view.compared.differences == []
    assert status.differences == []
    assert not [e for e in logs if e["event"] == "fleet_config_disagrees"]

    b.fleet.set_tenants(tenants, {**own_starts(tenants), 7: own_starts([7], later=1)[7]})
    await b.fleet.round()  # announces its new configuration
    with structlog.testing.capture_logs() as logs:
        await a.fleet.round()
    starts = [own_starts([7], later)[7].options["start"] for later in (0, 1)]
    expected = Difference("", "start", tuple(zip("ab", starts, strict=True)), (7,))
    assert a.fleet.view.compared.differences == [expected]
    [reported] = [e for e in logs if e["event"] == "fleet_config_disagrees"]
    assert reported["differences"] == [expected.describe()]
    assert reported["tenants"] == 1


async def test_every_tenant_differing_is_reported_within_bounds(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis_server: RedisServer
) -> None:
    """b's `start` is a day later for every tenant: as many differences as tenants. The log
    event, the comparison and `syncd status --fleet` name the first ones and count the rest,
    within the first round of a's after b joined."""
    n, lease = MAX_DIFFERENCES + 150, 30.0
    tenants = list(range(1, n + 1))
    a = harness.add("a", clients(), tenants, lease, profiles=own_starts(tenants), run=False)
    b = harness.add("b", clients(), tenants, lease, profiles=own_starts(tenants, 1), run=False)
    await a.fleet.round()
    await b.fleet.round()  # b joins
    with structlog.testing.capture_logs() as logs:
        await a.fleet.round()
    [reported] = [e for e in logs if e["event"] == "fleet_config_disagrees"]
    assert reported["tenants"] == n
    assert [d["sample"] for d in reported["differences"]] == [
        [t] for t in range(1, LOGGED_DIFFERENCES + 1)
    ]
    assert reported["more_differences"] == n - LOGGED_DIFFERENCES
    compared = a.fleet.view.compared
    assert [d.tenants for d in compared.differences] == [(t,) for t in range(1, 101)]
    assert compared.omitted == n - MAX_DIFFERENCES
    assert compared.disagreeing == frozenset(tenants)

    data = config_dict(redis_server.url, "http://127.0.0.1:1", "k", tenants, [CRM])
    data["fleet"] = {"enabled": True}
    out = io.StringIO()
    assert await commands.status(settings(data), as_json=False, out=out, fleet_only=True) == 0
    lines = out.getvalue().splitlines()
    assert len([line for line in lines if "start differs" in line]) == MAX_DIFFERENCES
    assert (
        f"  ... and {n - MAX_DIFFERENCES} more difference(s); {n} tenant(s) differ in all" in lines
    )
    out = io.StringIO()
    assert await commands.status(settings(data), as_json=True, out=out, fleet_only=True) == 0
    rows = json.loads(out.getvalue())
    assert [len(r["differences"]) for r in rows] == [MAX_DIFFERENCES, MAX_DIFFERENCES]


async def test_two_processes_under_one_name_never_poll_one_tenant_twice(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis: aioredis.Redis
) -> None:
    """A second process under a name in use (a cloned host) takes no lease while the first
    lives, says so, and takes over when the first stops."""
    n, lease = 6, 1.5
    tenants = list(range(1, n + 1))
    with structlog.testing.capture_logs() as logs:
        first = harness.add("twin", clients(), tenants, lease, label="first")
        harness.add("other", clients(), tenants, lease)
        await eventually(
            lambda: harness.counts() == {"first": 3, "other": 3}, what="first and other share"
        )
        second = harness.add("twin", clients(), tenants, lease, label="second")
        # Over two lease periods: every tenant with exactly one poller, every lease held by
        # the first twin's incarnation or by the other instance.
        deadline = time.monotonic() + 2 * lease
        while time.monotonic() < deadline:
            owners = harness.board.owner_map()
            assert set(owners) == set(tenants)
            assert all(len(hs) == 1 for hs in owners.values()), owners
            assert "second" not in {h for hs in owners.values() for h in hs}
            holders = await read_holders(redis, PREFIX, tenants)
            assert {parse_holder(v) for v in holders.values()} <= {
                ("twin", first.fleet.token),
                ("other", harness.members["other"].fleet.token),
            }
            await asyncio.sleep(0.05)
        assert harness.board.overlaps == []
        clashes = [e for e in logs if e["event"] == "fleet_instance_name_clash"]
        assert {e["polling"] for e in clashes} == {True, False}, clashes
        assert first.fleet.name_clash is not None
        assert second.fleet.name_clash is not None
        assert second.fleet.kept_out is not None
        assert first.fleet.name_clash.token == second.fleet.token
        members = await read_members(redis, PREFIX)
        assert members["twin"].heartbeat.token == first.fleet.token
        assert members["twin"].clash is not None
        assert members["twin"].clash.token == second.fleet.token

        # The first stops: the second joins at once (the epoch moved) and takes its tenants.
        await harness.stop("first")
        await eventually(
            lambda: harness.counts() == {"second": 3, "other": 3},
            timeout=20,
            what="second took over",
        )
        await eventually(lambda: second.fleet.name_clash is None, what="the clash is over")
        assert second.fleet.kept_out is None
        assert harness.board.overlaps == []


async def test_a_process_restarted_under_its_name_waits_for_its_predecessor(
    harness: Harness, clients: Callable[[], aioredis.Redis]
) -> None:
    """After a SIGKILL, the new process under the same name cannot tell its predecessor from a
    live clone until the predecessor's heartbeat fails to renew: it waits for it to run out
    (at most a lease), reports no clash, and takes the tenants back."""
    n, lease = 4, 1.5
    with structlog.testing.capture_logs() as logs:
        harness.add("a", clients(), range(1, n + 1), lease)
        await eventually(lambda: harness.counts() == {"a": n}, what="a polls everything")
        await harness.kill("a")
        again = harness.add("a", clients(), range(1, n + 1), lease)
        took = await eventually(
            lambda: harness.counts() == {"a": n}, timeout=20, what="the new a took back"
        )
        assert took <= lease + 5
        assert again.fleet.name_clash is None
        assert [e for e in logs if e["event"] == "fleet_instance_name_taken"]
        assert not [e for e in logs if e["event"] == "fleet_instance_name_clash"]
        assert harness.board.overlaps == []


async def test_a_lease_of_0_2_0_is_retaken_at_once_by_its_instance_restarted(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis: aioredis.Redis
) -> None:
    """An in-place upgrade: 0.2.0 wrote leases holding the bare instance name. The instance
    restarted under that name on this version takes them in its first round, instead of
    waiting up to a lease for them to run out; leases of another name, or of another process
    under this name, stay where they are."""
    lease = 1.5
    bare = {1: "a", 2: "a", 3: "b"}
    for t, value in bare.items():
        await redis.set(Keys(PREFIX, t).owner, value, px=60_000)
    await redis.set(Keys(PREFIX, 4).owner, "a#0123456789abcdef", px=60_000)
    a = harness.add("a", clients(), [1, 2, 3, 4], lease, run=False)
    await a.fleet.round()
    assert set(a.fleet.held) == {1, 2}
    holders = await read_holders(redis, PREFIX, [1, 2, 3, 4])
    assert holders == {
        1: a.fleet.holder,
        2: a.fleet.holder,
        3: "b",
        4: "a#0123456789abcdef",
    }
    await eventually(lambda: harness.board.of("a") == {1, 2}, what="a polls its old tenants")
    # Renewed as its own from then on.
    assert 0 < await redis.pttl(Keys(PREFIX, 1).owner) <= lease * 1000


@pytest.mark.parametrize(
    ("stored", "taken"),
    [
        (None, True),  # free
        ("a#0000000000000001", True),  # this process's own: renewed
        ("a", True),  # 0.2.0's lease under this name
        ("b", False),  # 0.2.0's lease of another instance
        ("a#0000000000000002", False),  # another process under this name
        ("ab", False),
    ],
)
async def test_the_lease_script_takes_a_bare_name_only_if_it_is_its_own(
    redis: aioredis.Redis, stored: str | None, taken: bool
) -> None:
    """Decided in the script, atomically with the write."""
    key = Keys(PREFIX, 1).owner
    if stored is not None:
        await redis.set(key, stored, px=60_000)
    mine = holder("a", "0000000000000001")
    assert await redis.eval(ACQUIRE, 1, key, mine, 1500, "a") == int(taken)
    assert (await redis.get(key)).decode() == (mine if taken else stored)
    assert 0 < await redis.pttl(key) <= (1500 if taken else 60_000)


# -- Redis Cluster --------------------------------------------------------------------------


async def test_fleet_on_a_cluster(harness: Harness, cluster: RedisClusterServers) -> None:
    n, lease = 15, 1.5
    made = [RedisCluster.from_url(cluster.url) for _ in range(3)]
    try:
        await made[0].initialize()
        nodes = {made[0].get_node_from_key(Keys(PREFIX, t).owner).port for t in range(1, n + 1)}
        assert len(nodes) > 1, "the leases should spread over several nodes"
        for name, client in zip("abc", made, strict=True):
            harness.add(name, client, range(1, n + 1), lease)
        await eventually(lambda: balanced(harness, n), what="balanced on the cluster")
        assert sorted(harness.counts().values()) == [5, 5, 5]
        await harness.stop("c")
        await eventually(lambda: balanced(harness, n), what="c's tenants handed over")
        owners = await read_owners(made[0], PREFIX, list(range(1, n + 1)))
        assert set(owners.values()) == {"a", "b"}
        assert harness.board.overlaps == []
    finally:
        await harness.close()
        for c in made:
            await c.aclose()


async def test_status_shows_owners_and_the_fleet(
    harness: Harness, clients: Callable[[], aioredis.Redis], redis_server: RedisServer
) -> None:
    harness.add("a", clients(), [1, 2, 3], 1.5)
    harness.add("b", clients(), [1, 2, 3], 1.5)
    await eventually(lambda: balanced(harness, 3), what="balanced")
    data = config_dict(redis_server.url, "http://127.0.0.1:1", "k", [1, 2, 3, 4], ["jpm.jobs"])
    data["fleet"] = {"enabled": True}
    s = settings(data)
    out = io.StringIO()
    assert await commands.status(s, as_json=True, out=out) == 0
    rows = json.loads(out.getvalue())
    owners = {row["tenant"]: row["owner"] for row in rows}
    assert owners == {
        1: next(iter(harness.board.polling[1])),
        2: next(iter(harness.board.polling[2])),
        3: next(iter(harness.board.polling[3])),
        4: None,  # configured here, unknown to the fleet
    }
    out = io.StringIO()
    assert await commands.status(s, as_json=True, out=out, fleet_only=True) == 0
    fleet = json.loads(out.getvalue())
    assert [(i["instance"], i["tenants"], i["known"]) for i in fleet] == [
        ("a", len(harness.board.of("a")), 3),
        ("b", len(harness.board.of("b")), 3),
    ]
    out = io.StringIO()
    assert await commands.status(s, as_json=False, out=out) == 0
    table = out.getvalue()
    assert "owner" in table.splitlines()[0]
    assert "fleet: 2 instance(s)" in table
