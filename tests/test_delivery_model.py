"""The delivery contract as a Hypothesis state machine against a real Redis: two consumers of
one group racing on claims (a tiny claim idle time: every read takes over what is pending),
handlers failing some events for a while and poison events for ever, an unlisted group reading
at its own pace, someone deleting entries in the middle, retention trimming in between.

Checked against a small reference model:
- every event is handed to a handler at least once, unless it was deleted before that;
- a handled event is acknowledged; one dead-lettered is never handled, was handed (and
  failed) at least once and has exactly one copy in the dead stream;
- retention never removes an entry that a group (the listed one, or the unlisted one it
  protects) has not acknowledged.

`make test` runs a small fixed budget; SYNCD_STATEFUL_EXAMPLES=N runs N random examples
(e.g. `SYNCD_STATEFUL_EXAMPLES=500 .venv/bin/pytest tests/test_delivery_model.py --timeout 0`).
"""

from __future__ import annotations

import asyncio
import os
import time
from datetime import timedelta
from typing import Any

import redis.asyncio as aioredis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from syncd.consumer import Consumer, Event
from syncd.engine import upkeep
from syncd.testing.redis_server import RedisServer
from tests.test_consumer import CUSTOMERS, KEYS

_LONG = os.environ.get("SYNCD_STATEFUL_EXAMPLES")
BUDGET = settings(
    max_examples=int(_LONG) if _LONG else 12,
    stateful_step_count=30,
    derandomize=not _LONG,
    database=None,
    deadline=timedelta(seconds=30),
    suppress_health_check=[HealthCheck.too_slow],
)
GROUP = "billing"
AUDIT = "audit"  # exists on the stream, not listed: protected by default
MAX_DELIVERIES = 2


