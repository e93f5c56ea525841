"""Which events `Consumer.run_each` may hand to its one-event handler now: up to N calls at
once, never two of one key at once, and a key's events in stream order.

A key is a record key in one event stream: `(Event.stream, Event.key)` (a replayed event
carries its own stream, so it queues with the other versions of its key). Pure: the loop in
`syncd.consumer.each` adds what it reads, takes what `start` hands out and says when each call
ended; no clock, no I/O. Tested by tables and a Hypothesis property.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable

from syncd.consumer.delivery import entry_order
from syncd.consumer.events import Event

Key = tuple[str, str]
"""A record key in one stream: (stream, key)."""

Ident = tuple[str, str, str | None]
"""One delivery's identity: (stream, entry id, replay id)."""


def key_of(event: Event) -> Key:
    return event.stream, event.key


def ident_of(event: Event) -> Ident:
    return event.stream, event.id, event.replay_id


class KeyedQueue:
    """Events waiting for a handler call, per key in stream order, and the calls running.

    `start` hands out the events that may start now: the oldest waiting event of each key that
    has no call running, keys taken in the order they became ready, while fewer than
    `concurrency` calls run. An event already waiting or running (a stale one the consumer
    took over from itself) is not queued twice.
    """

    def __init__(self, concurrency: int) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.concurrency = concurrency
        self._waiting: dict[Key, list[Event]] = {}
        self._ready: deque[Key] = deque()  # keys with waiting events and no call running
        self._running: dict[Key, Event] = {}
        self._known: set[Ident] = set()
        self._count = 0  # waiting events, all keys together

    @property
    def waiting(self) -> int:
        """Events queued and not started."""
        return self._count

    @property
    def running(self) -> int:
        """Calls started and not finished."""
        return len(self._running)

    def add(self, events: Iterable[Event]) -> int:
        """Queue events; returns how many were new (not waiting or running already)."""
        added = 0
        for event in events:
            ident = ident_of(event)
            if ident in self._known:
                continue
            self._known.add(ident)
            key = key_of(event)
            queue = self._waiting.get(key)
            if queue is None:
                queue = self._waiting[key] = []
                if key not in self._running:
                    self._ready.append(key)
            # A stale event taken over comes after newer ones of its key were read: it still
            # goes first among those not started.
            bisect.insort(queue, event, key=lambda e: entry_order(e.id))
            self._count += 1
            added += 1
        return added

    def start(self) -> list[Event]:
        """The events to hand to the handler now, counted as running from here on."""
        started: list[Event] = []
        while self._ready and len(self._running) < self.concurrency:
            key = self._ready.popleft()
            queue = self._waiting[key]
            event = queue.pop(0)
            if not queue:
                del self._waiting[key]
            self._count -= 1
            self._running[key] = event
            started.append(event)
        return started

    def finish(self, event: Event) -> None:
        """The call for `event` ended (whatever its outcome): its key's next event may start."""
        key = key_of(event)
        if self._running.get(key) is not event:
            raise ValueError(f"{event.stream} {event.id} is not running")
        del self._running[key]
        self._known.discard(ident_of(event))
        if key in self._waiting:
            self._ready.append(key)

    def remove(self, keep: Iterable[Event]) -> list[Event]:
        """Drop the waiting events not in `keep` (no longer this consumer's); returns them."""
        kept = {ident_of(e) for e in keep}
        dropped = [e for q in self._waiting.values() for e in q if ident_of(e) not in kept]
        for event in dropped:
            key = key_of(event)
            queue = self._waiting[key]
            queue.remove(event)
            self._known.discard(ident_of(event))
            self._count -= 1
            if not queue:
                del self._waiting[key]
                if key not in self._running:
                    self._ready.remove(key)
        return dropped

    def waiting_events(self) -> list[Event]:
        """The waiting events, key after key, each key's in stream order."""
        return [e for q in self._waiting.values() for e in q]
