"""The consumer's contract under adversarial handlers and cancellation: handlers that return
the wrong things, cancellation arriving as a handler call completes or as `stop` is set."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
import redis.asyncio as aioredis

from syncd.consumer import Event
from tests.test_consumer import CUSTOMERS, KEYS, publish
from tests.test_consumer_faults import make, until


@pytest.mark.parametrize("timeout", [None, 5.0])
async def test_cancellation_arriving_as_the_handler_returns_ends_run(
    redis: aioredis.Redis, timeout: float | None
) -> None:
    # The world cancels run() in the same loop turn in which a handler call completes: the
    # cancellation must end run(), not be taken for the handler's result and dropped.
    await publish(redis, CUSTOMERS, 1)
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    calls = 0

    async def handler(batch: list[Event]) -> None:
        nonlocal calls
        calls += 1
        assert task is not None
        task.cancel()

    task = asyncio.create_task(make(redis, handler_timeout=timeout).run(handler, stop=stop))
    done, _ = await asyncio.wait({task}, timeout=30)
    assert done, "run() kept going after it was cancelled"
    assert task.cancelled()
    assert calls == 1


async def test_cancellation_arriving_as_stop_is_set_ends_run_cancelled(
    redis: aioredis.Redis,
) -> None:
    # run() is waiting out a backoff (Redis refuses: wrong type) when stop is set and the task
    # cancelled in the same loop turn: the cancellation is not swallowed.
    await redis.set(CUSTOMERS, "not a stream")
    stop = asyncio.Event()
    c = make(redis)
    task = asyncio.create_task(c.run(lambda batch: asyncio.sleep(0), stop=stop))
    await until(lambda: c._groups_ready is False and task.done() is False, "run to start")
    await asyncio.sleep(0.3)  # inside the backoff pause by now

    def both() -> None:
        stop.set()
        task.cancel()

    asyncio.get_running_loop().call_soon(both)
    done, _ = await asyncio.wait({task}, timeout=30)
    assert done
    assert task.cancelled()


@pytest.mark.parametrize("turns", list(range(0, 40, 3)))
async def test_cancellation_at_any_moment_of_a_busy_round_ends_run(
    redis: aioredis.Redis, turns: int
) -> None:
    # Cancelled after `turns` loop turns of a consumer busy reading, handling and
    # acknowledging: wherever that lands (also while redis-py sends a command, where Python
    # 3.11 drops the request inside asyncio.wait_for), run() ends cancelled, promptly.
    for key in range(30):
        await publish(redis, CUSTOMERS, key)
    handled: list[str] = []

    async def handler(batch: list[Event]) -> None:
        handled.extend(e.key for e in batch)

    c = make(redis, batch=2, block_ms=50)
    await c.ensure_groups()
    task = asyncio.create_task(c.run(handler, stop=asyncio.Event()))
    for _ in range(turns):
        await asyncio.sleep(0)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done, f"run() still going after being cancelled at turn {turns}"
    assert task.cancelled(), task.result()


@pytest.mark.parametrize(
    "report",
    [
        "generator",  # the failed events as a generator
        "bytes_ids",  # their entry ids as bytes
        "record_keys",  # record keys instead of entry ids: not understood
        "other_batch",  # events of another batch: not understood
        "duplicates",  # the failed event twice
    ],
)
async def test_a_failure_the_handler_reports_is_never_acknowledged(
    redis: aioredis.Redis, report: str
) -> None:
    # Record 3 keeps failing, whatever shape the handler reports that in: it must not be
    # acknowledged as handled; it ends in the dead stream, and the others are handled.
    handled: set[str] = set()
    stale: list[Event] = []

    async def handler(batch: list[Event]) -> object:
        bad = [e for e in batch if e.key == "3"]
        handled.update(e.key for e in batch if e.key != "3")
        if not stale:
            stale.extend(batch)
        if report == "generator":
            return (e for e in bad)
        if report == "bytes_ids":
            return [e.id.encode() for e in bad]
        if report == "record_keys":
            return [e.key for e in bad]
        if report == "other_batch":
            return [s for s in stale if s.key == "999"] + [
                msgspec_replace(e, id="1-1") for e in bad
            ]
        return bad + bad

    for key in range(1, 6):
        await publish(redis, CUSTOMERS, key)
    c = make(redis, claim_idle_ms=100, max_deliveries=2)
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(handler, stop=stop))
    await until(lambda: handled == {"1", "2", "4", "5"}, "the good events")
    await until(lambda: _dead(redis, ["3"]), "the failing event in the dead stream")
    stop.set()
    await asyncio.wait_for(task, 30)
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0


def msgspec_replace(event: Event, **changes: object) -> Event:
    return msgspec.structs.replace(event, **changes)


async def _dead(client: aioredis.Redis, keys: list[str]) -> bool:
    return [f[b"key"].decode() for _, f in await client.xrange(KEYS.dead)] == keys
