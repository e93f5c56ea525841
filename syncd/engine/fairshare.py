"""Who gets the next free worker: a fair share of the pool for every tenant, pure.

The pool has `workers` slots; a poll holds one from the request to the stored page. Each
tenant holds at most its `max_in_flight`, and is owed a fair share: the pool divided among
the tenants, at least one. Below its share a tenant takes any free worker, and is served
before tenants above theirs. Above it, a tenant may borrow idle workers only while enough stay
free for the shares the others are not using (at most half the pool stays back, so that a
lone busy tenant among many idle ones still gets its `max_in_flight`). So tenants whose
requests hang hold their share and a little more, never the whole pool: a healthy tenant
finds a worker at once. While there are more tenants than workers, shares cannot all be kept.

No clock, no I/O: the scheduler tells the pool which tenants are ready, asks whom to serve,
and reports polls started and finished. Tested by tables in tests/test_scheduler_pool.py.
"""

from __future__ import annotations


def fair_share(workers: int, tenants: int) -> int:
    """Workers a tenant is owed when `tenants` share `workers`."""
    return max(1, workers // max(1, tenants))


def may_borrow(free: int, owed_to_others: int, workers: int) -> bool:
    """Whether a tenant at or above its share may take one of `free` workers."""
    return free >= 1 and free - 1 >= min(owed_to_others, workers // 2)


class Pool:
    """Worker slots, per-tenant caps and shares, and the tenants waiting for a worker."""

    def __init__(self, workers: int) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.workers = workers
        self.busy = 0
        self.share = workers
        self._cap: dict[int, int] = {}
        self._held: dict[int, int] = {}
        self._owed = 0  # sum over tenants of the part of their share they do not use
        # Tenants ready to start a poll, oldest first; dicts keep insertion order.
        self._below: dict[int, None] = {}
        self._above: dict[int, None] = {}

    # -- tenants ---------------------------------------------------------------------------

    def add(self, tenant: int, max_in_flight: int) -> None:
        """A tenant joins (or changes its cap)."""
        count = len(self._cap) + (tenant not in self._cap)
        self._owed -= self._unused(tenant)
        self._cap[tenant] = max_in_flight
        self._held.setdefault(tenant, 0)
        self._owed += self._unused(tenant)
        self._reshare(fair_share(self.workers, count), tenant)

    def remove(self, tenant: int) -> None:
        """A tenant leaves; its polls under way keep their workers until they finish."""
        self._owed -= self._unused(tenant)
        self._cap.pop(tenant, None)
        self._below.pop(tenant, None)
        self._above.pop(tenant, None)
        if not self._held.get(tenant):
            self._held.pop(tenant, None)
        self._reshare(fair_share(self.workers, len(self._cap)), None)

    def _reshare(self, share: int, changed: int | None) -> None:
        """Apply a new share (every tenant's place may change) or requeue the one changed."""
        if share == self.share:
            if changed is not None and self.unwant(changed):
                self.want(changed)
            return
        self.share = share
        self._owed = sum(self._unused(t) for t in self._cap)
        waiting = [*self._below, *self._above]
        self._below.clear()
        self._above.clear()
        for t in waiting:
            self.want(t)

    def _unused(self, tenant: int) -> int:
        cap = self._cap.get(tenant)
        if cap is None:
            return 0
        return max(0, min(self.share, cap) - self._held.get(tenant, 0))

    def held(self, tenant: int) -> int:
        return self._held.get(tenant, 0)

    def at_cap(self, tenant: int) -> bool:
        """Whether the tenant holds its max_in_flight (or is gone)."""
        cap = self._cap.get(tenant)
        return cap is None or self._held.get(tenant, 0) >= cap

    @property
    def free(self) -> int:
        return self.workers - self.busy

    @property
    def owed(self) -> int:
        """Workers the tenants are owed and do not use."""
        return self._owed

    # -- waiting and serving ---------------------------------------------------------------

    def want(self, tenant: int) -> None:
        """The tenant has a poll it could start now; it waits its turn (once)."""
        if tenant not in self._cap or tenant in self._below or tenant in self._above:
            return
        if self._held.get(tenant, 0) < self.share:
            self._below[tenant] = None
        else:
            self._above[tenant] = None

    def unwant(self, tenant: int) -> bool:
        """The tenant has nothing to start after all; whether it was waiting."""
        below = self._below.pop(tenant, 0) is None
        above = self._above.pop(tenant, 0) is None
        return below or above

    def waiting(self) -> bool:
        return bool(self._below or self._above)

    def next(self) -> int | None:
        """The tenant to serve now (no longer waiting), or None while none may start.

        Tenants below their share go first, in the order they became ready; then those above
        it, while borrowing leaves the others' shares free.
        """
        if self.free < 1:
            return None
        while self._below:
            tenant = next(iter(self._below))
            del self._below[tenant]
            if not self.at_cap(tenant):
                return tenant
        while self._above:
            tenant = next(iter(self._above))
            if self.at_cap(tenant):
                del self._above[tenant]
                continue
            if not may_borrow(self.free, self._owed, self.workers):
                return None
            del self._above[tenant]
            return tenant
        return None

    def spare_for(self, tenant: int) -> bool:
        """Whether the tenant may take a worker for work beyond its polls (a page fetched
        ahead) now: one is free, no tenant waits for one, and `next` would let it have it."""
        if self.free < 1 or self.waiting() or self.at_cap(tenant):
            return False
        if self._held.get(tenant, 0) < self.share:
            return True
        return may_borrow(self.free, self._owed, self.workers)

    def started(self, tenant: int) -> None:
        """A poll of the tenant took a worker."""
        before = self._unused(tenant)
        self._held[tenant] = self._held.get(tenant, 0) + 1
        self.busy += 1
        self._owed += self._unused(tenant) - before

    def finished(self, tenant: int) -> None:
        """A poll of the tenant gave its worker back (also after the tenant was removed)."""
        before = self._unused(tenant)
        held = self._held.get(tenant, 0) - 1
        self.busy -= 1
        if held <= 0 and tenant not in self._cap:
            self._held.pop(tenant, None)
        else:
            self._held[tenant] = max(0, held)
        self._owed += self._unused(tenant) - before
        if tenant in self._above and self._held.get(tenant, 0) < self.share:
            # Back under its share: it moves up, keeping nothing of its place.
            del self._above[tenant]
            self._below[tenant] = None
