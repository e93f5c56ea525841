"""`syncd mirror` as a process: SIGKILLed in the middle of a backfill and started again, its
tables still equal the ground truth (nothing lost, nothing older winning); SIGTERM exits 0."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from bench.common import to_toml
from syncd.consumer import Subscription
from syncd.daemon import Daemon
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import mutate, settings, truth
from tests.mirror_helpers import caught_up, count, mirror_config, table
from tests.test_consumer_faults import until

TENANT = 5353
FEEDS = ["crm.customers", "jpm.jobs"]
RECORDS = 1500


def test_without_its_section_the_mirror_exits_2(tmp_path: Path) -> None:
    data = mirror_config("redis://127.0.0.1:1/0", "postgresql://127.0.0.1:1/db", [TENANT], FEEDS)
    del data["mirror"]
    config = tmp_path / "syncd.toml"
    config.write_text(to_toml(data))
    done = subprocess.run(
        [sys.executable, "-m", "syncd", "mirror", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"{config}: mirror: missing: add a [mirror] section" in done.stderr


def test_a_name_its_workers_would_take_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "syncd.toml"
    config.write_text(
        to_toml(mirror_config("redis://127.0.0.1:1/0", "postgresql://x/db", [1], FEEDS))
    )
    done = subprocess.run(
        [sys.executable, "-m", "syncd", "mirror", "--config", str(config), "--name", "db.2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "--name db.2: ends in .<number>, as the mirror's workers are named" in done.stderr


def start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "syncd", "mirror", "--config", str(config), "--name", "m1"],
            stdout=out,
            stderr=out,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


@pytest.mark.slow
async def test_sigkill_mid_backfill_then_restart_leaves_the_tables_equal_to_the_truth(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    async with run_simulator(
        tenants=[TENANT], records=RECORDS, page_size=500, seed=8, quirks={"duplicate_keys": 0.2}
    ) as sim:
        # Small batches: the backfill takes many transactions, one of them is cut short.
        data = mirror_config(
            redis_server.url, pg_url, [TENANT], FEEDS, sim.url, sim.app_key, batch=10
        )
        data["mirror"]["claim_idle"] = 1.0
        assert await Daemon(settings(data), once=True).run() == 0
        for feed in FEEDS:  # newer versions of some records, behind their first ones
            await mutate(sim.url, TENANT, feed, 200)
        assert await Daemon(settings(data), once=True).run() == 0
        total = sum([await redis.xlen(f"st:{{{TENANT}}}:{feed}") for feed in FEEDS])
        with tempfile.TemporaryDirectory(prefix="syncd-mirror-") as tmp:
            config, log = Path(tmp) / "syncd.toml", Path(tmp) / "mirror.log"
            config.write_text(to_toml(data))
            proc = start(config, log)
            try:

                async def some_applied() -> bool:
                    return await count(pg_url, FEEDS[0]) >= 100

                await until(some_applied, "the backfill to be under way", timeout=60)
                proc.kill()
                assert proc.wait(10) == -signal.SIGKILL
                applied = sum([await count(pg_url, feed) for feed in FEEDS])
                assert 0 < applied < total, "killed after the backfill, not in the middle"
                proc = start(config, log)
                subs = [Subscription(TENANT, FEEDS)]
                await until(lambda: caught_up(redis, subs), "the restarted mirror", timeout=90)
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 30) == 0, log.read_text()[-2000:]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for feed in FEEDS:
            expected = {(TENANT, k): r for k, r in (await truth(sim.url, TENANT, feed)).items()}
            assert await table(pg_url, feed) == expected, feed
        assert await redis.xlen(f"st:{{{TENANT}}}:dead") == 0
