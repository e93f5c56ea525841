"""`syncd demo` (`make run`): syncd on the built-in simulator and a local Redis.

Starts the simulator in a child process (mutating records as it goes), uses the Redis on
127.0.0.1:6379 when one answers (else, or with `--private-redis`, starts a private one), runs the
daemon on `syncd/data/demo.toml` (package data: a wheel has it too), and prints the events as
they arrive until Ctrl-C or SIGTERM. With a PostgreSQL (`syncd.cli.demo_postgres`), the events
fill tables too, through the mirror running in the same process.

On its way out the demo deletes its `demo:*` keys and stops its children (the simulator, a
private Redis and its temporary directory), on an exception or a signal too. A watchdog process
(syncd.testing.demoguard) does the same if the demo is killed outright (SIGKILL).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tomllib
from importlib import resources
from types import FrameType
from typing import IO

import msgspec
import redis.asyncio as aioredis

from syncd import config, log
from syncd.cli import demo_postgres
from syncd.config.urls import redact_url
from syncd.consumer.tail import tail
from syncd.daemon import Daemon
from syncd.keys import Keys
from syncd.testing.redis_server import RedisServer, reachable
from syncd.testing.simulator import SimulatorProcess

DEMO_CONFIG = "data/demo.toml"  # inside the package: read through importlib.resources


def demo_config() -> config.Config:
    """The demo's configuration, packaged with syncd (wheel or checkout alike)."""
    text = resources.files("syncd").joinpath(DEMO_CONFIG).read_text("utf-8")
    return config.parse(tomllib.loads(text), f"syncd/{DEMO_CONFIG}")


class Guard:
    """The watchdog child: told about every child and directory, released on a clean exit."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "syncd.testing.demoguard"],
            stdin=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a Ctrl-C of the terminal must not reach it
        )

    def _say(self, line: str) -> None:
        stdin: IO[str] | None = self.proc.stdin
        assert stdin is not None
        stdin.write(line + "\n")
        stdin.flush()

    def watch_pid(self, pid: int) -> None:
        self._say(f"pid {pid}")

    def watch_dir(self, path: str) -> None:
        self._say(f"dir {path}")

    def release(self) -> None:
        """Everything is cleaned up: let the guard go without doing anything."""
        with contextlib.suppress(OSError, ValueError):
            self._say("done")
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _redis(url: str | None, private: bool, guard: Guard) -> tuple[str, RedisServer | None]:
    if url:
        return url, None
    if not private and reachable("127.0.0.1", 6379):
        return "redis://127.0.0.1:6379/0", None
    server = RedisServer()
    try:
        server.start()
    except BaseException:
        server.stop()  # a signal while it starts: the caller never learns of this server
        raise
    finally:
        if server.proc is not None:
            guard.watch_pid(server.proc.pid)
        if server.data_dir is not None:
            guard.watch_dir(server.data_dir)
    return server.url, server


async def _clear(client: aioredis.Redis, prefix: str, tenants: list[int]) -> None:
    """Remove the demo's keys: its cursors belong to a simulator that is gone. Only its own
    tenants' keys: the Redis may be someone's, with other keys under the same prefix."""
    for tenant in tenants:
        async for key in client.scan_iter(match=f"{Keys(prefix, tenant).base}:*", count=1000):
            await client.delete(key)


async def _run(cfg: config.Config) -> int:
    settings = config.resolve(cfg)
    daemon = Daemon(settings)
    mirror: asyncio.Task[int] | None = None
    mirroring = None
    if cfg.mirror is not None:
        from syncd.mirror import Mirror

        mirroring = Mirror(settings, name="demo")
        mirror = asyncio.create_task(mirroring.serve())
    client = aioredis.Redis.from_url(cfg.redis.url)
    tenants = [t.id for t in settings.tenants]
    await _clear(client, cfg.redis.key_prefix, tenants)
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
                fmt="text",
                stop=stop,
            )
        )
        for t in settings.tenants
    ]
    try:
        return await daemon.run()
    finally:
        # The daemon's signal handlers are gone now; a second SIGTERM must not cut this short.
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: None)
        stop.set()
        if mirroring is not None and mirror is not None:
            mirroring.stop.set()
            viewers.append(mirror)
        await asyncio.gather(*viewers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await _clear(client, cfg.redis.key_prefix, tenants)
        await client.aclose()


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    # Outside the daemon's event loop (starting the children): leave through the finally blocks.
    raise SystemExit(128 + signum)


def main(args: argparse.Namespace) -> int:
    cfg = demo_config()
    tenants = ",".join(str(t.id) for t in cfg.tenants)
    feeds = ",".join(cfg.defaults.feeds or [])
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    guard = Guard()
    own_redis: RedisServer | None = None
    sim: SimulatorProcess | None = None
    try:
        redis_url, own_redis = _redis(args.redis_url, args.private_redis, guard)
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
        assert sim.process is not None
        guard.watch_pid(sim.process.pid)
        cfg = msgspec.structs.replace(
            cfg,
            redis=msgspec.structs.replace(cfg.redis, url=redis_url),
            servicetitan=msgspec.structs.replace(
                cfg.servicetitan, api_url=sim.url, auth_url=sim.auth_url
            ),
        )
        pg_url, pg_says = (None, "no tables (--no-postgres)")
        if not args.no_postgres:
            pg_url, pg_says = demo_postgres.find(args.postgres_url)
        if pg_url is not None:
            cfg = demo_postgres.with_mirror(cfg, pg_url)
        # The warnings among the events, in the same readable lines (not JSON).
        log.configure(cfg.log.level, "text")
        where = f"PostgreSQL {redact_url(pg_url)}: {pg_says}" if pg_url else pg_says
        print(
            f"syncd demo: simulator {sim.url}, Redis {redact_url(redis_url)}, tenants {tenants};"
            f" {where}; Ctrl-C stops",
            file=sys.stderr,
            flush=True,
        )
        with contextlib.suppress(KeyboardInterrupt):
            code = asyncio.run(_run(cfg))
            signal.signal(signal.SIGTERM, _exit_on_signal)
            return code
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if sim is not None:
            sim.stop()
        if own_redis is not None:
            own_redis.stop()
        guard.release()
        signal.signal(signal.SIGTERM, previous)
