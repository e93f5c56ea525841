"""A soak: a fleet under random faults, checked against the ground truth.

    .venv/bin/python -m bench.soak --seconds 600 --seed 7     # or: make soak SOAK_S=600

Three `syncd run --instance` processes (fleet lease of a few seconds) share the tenants of a
simulator with quirks on; Redis is a primary, a replica and three sentinels (`wait_replicas =
1`); the harness keeps creating, updating, deactivating and deleting records; two consumer
processes (bench/soak_consumer.py, one group) apply the events to a PostgreSQL table of a
throwaway database. Meanwhile faults are drawn at random from the seed, in two lanes:

- processes and Redis: an instance SIGKILLed (restarted later) or SIGSTOPped past its lease
  (then SIGCONT), the Redis primary SIGKILLed (Sentinel fails over; the old primary comes back
  as a replica), instance `c` partitioned from Redis (it reaches the sentinels and servers only
  through proxies, which then black-hole), SIGHUP with a changed configuration, a consumer
  SIGKILLed and restarted;
- the API: 429 storms (injected 429s or a tiny rate limit) and 5xx storms for some tenants,
  every access token expired at once.

The instances run a reconciliation pass of each feed every minute through all of it, and once
the faults stop one more pass per tenant (`syncd reconcile`) publishes what was deleted since.

Then faults and changes stop, everything drains (bounded), and the events and the table are
judged against the simulator's truth (bench/soak_verdict.py): nothing lost, nothing published
twice, nothing back in time, the table equal to the truth. Prints the timeline and the
verdict, writes bench/results/soak.json and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from redis.asyncio.sentinel import Sentinel

from bench import common
from bench.soak_consumer import PSQL, SCHEMA, TABLE
from bench.soak_verdict import Row, StreamEvent, Verdict, judge_stream, judge_table
from syncd import catalogue
from syncd.consumer import entry_order
from syncd.keys import Keys
from syncd.testing.redis_server import RedisServerError
from syncd.testing.sentinel_server import SERVICE, SentinelServers
from syncd.testing.simulator import SimulatorProcess
from syncd.testing.tcpproxy import Proxy, port_rewriter

FEEDS = ["crm.customers", "jpm.jobs"]
# Each feed's reconciliation pass runs this often in the instances, faults and all.
RECONCILE_S = 60.0
PREFIX = "st"
GROUP = "soak"
INSTANCES = ("a", "b", "c")
PARTITIONED = "c"  # the instance that reaches Redis through proxies
KINDS = ("kill", "stop", "failover", "partition", "sighup", "consumer-kill")
KINDS += ("429-storm", "5xx-storm", "token-expiry")
Fault = Callable[[random.Random], Awaitable[None]]
Gap = tuple[float, float]
# Quirks on from the start (see docs/simulator.md, "Quirks"). Not numeric_modified_on: an event
# without a timestamp applies over anything, so a redelivered older one would win, as documented.
# Nor naive_timestamps: a truncated fraction can make a key's newer version look older than one
# changed earlier in the same second, and syncd rightly never publishes it.
QUIRKS = [
    "--stale-repeats", "0.2",
    "--duplicate-keys", "0.2",
    "--out-of-order", "0.3",
    "--shared-timestamps", "0.3",
    "--required-nulls", "0.05",
    "--enum-integers", "0.05",
    "--keyless", "0.02",
    "--no-progress", "0.01",
    "--hang", "0.005",
    "--gzip",
    "--rate-limit-body", "apim-retry-after",
    "--error-body", "html",
]  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=common.env_float("SOAK_S", 600.0))
    p.add_argument("--seed", type=int, help="default: a random one (printed)")
    p.add_argument("--tenants", type=int, default=6)
    p.add_argument("--records", type=int, default=300, help="records per feed at start")
    p.add_argument("--lease", type=float, default=3.0)
    p.add_argument("--changes", type=float, default=5.0, help="record changes per second")
    p.add_argument("--deletes", type=float, default=0.1, help="share of changes that delete")
    p.add_argument("--drain", type=float, default=180.0, help="seconds to wait for the drain")
    p.add_argument("--keep", action="store_true", help="keep the logs and the database")
    p.add_argument("--faults", help="only these kinds, e.g. kill,partition (default: all)")
    return p


# -- processes ---------------------------------------------------------------------------------


class Proc:
    """A child process (daemon or consumer) whose output goes to a log file."""

    def __init__(self, name: str, command: list[str], log_path: Path) -> None:
        self.name = name
        self.command = command
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected_down = False  # killed or stopped by the harness: exiting is no news
        self.paused = False

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.command, stdout=out, stderr=out, cwd=common.ROOT, start_new_session=True
            )
        self.expected_down = False

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: signal.Signals) -> None:
        if self.running():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        self.expected_down = True
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.paused = False

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        self.signal(signal.SIGCONT)
        self.paused = False

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM (SIGKILL after `timeout`); the exit status."""
        self.expected_down = True
        if self.proc is None:
            return None
        if self.paused:
            self.resume()
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# -- Redis: failover with the old primary back as a replica -------------------------------------


