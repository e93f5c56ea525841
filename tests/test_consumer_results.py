"""What a handler returns: None or the failed events (or their ids) in a collection. Anything
else (a dict of reasons, a str, bytes, a number) says nothing about which events failed and
must acknowledge nothing, at run time, and mypy refuses most of it before it runs."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from syncd.consumer import Event, Failed
from syncd.consumer.delivery import UnknownResult, failed_events, failure_reasons
from tests.test_consumer import CUSTOMERS, KEYS, publish
from tests.test_consumer_faults import Runner, make, until

ROOT = Path(__file__).resolve().parent.parent

BATCH = [
    Event(CUSTOMERS, f"1-{i}", 1, "crm.customers", "created", str(i), b"{}", None, 1)
    for i in range(3)
]


@pytest.mark.parametrize(
    ("result", "kind"),
    [
        ({"1-1": "constraint violated"}, "dict"),  # {event.id: reason}: the natural mistake
        ("1-1", "str"),  # one id, not in a collection
        (b"1-1", "bytes"),
        (bytearray(b"1-1"), "bytearray"),
        (0, "int"),  # a count of failures
        (2, "int"),
        (True, "bool"),
        (1.0, "float"),
        (BATCH[1], "Event"),  # one event, not in a collection
        (object(), "object"),
    ],
)
def test_a_result_that_names_no_failures_is_refused(result: object, kind: str) -> None:
    with pytest.raises(UnknownResult, match=f"returned a {kind}") as exc:
        failed_events(BATCH, result)
    assert exc.value.kind == kind


@pytest.mark.parametrize(
    ("result", "failed"),
    [
        (None, []),
        ([], []),
        ((), []),
        (set(), []),
        ([BATCH[1]], [BATCH[1]]),
        (("1-0", b"1-2"), [BATCH[0], BATCH[2]]),
        ({"1-2"}, [BATCH[2]]),
        (frozenset({BATCH[0]}), [BATCH[0]]),
        ({"1-1": "why"}.keys(), [BATCH[1]]),  # a dict's keys: the ids it holds
        (iter(["1-1"]), [BATCH[1]]),
        ((e for e in BATCH if e.key != "1"), [BATCH[0], BATCH[2]]),
        ([Failed(BATCH[1], "refused")], [BATCH[1]]),
        ([BATCH[0], Failed(BATCH[2], "refused")], [BATCH[0], BATCH[2]]),
    ],
)
def test_a_collection_of_failures_is_understood(result: object, failed: list[Event]) -> None:
    assert failed_events(BATCH, result) == failed


@pytest.mark.parametrize(
    ("result", "reasons"),
    [
        (None, {}),
        ([BATCH[0], "1-1"], {}),
        ({"1-1": "a dict is refused anyway"}, {}),
        ("1-1", {}),
        ([BATCH[0], Failed(BATCH[2], "too big")], {(CUSTOMERS, "1-2"): "too big"}),
        ((Failed(e, e.key) for e in BATCH[:2]), {(CUSTOMERS, "1-0"): "0", (CUSTOMERS, "1-1"): "1"}),
    ],
)
def test_the_reasons_given_for_failures(result: object, reasons: dict[Any, str]) -> None:
    assert failure_reasons(result) == reasons


async def test_a_refused_event_reaches_the_dead_stream_with_its_reason(
    redis: aioredis.Redis,
) -> None:
    # Alone in its batches (as each redelivery is), a refused event fails every event of the
    # round; with a reason of its own that is no outage, so it is not held but goes the normal
    # way, and its dead letter says why.
    handled: list[str] = []

    async def handler(batch: list[Event]) -> list[Failed]:
        handled.extend(e.key for e in batch if e.key != "2")
        return [
            Failed(e, "jsonb: \\u0000 cannot be converted to text") for e in batch if e.key == "2"
        ]

    for key in (1, 2, 3):
        await publish(redis, CUSTOMERS, key)
    c = make(redis, claim_idle_ms=100, max_deliveries=2, outage_after=1)
    with capture_logs() as logs:
        runner = Runner(c, handler)
        await until(lambda: redis.xlen(KEYS.dead), "the refused event in the dead stream")
        await runner.finish()
    assert handled == ["1", "3"]
    ((_, dead),) = await redis.xrange(KEYS.dead)
    assert dead[b"key"] == b"2"
    assert dead[b"reason"] == b"max_deliveries"
    assert dead[b"detail"] == b"jsonb: \\u0000 cannot be converted to text"
    assert not [e for e in logs if e["event"] == "consumer_handler_outage"]
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 0


def test_the_refusal_says_what_to_return_instead() -> None:
    with pytest.raises(UnknownResult) as exc:
        failed_events(BATCH, {"1-1": "reason"})
    assert "list(it)" in str(exc.value)
    assert "return None when every event was handled" in str(exc.value)


@pytest.mark.parametrize("shape", ["dict", "str", "bytes", "int", "true", "event"])
async def test_run_acknowledges_nothing_on_a_result_it_does_not_understand(
    redis: aioredis.Redis, shape: str
) -> None:
    ids = [await publish(redis, CUSTOMERS, key) for key in range(3)]
    calls: list[list[str]] = []

    async def handler(batch: list[Event]) -> Any:
        calls.append([e.id for e in batch])
        bad = batch[0]
        return {
            "dict": {bad.id: "constraint violated"},
            "str": bad.id,
            "bytes": bad.id.encode(),
            "int": 1,
            "true": True,
            "event": bad,
        }[shape]

    c = make(redis, claim_idle_ms=60_000)
    with capture_logs() as logs:
        runner = Runner(c, handler)
        await until(lambda: len(calls) >= 1, "the first call")
        await asyncio.sleep(0.2)  # time enough to acknowledge, were it going to
        await runner.finish()

    # Everything stays pending: nothing was acknowledged on the word of that result.
    (group,) = await redis.xinfo_groups(CUSTOMERS)
    assert group["pending"] == 3
    rows = await redis.xpending_range(CUSTOMERS, "billing", "-", "+", 10)
    assert [row["message_id"].decode() for row in rows] == ids
    # The whole batch failed at once: the handler is not called again per event for it.
    assert calls[0] == ids
    assert all(call == ids for call in calls)
    refused = [e for e in logs if e["event"] == "consumer_handler_result_refused"]
    assert refused
    assert refused[0]["log_level"] == "error"
    expected = {"true": "bool", "event": "Event"}.get(shape, shape)
    assert refused[0]["result_type"] == expected
    assert refused[0]["events"] == 3


async def test_a_handler_refused_every_round_is_held_not_dead_lettered(
    redis: aioredis.Redis,
) -> None:
    # A wrong result is the handler's bug, not the events': after `outage_after` rounds the
    # loop holds them like an outage instead of burning their deliveries into the dead stream.
    await publish(redis, CUSTOMERS, 1)
    calls = 0

    async def handler(batch: list[Event]) -> Any:
        nonlocal calls
        calls += 1
        return {e.id: "no" for e in batch}

    c = make(redis, claim_idle_ms=100, max_deliveries=1, outage_after=1)
    with capture_logs() as logs:
        runner = Runner(c, handler)
        await until(
            lambda: any(e["event"] == "consumer_handler_outage" for e in logs), "the outage"
        )
        await until(lambda: calls >= 3, "retries of the held event")
        await runner.finish()
    assert await redis.xlen(KEYS.dead) == 0
    assert (await redis.xinfo_groups(CUSTOMERS))[0]["pending"] == 1


MYPY_SNIPPET = """
    import asyncio
    from collections.abc import Iterator

    from syncd.consumer import Consumer, Event, Failed


    async def failed_events(batch: list[Event]) -> list[Event]:
        return []


    async def failed_ids(batch: list[Event]) -> set[str]:
        return set()


    async def all_handled(batch: list[Event]) -> None:
        return None


    async def generated(batch: list[Event]) -> Iterator[Event]:
        return iter(batch)


    async def reasons(batch: list[Event]) -> dict[str, str]:
        return {e.id: "why" for e in batch}


    async def refused(batch: list[Event]) -> list[Failed]:
        return [Failed(e, "why") for e in batch]


    async def raw(batch: list[Event]) -> bytes:
        return b""


    async def counted(batch: list[Event]) -> int:
        return 0


    async def main(c: Consumer, stop: asyncio.Event) -> None:
        await c.run(failed_events, stop=stop)
        await c.run(failed_ids, stop=stop)
        await c.run(all_handled, stop=stop)
        await c.run(generated, stop=stop)
        await c.run(refused, stop=stop)
        await c.run(reasons, stop=stop)  # line 45
        await c.run(raw, stop=stop)  # line 46
        await c.run(counted, stop=stop)  # line 47
"""


def test_mypy_refuses_a_handler_that_returns_a_dict_bytes_or_a_count(tmp_path: Path) -> None:
    mypy = Path(sys.executable).parent / "mypy"
    if not mypy.exists() and shutil.which("mypy") is None:
        pytest.skip("mypy is not installed beside this Python")
    snippet = tmp_path / "handlers.py"
    snippet.write_text(textwrap.dedent(MYPY_SNIPPET).lstrip())
    done = subprocess.run(
        [
            str(mypy if mypy.exists() else "mypy"),
            "--strict",
            # Only the snippet's own errors: how syncd's modules check against the installed
            # redis-py is make lint's business (and differs between its versions).
            "--follow-imports=silent",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(snippet),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    lines = [line for line in done.stdout.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in lines] == [45, 46, 47], done.stdout
    assert all('"run" of "Consumer"' in line for line in lines), done.stdout
