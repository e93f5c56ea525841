"""syncd side by side with tap-service-titan piped into a Singer PostgreSQL target
(meltanolabs-target-postgres), on the same simulated tenant: records/s, time to first row in
PostgreSQL, lag after a change.

One simulator (`syncd simulate --prerender`, tenant 1001, `--records` records of `crm.customers`,
`--page-size` records a page, ServiceTitan's rate limit of 60 requests/s, and its delay before a
change shows to a client that does not ask for recent changes, `--recent-delay`, 900 s) serves
both contenders; each writes into a throwaway database of one private PostgreSQL server
(`syncd.testing.postgres_server`, durable defaults), dropped afterwards.

- `tap`: `tap-service-titan --config --catalog` (only `customers` selected, `start_date` before
  the first record) piped into `target-postgres` (`load_method = "upsert"`, `use_copy = true`,
  its other settings at their defaults), both from the peer venv. Timed from the start of the
  pipe to the target's exit (every row committed); the catalogue is discovered once beforehand,
  not timed. Then one record is changed in the simulator and the pipe is run again with the
  state the first run ended with (an incremental run): its duration, and whether the changed row
  reached PostgreSQL. The tap cannot ask for recent changes (it has no setting for
  `includeRecentChanges`), so a change is invisible to it until `--recent-delay` has passed
  (about 15 minutes on ServiceTitan); its lag after a change is that delay, plus the wait for
  the next scheduled run, plus a run's duration.
- `syncd`: `python -m syncd run --once` into a private Redis and `syncd mirror` into PostgreSQL,
  started together; timed until the mirror's table holds every record. Then `syncd run` (not
  `--once`, `poll_interval` = `--poll-interval`) with the mirror still running, and `--changes`
  records changed one at a time, each at a random moment of the poll cycle: each change's lag,
  from the change in the simulator to its row in PostgreSQL, and the part of it after the poll
  that saw the change (from the simulator's request log). syncd's default `poll_interval` is
  300 s (ServiceTitan asks for 5 to 10 minutes between polls of a drained feed): at that setting
  the wait for the next poll dominates, as the schedule does for the tap.

Time to first row: from the start to the first moment (sampled every 20 ms) a `count(*)` of the
table is not 0 (the target commits a batch at a time, 10,000 rows by singer-sdk's default). CPU
seconds of each process (wait4) and of PostgreSQL are reported too: the machine's other load
changes the wall times, not those.

The peer venv is not part of syncd's environment (nothing of it is in the lock or pyproject.toml).
Prepare it once, outside the repository, with tap-service-titan's source at a known commit:

    python3 -m venv /work/peer-venv
    git clone https://github.com/archdotdev/tap-service-titan /work/peer-src   # or a snapshot
    SETUPTOOLS_SCM_PRETEND_VERSION=0.0.0+$(git -C /work/peer-src rev-parse --short=8 HEAD) \\
        /work/peer-venv/bin/pip install /work/peer-src meltanolabs-target-postgres

(the version's local part names the tap's commit in the results). Then:

    .venv/bin/python -m bench.peer [--records 20000] [--peer-venv /work/peer-venv]

Without the peer venv (or without PostgreSQL) it prints a figure saying why it skipped and exits 0,
leaving bench/results/peer.json as it was. Not part of `make test`, nor of `make bench`'s default
list (it takes about two minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import common
from bench.mirror import postgres_cpu
from syncd.simulator.options import DEFAULT_APP_KEY
from syncd.testing import postgres_server
from syncd.testing.simulator import credentials

TENANT = 1001
FEED = "crm.customers"
TAP_STREAM = "customers"
TAP_SCHEMA = "tap"
MIRROR_SCHEMA = "syncd"
DEFAULT_VENV = Path(os.environ.get("BENCH_PEER_VENV", "/work/peer-venv"))


# -- the peer venv -----------------------------------------------------------------------------


def peer_tools(venv: Path) -> dict[str, Path] | str:
    """The peer's programs in `venv`, or why they cannot be used."""
    tools = {name: venv / "bin" / name for name in ("tap-service-titan", "target-postgres")}
    missing = [name for name, path in tools.items() if not os.access(path, os.X_OK)]
    if missing:
        return f"no {', '.join(missing)} in {venv} (see bench/peer.py's docstring to prepare it)"
    return tools


