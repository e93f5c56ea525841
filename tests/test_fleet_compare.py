"""How the fleet compares its members' configurations, and who may own a tenant when they
differ: decided from the facts alone (syncd.fleet.compare), then fed to the assignment."""

from __future__ import annotations

from collections.abc import Mapping
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.fleet import compare as compare_module
from syncd.fleet.assign import assign
from syncd.fleet.compare import LISTED, Difference, Profile, Published, Value, compare

CRM, JOBS, INV = "crm.customers", "jpm.jobs", "inventory.purchase-orders"


def feeds(*names: str, **options: Value) -> Profile:
    """A profile listing `names`, each with the same options (poll interval 300 by default)."""
    opts: dict[str, Value] = {"poll_interval": 300.0, **options}
    return Profile(feeds={n: dict(opts) for n in names}, options={"start": None})


def run(
    configs: Mapping[str, Mapping[int, Profile] | list[int]],
) -> tuple[dict[str, set[int]], list[tuple[str, str, dict[str, Value], tuple[int, ...]]]]:
    """compare() from instance -> (tenant -> profile), or a list of tenant ids for an instance
    that publishes no profiles; eligible tenants per instance and the differences, readable."""
    known: dict[str, list[int]] = {}
    published: dict[str, Published | None] = {}
    for name, cfg in configs.items():
        if isinstance(cfg, list):
            known[name], published[name] = cfg, None
            continue
        known[name], published[name] = list(cfg), Published.of(cfg)
    got = compare(known, published)
    eligible = {i: set(ts) for i, ts in got.eligible.items()}
    diffs = [(d.feed, d.option, dict(d.values), d.tenants) for d in got.differences]
    return eligible, diffs


def each(tenants: list[int], profile: Profile) -> dict[int, Profile]:
    return dict.fromkeys(tenants, profile)


T4 = [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("configs", "eligible", "differences"),
    [
        pytest.param(
            {"a": each(T4, feeds(CRM)), "b": each(T4, feeds(CRM))},
            {"a": set(T4), "b": set(T4)},
            [],
            id="same configuration: anyone, nothing to report",
        ),
        pytest.param(
            {"a": each(T4, feeds(CRM)), "b": each(T4, feeds(CRM, JOBS))},
            {"a": set(), "b": set(T4)},
            [(JOBS, LISTED, {"a": False, "b": True}, (1, 2, 3, 4))],
            id="a feed added on one instance: the tenants go to it",
        ),
        pytest.param(
            {"a": each(T4, feeds(CRM, JOBS)), "b": each(T4, feeds(CRM))},
            {"a": set(T4), "b": set()},
            [(JOBS, LISTED, {"a": True, "b": False}, (1, 2, 3, 4))],
            id="a feed removed on one instance: the others keep polling it until the last",
        ),
        pytest.param(
            {
                "a": each(T4, feeds(CRM)),
                "b": each(T4, feeds(CRM, JOBS)),
                "c": each(T4, feeds(CRM, JOBS)),
            },
            {"a": set(), "b": set(T4), "c": set(T4)},
            [(JOBS, LISTED, {"a": False, "b": True, "c": True}, (1, 2, 3, 4))],
            id="every instance that lists the most may own them",
        ),
        pytest.param(
            {"a": each(T4, feeds(CRM, JOBS)), "b": each(T4, feeds(CRM, INV))},
            {"a": set(T4), "b": set(T4)},
            [
                (INV, LISTED, {"a": False, "b": True}, (1, 2, 3, 4)),
                (JOBS, LISTED, {"a": True, "b": False}, (1, 2, 3, 4)),
            ],
            id="lists neither containing the other: both may own, both reported",
        ),
        pytest.param(
            {
                "a": {**each([1, 2], feeds(CRM)), **each([3, 4], feeds(CRM, JOBS))},
                "b": each(T4, feeds(CRM, JOBS)),
            },
            {"a": {3, 4}, "b": set(T4)},
            [(JOBS, LISTED, {"a": False, "b": True}, (1, 2))],
            id="per tenant: only the tenants whose feeds differ are affected",
        ),
        pytest.param(
            {"a": each(T4, feeds(CRM, JOBS)), "b": each(T4, feeds(CRM, JOBS, poll_interval=60.0))},
            {"a": set(T4), "b": set(T4)},
            [
                (CRM, "poll_interval", {"a": 300.0, "b": 60.0}, (1, 2, 3, 4)),
                (JOBS, "poll_interval", {"a": 300.0, "b": 60.0}, (1, 2, 3, 4)),
            ],
            id="an option differs: reported per feed, nobody moves",
        ),
        pytest.param(
            {
                "a": each(T4, feeds(CRM)),
                "b": each(T4, Profile(feeds=feeds(CRM).feeds, options={"start": "2024-01-01"})),
            },
            {"a": set(T4), "b": set(T4)},
            [("", "start", {"a": None, "b": "2024-01-01"}, (1, 2, 3, 4))],
            id="a tenant-wide option differs",
        ),
        pytest.param(
            {"a": each(T4, feeds(CRM)), "b": each(T4, feeds(CRM, change_detection=True))},
            {"a": set(T4), "b": set(T4)},
            [],
            id="an option only one states (a newer syncd compares more) is no difference",
        ),
        pytest.param(
            {"a": each([1, 2], feeds(CRM)), "b": each([2, 3], feeds(CRM))},
            {"a": {1, 2}, "b": {2, 3}},
            [
                ("", LISTED, {"a": True, "b": False}, (1,)),
                ("", LISTED, {"a": False, "b": True}, (3,)),
            ],
            id="tenants only some list: reported, each with an instance that lists it",
        ),
        pytest.param(
            {"a": T4, "b": each(T4, feeds(CRM, JOBS)), "c": each(T4, feeds(CRM))},
            {"a": set(T4), "b": set(T4), "c": set()},
            [(JOBS, LISTED, {"b": True, "c": False}, (1, 2, 3, 4))],
            id="an instance that publishes no configuration is compared by tenant ids only",
        ),
    ],
)
def test_comparison_table(
    configs: dict[str, dict[int, Profile] | list[int]],
    eligible: dict[str, set[int]],
    differences: list[tuple[str, str, dict[str, Value], tuple[int, ...]]],
) -> None:
    got_eligible, got_differences = run(configs)
    assert got_eligible == eligible
    assert got_differences == differences


