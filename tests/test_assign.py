"""The fleet's assignment: who polls which tenant, decided from the facts alone."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.fleet.assign import assign, capacities, disagreements


def everyone(instances: list[str], tenants: range | list[int]) -> dict[str, list[int]]:
    return {i: list(tenants) for i in instances}


def counts(owners: dict[int, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for inst in owners.values():
        out[inst] = out.get(inst, 0) + 1
    return out


@pytest.mark.parametrize(
    ("known", "owners", "expected", "moves"),
    [
        pytest.param({}, {}, {}, 0, id="empty fleet"),
        pytest.param({}, {1: "a"}, {}, 0, id="no live instance: nobody owns anything"),
        pytest.param({"a": []}, {}, {}, 0, id="one instance, no tenants"),
        pytest.param(
            {"a": [1, 2, 3]}, {}, {1: "a", 2: "a", 3: "a"}, 0, id="one instance takes all"
        ),
        pytest.param(
            everyone(["a", "b"], [1, 2, 3, 4]),
            {},
            {1: "a", 2: "b", 3: "a", 4: "b"},
            0,
            id="fresh fleet alternates by name",
        ),
        pytest.param(
            everyone(["a", "b"], [1, 2, 3, 4]),
            {1: "a", 2: "a", 3: "a", 4: "a"},
            {1: "a", 2: "a", 3: "b", 4: "b"},
            2,
            id="join: the newcomer takes the highest ids of the full one",
        ),
        pytest.param(
            everyone(["a", "b", "c"], [1, 2, 3, 4, 5, 6]),
            {1: "a", 2: "a", 3: "a", 4: "b", 5: "b", 6: "b"},
            {1: "a", 2: "a", 3: "c", 4: "b", 5: "b", 6: "c"},
            2,
            id="join of a third: one from each",
        ),
        pytest.param(
            everyone(["a", "c"], [1, 2, 3, 4, 5, 6]),
            {1: "a", 2: "a", 3: "b", 4: "b", 5: "c", 6: "c"},
            {1: "a", 2: "a", 3: "a", 4: "c", 5: "c", 6: "c"},
            0,
            id="leave: the orphans are shared, nobody else moves",
        ),
        pytest.param(
            everyone(["a", "b"], [1, 2, 3]),
            {1: "a", 2: "b", 3: "b"},
            {1: "a", 2: "b", 3: "b"},
            0,
            id="balanced within one: the extra place stays where it is",
        ),
        pytest.param(
            everyone(["a", "b", "c"], [1, 2, 3, 4]),
            {1: "b", 2: "b", 3: "b", 4: "b"},
            {1: "b", 2: "b", 3: "a", 4: "c"},
            2,
            id="the extra place goes to the instance that holds the most",
        ),
        pytest.param(
            {"a": [1, 2], "b": [2, 3]},
            {},
            {1: "a", 2: "a", 3: "b"},
            0,
            id="disagreement: a tenant goes only to an instance that knows it",
        ),
        pytest.param(
            {"a": [1, 2, 3, 4], "b": [4]},
            {4: "a"},
            {1: "a", 2: "a", 3: "a", 4: "a"},
            0,
            id="disagreement: overflow on the only instance that knows them",
        ),
        pytest.param(
            {"a": [1, 2], "b": [1, 2, 3]},
            {3: "a"},
            {1: "a", 2: "a", 3: "b"},
            0,
            id="an owner whose configuration dropped the tenant gives it up",
        ),
        pytest.param(
            everyone(["a", "b"], [1, 2]),
            {1: "zombie", 2: "zombie"},
            {1: "a", 2: "b"},
            0,
            id="owners that are not live count as free",
        ),
    ],
)
def test_assignment_table(
    known: dict[str, list[int]], owners: dict[int, str], expected: dict[int, str], moves: int
) -> None:
    plan = assign(known, owners)
    assert plan.owners == expected
    assert plan.moves == moves


def test_many_tenants_spread_within_one() -> None:
    instances = [f"i{n}" for n in range(7)]
    plan = assign(everyone(instances, range(1, 1001)), {})
    per = counts(plan.owners)
    assert set(per) == set(instances)
    assert max(per.values()) - min(per.values()) <= 1
    assert max(per.values()) <= math.ceil(1000 / 7)


def test_same_facts_same_answer_whatever_the_order() -> None:
    known = {"b": [5, 3, 1, 2, 4], "a": [4, 2, 3, 1, 5], "c": [1, 2, 3, 4, 5]}
    owners = {1: "b", 2: "b", 3: "b", 4: "c"}
    reordered = {k: list(reversed(v)) for k, v in reversed(list(known.items()))}
    assert assign(known, owners).owners == assign(reordered, dict(reversed(owners.items()))).owners


def test_capacities_favour_current_holders() -> None:
    assert capacities(["a", "b", "c"], 7, {"c": 5}) == {"a": 2, "b": 2, "c": 3}
    assert capacities(["a", "b", "c"], 8, {}) == {"a": 3, "b": 3, "c": 2}
    assert capacities([], 5, {}) == {}


@pytest.mark.parametrize(
    ("known", "expected"),
    [
        ({}, {}),
        ({"a": [1, 2], "b": [2, 1]}, {}),
        ({"a": [1, 2], "b": [2, 3], "c": [1, 2, 3]}, {1: ["b"], 3: ["a"]}),
        ({"a": [7], "b": []}, {7: ["b"]}),
    ],
)
def test_disagreements(known: dict[str, list[int]], expected: dict[int, list[str]]) -> None:
    assert disagreements(known) == expected


# -- properties ----------------------------------------------------------------------------

names = st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=8, unique=True)


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[str], list[int], dict[int, str]]:
    instances = draw(names)
    tenants = draw(st.lists(st.integers(1, 400), max_size=120, unique=True))
    ghosts = ["x", "y"]  # owners that are no longer live
    owners = {
        t: draw(st.sampled_from(instances + ghosts))
        for t in tenants
        if draw(st.booleans())  # some tenants are free
    }
    return instances, tenants, owners


@settings(max_examples=300, deadline=None)
@given(fleets())
def test_every_tenant_one_owner_and_balanced(
    fleet: tuple[list[str], list[int], dict[int, str]],
) -> None:
    instances, tenants, owners = fleet
    plan = assign(everyone(instances, tenants), owners)
    assert set(plan.owners) == set(tenants)
    assert set(plan.owners.values()) <= set(instances)
    per = [counts(plan.owners).get(i, 0) for i in instances]
    assert max(per) - min(per) <= 1
    assert max(per) <= math.ceil(len(tenants) / len(instances))


@settings(max_examples=300, deadline=None)
@given(fleets())
def test_fewest_moves(fleet: tuple[list[str], list[int], dict[int, str]]) -> None:
    instances, tenants, owners = fleet
    plan = assign(everyone(instances, tenants), owners)
    live = {t: o for t, o in owners.items() if o in instances}
    moved = sum(1 for t, o in live.items() if plan.owners[t] != o)
    assert moved == plan.moves
    # No assignment balanced within one can move fewer: every instance above ceil(N/M) must
    # shed down to it, and no more than `extra` of them may stay at ceil.
    n, m = len(tenants), len(instances)
    base, extra = divmod(n, m)
    held = sorted((sum(1 for o in live.values() if o == i) for i in instances), reverse=True)
    floor = sum(max(0, h - base - (1 if k < extra else 0)) for k, h in enumerate(held))
    assert plan.moves == floor


@settings(max_examples=200, deadline=None)
@given(fleets())
def test_stable_once_reached(fleet: tuple[list[str], list[int], dict[int, str]]) -> None:
    instances, tenants, owners = fleet
    first = assign(everyone(instances, tenants), owners)
    second = assign(everyone(instances, tenants), first.owners)
    assert second.owners == first.owners
    assert second.moves == 0
