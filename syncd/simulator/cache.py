"""A byte-budgeted cache of rendered JSON (records and whole pages)."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


class SizedCache(Generic[V]):
    """Dict with a byte budget; evicts oldest insertions first.

    Insertion order is good enough here: pages are read in log order and hot pages are
    re-inserted after every invalidation, so FIFO behaves close to LRU without bookkeeping on
    each hit.
    """

    __slots__ = ("_budget", "_items", "hits", "misses", "size")

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes
        self._items: dict[Hashable, tuple[V, int]] = {}
        self.size = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> V | None:
        """The cached value, or None."""
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.hits += 1
        return item[0]

    def put(self, key: Hashable, value: V, nbytes: int) -> None:
        """Store `value`, accounted as `nbytes`, evicting old entries beyond the budget."""
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= old[1]
        if nbytes > self._budget:
            return
        self._items[key] = (value, nbytes)
        self.size += nbytes
        while self.size > self._budget:
            oldest = next(iter(self._items))
            self.size -= self._items.pop(oldest)[1]

    def discard(self, key: Hashable) -> None:
        """Forget `key` if present."""
        old = self._items.pop(key, None)
        if old is not None:
            self.size -= old[1]

    def __len__(self) -> int:
        return len(self._items)
