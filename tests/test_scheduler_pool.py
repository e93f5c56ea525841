"""Who gets the next free worker (syncd.engine.fairshare), by tables: no clock, no sockets."""

from __future__ import annotations

import random

import pytest

from syncd.engine.fairshare import Pool, fair_share, may_borrow


@pytest.mark.parametrize(
    ("workers", "tenants", "share"),
    [(64, 0, 64), (64, 1, 64), (64, 8, 8), (64, 10, 6), (64, 64, 1), (64, 1000, 1), (1, 3, 1)],
)
def test_fair_share(workers: int, tenants: int, share: int) -> None:
    assert fair_share(workers, tenants) == share


@pytest.mark.parametrize(
    ("free", "owed", "workers", "expected"),
    [
        (10, 0, 64, True),  # nobody is owed anything: borrow
        (1, 0, 64, True),
        (0, 0, 64, False),  # nothing free
        (7, 6, 64, True),  # one more still leaves the 6 owed
        (6, 6, 64, False),  # ... this one would take from a tenant's share
        (40, 600, 64, True),  # many idle tenants: at most half the pool stays back
        (32, 600, 64, False),
    ],
)
def test_may_borrow(free: int, owed: int, workers: int, expected: bool) -> None:
    assert may_borrow(free, owed, workers) is expected


def greedy(pool: Pool, tenants: list[int]) -> None:
    """Every tenant in `tenants` wants to start polls for as long as the pool lets it."""
    for t in tenants:
        pool.want(t)
    while (t := pool.next()) is not None:
        pool.started(t)
        pool.want(t)


@pytest.mark.parametrize(
    ("workers", "tenants", "cap", "hogs"),
    [
        (64, 10, 8, 9),  # the defaults: 9 x 8 = 72 > 64
        (64, 10, 8, 5),
        (64, 20, 8, 19),
        (64, 64, 8, 63),  # one worker each at least
        (16, 4, 16, 3),
        (8, 3, 8, 2),
    ],
)
def test_hanging_tenants_always_leave_a_share_for_another(
    workers: int, tenants: int, cap: int, hogs: int
) -> None:
    """Tenants whose polls never end grab all they can, before the last one is even ready;
    it still starts its share of polls at once."""
    pool = Pool(workers)
    for t in range(tenants):
        pool.add(t, cap)
    greedy(pool, list(range(hogs)))
    assert all(pool.held(t) <= cap for t in range(hogs))
    late = tenants - 1
    greedy(pool, [late])
    assert pool.held(late) >= min(pool.share, cap) >= 1
    assert pool.busy <= workers


def test_lone_busy_tenant_gets_its_max_in_flight() -> None:
    """Shares hold back workers for idle tenants, but never so many that a lone busy tenant
    among many idle ones cannot reach its max_in_flight."""
    for tenants in (2, 10, 100, 1000):
        pool = Pool(64)
        for t in range(tenants):
            pool.add(t, 8)
        greedy(pool, [0])
        assert pool.held(0) == 8, tenants


def test_below_share_goes_first_then_round_robin() -> None:
    pool = Pool(7)
    for t in (1, 2, 3):
        pool.add(t, 6)
    assert pool.share == 2
    for _ in range(3):
        pool.started(1)  # 1 borrowed beyond its share
    for t in (1, 2, 3):
        pool.want(t)
    assert pool.next() == 2  # below their share, in the order they became ready
    pool.started(2)
    pool.want(2)
    assert pool.next() == 3
    pool.started(3)
    pool.want(3)
    assert pool.next() == 2  # 2 was ready again before 3
    pool.started(2)
    pool.want(2)  # at its share now: behind 1
    assert pool.next() == 3
    pool.started(3)
    assert pool.next() is None  # full
    pool.finished(1)
    assert pool.next() == 1  # nobody is owed a worker: the longest waiting borrower


