"""`syncd tail` against a real Redis: JSON lines, readable lines, following, and group mode."""

from __future__ import annotations

import asyncio
import io
import json
import re
from typing import Any

import msgspec
import pytest
import redis.asyncio as aioredis

from syncd.consumer import Event
from syncd.consumer.tail import render_text, summarize, tail
from syncd.keys import Keys

TENANT = 123456
KEYS = Keys("st", TENANT)
CUSTOMERS = KEYS.stream("crm.customers")
JOBS = KEYS.stream("jpm.jobs")

# Spacing and key order as ServiceTitan might send them: tail must not re-encode.
ACME = b'{"id": 1, "name": "Acme \\u00e9", "active": true, "balance": 12.5, "tags": [1, 2]}'


async def publish(redis: aioredis.Redis, stream: str, key: str, data: bytes, **extra: str) -> str:
    """XADD one event the way the daemon does; returns the entry id."""
    fields = {"op": "created", "key": key, "data": data, "modified_on": "2024-05-01T12:00:00Z"}
    entry_id = await redis.xadd(stream, {**fields, **extra})
    return entry_id.decode()


async def run_tail(redis: aioredis.Redis, **options: Any) -> tuple[int, list[str]]:
    out = io.StringIO()
    options = {
        "prefix": "st",
        "tenant": TENANT,
        "feeds": None,
        "group": None,
        "from_start": True,
        "fmt": "json",
        "stop": asyncio.Event(),
        **options,
    }
    printed = await asyncio.wait_for(tail(redis, out=out, **options), 5)
    return printed, out.getvalue().splitlines()


async def test_json_lines_from_start(redis: aioredis.Redis) -> None:
    first = await publish(redis, CUSTOMERS, "1", ACME, trace="ignored")
    second = await publish(redis, JOBS, "9", b'{"id":9}')

    printed, lines = await run_tail(redis, limit=2)

    assert printed == 2
    assert [json.loads(line) for line in lines] == [
        {
            "stream": CUSTOMERS,
            "id": first,
            "tenant": TENANT,
            "feed": "crm.customers",
            "op": "created",
            "key": "1",
            "modified_on": "2024-05-01T12:00:00Z",
            "modified_at": "2024-05-01T12:00:00.0000000Z",
            "data": {"id": 1, "name": "Acme é", "active": True, "balance": 12.5, "tags": [1, 2]},
        },
        {
            "stream": JOBS,
            "id": second,
            "tenant": TENANT,
            "feed": "jpm.jobs",
            "op": "created",
            "key": "9",
            "modified_on": "2024-05-01T12:00:00Z",
            "modified_at": "2024-05-01T12:00:00.0000000Z",
            "data": {"id": 9},
        },
    ]
    assert lines[0].endswith(',"data":' + ACME.decode() + "}")


async def test_json_lines_keep_odd_data_on_one_line(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, "1", b'{\n  "id": 1\n}')
    await publish(redis, CUSTOMERS, "2", b"not json")

    _, lines = await run_tail(redis, feeds=["crm.customers"], limit=2)

    assert [json.loads(line)["data"] for line in lines] == [{"id": 1}, "not json"]


async def test_follows_only_new_events(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, "old", b'{"id":0}')
    task = asyncio.create_task(run_tail(redis, from_start=False, limit=1))
    # Publish until tail has pinned "now" and picked one up: no guessing how long that takes.
    while not task.done():
        await publish(redis, CUSTOMERS, "new", b'{"id":1}')
        await asyncio.sleep(0.02)

    printed, lines = await task
    assert printed == 1
    assert json.loads(lines[0])["key"] == "new"


async def test_stop_ends_tail(redis: aioredis.Redis) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(run_tail(redis, stop=stop))
    await asyncio.sleep(0.05)
    stop.set()

    assert await task == (0, [])


async def test_text_lines(redis: aioredis.Redis) -> None:
    entry_id = await publish(redis, CUSTOMERS, "1", ACME)

    _, (line,) = await run_tail(redis, fmt="text", width=200, limit=1)

    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} "
        + re.escape(f"{entry_id} {TENANT} crm.customers created 1  ")
        + re.escape('name="Acme é" active=true balance=12.5 tags=[2]')
    )
    assert re.fullmatch(pattern, line)


def test_text_time_is_the_entry_time() -> None:
    event = Event(
        stream=CUSTOMERS,
        id="1714564800123-4",
        tenant=TENANT,
        feed="crm.customers",
        op="updated",
        key="42",
        data=b'{"id":42}',
        modified_on=None,
        deliveries=0,
    )
    assert render_text(event) == (
        f"2024-05-01 12:00:00.123 1714564800123-4 {TENANT} crm.customers updated 42"
    )


