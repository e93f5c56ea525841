"""`syncd demo` (`make run`): syncd on the built-in simulator and a local Redis.

Starts the simulator in a child process (mutating records as it goes), uses the Redis on
127.0.0.1:6379 when one answers (else starts a private one), runs the daemon on
`config/demo.toml`, and prints the events as they arrive until Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
from pathlib import Path

import msgspec
import redis.asyncio as aioredis

from syncd import config, log
from syncd.daemon import Daemon
from syncd.redisserver import RedisServer, reachable
from syncd.simulator.testing import SimulatorProcess
from syncd.tail import tail

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "demo.toml"


def _redis(url: str | None) -> tuple[str, RedisServer | None]:
    if url:
        return url, None
    if reachable("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0", None
    server = RedisServer()
    server.start()
    return server.url, server


async def _clear(client: aioredis.Redis, prefix: str) -> None:
    """Remove an earlier demo's keys: its cursors belong to a simulator that is gone."""
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        await client.delete(key)


async def _run(cfg: config.Config) -> int:
    settings = config.resolve(cfg)
    daemon = Daemon(settings)
    client = aioredis.Redis.from_url(cfg.redis.url)
    await _clear(client, cfg.redis.key_prefix)
    stop = asyncio.Event()
    viewers = [
        asyncio.create_task(
            tail(
                client,
                prefix=cfg.redis.key_prefix,
                tenant=t.id,
                feeds=list(t.feeds),
                group=None,
                from_start=True,
                out=sys.stdout,
                pretty=True,
                stop=stop,
            )
        )
        for t in settings.tenants
    ]
    try:
        return await daemon.run()
    finally:
        stop.set()
        await asyncio.gather(*viewers, return_exceptions=True)
        await client.aclose()


def main(args: argparse.Namespace) -> int:
    cfg = config.load(DEMO_CONFIG)
    tenants = ",".join(str(t.id) for t in cfg.tenants)
    feeds = ",".join(cfg.defaults.feeds or [])
    redis_url, own_redis = _redis(args.redis_url)
    sim = SimulatorProcess(
        [
            "--tenants",
            tenants,
            "--records",
            "300",
            "--page-size",
            "100",
            "--mutation-rate",
            "2",
            "--seed",
            "1",
            "--feeds",
            feeds,
        ]
    )
    sim.start()
    try:
        cfg = msgspec.structs.replace(
            cfg,
            redis=msgspec.structs.replace(cfg.redis, url=redis_url),
            servicetitan=msgspec.structs.replace(
                cfg.servicetitan, api_url=sim.url, auth_url=sim.auth_url
            ),
        )
        log.configure(cfg.log.level, cfg.log.format)
        print(
            f"syncd demo: simulator {sim.url}, Redis {redis_url}, tenants {tenants}; Ctrl-C stops",
            file=sys.stderr,
        )
        with contextlib.suppress(KeyboardInterrupt):
            return asyncio.run(_run(cfg))
        return 0
    finally:
        sim.stop()
        if own_redis is not None:
            own_redis.stop()