def test_borrowers_leave_an_idle_tenants_share_free() -> None:
    pool = Pool(6)
    for t in (1, 2, 3):
        pool.add(t, 6)
    for _ in range(3):
        pool.started(1)
    for _ in range(2):
        pool.started(2)
    pool.want(1)
    pool.want(2)
    assert (pool.free, pool.owed) == (1, 2)
    assert pool.next() is None  # the last free worker is 3's, idle as 3 is
    pool.want(3)
    assert pool.next() == 3


def test_a_tenant_back_under_its_share_moves_up() -> None:
    pool = Pool(4)
    for t in (1, 2):
        pool.add(t, 4)
    for _ in range(2):
        pool.started(1)
        pool.started(2)
    pool.want(1)
    pool.want(2)
    assert pool.next() is None
    pool.finished(2)
    assert pool.next() == 2  # under its share again: served before 1, which waited longer


def test_removed_tenant_keeps_its_workers_until_its_polls_end() -> None:
    pool = Pool(4)
    pool.add(1, 4)
    pool.add(2, 4)
    pool.started(1)
    pool.started(1)
    pool.want(1)
    pool.remove(1)
    assert pool.share == 4
    assert (pool.busy, pool.free) == (2, 2)
    assert pool.next() is None  # nobody waiting: the removed tenant left the queue
    pool.finished(1)
    pool.finished(1)
    assert (pool.busy, pool.held(1), pool.owed) == (0, 0, 4)


def test_caps_hold_whatever_the_share() -> None:
    pool = Pool(64)
    pool.add(1, 3)
    greedy(pool, [1])
    assert pool.held(1) == 3
    pool.add(1, 5)  # reconfigured
    greedy(pool, [1])
    assert pool.held(1) == 5
    assert pool.at_cap(1)
    assert pool.at_cap(99)  # unknown tenants start nothing


def test_bookkeeping_stays_exact_through_any_sequence() -> None:
    """What the pool keeps incrementally (workers owed, busy) equals a recount after every
    step of a long random sequence of joins, leaves, cap changes, starts and ends."""
    rng = random.Random(11)
    pool = Pool(16)
    caps: dict[int, int] = {}
    running: list[int] = []
    for _ in range(3000):
        op = rng.random()
        tenant = rng.randrange(40)
        if op < 0.1:
            caps[tenant] = rng.randint(1, 8)
            pool.add(tenant, caps[tenant])
        elif op < 0.15:
            caps.pop(tenant, None)
            pool.remove(tenant)
        elif op < 0.55:
            pool.want(tenant)
            chosen = pool.next()
            if chosen is not None:
                assert pool.held(chosen) < caps[chosen]  # never beyond its max_in_flight
                pool.started(chosen)
                running.append(chosen)
        elif running:
            pool.finished(running.pop(rng.randrange(len(running))))
        owed = sum(max(0, min(pool.share, c) - pool.held(t)) for t, c in caps.items())
        assert pool.owed == owed
        assert pool.busy == len(running) <= 16
        assert pool.share == fair_share(16, len(caps))


def test_a_worker_is_spare_for_work_beyond_polls_only_as_next_would_give_it() -> None:
    """Work beyond a tenant's polls (a page fetched ahead) takes a worker only when `next`
    would give the tenant one and no tenant is waiting for one."""
    pool = Pool(6)
    for t in (1, 2, 3):
        pool.add(t, 3)
    pool.started(1)
    assert pool.spare_for(1)  # below its share of 2
    pool.started(1)
    assert pool.spare_for(1)  # at its share; 4 free, 4 owed to 2 and 3: borrowing leaves 3
    pool.started(1)
    assert not pool.spare_for(1)  # at max_in_flight
    pool.started(2)
    pool.started(2)
    assert not pool.spare_for(2)  # 1 free, owed to 3, idle as 3 is
    pool.want(3)
    assert not pool.spare_for(3)  # 3 waits for it: its poll first
    assert pool.next() == 3
    pool.started(3)
    assert not pool.spare_for(3)  # none free