def _entry_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class DeliveryModel(RuleBasedStateMachine):
    url = ""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.r = aioredis.Redis.from_url(self.url)
        self.run(self.r.flushall())
        self.consumers = [
            Consumer(
                self.r,
                GROUP,
                f"c{i}",
                streams=[CUSTOMERS],
                claim_idle_ms=1,
                max_deliveries=MAX_DELIVERIES,
                batch=3,
                block_ms=1,
            )
            for i in range(2)
        ]
        self.run(self.consumers[0].ensure_groups())
        self.run(self.r.xgroup_create(CUSTOMERS, AUDIT, id="0"))
        self.published: dict[str, str] = {}  # entry id -> record key
        self.poison: set[str] = set()  # record keys that always fail
        self.flaky: dict[str, int] = {}  # record key -> failures left
        self.handed: dict[str, int] = {}  # entry id -> times handed to a handler
        self.handled: set[str] = set()  # entry ids handled and acknowledged
        self.audit_acked: set[str] = set()
        self.deleted: set[str] = set()  # deleted by someone else
        self.trimmed: set[str] = set()
        self.key = 0

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    # -- the world -------------------------------------------------------------------

    @rule(kind=st.sampled_from(["good", "good", "flaky", "poison"]))
    def publish(self, kind: str) -> None:
        self.key += 1
        key = str(self.key)
        fields = {"op": "created", "key": key, "data": b"{}", "modified_on": ""}
        entry_id = _text(self.run(self.r.xadd(CUSTOMERS, fields)))  # type: ignore[arg-type]
        self.published[entry_id] = key
        if kind == "poison":
            self.poison.add(key)
        elif kind == "flaky":
            self.flaky[key] = 1

    @rule(pick=st.integers(0, 10_000))
    def delete_one(self, pick: int) -> None:
        live = sorted(set(self.published) - self.deleted - self.trimmed)
        if live:
            entry_id = live[pick % len(live)]
            self.run(self.r.xdel(CUSTOMERS, entry_id))
            self.deleted.add(entry_id)

    @rule(count=st.integers(1, 4), ack=st.booleans())
    def audit_reads(self, count: int, ack: bool) -> None:
        reply = self.run(self.r.xreadgroup(AUDIT, "a", {CUSTOMERS: ">"}, count=count))
        ids = [_text(i) for _, entries in reply or [] for i, f in entries if f]
        if ack and ids:
            self.run(self.r.xack(CUSTOMERS, AUDIT, *ids))
            self.audit_acked.update(ids)

    @rule(max_len=st.integers(0, 4))
    def retention(self, max_len: int) -> None:
        before = self._stream_ids()
        state = self.run(upkeep.stream_state(self.r, CUSTOMERS, [GROUP]))
        self.run(
            upkeep.trim(self.r, CUSTOMERS, state, configured=[GROUP], max_len=max_len, max_age=0)
        )
        gone = before - self._stream_ids()
        for entry_id in gone:
            assert entry_id in self.handled | self._dead_ids(), (
                f"retention removed {entry_id}, which {GROUP} has not acknowledged"
            )
            assert entry_id in self.audit_acked, (
                f"retention removed {entry_id}, which the unlisted group has not acknowledged"
            )
        self.trimmed |= gone

    # -- the consumers ---------------------------------------------------------------

    async def _handle(self, consumer: Consumer) -> None:
        events = await consumer.read()
        done: list[Event] = []
        for event in events:
            self.handed[event.id] = self.handed.get(event.id, 0) + 1
            if event.key in self.poison:
                continue
            if self.flaky.get(event.key, 0) > 0:
                self.flaky[event.key] -= 1
                continue
            done.append(event)
        await consumer.ack(*done)
        self.handled.update(e.id for e in done)

    @rule(which=st.integers(0, 1))
    def consume(self, which: int) -> None:
        self.run(self._handle(self.consumers[which]))

    @rule()
    def consume_concurrently(self) -> None:
        async def both() -> None:
            await asyncio.gather(*(self._handle(c) for c in self.consumers))

        self.run(both())

    @rule()
    def let_time_pass(self) -> None:
        time.sleep(0.003)  # beyond the claim idle time: everything pending may be taken over

    # -- what must hold --------------------------------------------------------------

    def _stream_ids(self) -> set[str]:
        return {_text(i) for i, _ in self.run(self.r.xrange(CUSTOMERS))}

    def _dead_entries(self) -> list[str]:
        return [_text(f[b"entry_id"]) for _, f in self.run(self.r.xrange(KEYS.dead))]

    def _dead_ids(self) -> set[str]:
        return set(self._dead_entries())

    @invariant()
    def dead_letters_are_single_and_deserved(self) -> None:
        dead = self._dead_entries()
        assert len(dead) == len(set(dead)), f"an event was dead-lettered twice: {dead}"
        for entry_id in dead:
            assert entry_id not in self.handled, f"{entry_id} was handled and dead-lettered"
            # Handed and failed at least once. Not necessarily `max_deliveries` times: a
            # take-over that loses a race to another consumer still counts as a delivery.
            assert self.handed.get(entry_id, 0) >= 1, f"{entry_id} was dead-lettered unseen"

    def teardown(self) -> None:
        try:
            # Drain: the flaky events succeed now, the poison ones end in the dead stream.
            self.flaky.clear()
            for _ in range(200):
                (info,) = [
                    g for g in self.run(self.r.xinfo_groups(CUSTOMERS)) if _text(g["name"]) == GROUP
                ]
                # Drained: nothing pending and nothing left past the group's position. The
                # newest entry that still exists counts, not the last generated id: an entry
                # deleted before anyone read it can never be delivered.
                newest = self.run(self.r.xrevrange(CUSTOMERS, count=1))
                delivered = _entry_order(_text(info["last-delivered-id"]))
                behind = bool(newest) and _entry_order(_text(newest[0][0])) > delivered
                if info["pending"] == 0 and not behind:
                    break
                self.let_time_pass()
                self.consume_concurrently()
            else:
                raise AssertionError(f"the group never drained: {info}")
            self.dead_letters_are_single_and_deserved()
            dead = self._dead_ids()
            for entry_id, key in self.published.items():
                if entry_id in self.deleted and entry_id not in self.handed:
                    continue  # deleted before anyone read it
                assert self.handed.get(entry_id, 0) >= 1, f"{entry_id} was never handed over"
                if entry_id in self.deleted:
                    continue  # deleted while pending: there is nothing left to retry
                if key in self.poison:
                    assert entry_id in dead, f"poison {entry_id} is not in the dead stream"
                else:
                    assert entry_id in self.handled | dead, f"{entry_id} was lost"
        finally:
            self.run(self.r.aclose())
            self.loop.close()


def test_delivery_contract(redis_server: RedisServer) -> None:
    DeliveryModel.url = redis_server.url
    run_state_machine_as_test(DeliveryModel, settings=BUDGET)