def test_unpolled_names_the_feeds_the_owner_lacks() -> None:
    a, b = feeds(CRM, JOBS), feeds(CRM, INV)
    published = {"a": Published.of(each(T4, a)), "b": Published.of(each(T4, b))}
    got = compare({"a": T4, "b": T4}, published)
    assert got.unpolled({1: "a", 2: "b"}) == {1: (INV,), 2: (JOBS,)}
    assert got.disagreeing == frozenset(T4)


def test_no_feed_goes_unpolled_when_one_list_contains_the_others() -> None:
    """The rolling change: the assignment over the eligible instances leaves nothing unpolled,
    and the instance that lacks the feed keeps nothing, whoever held the tenants before."""
    configs = {"a": each(T4, feeds(CRM)), "b": each(T4, feeds(CRM, JOBS))}
    published = {n: Published.of(c) for n, c in configs.items()}
    got = compare(dict.fromkeys(configs, T4), published)
    plan = assign(got.eligible, dict.fromkeys(T4, "a"))  # a held them all before b came
    assert plan.owners == dict.fromkeys(T4, "b")
    assert got.unpolled(plan.owners) == {}


def test_differences_are_described_by_name() -> None:
    listed = Difference(JOBS, LISTED, (("a", False), ("b", True)), tuple(range(1, 13)))
    assert listed.describe() == {
        "feed": JOBS,
        "listed_by": ["b"],
        "missing_from": ["a"],
        "tenants": 12,
        "sample": list(range(1, 11)),
    }
    assert listed.text() == (
        f"feed {JOBS} listed by b, not by a: tenants 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... (12)"
    )
    option = Difference(CRM, "poll_interval", (("a", 300.0), ("b", 60.0)), (7,))
    assert option.describe() == {
        "feed": CRM,
        "option": "poll_interval",
        "values": {"a": 300.0, "b": 60.0},
        "tenants": 1,
        "sample": [7],
    }
    assert option.text() == f"{CRM} poll_interval differs (a=300.0, b=60.0): tenants 7"


