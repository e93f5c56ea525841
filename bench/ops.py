"""The ops port under attack: /healthz latency and polling progress while 2,000 slow clients
hold connections, and while 300 clients flood /readyz.

The daemon runs with the file descriptor limit a service gets without `LimitNOFILE` (1,024
soft), polls 4 tenants x 3 feeds of a mutating simulator every second, and serves its ops port.
Three phases of `--phase` seconds each:

- baseline: nothing but a prober;
- slow: 2,000 connections that send one byte of a request head per second each (a closed one is
  opened again at once, as an attacker would);
- flood: 300 concurrent clients sending GET /readyz back to back.

In each phase a prober sends GET /healthz every 100 ms (2 s timeout) on a new connection; the
figures are its p50/p99 latency and failure share, and the simulator's export requests per
second (polling progress, counted by the simulator, not through the ops port).

    .venv/bin/python -m bench.ops [--phase 20] [--slow 2000] [--flood 300] [--src DIR]

`--src DIR` runs the daemon from another checkout (e.g. `git archive main | tar -x -C DIR`) to
measure the code before a change; the result is then written as `ops-<label>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import resource
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from bench import common
from syncd.testing.redis_server import free_port

TENANTS = (5001, 5002, 5003, 5004)
FEEDS = ("crm.customers", "jpm.jobs", "crm.locations")
NOFILE = 1024


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(1000 * seconds, 2)


class Prober(threading.Thread):
    """GET /healthz every 100 ms on a fresh connection; latencies and failures."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.latencies: list[float] = []
        self.failures = 0
        self.failure_kinds: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=2.0) as resp:
                    resp.read()
                    ok = resp.status == 200
            except Exception as exc:
                ok = False
                kind = type(getattr(exc, "reason", exc)).__name__
                self.failure_kinds[kind] = self.failure_kinds.get(kind, 0) + 1
            if ok:
                self.latencies.append(time.monotonic() - started)
            else:
                self.failures += 1
            self.stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def figures(self) -> dict[str, Any]:
        total = len(self.latencies) + self.failures
        return {
            "healthz_probes": total,
            "healthz_failed_share": round(self.failures / total, 4) if total else None,
            "healthz_p50_ms": _ms(common.percentile(self.latencies, 0.5)),
            "healthz_p99_ms": _ms(common.percentile(self.latencies, 0.99)),
            "healthz_failures": dict(self.failure_kinds),
        }


class SlowClients(threading.Thread):
    """`count` connections, each sending one more byte of a request head every second."""

    HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000

    def __init__(self, port: int, count: int) -> None:
        super().__init__(daemon=True)
        self.port, self.count = port, count
        self.reconnects = 0
        self.stop = threading.Event()

    def _open(self) -> tuple[socket.socket, int]:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        return s, 0

    def run(self) -> None:
        conns = [self._open() for _ in range(self.count)]
        while not self.stop.wait(1.0):
            for i, (s, sent) in enumerate(conns):
                try:
                    s.send(self.HEAD[sent % len(self.HEAD) : sent % len(self.HEAD) + 1])
                    conns[i] = (s, sent + 1)
                except BlockingIOError:
                    pass  # still connecting, or the server does not read: keep holding it
                except OSError:
                    s.close()
                    conns[i] = self._open()
                    self.reconnects += 1
        for s, _ in conns:
            s.close()


class Flood(threading.Thread):
    """`count` concurrent clients sending GET /readyz back to back."""

    def __init__(self, url: str, count: int) -> None:
        super().__init__(daemon=True)
        self.url, self.count = url, count
        self.requests = self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        timeout = aiohttp.ClientTimeout(total=5)
        connector = aiohttp.TCPConnector(limit=self.count, force_close=True)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            await asyncio.gather(*(self._client(session) for _ in range(self.count)))

    async def _client(self, session: aiohttp.ClientSession) -> None:
        while not self.stop.is_set():
            try:
                async with session.get(self.url) as resp:
                    await resp.read()
                self.requests += 1
            except Exception:
                self.errors += 1
                await asyncio.sleep(0.05)


