"""The README's consumer example, run as written against `syncd demo` (what `make run` starts):
it reads the demo's customers, prints each one it stores, and stops cleanly on Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import IO

import redis.asyncio as aioredis

from syncd.testing.redis_server import RedisServer
from tests.docs_helpers import README, blocks, section
from tests.test_ops_demo import DEADLINE_S, Demo

DEMO_RECORDS = 300  # per feed and tenant: `syncd demo` starts its simulator with --records 300
LINE = re.compile(r"^(created|updated|upsert) \d+ \S", re.M)


def run_example(script: Path, url: str, out: IO[bytes], err: IO[bytes]) -> subprocess.Popen[bytes]:
    """`python consumer.py URL`, as the README's quick start runs it."""
    return subprocess.Popen(
        [sys.executable, str(script), url],
        stdout=out,
        stderr=err,
        cwd=script.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


async def test_the_readme_consumer_runs_against_the_demo(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    (example,) = blocks(section(README.read_text(), "## Consuming events"), "python")
    script = tmp_path / "consumer.py"
    script.write_text(example)
    demo = Demo("--redis-url", redis_server.url)
    out = tempfile.TemporaryFile()  # noqa: SIM115
    err = tempfile.TemporaryFile()  # noqa: SIM115
    consumer: subprocess.Popen[bytes] | None = None
    try:
        await demo.wait_for_events()
        consumer = run_example(script, redis_server.url, out, err)

        def printed() -> str:
            out.seek(0)
            return out.read().decode(errors="replace")

        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while len(LINE.findall(printed())) < DEMO_RECORDS:
            err.seek(0)
            assert consumer.poll() is None, err.read().decode(errors="replace")[-2000:]
            assert loop.time() < deadline, f"the example printed: {printed()[-2000:]}"
            await asyncio.sleep(0.2)
        consumer.send_signal(signal.SIGINT)  # Ctrl-C
        assert await asyncio.to_thread(consumer.wait, DEADLINE_S) == 0
        err.seek(0)
        assert "Traceback" not in err.read().decode(errors="replace")
        # It read as the group `billing`, from the demo's stream, and acknowledged what it stored.
        groups = await redis.xinfo_groups("demo:{1001}:crm.customers")
        (billing,) = [g for g in groups if g["name"] == b"billing"]
        assert billing["pending"] == 0
    finally:
        if consumer is not None and consumer.poll() is None:
            consumer.kill()
            consumer.wait()
        out.close()
        err.close()
        if demo.proc.poll() is None:
            demo.proc.send_signal(signal.SIGTERM)
            await asyncio.to_thread(demo.proc.wait, DEADLINE_S)
        demo.close()