def peer_versions(venv: Path) -> dict[str, str]:
    """Versions of the peer's packages in its venv (the tap's local version names its commit)."""
    code = (
        "import importlib.metadata as m, json, sys; print(json.dumps({n: m.version(n) for n in "
        "('tap-service-titan', 'meltanolabs-target-postgres', 'singer-sdk', 'sqlalchemy', "
        "'psycopg')} | {'python': sys.version.split()[0]}))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
    )
    versions: dict[str, str] = json.loads(out.stdout)
    _, _, commit = versions["tap-service-titan"].partition("+")
    versions["tap_commit"] = commit or "unknown"
    return versions


# -- PostgreSQL --------------------------------------------------------------------------------


class RowWatch:
    """`count(*)` of one table every 20 ms in a thread: when it first held a row, and when it
    first held `wanted` rows (a table that does not exist yet counts 0)."""

    def __init__(self, url: str, table: str, wanted: int, t0: float) -> None:
        self.url, self.table, self.wanted, self.t0 = url, table, wanted, t0
        self.first_row: float | None = None
        self.all_rows: float | None = None
        self.rows = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RowWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            while not self._stop.is_set():
                try:
                    row = conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()
                    self.rows = int(row[0]) if row else 0
                except psycopg.errors.UndefinedTable:
                    self.rows = 0
                now = time.monotonic() - self.t0
                if self.rows and self.first_row is None:
                    self.first_row = now
                if self.rows >= self.wanted and self.all_rows is None:
                    self.all_rows = now
                time.sleep(0.02)

    def wait_all(self, timeout: float, alive: Any = None) -> float:
        """Seconds from t0 to every row present; RuntimeError after `timeout`."""
        deadline = time.monotonic() + timeout
        while self.all_rows is None:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.table}: {self.rows} of {self.wanted} rows after {timeout}s"
                )
            if alive is not None and not alive():
                raise RuntimeError(f"{self.table}: a process exited at {self.rows} rows")
            time.sleep(0.02)
        return self.all_rows


