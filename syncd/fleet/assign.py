"""Who polls which tenant: the fleet's assignment, a pure function of the facts in Redis.

Every instance computes the same answer from the same facts (live instances, the tenants each of
them knows from its configuration, the current lease owners), so the fleet agrees without a
leader. Tenants are counted, not weighted by feeds: a tenant's load is capped by its own rate limit
rather than its feed count, and counting keeps the promise that each instance holds within one of
ceil(tenants / instances).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Plan:
    """The desired owner of every tenant some live instance knows, and what changes to get there."""

    owners: dict[int, str]  # tenant -> instance; tenants no live instance knows are absent
    moves: int  # tenants that leave a live owner which still knows them

    def tenants_of(self, instance: str) -> set[int]:
        return {t for t, i in self.owners.items() if i == instance}


def capacities(instances: list[str], tenants: int, held: Mapping[str, int]) -> dict[str, int]:
    """How many tenants each instance should hold: all get floor(N/M), and the N mod M extra
    places go to the instances holding the most now (then by name), which keeps moves fewest."""
    if not instances:
        return {}
    base, extra = divmod(tenants, len(instances))
    ranked = sorted(instances, key=lambda i: (-held.get(i, 0), i))
    return {inst: base + (1 if n < extra else 0) for n, inst in enumerate(ranked)}


def assign(
    known: Mapping[str, Iterable[int]],
    owners: Mapping[int, str],
) -> Plan:
    """The desired owner per tenant.

    `known` maps each live instance to the tenant ids its configuration lists; a tenant goes only
    to an instance that knows it. `owners` maps tenants to their current lease holder (absent:
    free); owners that are not live, or no longer know the tenant, count as free.
    A current owner keeps its tenants up to its capacity (the lowest ids first); the rest go to
    the instance with the fewest tenants among those that know them (then by name), the tenants
    with the fewest candidates first. When configurations disagree the balance is best effort.
    """
    instances = sorted(known)
    knows = {i: set(known[i]) for i in instances}
    candidates: dict[int, list[str]] = {}
    for inst in instances:
        for t in knows[inst]:
            candidates.setdefault(t, []).append(inst)
    tenants = sorted(candidates)

    current: dict[str, list[int]] = {i: [] for i in instances}
    for t in tenants:
        owner = owners.get(t)
        if owner is not None and owner in knows and t in knows[owner]:
            current[owner].append(t)
    caps = capacities(instances, len(tenants), {i: len(ts) for i, ts in current.items()})

    result: dict[int, str] = {}
    count = dict.fromkeys(instances, 0)
    moves = 0
    for inst in instances:
        keep = current[inst][: caps[inst]]
        moves += len(current[inst]) - len(keep)
        for t in keep:
            result[t] = inst
        count[inst] = len(keep)

    free = sorted((t for t in tenants if t not in result), key=lambda t: (len(candidates[t]), t))
    for t in free:
        cands = candidates[t]
        room = [i for i in cands if count[i] < caps[i]]
        best = min(room or cands, key=lambda i: (count[i], i))
        result[t] = best
        count[best] += 1
    return Plan(owners=result, moves=moves)


def disagreements(known: Mapping[str, Iterable[int]]) -> dict[int, list[str]]:
    """Tenants that some live instances know and others do not: tenant -> instances missing it."""
    sets = {i: set(ts) for i, ts in known.items()}
    everything: set[int] = set().union(*sets.values()) if sets else set()
    out: dict[int, list[str]] = {}
    for t in sorted(everything):
        missing = sorted(i for i, ts in sets.items() if t not in ts)
        if missing:
            out[t] = missing
    return out
