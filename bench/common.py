"""Shared plumbing of the benchmarks: Redis, simulator, configuration, daemon, measurements.

Every benchmark starts its own Redis (`syncd.testing.redis_server.RedisServer` on a free port, never
127.0.0.1:6379), runs the simulator in a separate process with `--prerender` and the daemon as
`python -m syncd run --config FILE`, so that the engine, not the simulator, is what is measured.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import redis

from syncd.simulator.options import DEFAULT_APP_KEY
from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import SimulatorProcess, credentials

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
PYTHON = sys.executable


def log(message: str) -> None:
    """Progress on stderr, stamped, so that a long `make bench` shows where it is."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value else default


# -- results -----------------------------------------------------------------------------------


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


def meta(redis_version: str) -> dict[str, Any]:
    """What every result file carries about the machine and the software measured."""
    import aiohttp
    import msgspec

    dirty = bool(_git("status", "--porcelain", "--", "syncd"))
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "redis_version": redis_version,
        "platform": platform.platform(),
        "aiohttp": aiohttp.__version__,
        "msgspec": msgspec.__version__,
        "redis_py": redis.__version__,
        "syncd_commit": _git("rev-parse", "--short", "HEAD") + ("+dirty" if dirty else ""),
    }


def write_result(name: str, figures: dict[str, Any], redis_version: str) -> Path:
    """`bench/results/<name>.json`: the figures plus the machine and versions."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps({"benchmark": name, **meta(redis_version), **figures}, indent=2))
    return path


def figures_elsewhere(src: str, module: str, argv: Sequence[str]) -> dict[str, Any]:
    """The figures of `python -m <module> <argv> --figures-only` (JSON on its standard output)
    measured on the syncd package of `src`, another checkout's directory or a git revision of
    this one (`main`): the code before a change, measured by this checkout's benchmark."""
    with tempfile.TemporaryDirectory() as tmp:
        if Path(src).is_dir():
            source = str(Path(src).resolve())
            (Path(tmp) / "syncd").symlink_to(Path(source) / "syncd")
        else:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "--verify", f"{src}^{{commit}}"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            source = f"{src} ({commit})"
            archive = subprocess.run(
                ["git", "archive", commit, "syncd"], cwd=ROOT, capture_output=True, check=True
            ).stdout
            subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        # That syncd alone ahead of this checkout (which still provides `bench`).
        code = (
            f"import runpy, sys; sys.path.insert(0, {tmp!r}); "
            f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
        )
        out = subprocess.run(
            [PYTHON, "-c", code, *argv, "--figures-only"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        )
    return {**json.loads(out.stdout), "source": source}


def syncd_source() -> str:
    """Where the syncd measured comes from: "this checkout" or the other checkout's path."""
    import syncd

    where = Path(syncd.__file__).resolve().parent.parent
    return "this checkout" if where == ROOT else str(where)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, linearly interpolated; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- Redis -------------------------------------------------------------------------------------


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A private Redis on a free port (no persistence), stopped afterwards."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def redis_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url, socket_timeout=120)


def redis_version(client: redis.Redis) -> str:
    info = client.info("server")
    return str(info.get("valkey_version") or info.get("redis_version"))


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def high_water_mb(pid: int) -> float:
    """A process's peak RSS since it started its program (VmHWM; 0.0 once it is gone).

    Not wait4()'s ru_maxrss: after fork and exec that is at least the parent's RSS at the fork
    (a child of a bench process that grew to 250 MB reports 250 MB however little it used)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class HighWater(threading.Thread):
    """Reads a child's VmHWM four times a second until `done`: its peak RSS (`mb`)."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.mb = pid, every, 0.0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.mb = max(self.mb, high_water_mb(self.pid))
            self.done.wait(self.every)


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a running process (0.0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        t = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return float(t.user + t.system)


class CpuMeter:
    """CPU seconds that some processes (Redis, the simulator) spend between two readings."""

    def __init__(self, **pids: int | None) -> None:
        self.pids = pids
        self._start = {name: process_cpu(pid) for name, pid in pids.items()}
        self._t0 = time.monotonic()

    def read(self) -> dict[str, float]:
        """CPU seconds per process since the start, and `<name>_share` of one core."""
        wall = max(time.monotonic() - self._t0, 1e-9)
        out: dict[str, float] = {}
        for name, pid in self.pids.items():
            used = process_cpu(pid) - self._start[name]
            out[f"{name}_cpu_s"] = round(used, 2)
            out[f"{name}_cpu_share"] = round(used / wall, 2)
        return out


# -- simulator ---------------------------------------------------------------------------------


class Simulator(SimulatorProcess):
    """The simulator in a child process; with `access_log`, its request log is captured.

    `--log-requests` makes the simulator log every request on stderr; a reader thread stamps
    each line with this process's monotonic clock as it arrives (aiohttp logs a request when its
    response has been sent), which is precise enough for request rates and pauses.
    """

    def __init__(self, args: Sequence[str] = (), *, access_log: bool = False) -> None:
        super().__init__(args, startup_timeout=900.0)
        self.access_log = access_log
        self.requests: list[tuple[float, str, int]] = []  # (monotonic, path, status)
        self._stderr_thread: threading.Thread | None = None

    def start(self) -> Simulator:
        if not self.access_log:
            super().start()
            return self
        # SimulatorProcess.start, with stderr captured (it leaves stderr to the parent).
        command = [PYTHON, "-m", "syncd", "simulate", "--port", "0", "--log-requests", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
        try:
            line = self._first_line(self.process)
        except BaseException:
            self.stop()
            raise
        self.url = line.removeprefix("simulator listening on ").strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        assert self.process.stdout is not None
        threading.Thread(target=self.process.stdout.read, daemon=True).start()
        self._stderr_thread = threading.Thread(target=self._read_log, daemon=True)
        self._stderr_thread.start()
        return self

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    _REQUEST = re.compile(rb'"(?:GET|POST) (\S+) HTTP/[\d.]+" (\d{3}) ')

    def _read_log(self) -> None:
        assert self.process is not None
        assert self.process.stderr is not None
        for line in self.process.stderr:
            now = time.monotonic()
            m = self._REQUEST.search(line)
            if m:
                self.requests.append((now, m.group(1).decode(), int(m.group(2))))

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=120) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: Any = None) -> Any:
        data = json.dumps(body if body is not None else {}).encode()
        req = urllib.request.Request(
            self.url + path, data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            return json.loads(resp.read())

    def stats(self) -> Any:
        return self.get("/_sim/stats")


async def fetch_token(session: aiohttp.ClientSession, auth_url: str, tenant: int) -> str:
    """An access token for `tenant` from the simulator's token endpoint."""
    client_id, secret = credentials(tenant)
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    async with session.post(auth_url, data=form) as resp:
        resp.raise_for_status()
        return str((await resp.json())["access_token"])


def start_simulator(args: Sequence[str], *, access_log: bool = False) -> Simulator:
    started = time.monotonic()
    sim = Simulator(args, access_log=access_log).start()
    log(f"simulator up at {sim.url} after {time.monotonic() - started:.1f}s")
    return sim


# -- configuration -----------------------------------------------------------------------------


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(type(v))


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer: tables, one level of sub-tables (`[feeds."x"]`), arrays of tables."""
    lines: list[str] = []
    for section, body in data.items():
        if isinstance(body, list):
            for item in body:
                lines.append(f"[[{section}]]")
                lines += [f"{k} = {_toml_value(v)}" for k, v in item.items()]
            continue
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in body.items() if not isinstance(v, dict)]
        for k, v in body.items():
            if isinstance(v, dict):
                lines.append(f"[{section}.{json.dumps(k)}]")
                lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def config_dict(
    redis_url: str,
    sim_url: str,
    tenants: Iterable[int],
    *,
    feeds: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    engine: dict[str, Any] | None = None,
    feed_options: dict[str, dict[str, Any]] | None = None,
    ops_listen: str | None = None,
    log_level: str = "info",
    app_key: str = DEFAULT_APP_KEY,
    tenant_overrides: dict[int, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A syncd configuration for `tenants` on the simulator at `sim_url`."""
    tenant_list = []
    for t in tenants:
        client_id, secret = credentials(t)
        entry: dict[str, Any] = {"id": t, "client_id": client_id, "client_secret": secret}
        if feeds is not None:
            entry["feeds"] = list(feeds)
        entry.update((tenant_overrides or {}).get(t, {}))
        tenant_list.append(entry)
    data: dict[str, Any] = {
        "redis": {"url": redis_url},
        "servicetitan": {
            "app_key": app_key,
            "api_url": sim_url,
            "auth_url": sim_url + "/connect/token",
        },
        "defaults": dict(defaults or {}),
        "engine": dict(engine or {}),
        "log": {"level": log_level, "format": "json"},
    }
    if feed_options:
        data["feeds"] = feed_options
    if ops_listen:
        data["ops"] = {"listen": ops_listen}
    data["tenants"] = tenant_list
    return data


class Workdir:
    """A temporary directory for configurations and daemon logs."""

    def __init__(self, name: str) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"syncd-bench-{name}-")
        self.path = Path(self._tmp.name)

    def write_config(self, data: dict[str, Any], name: str = "syncd.toml") -> Path:
        path = self.path / name
        path.write_text(to_toml(data))
        return path

    def cleanup(self) -> None:
        """Remove the directory, unless BENCH_KEEP_LOGS is set (then say where it is)."""
        if os.environ.get("BENCH_KEEP_LOGS"):
            log(f"configurations and daemon logs kept in {self.path}")
            self._tmp._finalizer.detach()  # type: ignore[attr-defined]
            return
        self._tmp.cleanup()


# -- the daemon --------------------------------------------------------------------------------


@dataclass
class DaemonResult:
    """What one daemon process cost, from its start to its exit."""

    returncode: int
    wall_s: float
    cpu_s: float  # user + system, from wait4()
    user_s: float
    system_s: float
    peak_rss_mb: float  # ru_maxrss of the process
    events: list[dict[str, Any]] = field(default_factory=list)  # its JSON log lines

    def find(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]


class Daemon:
    """`python -m syncd run --config FILE [--once]` as a child process.

    CPU and peak RSS come from `wait4()` (exact, for this process alone); `cpu_times()` and
    `rss_mb()` read it while it runs (psutil). With `profile="py-spy"` a `py-spy record` is
    attached for the daemon's whole life and writes raw (collapsed) stacks to `profile_out`.
    `cwd` and `env` run another checkout's syncd (its tree as the working directory and first
    on PYTHONPATH, see bench/sidebyside.py).
    """

    def __init__(
        self,
        config_path: Path,
        *,
        once: bool = False,
        log_path: Path | None = None,
        profile: str | None = None,
        profile_out: Path | None = None,
        profile_rate: int = 250,
        cwd: Path = ROOT,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config_path = config_path
        self.cwd = cwd
        self.env = env
        self.once = once
        self.log_path = log_path or config_path.with_suffix(".log")
        self.profile = profile
        self.profile_out = profile_out
        self.profile_rate = profile_rate
        self.proc: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.started = 0.0
        self._spy: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.rss_samples: list[tuple[float, float]] = []  # (seconds since start, RSS MB)
        self.peak_hwm_mb = 0.0  # the process's peak RSS, as last read (VmHWM)
        self._sampler: threading.Thread | None = None

    def start(self) -> Daemon:
        # BENCH_DAEMON_MODULE runs another entry point with syncd's CLI (e.g. a patched engine,
        # to measure a proposed change without editing syncd/); PYTHONPATH must find it.
        module = os.environ.get("BENCH_DAEMON_MODULE", "syncd")
        command = [PYTHON, "-m", module, "run", "--config", str(self.config_path)]
        if self.once:
            command.append("--once")
        with self.log_path.open("ab") as out:
            self._log_offset = out.tell()
            self.started = time.monotonic()
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=out, cwd=self.cwd, env=self.env
            )
        self.ps = psutil.Process(self.proc.pid)
        self._sampler = threading.Thread(target=self._sample_rss, daemon=True)
        self._sampler.start()
        if self.profile == "py-spy":
            assert self.profile_out is not None
            self.attach_py_spy(self.profile_out)
        return self

    def attach_py_spy(self, out: Path, duration: float | None = None) -> None:
        """Sample the daemon with `py-spy record` (raw collapsed stacks to `out`) until it
        exits, or for `duration` seconds."""
        spy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        assert self.proc is not None
        command = [spy, "record", "--pid", str(self.proc.pid), "--rate", str(self.profile_rate)]
        command += ["--format", "raw", "--output", str(out), "--nonblocking"]
        if duration is not None:
            command += ["--duration", str(max(1, round(duration)))]
        self._spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def wait_py_spy(self, timeout: float = 60.0) -> None:
        if self._spy is not None:
            try:
                self._spy.wait(timeout)
            except subprocess.TimeoutExpired:
                self._spy.kill()
            self._spy = None

    def _sample_rss(self, every: float = 0.25) -> None:
        """RSS twice to four times a second while the process lives: when the peak happens;
        and its peak RSS so far (`peak_hwm_mb`)."""
        assert self.ps is not None
        while self.running():
            try:
                rss = self.ps.memory_info().rss / 2**20
            except psutil.Error:
                return
            self.rss_samples.append((time.monotonic() - self.started, rss))
            self.peak_hwm_mb = max(self.peak_hwm_mb, high_water_mb(self.ps.pid))
            time.sleep(every)

    def rss_peak_at(self) -> tuple[float, float]:
        """(seconds since start, MB) of the highest RSS sample."""
        if not self.rss_samples:
            return (0.0, 0.0)
        return max(self.rss_samples, key=lambda s: s[1])

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_times(self) -> float:
        """User + system CPU seconds so far (all threads)."""
        assert self.ps is not None
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def rss_mb(self) -> float:
        assert self.ps is not None
        return float(self.ps.memory_info().rss) / 2**20

    def running(self) -> bool:
        """Whether the process has not exited; never reaps it (wait() needs its rusage)."""
        if self.proc is None or self.proc.returncode is not None:
            return False
        try:
            info = os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return info is None

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far by this run."""
        out = []
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            for line in f:
                if line.startswith(b"{"):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    def wait_for_event(self, event: str, timeout: float, count: int = 1) -> list[dict[str, Any]]:
        """Wait until the log holds `count` lines of `event`; RuntimeError on exit or timeout."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.events() if e.get("event") == event]
            if len(found) >= count:
                return found
            if not self.running():
                raise RuntimeError(f"daemon exited before logging {event}: {self.tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {count} x {event} within {timeout}s: {self.tail()}")
            time.sleep(0.2)

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait(self, timeout: float | None = None) -> DaemonResult:
        """Wait for exit (SIGKILL after `timeout`); its exact CPU and peak RSS via wait4()."""
        assert self.proc is not None
        proc = self.proc
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if deadline is not None and time.monotonic() > deadline:
                log(f"daemon did not exit within {timeout}s; killing it\n{self.tail()}")
                proc.kill()
                deadline = None
            time.sleep(0.02)
        wall = time.monotonic() - self.started
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.wait_py_spy(30)
        return DaemonResult(
            returncode=proc.returncode,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            user_s=usage.ru_utime,
            system_s=usage.ru_stime,
            peak_rss_mb=self.peak_hwm_mb or usage.ru_maxrss / 1024,
            events=self.events(),
        )

    def stop(self, timeout: float = 60.0) -> DaemonResult:
        """SIGTERM, then wait (the daemon finishes its pages and exits 0)."""
        if self.running():
            self.signal(signal.SIGTERM)
        return self.wait(timeout)


def run_daemon(
    config_path: Path,
    *,
    timeout: float,
    profile: str | None = None,
    profile_out: Path | None = None,
    cwd: Path = ROOT,
    env: Mapping[str, str] | None = None,
) -> DaemonResult:
    """Run `--once` to completion."""
    daemon = Daemon(
        config_path, once=True, profile=profile, profile_out=profile_out, cwd=cwd, env=env
    ).start()
    result = daemon.wait(timeout)
    if result.returncode != 0:
        log(f"daemon exited with {result.returncode}:\n{daemon.tail()}")
    return result


def scrape(url: str, timeout: float = 120.0, *, gzip: bool = True) -> str:
    """GET /metrics as Prometheus does (`Accept-Encoding: gzip` unless told otherwise)."""
    import gzip as gz

    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gz.decompress(body)
    return str(body.decode())


def histogram(text: str, name: str) -> list[tuple[float, float]]:
    """The cumulative buckets (upper bound, count) of an unlabelled Prometheus histogram."""
    out = []
    pattern = re.compile(rf'^{re.escape(name)}_bucket\{{le="([^"]+)"\}} (\S+)$', re.M)
    for m in pattern.finditer(text):
        out.append((float(m.group(1)), float(m.group(2))))
    return sorted(out)


def histogram_between(text0: str, text1: str, name: str) -> list[tuple[float, float]]:
    """The cumulative buckets of histogram `name` between two scrapes (`text0` first)."""
    before = dict(histogram(text0, name))
    return [(bound, count - before.get(bound, 0.0)) for bound, count in histogram(text1, name)]


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> tuple[float, float]:
    """(interpolated quantile, upper bound of its bucket), as Prometheus computes it."""
    if not buckets or buckets[-1][1] <= 0:
        return float("nan"), float("nan")
    total = buckets[-1][1]
    rank = q * total
    low_bound, low_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return low_bound, bound
            share = (rank - low_count) / (count - low_count) if count > low_count else 1.0
            return low_bound + (bound - low_bound) * share, bound
        low_bound, low_count = bound, count
    return float("nan"), float("nan")


def ops_listen() -> tuple[str, str]:
    """An ops listen address on a free port and its /metrics URL."""
    port = free_port()
    return f"127.0.0.1:{port}", f"http://127.0.0.1:{port}/metrics"


class PeakRss:
    """The highest RSS of a process while a block runs, sampled every 10 ms."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.ps = psutil.Process(pid)
        self.every = every
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak_mb = max(self.peak_mb, self.ps.memory_info().rss / 2**20)
            time.sleep(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(3 * self.every)
        self._stop.set()
        self._thread.join()


# -- profiles ----------------------------------------------------------------------------------


def summarize_profile(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive shares of the busiest functions in a py-spy raw (collapsed) profile.

    Shares are of the samples py-spy took while the daemon was not idle.
    """
    self_counts: dict[str, int] = {}
    incl_counts: dict[str, int] = {}
    total = 0
    if not path.exists():
        return {"error": f"no profile at {path}"}
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [_short_frame(f) for f in stack.split(";")]
        frames = [f for f in frames if f]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + count
        for frame in set(frames):
            incl_counts[frame] = incl_counts.get(frame, 0) + count

    def ranked(counts: dict[str, int]) -> list[tuple[str, float]]:
        best = sorted(counts.items(), key=lambda kv: -kv[1])[:top]
        return [(name, round(100.0 * c / max(total, 1), 1)) for name, c in best]

    return {"samples": total, "self_pct": ranked(self_counts), "inclusive_pct": ranked(incl_counts)}


_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^:)]+)(?::\d+)?\)$")


def _short_frame(frame: str) -> str:
    """`apply (syncd/engine/publisher.py:120)` -> `syncd/engine/publisher.py:apply`; thread names
    dropped."""
    m = _FRAME.match(frame.strip())
    if not m:
        return "" if frame.startswith(("process ", "thread ")) else frame.strip()
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    if "/syncd/" in file:
        file = "syncd/" + file.split("/syncd/", 1)[1]
    return f"{file}:{m.group('func')}"


def print_profile(summary: dict[str, Any], title: str) -> None:
    if "error" in summary:
        log(f"{title}: {summary['error']}")
        return
    print(f"\n{title}: {summary['samples']} samples", file=sys.stderr)
    print("  self %                               inclusive %", file=sys.stderr)
    rows = zip(summary["self_pct"], summary["inclusive_pct"], strict=False)
    for (s_name, s_pct), (i_name, i_pct) in rows:
        print(f"  {s_pct:5.1f} {s_name[:60]:60} {i_pct:5.1f} {i_name[:60]}", file=sys.stderr)