def _replication(port: int) -> dict[str, Any]:
    client = redis.Redis(port=port, socket_timeout=5)
    try:
        return dict(client.info("replication"))
    finally:
        client.close()


def has_replica(port: int) -> bool:
    """Whether the server on `port` has a replica in sync."""
    return any(
        isinstance(v, dict) and v.get("state") == "online"
        for k, v in _replication(port).items()
        if k.startswith("slave")
    )


def replica_state(port: int) -> str:
    """How the server on `port` sees its replication, in a few words."""
    try:
        info = _replication(port)
    except redis.RedisError as exc:
        return f":{port} {type(exc).__name__}"
    shown = ("role", "master_port", "master_link_status", "master_sync_in_progress")
    return f":{port} " + " ".join(f"{k}={info[k]}" for k in shown if k in info)


def fail_over(servers: SentinelServers) -> str:
    """SIGKILL the primary, wait for Sentinel's failover, start the old one again as a replica
    of the new primary and wait until it is in sync; what happened."""
    old_port = servers.primary_port()
    old = next(s for s in (servers.primary, servers.replica) if s.port == old_port)
    started = time.monotonic()
    assert old.proc is not None
    old.proc.kill()
    old.proc.wait()
    try:
        new_port = servers.wait_failover(old_port, timeout=60)
    except RedisServerError:
        old.start()
        return f"primary :{old_port} killed; NO FAILOVER within 60s, started again"
    took = time.monotonic() - started
    args = old.extra_args
    if "--replicaof" in args:
        i = args.index("--replicaof")
        del args[i : i + 3]
    args += ["--replicaof", "127.0.0.1", str(new_port)]
    old.start()
    deadline = time.monotonic() + 60
    while not has_replica(new_port):
        if time.monotonic() > deadline:
            return (
                f"primary :{old_port} killed, :{new_port} promoted in {took:.1f}s; NO REPLICA "
                f"after 60s ({replica_state(old_port)})"
            )
        time.sleep(0.2)
    return (
        f"primary :{old_port} killed, :{new_port} promoted in {took:.1f}s, "
        f"old one a replica again after {time.monotonic() - started:.1f}s"
    )