def test_a_profile_digest_does_not_depend_on_order() -> None:
    one = Profile(feeds={CRM: {"x": 1, "y": 2}, JOBS: {}}, options={"a": 1, "b": None})
    two = Profile(feeds={JOBS: {}, CRM: {"y": 2, "x": 1}}, options={"b": None, "a": 1})
    assert one.digest() == two.digest()
    assert one.digest() != feeds(CRM).digest()
    assert Published.of({1: one, 2: two}).tenants == {one.digest(): [1, 2]}


def test_each_feed_list_and_each_set_of_options_is_published_once() -> None:
    """A tenant's own `start` makes its profile its own; the feed list it shares with others
    is still written once."""
    shared = feeds(CRM, JOBS, INV).feeds
    profiles = {
        t: Profile(feeds=shared if t % 2 else feeds(CRM).feeds, options={"start": f"2024-{t}"})
        for t in range(1, 1001)
    }
    published = Published.of(profiles)
    assert len(published.feeds) == 2
    assert len(published.options) == 1000
    assert published.by_tenant() == {t: p.digest() for t, p in profiles.items()}
    document = msgspec.json.encode(published)
    assert document.count(JOBS.encode()) == 1
    assert document.count(CRM.encode()) == 2


def test_differences_past_the_limit_are_counted_not_named() -> None:
    """Every tenant's `start` differing: the first MAX_DIFFERENCES are named (by first tenant),
    the rest counted; every tenant is still known to differ, and none moves."""
    n = compare_module.MAX_DIFFERENCES + 150
    a = {t: Profile(feeds=feeds(CRM).feeds, options={"start": f"2024-{t}"}) for t in range(n)}
    b = {t: Profile(feeds=feeds(CRM).feeds, options={"start": f"2025-{t}"}) for t in range(n)}
    got = compare(dict.fromkeys("ab", range(n)), {"a": Published.of(a), "b": Published.of(b)})
    assert [d.tenants for d in got.differences] == [(t,) for t in range(100)]
    assert got.differences[7].values == (("a", "2024-7"), ("b", "2025-7"))
    assert got.omitted == 150
    assert got.disagreeing == frozenset(range(n))
    assert got.eligible == {"a": frozenset(range(n)), "b": frozenset(range(n))}


# -- properties ----------------------------------------------------------------------------

catalogue = [CRM, JOBS, INV, "a.b", "c.d"]
feed_lists = st.frozensets(st.sampled_from(catalogue), min_size=1)


@st.composite
def configurations(draw: st.DrawFn) -> dict[str, dict[int, Profile]]:
    instances = draw(st.lists(st.sampled_from("abcde"), min_size=1, max_size=5, unique=True))
    tenants = draw(st.lists(st.integers(1, 50), min_size=1, max_size=20, unique=True))
    out: dict[str, dict[int, Profile]] = {}
    for i in instances:
        out[i] = {t: feeds(*sorted(draw(feed_lists))) for t in tenants if draw(st.booleans())}
    return out


@settings(max_examples=300, deadline=None)
@given(configurations())
def test_a_tenant_goes_to_an_instance_listing_it_and_nothing_listed_is_lost_silently(
    configs: dict[str, dict[int, Profile]],
) -> None:
    published: dict[str, Published | None] = {n: Published.of(c) for n, c in configs.items()}
    got = compare({n: list(c) for n, c in configs.items()}, published)
    plan = assign(got.eligible, {})
    listed = {t for c in configs.values() for t in c}
    assert set(plan.owners) == listed
    unpolled = got.unpolled(plan.owners)
    for t, owner in plan.owners.items():
        assert t in configs[owner]
        union = set().union(*(set(c[t].feeds) for c in configs.values() if t in c))
        missing = union - set(configs[owner][t].feeds)
        # Whatever the owner lacks is reported as unpolled, and only when no instance's list
        # for the tenant contains every other's.
        assert set(unpolled.get(t, ())) == missing
        covering = [i for i, c in configs.items() if t in c and set(c[t].feeds) == union]
        assert not missing or not covering
        if missing:
            assert t in got.disagreeing


