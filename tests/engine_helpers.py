"""Helpers for engine tests: configurations pointing at a simulator, stream and truth readers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from bench.common import to_toml
from syncd import config
from syncd.keys import Keys


def config_dict(
    redis_url: str,
    sim_url: str,
    app_key: str,
    tenants: list[int],
    feeds: list[str],
    **defaults: Any,
) -> dict[str, Any]:
    """A configuration for `tenants` x `feeds` on the simulator at `sim_url`."""
    return {
        "redis": {"url": redis_url},
        "servicetitan": {
            "app_key": app_key,
            "api_url": sim_url,
            "auth_url": sim_url + "/connect/token",
            "request_timeout": 20.0,
        },
        "defaults": {"requests_per_second": 60.0, "poll_interval": 30.0, **defaults},
        "engine": {"backoff_base": 0.05, "backoff_max": 1.0, "shutdown_grace": 5.0},
        "tenants": [
            {"id": t, "client_id": f"client-{t}", "client_secret": f"secret-{t}", "feeds": feeds}
            for t in tenants
        ],
    }


def settings(data: dict[str, Any]) -> config.Settings:
    return config.resolve(config.parse(data, "test.toml"), environ={})


async def stream_events(
    r: aioredis.Redis, tenant: int, feed: str, prefix: str = "st"
) -> list[dict[str, bytes]]:
    """Every event of one feed's stream, oldest first."""
    entries = await r.xrange(Keys(prefix, tenant).stream(feed))
    return [{k.decode(): v for k, v in fields.items()} for _, fields in entries]


async def truth(sim_url: str, tenant: int, feed: str) -> dict[str, Any]:
    """The simulator's current records of one feed, by key."""
    from syncd import catalogue

    f = catalogue.feed(feed)
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{sim_url}/_sim/tenants/{tenant}/feeds/{feed}/records") as resp,
    ):
        resp.raise_for_status()
        records = await resp.json()
    out = {}
    for rec in records:
        key = f.record_key(rec)
        assert key is not None
        out[key] = rec
    return out


async def mutate(sim_url: str, tenant: int, feed: str, count: int) -> list[str]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{sim_url}/_sim/tenants/{tenant}/feeds/{feed}/mutate", params={"count": str(count)}
        ) as resp,
    ):
        resp.raise_for_status()
        body = await resp.json()
    return [str(k) for k in body["keys"]]


async def sim_post(sim_url: str, path: str, body: Any = None) -> Any:
    async with aiohttp.ClientSession() as s, s.post(sim_url + path, json=body) as resp:
        resp.raise_for_status()
        return await resp.json()


async def sim_stats(sim_url: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(sim_url + "/_sim/stats") as resp:
        resp.raise_for_status()
        return await resp.json()


def assert_exactly_once(
    events: list[dict[str, bytes]], records: dict[str, Any], *, where: str = ""
) -> None:
    """One `created` event per record whose data equals the record; nothing else."""
    created = [e for e in events if e["op"] == b"created"]
    keys = Counter(e["key"].decode() for e in created)
    dupes = {k: n for k, n in keys.items() if n > 1}
    assert not dupes, f"{where}: duplicate created events: {list(dupes)[:5]}"
    assert set(keys) == set(records), (
        f"{where}: missing {sorted(set(records) - set(keys))[:5]}, "
        f"extra {sorted(set(keys) - set(records))[:5]}"
    )


def latest_by_key(events: list[dict[str, bytes]]) -> dict[str, Any]:
    """The last published version of each key, decoded."""
    out: dict[str, Any] = {}
    for e in events:
        out[e["key"].decode()] = json.loads(e["data"])
    return out


class DaemonProcess:
    """`python -m syncd run --config FILE` as a child process, its log captured to a file."""

    def __init__(self, data: dict[str, Any], *extra: str) -> None:
        self.dir = tempfile.TemporaryDirectory(prefix="syncd-test-")
        self.config_path = Path(self.dir.name) / "syncd.toml"
        self.config_path.write_text(to_toml(data))
        self.log_path = Path(self.dir.name) / "daemon.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, env: dict[str, str] | None = None) -> DaemonProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "syncd",
                "run",
                "--config",
                str(self.config_path),
                *self.extra,
                *extra,
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, **(env or {})},
        )
        log.close()
        return self

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines()

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_lines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.dir.cleanup()