def query_one(url: str, statement: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(statement, params).fetchone()
    return row[0] if row else None


# -- processes ---------------------------------------------------------------------------------


def reap(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int, float]:
    """Wait for `proc` (SIGKILL after `timeout`): (exit code, its CPU seconds, from wait4)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            proc.kill()
            deadline = float("inf")
        time.sleep(0.01)


def tail(path: Path, lines: int = 12) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# -- the tap -----------------------------------------------------------------------------------


class Tap:
    """tap-service-titan | target-postgres, with their configuration, catalogue and state."""

    def __init__(self, tools: dict[str, Path], work: Path, sim_url: str, pg_url: str) -> None:
        self.tools, self.work = tools, work
        client_id, secret = credentials(TENANT)
        self.config = work / "tap.json"
        self.config.write_text(
            json.dumps(
                {
                    "client_id": client_id,
                    "client_secret": secret,
                    "st_app_key": DEFAULT_APP_KEY,
                    "tenant_id": str(TENANT),
                    "api_url": sim_url,
                    "auth_url": sim_url + "/connect/token",
                    "start_date": "2000-01-01T00:00:00Z",
                }
            )
        )
        self.target_config = work / "target.json"
        self.target_config.write_text(
            json.dumps(
                {
                    "sqlalchemy_url": pg_url.replace("postgresql://", "postgresql+psycopg://", 1),
                    "default_target_schema": TAP_SCHEMA,
                    "load_method": "upsert",
                    "use_copy": True,
                }
            )
        )
        self.catalog = work / "catalog.json"
        self.state = work / "state.json"
        self.log = work / "tap.log"

    def discover(self) -> float:
        """The catalogue, with only `customers` selected; seconds the discovery took."""
        t0 = time.monotonic()
        out = subprocess.run(
            [str(self.tools["tap-service-titan"]), "--config", str(self.config), "--discover"],
            capture_output=True,
            check=True,
        )
        seconds = time.monotonic() - t0
        catalog = json.loads(out.stdout)
        for stream in catalog["streams"]:
            for entry in stream["metadata"]:
                if entry["breadcrumb"] == []:
                    entry["metadata"]["selected"] = stream["tap_stream_id"] == TAP_STREAM
        self.catalog.write_text(json.dumps(catalog))
        return seconds

    def run(self, watch: RowWatch | None, t0: float, timeout: float) -> dict[str, Any]:
        """One run of the pipe (from the saved state when there is one), until the target
        exits; its state is kept for the next run."""
        tap_cmd = [str(self.tools["tap-service-titan"]), "--config", str(self.config)]
        tap_cmd += ["--catalog", str(self.catalog)]
        if self.state.exists():
            tap_cmd += ["--state", str(self.state)]
        target_cmd = [str(self.tools["target-postgres"]), "--config", str(self.target_config)]
        states = self.work / "states.jsonl"
        with self.log.open("ab") as log, states.open("wb") as out:
            tap = subprocess.Popen(tap_cmd, stdout=subprocess.PIPE, stderr=log)
            target = subprocess.Popen(target_cmd, stdin=tap.stdout, stdout=out, stderr=log)
        assert tap.stdout is not None
        tap.stdout.close()
        tap_rc, tap_cpu = reap(tap, timeout)
        target_rc, target_cpu = reap(target, timeout)
        seconds = time.monotonic() - t0
        if tap_rc or target_rc:
            raise RuntimeError(f"tap exited {tap_rc}, target {target_rc}:\n{tail(self.log)}")
        lines = states.read_text().splitlines()
        if lines:
            self.state.write_text(lines[-1])
        found = re.findall(
            rb"completed processing \d+ lines of input \(\d+ schemas, (\d+) records",
            self.log.read_bytes(),
        )
        return {
            "seconds": round(seconds, 2),
            "records": int(found[-1]) if found else None,
            "first_row_s": round(watch.first_row, 2) if watch and watch.first_row else None,
            "tap_cpu_s": round(tap_cpu, 2),
            "target_cpu_s": round(target_cpu, 2),
        }


def bench_tap(
    tools: dict[str, Path], sim: common.Simulator, pg: Any, url: str, args: argparse.Namespace
) -> dict[str, Any]:
    work = common.Workdir("peer-tap")
    try:
        tap = Tap(tools, work.path, sim.url, url)
        discover_s = tap.discover()
        table = f"{TAP_SCHEMA}.{TAP_STREAM}"
        pg0 = postgres_cpu(pg)
        t0 = time.monotonic()
        with RowWatch(url, table, args.records, t0) as watch:
            first = tap.run(watch, t0, timeout=args.timeout)
        first["postgres_cpu_s"] = round(postgres_cpu(pg) - pg0, 2)
        rows = query_one(url, f"SELECT count(*) FROM {table}")
        first["rows"] = rows
        first["records_per_s"] = round(args.records / first["seconds"])
        common.log(f"tap, first run: {first}")

        # A change, then the next (incremental) run at once.
        key = sim.post(f"/_sim/tenants/{TENANT}/feeds/{FEED}/mutate?kind=update&count=1")["keys"][0]
        changed = time.monotonic()
        before = query_one(url, f'SELECT "modifiedOn" FROM {table} WHERE id = %s', (int(key),))
        rerun = tap.run(None, time.monotonic(), timeout=args.timeout)
        after = query_one(url, f'SELECT "modifiedOn" FROM {table} WHERE id = %s', (int(key),))
        rerun["saw_change"] = after != before
        rerun["seconds_since_change"] = round(time.monotonic() - changed, 2)
        rerun.pop("first_row_s")
        common.log(f"tap, run after a change: {rerun}")
        return {"discover_s": round(discover_s, 2), "first_run": first, "run_after_change": rerun}
    finally:
        work.cleanup()


# -- syncd -------------------------------------------------------------------------------------


def bench_syncd(
    sim: common.Simulator, rs: Any, pg: Any, url: str, args: argparse.Namespace
) -> dict[str, Any]:
    work = common.Workdir("peer-syncd")
    mirror: subprocess.Popen[bytes] | None = None
    daemon: common.Daemon | None = None
    try:
        data = common.config_dict(
            rs.url,
            sim.url,
            [TENANT],
            feeds=[FEED],
            defaults={"poll_interval": args.poll_interval},
        )
        data["mirror"] = {"url": url, "schema": MIRROR_SCHEMA, "group": "peer-mirror"}
        config = work.write_config(data)
        table = f"{MIRROR_SCHEMA}.crm_customers"
        mirror_log = work.path / "mirror.log"
        pg0 = postgres_cpu(pg)
        t0 = time.monotonic()
        with RowWatch(url, table, args.records, t0) as watch:
            with mirror_log.open("ab") as out:
                mirror = subprocess.Popen(
                    [common.PYTHON, "-m", "syncd", "mirror", "--config", str(config)],
                    stdout=out,
                    stderr=out,
                    cwd=common.ROOT,
                )
            daemon = common.Daemon(config, once=True, log_path=work.path / "once.log").start()
            done = daemon.wait(timeout=args.timeout)
            if done.returncode:
                raise RuntimeError(f"syncd run --once exited {done.returncode}: {daemon.tail()}")
            seconds = watch.wait_all(args.timeout, alive=lambda: mirror.poll() is None)
        mirror_cpu = common.process_cpu(mirror.pid)
        first: dict[str, Any] = {
            "seconds": round(seconds, 2),
            "records_per_s": round(args.records / seconds),
            "first_row_s": round(watch.first_row or seconds, 2),
            "run_once_s": round(done.wall_s, 2),
            "run_once_cpu_s": round(done.cpu_s, 2),
            "mirror_cpu_s": round(mirror_cpu, 2),
            "postgres_cpu_s": round(postgres_cpu(pg) - pg0, 2),
            "rows": query_one(url, f"SELECT count(*) FROM {table}"),
        }
        common.log(f"syncd, first sync: {first}")

        # Steady: the daemon polls every --poll-interval; changes at random moments of its cycle.
        daemon = common.Daemon(config, log_path=work.path / "run.log").start()
        time.sleep(2.0)  # its first poll of the drained feed is over
        rng = random.Random(3)
        path = f"/crm/v2/tenant/{TENANT}/export/customers"
        changes: list[dict[str, Any]] = []
        for _ in range(args.changes):
            time.sleep(rng.uniform(0, args.poll_interval))
            wall_ms = int(time.time() * 1000)
            changed = time.monotonic()
            key = sim.post(f"/_sim/tenants/{TENANT}/feeds/{FEED}/mutate?kind=update&count=1")[
                "keys"
            ][0]
            statement = f"SELECT 1 FROM {table} WHERE tenant = %s AND key = %s AND entry_ms >= %s"
            deadline = changed + args.poll_interval * 1.2 + 30
            while query_one(url, statement, (TENANT, key, wall_ms)) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"change of {key} not in PostgreSQL: {daemon.tail()}")
                time.sleep(0.005)
            arrived = time.monotonic()
            polls = [t for t, p, status in sim.requests if p.startswith(path) and t >= changed]
            changes.append(
                {
                    "lag_s": round(arrived - changed, 3),
                    "after_poll_s": round(arrived - polls[0], 3) if polls else None,
                }
            )
            common.log(f"syncd, change of {key}: {changes[-1]}")
        daemon.stop()
        lags: list[float] = [c["lag_s"] for c in changes]
        after: list[float] = [c["after_poll_s"] for c in changes if c["after_poll_s"] is not None]
        steady = {
            "poll_interval_s": args.poll_interval,
            "changes": changes,
            "lag_median_s": round(common.percentile(lags, 0.5), 3),
            "lag_max_s": round(max(lags), 3),
            "after_poll_median_s": round(common.percentile(after, 0.5), 3),
            "after_poll_max_s": round(max(after), 3) if after else None,
        }
        return {"first_sync": first, "after_change": steady}
    finally:
        if daemon is not None and daemon.running():
            daemon.stop()
        if mirror is not None and mirror.poll() is None:
            mirror.send_signal(signal.SIGTERM)
            try:
                mirror.wait(30)
            except subprocess.TimeoutExpired:
                mirror.kill()
                mirror.wait()
        work.cleanup()


# -- the benchmark -----------------------------------------------------------------------------


def bench(args: argparse.Namespace) -> dict[str, Any]:
    tools = peer_tools(args.peer_venv)
    if isinstance(tools, str):
        return {"skipped": tools}
    try:
        pg = postgres_server.start(durable=True)
    except postgres_server.PostgresServerError as exc:
        return {"skipped": f"no PostgreSQL: {exc}"}
    load_before = os.getloadavg()[0]
    sim_args = [
        *("--tenants", str(TENANT), "--feeds", FEED, "--records", str(args.records)),
        *("--page-size", str(args.page_size), "--recent-delay", str(args.recent_delay)),
        "--prerender",
    ]
    try:
        with common.redis_server() as rs:
            version = common.redis_version(common.redis_client(rs))
            sim = common.start_simulator(sim_args, access_log=True)
            databases = [pg.create_database("peer_tap"), pg.create_database("peer_syncd")]
            try:
                tap = bench_tap(tools, sim, pg, pg.url(databases[0]), args)
                syncd = bench_syncd(sim, rs, pg, pg.url(databases[1]), args)
                server = query_one(pg.url(databases[1]), "SHOW server_version")
            finally:
                sim.stop()
                for db in databases:
                    pg.drop_database(db)
    finally:
        pg.stop()
    rerun = tap["run_after_change"]
    first_tap, first_syncd = tap["first_run"], syncd["first_sync"]
    figures: dict[str, Any] = {
        "tenant": TENANT,
        "feed": FEED,
        "records": args.records,
        "page_size": args.page_size,
        "simulator_recent_delay_s": args.recent_delay,
        "postgres_version": server,
        "peer": peer_versions(args.peer_venv),
        "target_settings": {"load_method": "upsert", "use_copy": True},
        "tap": tap,
        "syncd": syncd,
        "summary": {
            "records_per_s": {
                "tap": tap["first_run"]["records_per_s"],
                "syncd": syncd["first_sync"]["records_per_s"],
            },
            "first_row_s": {
                "tap": tap["first_run"]["first_row_s"],
                "syncd": syncd["first_sync"]["first_row_s"],
            },
            "client_cpu_s": {
                "tap": round(first_tap["tap_cpu_s"] + first_tap["target_cpu_s"], 2),
                "syncd": round(first_syncd["run_once_cpu_s"] + first_syncd["mirror_cpu_s"], 2),
            },
            "postgres_cpu_s": {
                "tap": first_tap["postgres_cpu_s"],
                "syncd": first_syncd["postgres_cpu_s"],
            },
            "lag_after_change": {
                "tap": (
                    f"{args.recent_delay:.0f} s until the change is visible without "
                    f"includeRecentChanges + the wait for the next scheduled run + a run of "
                    f"{rerun['seconds']} s (the run made at once "
                    f"{'saw' if rerun['saw_change'] else 'did not see'} the change)"
                ),
                "syncd": (
                    f"median {syncd['after_change']['lag_median_s']} s, max "
                    f"{syncd['after_change']['lag_max_s']} s at poll_interval "
                    f"{args.poll_interval:g} s; {syncd['after_change']['after_poll_median_s']} s "
                    f"(median) after the poll that saw it"
                ),
            },
        },
        "load_average_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }
    common.write_result("peer", figures, version)
    return figures


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=20_000, help="records of crm.customers")
    p.add_argument("--page-size", type=int, default=500, help="records per export page")
    p.add_argument(
        "--recent-delay",
        type=float,
        default=900.0,
        help="seconds a change stays invisible without includeRecentChanges (ServiceTitan: ~900)",
    )
    p.add_argument(
        "--poll-interval", type=float, default=5.0, help="syncd's poll interval for the changes"
    )
    p.add_argument("--changes", type=int, default=5, help="changes whose lag syncd is timed on")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_VENV, help="the peer's venv")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one run may take")
    return p


def main(argv: list[str] | None = None) -> int:
    figures = bench(parser().parse_args(argv))
    print(json.dumps(figures.get("summary", figures), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
