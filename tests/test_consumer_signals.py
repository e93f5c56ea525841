"""`run_until_signal` in a real process: SIGTERM stops it gracefully and at once (not after its
blocked read), the calls in flight finish and are acknowledged, nothing else is; a second signal
cancels what still runs. Across a restart every event is handled once."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import redis.asyncio as aioredis

from syncd.testing.redis_server import RedisServer
from tests.test_consumer import CUSTOMERS, pending_ids, publish

SCRIPT = """
import asyncio, os, sys

import redis.asyncio as aioredis

from syncd.consumer import Consumer, Event, run_until_signal

url, out_path, stream = sys.argv[1:4]


async def main() -> None:
    client = aioredis.Redis.from_url(url)
    consumer = Consumer(
        client, "billing", "worker", streams=[stream], concurrency=4, batch=8,
        block_ms=30_000, claim_idle_ms=int(os.environ["CLAIM_IDLE_MS"]),
    )
    out = open(out_path, "a")

    async def handle(event: Event) -> None:
        out.write(f"start {event.id}\\n")
        out.flush()
        await asyncio.sleep(float(os.environ["HANDLER_S"]))
        out.write(f"done {event.id}\\n")
        out.flush()

    sig = await run_until_signal(consumer, each=handle, grace=float(os.environ["GRACE_S"]))
    await client.aclose()
    print(f"stopped by {sig.name if sig else None}", flush=True)


asyncio.run(main())
"""

DEADLINE_S = 60.0


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process, out: Path) -> None:
        self.proc = proc
        self.out = out

    def lines(self, what: str) -> list[str]:
        text = self.out.read_text() if self.out.exists() else ""
        return [line.split()[1] for line in text.splitlines() if line.startswith(what + " ")]

    async def until(self, what: str, count: int) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while len(self.lines(what)) < count:
            assert self.proc.returncode is None, "the worker exited"
            assert time.monotonic() < deadline, f"fewer than {count} {what} lines"
            await asyncio.sleep(0.05)

    async def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def exit(self) -> tuple[int, str, float]:
        started = time.monotonic()
        stdout, stderr = await asyncio.wait_for(self.proc.communicate(), DEADLINE_S)
        assert self.proc.returncode is not None
        return self.proc.returncode, stdout.decode() + stderr.decode(), time.monotonic() - started


async def worker(
    server: RedisServer, tmp_path: Path, *, handler_s: float, grace_s: float, claim_ms: int
) -> Worker:
    script = tmp_path / "worker.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "HANDLER_S": str(handler_s),
        "GRACE_S": str(grace_s),
        "CLAIM_IDLE_MS": str(claim_ms),
    }
    out = tmp_path / "handled.txt"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        server.url,
        str(out),
        CUSTOMERS,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    return Worker(proc, out)


async def acknowledged(client: aioredis.Redis, ids: list[str]) -> set[str]:
    """The ids the group took and no longer holds pending."""
    (group,) = await client.xinfo_groups(CUSTOMERS)
    delivered = group["last-delivered-id"].decode()
    taken = {i for i in ids if _order(i) <= _order(delivered)}
    return taken - set(await pending_ids(client, CUSTOMERS, "billing"))


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


async def test_sigterm_stops_gracefully_and_a_restart_handles_the_rest_once(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    ids = [await publish(redis, CUSTOMERS, key) for key in range(40)]
    first = await worker(redis_server, tmp_path, handler_s=0.2, grace_s=10, claim_ms=60_000)
    await first.until("done", 6)
    await first.signal(signal.SIGTERM)
    code, output, took = await first.exit()

    assert code == 0, output
    assert "stopped by SIGTERM" in output
    assert took < 10.0  # the calls in flight (0.2 s), not the 30 s blocked read
    started, done = first.lines("start"), first.lines("done")
    assert sorted(started) == sorted(done)  # every call in flight finished within the grace
    assert len(done) == len(set(done))
    # Exactly what was handled is acknowledged; the rest waits, pending or not yet delivered.
    assert await acknowledged(redis, ids) == set(done)

    second = await worker(redis_server, tmp_path, handler_s=0.01, grace_s=10, claim_ms=100)
    await second.until("done", len(ids))
    await second.signal(signal.SIGINT)
    code, output, _ = await second.exit()

    assert code == 0, output
    assert "stopped by SIGINT" in output
    handled = second.lines("done")  # both runs: the file is shared
    assert sorted(handled) == sorted(ids)  # each event handled once, none lost
    assert await acknowledged(redis, ids) == set(ids)
    assert await pending_ids(redis, CUSTOMERS, "billing") == {}


async def test_a_second_signal_cancels_the_calls_in_flight(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    ids = [await publish(redis, CUSTOMERS, key) for key in range(6)]
    stuck = await worker(redis_server, tmp_path, handler_s=3600, grace_s=3600, claim_ms=60_000)
    await stuck.until("start", 4)
    await stuck.signal(signal.SIGTERM)
    await asyncio.sleep(0.5)
    assert stuck.proc.returncode is None  # waiting for its calls, as long as the grace allows
    await stuck.signal(signal.SIGTERM)
    code, output, took = await stuck.exit()

    assert code == 0, output
    assert took < 10.0  # not the hour the calls would take
    assert stuck.lines("done") == []
    started = set(stuck.lines("start"))
    assert len(started) == 4
    # Cancelled calls acknowledge nothing: their events stay pending, to come back.
    assert set(await pending_ids(redis, CUSTOMERS, "billing")) >= started
    assert await acknowledged(redis, ids) == set()