_Key = tuple[str, str, tuple[tuple[str, Value], ...]]  # feed, option, values


def _stated_differently(feed: str, having: Mapping[str, Mapping[str, Value]]) -> list[_Key]:
    out = []
    for option in sorted({o for opts in having.values() for o in opts}):
        values = tuple((i, opts[option]) for i, opts in having.items() if option in opts)
        if len({repr(v) for _, v in values}) > 1:
            out.append((feed, option, values))
    return out


def one_by_one(
    configs: Mapping[str, Mapping[int, Profile]],
) -> list[tuple[str, str, tuple[tuple[str, Value], ...], tuple[int, ...]]]:
    """The differences the slow, obvious way, each tenant on its own: listed by some instances
    only; each feed listed by some only; each option two instances state differently."""
    instances = sorted(configs)
    found: dict[_Key, list[int]] = {}
    for t in sorted({t for c in configs.values() for t in c}):
        keys = []
        if not all(t in configs[i] for i in instances):
            keys.append(("", LISTED, tuple((i, t in configs[i]) for i in instances)))
        having = {i: configs[i][t] for i in instances if t in configs[i]}
        for f in sorted({f for p in having.values() for f in p.feeds}):
            listed = tuple((i, f in p.feeds) for i, p in having.items())
            if not all(v for _, v in listed):
                keys.append((f, LISTED, listed))
            keys += _stated_differently(
                f, {i: p.feeds[f] for i, p in having.items() if f in p.feeds}
            )
        keys += _stated_differently("", {i: p.options for i, p in having.items()})
        for key in keys:
            found.setdefault(key, []).append(t)
    return [(*key, tuple(found[key])) for key in sorted(found, key=lambda k: (*k[:2], found[k][0]))]


@st.composite
def varied_configurations(draw: st.DrawFn) -> dict[str, dict[int, Profile]]:
    """Feed lists, poll intervals, an option some instances do not state, and `start`."""
    instances = draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True))
    tenants = draw(st.lists(st.integers(1, 30), min_size=1, max_size=15, unique=True))
    out: dict[str, dict[int, Profile]] = {}
    for i in instances:
        out[i] = {}
        for t in tenants:
            if not draw(st.integers(0, 4)):
                continue  # not listed by this one
            listed: dict[str, dict[str, Value]] = {}
            for f in sorted(draw(feed_lists)):
                opts: dict[str, Value] = {"poll_interval": draw(st.sampled_from([60.0, 300.0]))}
                if draw(st.booleans()):
                    opts["change_detection"] = draw(st.booleans())
                listed[f] = opts
            start = draw(st.sampled_from([None, "2024-01-01", "2024-02-01"]))
            out[i][t] = Profile(feeds=listed, options={"start": start})
    return out


@settings(max_examples=300, deadline=None)
@given(varied_configurations(), st.integers(0, 5))
def test_tenants_decided_together_differ_as_each_alone(
    configs: dict[str, dict[int, Profile]], limit: int
) -> None:
    """Tenants seen alike are decided once, feed lists apart from tenant-wide options: the
    differences are those of each tenant compared on its own, the first `limit` named."""
    known = {n: list(c) for n, c in configs.items()}
    published: dict[str, Published | None] = {n: Published.of(c) for n, c in configs.items()}
    expected = one_by_one(configs)
    with mock.patch.object(compare_module, "MAX_DIFFERENCES", 10**6):
        got = compare(known, published)
    assert [(d.feed, d.option, d.values, d.tenants) for d in got.differences] == expected
    assert got.disagreeing == frozenset(t for *_, ts in expected for t in ts)
    for t in {t for c in configs.values() for t in c}:
        lists = {i: set(c[t].feeds) for i, c in configs.items() if t in c}
        may = {i for i, fs in lists.items() if not any(fs < other for other in lists.values())}
        assert {i for i, ts in got.eligible.items() if t in ts} == may
    with mock.patch.object(compare_module, "MAX_DIFFERENCES", limit):
        bounded = compare(known, published)
    assert bounded.differences == got.differences[:limit]
    assert bounded.omitted == len(expected) - len(bounded.differences)
    assert bounded.disagreeing == got.disagreeing
    assert bounded.eligible == got.eligible
