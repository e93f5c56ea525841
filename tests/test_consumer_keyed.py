"""`KeyedQueue`, the pure decision behind `Consumer.run_each`: which events may start now. Tables
of operations and what each `start` hands out, and a property over random interleavings."""

from __future__ import annotations

from collections import defaultdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.consumer import Event
from syncd.consumer.delivery import entry_order
from syncd.consumer.keyed import KeyedQueue
from syncd.keys import Keys

CUSTOMERS = Keys("st", 1).stream("crm.customers")
JOBS = Keys("st", 1).stream("jpm.jobs")


def ev(name: str) -> Event:
    """`a3`: version 3 of key a in crm.customers (entry id 3-97: unique in its stream, in
    version order within its key); `J:a3` the same in jpm.jobs."""
    stream = CUSTOMERS
    if name.startswith("J:"):
        stream, name = JOBS, name[2:]
    key, version = name[0], int(name[1:])
    return Event(
        stream=stream,
        id=f"{version}-{ord(key)}",
        tenant=1,
        feed="jpm.jobs" if stream == JOBS else "crm.customers",
        op="updated",
        key=key,
        data=b"{}",
        modified_on=None,
        deliveries=1,
    )


def name_of(event: Event) -> str:
    return ("J:" if event.stream == JOBS else "") + event.key + event.id.partition("-")[0]


def play(concurrency: int, script: list[str]) -> list[list[str]]:
    """Run `add x y`, `finish x`, `start` lines; what each `start` handed out."""
    queue = KeyedQueue(concurrency)
    running: dict[str, Event] = {}
    started: list[list[str]] = []
    for line in script:
        verb, *names = line.split()
        if verb == "add":
            queue.add(ev(n) for n in names)
        elif verb == "finish":
            queue.finish(running.pop(names[0]))
        else:
            out = queue.start()
            running.update((name_of(e), e) for e in out)
            started.append([name_of(e) for e in out])
    return started


@pytest.mark.parametrize(
    ("concurrency", "script", "started"),
    [
        # Up to N at once, keys in the order they arrived.
        (2, ["add a1 b1 c1 d1", "start", "finish a1", "start"], [["a1", "b1"], ["c1"]]),
        # Never two versions of one key at once: b waits for a's first version to end.
        (
            4,
            ["add a1 a2 a3 b1", "start", "start", "finish a1", "start", "finish a2", "start"],
            [["a1", "b1"], [], ["a2"], ["a3"]],
        ),
        # One key in two streams is two keys.
        (4, ["add a1 J:a1", "start"], [["a1", "J:a1"]]),
        # A key's versions in stream order, even when an older one (taken over) comes later.
        (1, ["add a5", "start", "add a7 a6 a2", "finish a5", "start"], [["a5"], ["a2"]]),
        # A key whose version ended goes behind the keys already waiting.
        (
            1,
            ["add a1 a2 b1 c1", "start", "finish a1", "start", "finish b1", "start"],
            [["a1"], ["b1"], ["c1"]],
        ),
        # The same delivery twice (waiting, or running) is queued once.
        (2, ["add a1 a1", "start", "add a1", "start"], [["a1"], []]),
        # A free slot and nothing startable: nothing.
        (3, ["add a1 a2", "start", "start"], [["a1"], []]),
    ],
)
def test_what_starts(concurrency: int, script: list[str], started: list[list[str]]) -> None:
    assert play(concurrency, script) == started


def test_counts_and_duplicates() -> None:
    queue = KeyedQueue(2)
    assert queue.add([ev("a1"), ev("a2"), ev("b1"), ev("a1")]) == 3
    assert (queue.waiting, queue.running) == (3, 0)
    first = queue.start()
    assert (queue.waiting, queue.running) == (1, 2)
    assert queue.add([first[0]]) == 0  # running already
    queue.finish(first[0])
    assert queue.add([first[0]]) == 1  # ended: a new delivery of it is queued again


def test_finishing_what_does_not_run_is_an_error() -> None:
    queue = KeyedQueue(1)
    queue.add([ev("a1"), ev("a2")])
    with pytest.raises(ValueError, match="not running"):
        queue.finish(ev("a2"))


def test_remove_drops_waiting_events_that_are_no_longer_ours() -> None:
    queue = KeyedQueue(1)
    queue.add([ev("a1"), ev("a2"), ev("b1"), ev("c1")])
    (a1,) = queue.start()
    dropped = queue.remove(keep=[ev("a2"), ev("c1")])
    assert [name_of(e) for e in dropped] == ["b1"]
    assert [name_of(e) for e in queue.waiting_events()] == ["a2", "c1"]
    assert queue.start() == []  # a1 still runs, c1 waits for the slot
    queue.finish(a1)
    assert [name_of(e) for e in queue.start()] == ["c1"]


def test_concurrency_must_be_positive() -> None:
    with pytest.raises(ValueError, match="concurrency"):
        KeyedQueue(0)


# Operations: ("add", key, stream) adds that key's next version; ("start",); ("finish", i)
# ends the i-th running call (modulo how many run).
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from("abcde"), st.sampled_from([CUSTOMERS, JOBS])),
        st.tuples(st.just("start")),
        st.tuples(st.just("finish"), st.integers(0, 20)),
    ),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(concurrency=st.integers(1, 4), ops=_ops)
def test_property_order_exclusion_bound_and_no_idle_slot(
    concurrency: int, ops: list[tuple[object, ...]]
) -> None:
    queue = KeyedQueue(concurrency)
    versions: dict[tuple[str, str], int] = defaultdict(int)
    running: list[Event] = []
    started: dict[tuple[str, str], list[str]] = defaultdict(list)
    added = 0

    def start() -> None:
        for event in queue.start():
            key = (event.stream, event.key)
            assert all((e.stream, e.key) != key for e in running), "two of one key at once"
            running.append(event)
            started[key].append(event.id)
        assert len(running) <= concurrency
        # No idle slot while an event could start: every waiting event's key is running.
        if len(running) < concurrency:
            busy = {(e.stream, e.key) for e in running}
            assert all((e.stream, e.key) in busy for e in queue.waiting_events())

    for op in ops:
        if op[0] == "add":
            _, key, stream = op
            versions[(str(stream), str(key))] += 1
            n = versions[(str(stream), str(key))]
            event = ev(("J:" if stream == JOBS else "") + f"{key}{n}")
            added += queue.add([event])
        elif op[0] == "start":
            start()
        elif running:
            index = int(str(op[1])) % len(running)
            queue.finish(running.pop(index))
    # Drain: everything added starts once, in each key's stream order.
    while running or queue.waiting:
        start()
        queue.finish(running.pop(0))
    assert sum(len(ids) for ids in started.values()) == added
    for ids in started.values():
        assert ids == sorted(ids, key=entry_order)