@pytest.mark.parametrize(
    ("data", "summary"),
    [
        (b'{"id":1,"name":"A","address":{"city":"X"},"note":null}', 'name="A" address={...}'),
        (b'{"technicianId":3,"jobId":4}', "technicianId=3 jobId=4"),
        (b'{"text":"line\\nbreak"}', 'text="line\\nbreak"'),
        (b'{"name":"' + b"x" * 60 + b'"}', 'name="' + "x" * 38 + "…"),
        (b"[1,2]", "[1,2]"),
        (b"oops", "<not JSON> oops"),
        (msgspec.json.encode({f"field{i}": i for i in range(30)}), None),
    ],
)
def test_summarize(data: bytes, summary: str | None) -> None:
    result = summarize(data)
    if summary is None:
        assert len(result) == 100
        assert result.startswith("field0=0 field1=1 ")
        assert result.endswith("…")
    else:
        assert result == summary


async def test_group_mode_acknowledges_what_it_printed(redis: aioredis.Redis) -> None:
    ids = [await publish(redis, CUSTOMERS, str(key), b'{"id":%d}' % key) for key in range(3)]

    printed, lines = await run_tail(redis, group="ops", feeds=["crm.customers"], limit=2)

    assert printed == 2
    assert [json.loads(line)["id"] for line in lines] == ids[:2]
    assert (await redis.xpending(CUSTOMERS, "ops"))["pending"] == 0
    # Nothing left pending under tail's own name, so it does not linger in the group.
    assert await redis.xinfo_consumers(CUSTOMERS, "ops") == []

    printed, lines = await run_tail(redis, group="ops", feeds=["crm.customers"], limit=1)
    assert [json.loads(line)["id"] for line in lines] == ids[2:]


async def test_group_mode_from_now(redis: aioredis.Redis) -> None:
    await publish(redis, CUSTOMERS, "old", b'{"id":0}')
    task = asyncio.create_task(
        run_tail(redis, group="ops", feeds=["crm.customers"], from_start=False, limit=1)
    )
    while not task.done():
        await publish(redis, CUSTOMERS, "new", b'{"id":1}')
        await asyncio.sleep(0.02)

    _, lines = await task
    assert json.loads(lines[0])["key"] == "new"


async def test_unknown_feed_is_refused(redis: aioredis.Redis) -> None:
    with pytest.raises(ValueError, match="unknown feed"):
        await run_tail(redis, feeds=["crm.customer"])


async def group_state(redis: aioredis.Redis, stream: str, group: str) -> tuple[int, int]:
    """(entries the group took from `stream`, entries of it still pending)."""
    (info,) = [g for g in await redis.xinfo_groups(stream) if g["name"].decode() == group]
    return int(info["entries-read"] or 0), int(info["pending"])


@pytest.mark.parametrize("count", [1, 2, 3, 5])
async def test_group_count_takes_exactly_n_across_feeds(redis: aioredis.Redis, count: int) -> None:
    # Three feeds with events interleaved in time: --count N takes the N oldest of all of them,
    # and only those: nothing is left pending under the name of a tail that exited.
    streams = [CUSTOMERS, JOBS, KEYS.stream("settings.technicians")]
    ids = []
    for i in range(9):  # one millisecond apart: entry ids of different streams then say the order
        fields = {"op": "created", "key": str(i), "data": b"{}", "modified_on": ""}
        ids.append((await redis.xadd(streams[i % 3], fields, id=f"{1714564800000 + i}-0")).decode())

    printed, lines = await run_tail(redis, group="ops", limit=count)

    assert printed == count
    assert [json.loads(line)["id"] for line in lines] == ids[:count]
    taken = [await group_state(redis, stream, "ops") for stream in streams]
    assert sum(read for read, _ in taken) == count
    assert [pending for _, pending in taken] == [0, 0, 0]
    for stream in streams:
        assert await redis.xpending(stream, "ops") == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
        assert await redis.xinfo_consumers(stream, "ops") == []

    # Run again: the next ones, exactly as many, still nothing pending and nothing dead.
    printed, lines = await run_tail(redis, group="ops", limit=9 - count)
    assert [json.loads(line)["id"] for line in lines] == ids[count:]
    assert [await group_state(redis, stream, "ops") for stream in streams] == [(3, 0)] * 3
    assert await redis.xlen(KEYS.dead) == 0


async def test_group_count_waits_for_what_is_missing(redis: aioredis.Redis) -> None:
    first = await publish(redis, CUSTOMERS, "1", b'{"id":1}')
    task = asyncio.create_task(run_tail(redis, group="ops", limit=3))
    later: list[str] = []
    while not task.done():  # one event at a time, in two feeds, until tail has its three
        later.append(await publish(redis, (JOBS, CUSTOMERS)[len(later) % 2], "n", b"{}"))
        await asyncio.sleep(0.05)

    printed, lines = await task
    assert printed == 3
    assert [json.loads(line)["id"] for line in lines] == [first, *later[:2]]
    taken = [await group_state(redis, stream, "ops") for stream in (CUSTOMERS, JOBS)]
    assert sum(read for read, _ in taken) == 3
    assert [pending for _, pending in taken] == [0, 0]