# -- the soak ----------------------------------------------------------------------------------


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.seed: int = args.seed
        self.tenants = list(range(8801, 8801 + args.tenants))
        self.t0 = time.monotonic()
        self.timeline: list[dict[str, Any]] = []
        self.faults: collections.Counter[str] = collections.Counter()
        self.mutations: collections.Counter[str] = collections.Counter()
        self.unexpected: list[str] = []
        self.harness_errors: list[str] = []
        self.stopping = asyncio.Event()
        self.db = f"syncd_soak_{os.getpid()}"
        self.sentinels = SentinelServers()
        self.sim = SimulatorProcess(self._sim_args(), startup_timeout=300)
        self.proxies: list[Proxy] = []
        self.instances: dict[str, Proc] = {}
        self.consumers: dict[str, Proc] = {}
        self.configs: dict[str, dict[str, Any]] = {}
        self.rps: dict[str, float] = {}
        self.sentinel: Sentinel | None = None
        self.redis: Any = None

    def _sim_args(self) -> list[str]:
        args = ["--tenants", ",".join(map(str, self.tenants)), "--feeds", ",".join(FEEDS)]
        args += ["--records", str(self.args.records), "--page-size", "25"]
        return [*args, "--seed", str(self.seed), "--rate-limit", "20", *QUIRKS]

    def now(self) -> float:
        return time.monotonic() - self.t0

    def note(self, kind: str, detail: str, started: float | None = None) -> None:
        """One line of the timeline, printed as it happens."""
        at = self.now() if started is None else started
        entry = {"t": round(at, 1), "fault": kind, "detail": detail}
        if started is not None:
            entry["end"] = round(self.now(), 1)
        self.timeline.append(entry)
        until = f" (until {entry['end']:.1f}s)" if "end" in entry else ""
        common.log(f"{at:7.1f}s  {kind:<14} {detail}{until}")

    # -- setup ---------------------------------------------------------------------------------

    async def start(self) -> None:
        psql_admin(f"CREATE DATABASE {self.db}")
        run_psql(self.db, SCHEMA)
        await asyncio.to_thread(self.sentinels.start)
        await asyncio.to_thread(self.sim.start)
        data_proxies = {}
        for server in (self.sentinels.primary, self.sentinels.replica):
            proxy = Proxy(server.port)
            await proxy.start()
            data_proxies[server.port] = proxy.port
            self.proxies.append(proxy)
        rewrite = port_rewriter(data_proxies)
        sentinel_proxies = []
        for port in self.sentinels.sentinel_ports:
            proxy = Proxy(port, rewrite)
            await proxy.start()
            sentinel_proxies.append(f"127.0.0.1:{proxy.port}")
            self.proxies.append(proxy)
        for name in INSTANCES:
            via = sentinel_proxies if name == PARTITIONED else self.sentinels.sentinels
            self.rps[name] = 5.0
            self.configs[name] = self._config(via)
            path = self.write_config(name)
            command = [sys.executable, "-m", "syncd", "run", "--config", str(path)]
            proc = Proc(name, [*command, "--instance", name], self.work / f"{name}.log")
            self.instances[name] = proc
            proc.start()
        for name in ("c1", "c2"):
            command = [sys.executable, "-m", "bench.soak_consumer", "--db", self.db]
            command += ["--name", name, "--group", GROUP, "--prefix", PREFIX]
            command += ["--sentinels", ",".join(self.sentinels.sentinels)]
            command += ["--tenants", ",".join(map(str, self.tenants)), "--feeds", ",".join(FEEDS)]
            proc = Proc(name, command, self.work / f"consumer-{name}.log")
            self.consumers[name] = proc
            proc.start()

    def _config(self, sentinels: list[str]) -> dict[str, Any]:
        data = common.config_dict(
            "redis://127.0.0.1/0",
            self.sim.url,
            self.tenants,
            feeds=FEEDS,
            defaults={"requests_per_second": 5.0, "poll_interval": 2.0},
            engine={"backoff_base": 0.2, "backoff_max": 5.0, "shutdown_grace": 10.0},
        )
        data["redis"].update(
            sentinels=sentinels,
            sentinel_service=SERVICE,
            wait_replicas=1,
            wait_timeout=2.0,
            timeout=10.0,
        )
        data["servicetitan"]["request_timeout"] = 10.0
        tenants = data.pop("tenants")
        data["fleet"] = {"enabled": True, "lease": self.args.lease}
        data["streams"] = {"groups": [GROUP]}
        # Reconciliation passes through the faults: the deletes reach the table.
        data["defaults"]["reconcile_interval"] = RECONCILE_S
        data["tenants"] = tenants
        return data

    def write_config(self, name: str) -> Path:
        data = self.configs[name]
        data["defaults"]["requests_per_second"] = self.rps[name]
        path = self.work / f"{name}.toml"
        path.write_text(common.to_toml(data))
        return path

    # -- faults --------------------------------------------------------------------------------

    def up_instances(self) -> list[str]:
        return [n for n, p in self.instances.items() if p.running() and not p.paused]

    async def kill_instance(self, rng: random.Random) -> None:
        name = rng.choice(self.up_instances() or list(INSTANCES))
        started = self.now()
        self.instances[name].kill()
        await asyncio.sleep(rng.uniform(0.5, 2 * self.args.lease))
        self.instances[name].start()
        self.note("kill", f"instance {name} SIGKILL, then started again", started)

    async def pause_instance(self, rng: random.Random) -> None:
        name = rng.choice(self.up_instances() or list(INSTANCES))
        started = self.now()
        pause = rng.uniform(1.5, 3.0) * self.args.lease
        self.instances[name].pause()
        await asyncio.sleep(pause)
        self.instances[name].resume()
        self.note("stop", f"instance {name} SIGSTOP for {pause:.1f}s, then SIGCONT", started)

    async def failover(self, rng: random.Random) -> None:
        started = self.now()
        detail = await asyncio.to_thread(fail_over, self.sentinels)
        self.note("failover", detail, started)

    async def partition(self, rng: random.Random) -> None:
        started = self.now()
        cut = rng.uniform(1.5, 4.0) * self.args.lease
        for proxy in self.proxies:
            proxy.cut()
        await asyncio.sleep(cut)
        for proxy in self.proxies:
            proxy.restore()
        self.note("partition", f"instance {PARTITIONED} cut off from Redis for {cut:.1f}s", started)

    async def sighup(self, rng: random.Random) -> None:
        name = rng.choice(INSTANCES)
        self.rps[name] = 6.0 if self.rps[name] == 5.0 else 5.0
        self.write_config(name)
        self.instances[name].signal(signal.SIGHUP)
        self.note("sighup", f"instance {name}, requests_per_second now {self.rps[name]}")

    async def kill_consumer(self, rng: random.Random) -> None:
        name = rng.choice(sorted(self.consumers))
        started = self.now()
        self.consumers[name].kill()
        await asyncio.sleep(rng.uniform(0.5, 5.0))
        self.consumers[name].start()
        self.note("consumer-kill", f"consumer {name} SIGKILL, then started again", started)

    async def storm(self, rng: random.Random, kind: str) -> None:
        chosen = rng.sample(self.tenants, rng.randint(1, len(self.tenants)))
        share = round(rng.uniform(0.5, 0.95), 2)
        if kind == "429-storm":
            body: dict[str, Any] = (
                {"error_rate": share, "status": 429} if rng.random() < 0.5 else {"rate_limit": 0.5}
            )
        else:
            body = {"error_rate": share, **({"status": 503} if rng.random() < 0.3 else {})}
        started = self.now()
        seconds = rng.uniform(5.0, 15.0)
        for t in chosen:
            await self.sim_post(f"/_sim/tenants/{t}/faults", body)
        await asyncio.sleep(seconds)
        for t in chosen:
            await self.sim_post(f"/_sim/tenants/{t}/faults", {})
        self.note(kind, f"{json.dumps(body)} on {len(chosen)} tenant(s)", started)

    async def expire_tokens(self, rng: random.Random) -> None:
        reply = await self.sim_post("/_sim/tokens/expire", {})
        self.note("token-expiry", f"{reply['expired']} token(s) expired")

    async def sim_post(self, path: str, body: Any) -> Any:
        def post() -> Any:
            data = json.dumps(body).encode()
            request = urllib.request.Request(self.sim.url + path, data=data, method="POST")
            request.add_header("Content-Type", "application/json")
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())

        return await asyncio.to_thread(post)

    async def lane(self, name: str, faults: dict[str, tuple[Fault, int]], gap: Gap) -> None:
        """Faults drawn by weight from the lane's own seeded stream, one at a time, a random
        gap before each, until stopping (the fault in progress finishes)."""
        rng = random.Random(f"{self.seed}:{name}")
        names = list(faults)
        weights = [faults[n][1] for n in names]
        while True:
            try:
                await asyncio.wait_for(self.stopping.wait(), rng.uniform(*gap))
                return
            except TimeoutError:
                pass
            if not names:
                continue
            chosen = rng.choices(names, weights)[0]
            self.faults[chosen] += 1
            try:
                await faults[chosen][0](rng)
            except Exception as exc:  # the harness's own trouble: shown, and the run fails
                self.harness_errors.append(f"{chosen}: {type(exc).__name__}: {exc}")
                self.note("HARNESS", self.harness_errors[-1])

    async def storm_429(self, rng: random.Random) -> None:
        await self.storm(rng, "429-storm")

    async def storm_5xx(self, rng: random.Random) -> None:
        await self.storm(rng, "5xx-storm")

    def lanes(self, only: str | None) -> list[tuple[str, dict[str, tuple[Fault, int]], Gap]]:
        """The two lanes of faults: (name, {fault: (function, weight)}, gap range); with
        `only` (kinds separated by commas), those kinds alone."""
        processes: dict[str, tuple[Fault, int]] = {
            "kill": (self.kill_instance, 3),
            "stop": (self.pause_instance, 2),
            "failover": (self.failover, 2),
            "partition": (self.partition, 2),
            "sighup": (self.sighup, 1),
            "consumer-kill": (self.kill_consumer, 1),
        }
        api: dict[str, tuple[Fault, int]] = {
            "429-storm": (self.storm_429, 2),
            "5xx-storm": (self.storm_5xx, 2),
            "token-expiry": (self.expire_tokens, 1),
        }
        lanes = [("processes", processes, (3.0, 10.0)), ("api", api, (5.0, 15.0))]
        if only is None:
            return lanes
        wanted = set(only.split(","))
        return [(n, {k: f for k, f in fs.items() if k in wanted}, gap) for n, fs, gap in lanes]

    # -- load and watch ------------------------------------------------------------------------

    async def mutate(self) -> None:
        """Record changes at about `--changes` per second until stopping."""
        rng = random.Random(f"{self.seed}:changes")
        rest = 1.0 - self.args.deletes
        mix = {"update": 0.55 * rest, "create": 0.3 * rest, "deactivate": 0.15 * rest}
        mix["delete"] = self.args.deletes
        kinds, weights = list(mix), list(mix.values())
        while not self.stopping.is_set():
            await asyncio.sleep(rng.expovariate(self.args.changes))
            kind = rng.choices(kinds, weights)[0]
            tenant, feed, count = rng.choice(self.tenants), rng.choice(FEEDS), rng.randint(1, 3)
            path = f"/_sim/tenants/{tenant}/feeds/{feed}/mutate?kind={kind}&count={count}"
            await self.sim_post(path, None)
            self.mutations[kind] += count

    async def watch(self) -> None:
        """Processes that exit without being told: noted, and started again."""
        while True:
            await asyncio.sleep(0.5)
            for proc in [*self.instances.values(), *self.consumers.values()]:
                if not proc.expected_down and not proc.running():
                    assert proc.proc is not None
                    code = proc.proc.returncode
                    self.unexpected.append(f"{proc.name} exited with {code}")
                    self.note("EXIT", f"{proc.name} exited by itself ({code}); started again")
                    proc.start()

    async def heal(self) -> None:
        """Whatever a fault left behind: every process running, every line open, no faults,
        a replica in sync (or a note that there is none)."""
        for proxy in self.proxies:
            proxy.restore()
        for t in self.tenants:
            await self.sim_post(f"/_sim/tenants/{t}/faults", {})
        for proc in [*self.instances.values(), *self.consumers.values()]:
            if proc.paused:
                proc.resume()
            if not proc.running():
                proc.start()
        deadline = time.monotonic() + 60
        primary = await asyncio.to_thread(self.sentinels.primary_port)
        while not await asyncio.to_thread(has_replica, primary):
            if time.monotonic() > deadline:
                others = [s.port for s in (self.sentinels.primary, self.sentinels.replica)]
                states = [replica_state(p) for p in others]
                self.note("NO-REPLICA", f"at the end, after 60s: {'; '.join(states)}")
                break
            await asyncio.sleep(0.5)

    async def final_passes(self) -> None:
        """A pass of every tenant (`syncd reconcile`) once the faults and changes stopped: what
        was deleted since the instances' last passes is published before the verdict."""
        path = self.work / f"{INSTANCES[0]}.toml"

        async def one(tenant: int) -> None:
            command = [sys.executable, "-m", "syncd", "reconcile", "--config", str(path)]
            command += ["--tenant", str(tenant), "--share", "1"]
            started = self.now()
            done = await asyncio.to_thread(
                subprocess.run, command, capture_output=True, text=True, timeout=600, check=False
            )
            if done.returncode != 0:
                self.harness_errors.append(
                    f"reconcile {tenant}: exit {done.returncode}: {done.stderr.strip()[-400:]}"
                )
                self.note("HARNESS", self.harness_errors[-1])
            else:
                self.note("final-pass", f"tenant {tenant}", started)

        await asyncio.gather(*(one(t) for t in self.tenants))

    # -- drain and judge -----------------------------------------------------------------------

    def connect(self) -> None:
        """The harness's own client of the primary, through the sentinels."""
        self.sentinel = Sentinel(
            [("127.0.0.1", p) for p in self.sentinels.sentinel_ports],
            sentinel_kwargs={"socket_timeout": 5.0},
        )
        self.redis = self.sentinel.master_for(SERVICE, socket_timeout=30.0)

    async def disconnect(self) -> None:
        if self.redis is not None:
            await self.redis.aclose()
        if self.sentinel is not None:
            for s in self.sentinel.sentinels:
                await s.aclose()

    async def read_streams(self, r: Any) -> dict[tuple[int, str], list[StreamEvent]]:
        out = {}
        for t in self.tenants:
            for feed in FEEDS:
                entries = await r.xrange(Keys(PREFIX, t).stream(feed))
                out[(t, feed)] = [
                    StreamEvent(
                        id=i.decode(),
                        op=f.get(b"op", b"").decode(),
                        key=f.get(b"key", b"").decode("utf-8", "replace"),
                        modified_on=f.get(b"modified_on", b"").decode(),
                        data=f.get(b"data", b"null"),
                    )
                    for i, f in entries
                ]
        return out

    async def read_truth(self) -> dict[tuple[int, str], tuple[dict[str, Any], list[str]]]:
        def get(path: str) -> Any:
            with urllib.request.urlopen(self.sim.url + path, timeout=60) as response:
                return json.loads(response.read())

        out = {}
        for t in self.tenants:
            for feed in FEEDS:
                base = f"/_sim/tenants/{t}/feeds/{feed}"
                records = await asyncio.to_thread(get, base + "/records")
                truth = await asyncio.to_thread(get, base + "/truth")
                record_key = catalogue.feed(feed).record_key
                live = {str(record_key(rec)): rec for rec in records}
                out[(t, feed)] = (live, [str(k) for k in truth["deleted"]])
        return out

    async def caught_up(self) -> tuple[bool, str]:
        """Whether every current version is the last event of its key and the group has read
        and acknowledged everything; what is still missing."""
        r = self.redis
        streams = await self.read_streams(r)
        truth = await self.read_truth()
        behind = Verdict()
        for where, (live, deleted) in truth.items():
            behind.merge(judge_stream(streams[where], live, deleted))
        unread = 0
        for (t, feed), events in streams.items():
            for g in await r.xinfo_groups(Keys(PREFIX, t).stream(feed)):
                if g["name"].decode() == GROUP:
                    delivered = g["last-delivered-id"].decode()
                    unread += int(g["pending"])
                    if events and entry_order(delivered) < entry_order(events[-1].id):
                        unread += 1
        missing = (
            behind.count("lost") + behind.count("not_last") + behind.count("deletions_unpublished")
        )
        status = (
            f"{missing} current versions (or deletes) not yet last in their stream, {unread} unread"
        )
        return missing == 0 and unread == 0, status

    async def drain(self) -> tuple[bool, float]:
        """Wait (at most --drain seconds) until the streams and the consumers caught up."""
        started = time.monotonic()
        status = ""
        while time.monotonic() - started < self.args.drain:
            try:
                done, status = await self.caught_up()
            except Exception as exc:  # a Redis still settling: ask again
                done, status = False, f"{type(exc).__name__}: {exc}"
            if done:
                return True, time.monotonic() - started
            await asyncio.sleep(2.0)
        common.log(f"not drained within {self.args.drain:.0f}s: {status}")
        return False, time.monotonic() - started

    def read_table(self) -> dict[tuple[int, str], dict[str, Row]]:
        query = (
            f"COPY (SELECT tenant, feed, encode(convert_to(key, 'UTF8'), 'hex'), "
            f"encode(data, 'hex'), deleted FROM {TABLE}) TO STDOUT"
        )
        out: dict[tuple[int, str], dict[str, Row]] = collections.defaultdict(dict)
        lines = run_psql(self.db, query).splitlines()
        for line in lines:
            tenant, feed, key, data, deleted = line.split("\t")
            row = Row(bytes.fromhex(data), deleted == "t")
            out[(int(tenant), feed)][bytes.fromhex(key).decode()] = row
        return out

    async def judge(self) -> Verdict:
        streams = await self.read_streams(self.redis)
        truth = await self.read_truth()
        table = self.read_table()
        verdict = Verdict()
        for (t, feed), (live, deleted) in truth.items():
            where = f"{t}/{feed}"
            verdict.merge(judge_stream(streams[(t, feed)], live, deleted, where=where))
            verdict.merge(judge_table(table.get((t, feed), {}), live, deleted, where=where))
        return verdict

    async def stop_all(self) -> dict[str, int | None]:
        codes = {}
        for name, proc in self.instances.items():
            codes[name] = await asyncio.to_thread(proc.terminate, 30.0)
        for name, proc in self.consumers.items():
            codes[name] = await asyncio.to_thread(proc.terminate, 30.0)
        return codes

    def cleanup(self) -> None:
        for proc in [*self.instances.values(), *self.consumers.values()]:
            if proc.running():
                proc.kill()
        self.sim.stop()
        self.keep_redis_logs()
        self.sentinels.stop()
        if not self.args.keep:
            psql_admin(f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")

    def keep_redis_logs(self) -> None:
        """The servers' and the sentinels' logs, next to the others."""
        for server in (self.sentinels.primary, self.sentinels.replica):
            if server.data_dir is not None:
                log = Path(server.data_dir) / "server.log"
                shutil.copy(log, self.work / f"redis-{server.port}.log")
        sentinel_dir = self.sentinels._dir
        if sentinel_dir is not None:
            for log in Path(sentinel_dir.name).glob("*.log"):
                shutil.copy(log, self.work / log.name)

    def log_summary(self) -> dict[str, int]:
        """Warnings and errors the instances logged, and their reloads, by event name."""
        seen: collections.Counter[str] = collections.Counter()
        for name in INSTANCES:
            for line in (self.work / f"{name}.log").read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    try:
                        event = json.loads(line)
                    except ValueError:
                        continue
                    if event.get("level") != "info" or event.get("event") == "reloaded":
                        seen[str(event.get("event"))] += 1
        return dict(seen.most_common())


def run_psql(db: str, sql: str) -> str:
    done = subprocess.run(
        [*PSQL, "-d", db, "-c", sql],
        capture_output=True,
        text=True,
        env={**os.environ, "PGCONNECT_TIMEOUT": "5"},
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql: {done.stderr.strip()}")
    return done.stdout


def psql_admin(sql: str) -> None:
    run_psql("postgres", sql)


async def soak(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Run the soak; its result (also written to bench/results/soak.json)."""
    s = Soak(args, work)
    common.log(
        f"soak: seed {s.seed} (again: python -m bench.soak --seed {s.seed}), "
        f"{args.seconds:.0f}s, {len(s.tenants)} tenants x {len(FEEDS)} feeds, lease "
        f"{args.lease}s, logs in {work}"
    )
    watch: asyncio.Task[None] | None = None
    try:
        await s.start()
        s.connect()
        s.t0 = time.monotonic()
        common.log(f"up: primary :{s.sentinels.primary.port}, simulator {s.sim.url}, db {s.db}")
        watch = asyncio.create_task(s.watch())
        changes = asyncio.create_task(s.mutate())
        lanes = [asyncio.create_task(s.lane(*lane)) for lane in s.lanes(args.faults)]
        await asyncio.sleep(args.seconds)
        s.stopping.set()
        common.log(f"{s.now():7.1f}s  no new faults or changes: the running ones finish")
        await asyncio.gather(*lanes, changes)
        await s.heal()
        await s.final_passes()
        drained, drain_s = await s.drain()
        common.log(f"{s.now():7.1f}s  drained: {drained}, after {drain_s:.1f}s")
        watch.cancel()  # no restarts from here on
        codes = await s.stop_all()
        verdict = await s.judge()
        info = await s.redis.info("server")
        version = str(info.get("valkey_version") or info.get("redis_version"))
        sim_totals = (await asyncio.to_thread(_get_json, s.sim.url + "/_sim/stats"))["totals"]
        result = {
            "ok": verdict.ok
            and drained
            and not s.unexpected
            and not s.harness_errors
            and all(code == 0 for code in codes.values()),
            "seed": s.seed,
            "seconds": args.seconds,
            "settings": {
                "tenants": len(s.tenants),
                "feeds": FEEDS,
                "records": args.records,
                "lease_s": args.lease,
                "changes_per_s": args.changes,
                "deletes_share": args.deletes,
                "quirks": QUIRKS,
            },
            "timeline": sorted(s.timeline, key=lambda e: e["t"]),
            "faults": dict(sorted(s.faults.items())),
            "changes": dict(sorted(s.mutations.items())),
            "drained": drained,
            "drain_s": round(drain_s, 1),
            "unexpected_exits": s.unexpected,
            "harness_errors": s.harness_errors,
            "exit_codes": codes,
            "verdict": verdict.to_json(),
            "simulator": sim_totals,
            "instance_log": s.log_summary(),
        }
        result["path"] = str(common.write_result("soak", result, version))
        return result
    finally:
        if watch is not None:
            watch.cancel()
        await s.disconnect()
        s.cleanup()
        for proxy in s.proxies:
            await proxy.stop()


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def report(result: dict[str, Any]) -> None:
    v = result["verdict"]
    print()
    print(f"soak: seed {result['seed']}, {result['seconds']:.0f}s")
    print("timeline:")
    for e in result["timeline"]:
        until = f" (until {e['end']:.1f}s)" if "end" in e else ""
        print(f"  {e['t']:7.1f}s  {e['fault']:<14} {e['detail']}{until}")
    print("faults: " + ", ".join(f"{k} {n}" for k, n in result["faults"].items()))
    print("changes: " + ", ".join(f"{k} {n}" for k, n in sorted(result["changes"].items())))
    sim = result["simulator"]
    print(
        f"simulator: {sim['requests']} requests, {sim['rate_limited']} 429s, "
        f"{sim['errors']} errors, {sim['token_grants']} tokens granted"
    )
    print(f"drained: {result['drained']} after {result['drain_s']}s")
    clean = all(code == 0 for code in result["exit_codes"].values())
    print(f"exit codes after SIGTERM: {result['exit_codes']}{'' if clean else '  NOT ALL 0'}")
    if result["unexpected_exits"]:
        print(f"UNEXPECTED EXITS: {result['unexpected_exits']}")
    if result["harness_errors"]:
        print(f"HARNESS ERRORS: {result['harness_errors']}")
    warned = result["instance_log"]
    print("instances logged: " + (", ".join(f"{k} {n}" for k, n in warned.items()) or "none"))
    print(
        f"events {v['events']}, live keys {v['live_keys']}, deleted keys {v['deleted_keys']}, "
        f"table rows {v['rows']}"
    )
    print(
        f"stream: lost {v['lost']}, duplicated {v['duplicated']}, back in time "
        f"{v['back_in_time']}, not last {v['not_last']}, unknown keys {v['unknown']}, "
        f"deletions unpublished {v['deletions_unpublished']}"
    )
    print(
        f"table: missing {v['table_missing']}, stale {v['table_stale']}, deleted still there "
        f"{v['table_deleted']}, extra {v['table_extra']}"
    )
    for name, keys in v["examples"].items():
        print(f"  e.g. {name}: {', '.join(keys)}")
    print(f"verdict: {'PASS' if result['ok'] else 'FAIL'} (written to {result['path']})")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    unknown = set((args.faults or "").split(",")) - {"", *KINDS}
    if unknown:
        parser().error(f"--faults: unknown {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    if args.seed is None:
        args.seed = random.SystemRandom().randint(1, 999_999)
    work = Path(tempfile.mkdtemp(prefix="syncd-soak-"))
    result: dict[str, Any] = {"ok": False}
    try:
        result = asyncio.run(soak(args, work))
        report(result)
    finally:
        if args.keep or not result["ok"]:
            common.log(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