def _limit_fds() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, hard))


def _requests(sim: common.Simulator) -> int:
    return int(sim.stats()["totals"]["requests"])


def _phase(name: str, seconds: float, sim: common.Simulator, healthz: str) -> dict[str, Any]:
    prober = Prober(healthz)
    before = _requests(sim)
    started = time.monotonic()
    prober.start()
    time.sleep(seconds)
    prober.stop.set()
    prober.join()
    elapsed = time.monotonic() - started
    figures = {
        **prober.figures(),
        "export_requests_per_s": round((_requests(sim) - before) / elapsed, 1),
    }
    common.log(f"{name}: {figures}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", type=float, default=common.env_float("BENCH_OPS_PHASE", 20))
    parser.add_argument("--slow", type=int, default=2000)
    parser.add_argument("--flood", type=int, default=300)
    parser.add_argument("--src", type=Path, default=common.ROOT, help="checkout to run")
    parser.add_argument("--label", default="", help="suffix of the result name")
    args = parser.parse_args(argv)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < args.slow + 500:
        sys.exit(f"the hard file descriptor limit ({hard}) is too low for {args.slow} clients")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    work = common.Workdir("ops")
    with common.redis_server() as server:
        client = common.redis_client(server)
        version = common.redis_version(client)
        sim = common.start_simulator(
            [
                "--tenants", ",".join(map(str, TENANTS)), "--feeds", ",".join(FEEDS),
                "--records", "200", "--page-size", "50", "--mutation-rate", "5", "--seed", "1",
            ]
        )  # fmt: skip
        port = free_port()
        data = common.config_dict(
            server.url,
            sim.url,
            TENANTS,
            feeds=FEEDS,
            defaults={"poll_interval": 1.0, "requests_per_second": 20.0},
            ops_listen=f"127.0.0.1:{port}",
        )
        config = work.write_config(data)
        log_path = work.path / "daemon.log"
        with log_path.open("ab") as out:
            daemon = subprocess.Popen(
                [common.PYTHON, "-m", "syncd", "run", "--config", str(config)],
                stdout=out,
                stderr=out,
                cwd=args.src,
                preexec_fn=_limit_fds,
            )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(Exception):
                    if urllib.request.urlopen(base + "/healthz", timeout=2).status == 200:
                        break
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit(f"the daemon did not come up; log in {log_path}")
                time.sleep(0.2)
            time.sleep(3)  # first syncs done: steady polling
            results: dict[str, Any] = {}
            results["baseline"] = _phase("baseline", args.phase, sim, base + "/healthz")

            slow = SlowClients(port, args.slow)
            slow.start()
            time.sleep(2)
            results["slow_connections"] = _phase("slow", args.phase, sim, base + "/healthz")
            slow.stop.set()
            slow.join()
            results["slow_connections"]["attacker_reconnects"] = slow.reconnects
            time.sleep(2)

            flood = Flood(base + "/readyz", args.flood)
            flood.start()
            time.sleep(1)
            results["readyz_flood"] = _phase("flood", args.phase, sim, base + "/healthz")
            flood.stop.set()
            flood.join()
            results["readyz_flood"]["readyz_requests"] = flood.requests
            results["readyz_flood"]["readyz_errors"] = flood.errors
            alive = daemon.poll() is None
        finally:
            if daemon.poll() is None:
                daemon.terminate()
                try:
                    daemon.wait(60)
                except subprocess.TimeoutExpired:
                    daemon.kill()
            sim.stop()
        log_bytes = log_path.stat().st_size
        work.cleanup()
    figures = {
        "phase_s": args.phase,
        "slow_clients": args.slow,
        "flood_clients": args.flood,
        "daemon_nofile": NOFILE,
        "daemon_survived": alive,
        "daemon_log_bytes": log_bytes,
        "source": "this checkout" if args.src == common.ROOT else str(args.src),
        **results,
    }
    name = "ops" + (f"-{args.label}" if args.label else "")
    path = common.write_result(name, figures, version)
    common.log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
