"""`syncd demo`: never prints a password, removes its keys on exit, and leaves no child process
or temporary directory behind, whether it stops on SIGTERM or is killed with SIGKILL. And it
runs from a wheel installed into a fresh environment, away from the checkout.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from syncd.testing.demoguard import start_time
from syncd.testing.redis_server import RedisServer

PASSWORD = "demo-redis-pass-77"
DEADLINE_S = 90.0
ROOT = Path(__file__).resolve().parent.parent
COLUMNS = 100
# An event line of the demo's view: publication time, entry id, tenant, feed, op, key.
EVENT_LINE = re.compile(
    r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \d+-\d+ +\d+ \S+ (created|updated|upsert) "
)


def descendants(root: int) -> dict[int, list[str]]:
    """Every process below `root`, with its command line."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found: dict[int, list[str]] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            found[child] = [c.decode(errors="replace") for c in cmd if c]
            todo.append(child)
    return found


def redis_dirs(pids: dict[int, list[str]]) -> list[str]:
    """The data directories of the Redis servers among `pids` (each runs in its own).

    redis-server rewrites its command line, so the directory is read from its working directory.
    """
    dirs = []
    for pid in pids:
        try:
            exe = os.path.basename(os.readlink(f"/proc/{pid}/exe"))
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        # Debian links redis-server to redis-check-rdb.
        if ("redis" in exe or "valkey" in exe) and "syncd-redis-" in cwd:
            dirs.append(cwd)
    return dirs


def alive(pid: int, started: str | None) -> bool:
    """Running and not a zombie (a zombie has exited; it only waits to be reaped)."""
    if started is None or start_time(pid) != started:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Demo:
    def __init__(self, *args: str, command: tuple[str, ...] = (), cwd: Path | None = None) -> None:
        # Files rather than pipes: nobody has to keep reading them. Closed by close().
        self.out = tempfile.TemporaryFile()  # noqa: SIM115
        self.err = tempfile.TemporaryFile()  # noqa: SIM115
        # The machine's PostgreSQL is left alone: a test gives the demo a database of its own.
        if "--postgres-url" not in args:
            args = (*args, "--no-postgres")
        self.proc = subprocess.Popen(
            [*(command or (sys.executable, "-m", "syncd")), "demo", *args],
            stdout=self.out,
            stderr=self.err,
            env={**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": str(COLUMNS)},
            cwd=cwd,
        )

    def output(self) -> str:
        text = ""
        for f in (self.out, self.err):
            f.seek(0)
            text += f.read().decode(errors="replace")
        return text

    async def wait_for_events(self) -> dict[int, list[str]]:
        """Wait until events print; the demo's children (and theirs) at that moment."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while not re.search(r" (created|updated|upsert) ", self.output()):
            assert self.proc.poll() is None, self.output()[-2000:]
            assert loop.time() < deadline, "no events printed: " + self.output()[-2000:]
            await asyncio.sleep(0.2)
        return descendants(self.proc.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.out.close()
        self.err.close()


@pytest.fixture
async def demo_user(redis: aioredis.Redis, redis_server: RedisServer) -> AsyncIterator[str]:
    """A URL with a password for the session's Redis."""
    await redis.execute_command("ACL", "SETUSER", "demo", "on", f">{PASSWORD}", "~*", "+@all")
    yield f"redis://demo:{PASSWORD}@127.0.0.1:{redis_server.port}/0"
    await redis.execute_command("ACL", "DELUSER", "demo")


async def wait_gone(pids: dict[int, str | None]) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while left := [p for p, s in pids.items() if alive(p, s)]:
        assert loop.time() < deadline, f"still running: {left}"
        await asyncio.sleep(0.1)


async def test_sigterm_stops_children_and_removes_keys_without_printing_the_password(
    redis: aioredis.Redis, demo_user: str
) -> None:
    # Another application's keys that happen to share the prefix are not the demo's to remove.
    others = [b"demo:app-data", b"demo:{99999}:cursors"]
    for key in others:
        await redis.set(key, "theirs")
    demo = Demo("--redis-url", demo_user)
    try:
        children = await demo.wait_for_events()
        assert any("simulate" in cmd for cmd in children.values()), children
        started = {pid: start_time(pid) for pid in children}
        assert len([k async for k in redis.scan_iter(match="demo:*")]) > len(others)
        demo.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(demo.proc.wait, DEADLINE_S) == 0
        await wait_gone(started)
        assert sorted([k async for k in redis.scan_iter(match="demo:*")]) == sorted(others)
        out = demo.output()
        assert PASSWORD not in out
        assert "demo:***@127.0.0.1" in out
        assert "Traceback" not in out
        # The view: readable lines that fit the terminal, warnings included; no JSON.
        events = [line for line in out.splitlines() if EVENT_LINE.match(line)]
        assert events
        assert max(len(line) for line in events) <= COLUMNS
        assert not [line for line in out.splitlines() if line.startswith("{")]
    finally:
        demo.close()


async def test_the_demo_fills_tables_in_postgresql(
    redis: aioredis.Redis, redis_server: RedisServer, pg_url: str
) -> None:
    """With a PostgreSQL, the demo's events fill tables too (the mirror, in the same process)."""
    import psycopg

    demo = Demo("--redis-url", redis_server.url, "--postgres-url", pg_url)
    try:
        await demo.wait_for_events()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        rows = 0
        while rows < 300:  # the demo's simulator: 300 records per feed and tenant
            assert demo.proc.poll() is None, demo.output()[-2000:]
            assert loop.time() < deadline, f"{rows} rows: " + demo.output()[-2000:]
            await asyncio.sleep(0.3)
            with contextlib.suppress(psycopg.errors.UndefinedTable):
                async with await psycopg.AsyncConnection.connect(pg_url) as c:
                    cur = await c.execute("SELECT count(*) FROM demo.crm_customers")
                    got = await cur.fetchone()
                    rows = int(got[0]) if got else 0
        assert "tables in schema demo" in demo.output()
        demo.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(demo.proc.wait, DEADLINE_S) == 0
        assert "Traceback" not in demo.output()
    finally:
        demo.close()


async def test_sigterm_while_starting_still_cleans_up() -> None:
    demo = Demo("--private-redis")
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        # As soon as the private Redis runs, before the simulator has started.
        while not redis_dirs(descendants(demo.proc.pid)):
            assert demo.proc.poll() is None, demo.output()
            assert loop.time() < deadline
            await asyncio.sleep(0.02)
        children = descendants(demo.proc.pid)
        dirs = redis_dirs(children)
        started = {pid: start_time(pid) for pid in children}
        demo.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(demo.proc.wait, DEADLINE_S)
        await wait_gone(started)
        assert dirs
        assert not any([await asyncio.to_thread(Path(d).exists) for d in dirs])
    finally:
        demo.close()


async def test_sigkill_of_the_demo_takes_its_children_and_temp_dir() -> None:
    demo = Demo("--private-redis")
    try:
        children = await demo.wait_for_events()
        dirs = redis_dirs(children)
        assert dirs, children
        data_dir = dirs[0]
        assert await asyncio.to_thread(Path(data_dir).is_dir)
        assert any("simulate" in cmd for cmd in children.values())
        started = {pid: start_time(pid) for pid in children}
        demo.proc.kill()
        demo.proc.wait()
        await wait_gone(started)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while await asyncio.to_thread(Path(data_dir).exists):
            assert loop.time() < deadline, f"{data_dir} left behind"
            await asyncio.sleep(0.1)
    finally:
        demo.close()


def _builds_wheels() -> bool:
    """Whether setuptools can build a wheel here without build isolation: its own
    `bdist_wheel` (setuptools 70.1 and later), or the wheel package's; none without setuptools."""
    if importlib.util.find_spec("setuptools") is None:
        return False
    if importlib.util.find_spec("wheel") is not None:
        return True
    return importlib.util.find_spec("setuptools.command.bdist_wheel") is not None


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh environment with syncd installed from a wheel built from this tree; the
    dependencies come from the test environment's site-packages (a path in a .pth file, so its
    editable install of syncd is not seen)."""
    if not _builds_wheels():
        pytest.skip(
            "this environment cannot build a wheel without isolation (it needs setuptools"
            " >= 70.1, or setuptools and the wheel package, as the locked environment has)"
        )
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "MANIFEST.in"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "syncd", src / "syncd", ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    build = [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", "dist"]
    subprocess.run([*build, "./src"], cwd=base, check=True, timeout=300)
    (wheel,) = (base / "dist").glob("syncd-*.whl")
    env = base / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True, timeout=120)
    python = env / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(purelib, "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [*pip, "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(install, check=True, timeout=300)
    return env


def module_file(python: Path, cwd: Path) -> str:
    """Where `python` imports syncd from."""
    command = [python, "-c", "import syncd; print(syncd.__file__)"]
    return subprocess.run(command, capture_output=True, text=True, check=True, cwd=cwd).stdout


async def test_demo_runs_from_a_wheel(
    wheel_env: Path, redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path
) -> None:
    where = await asyncio.to_thread(module_file, wheel_env / "bin" / "python", tmp_path)
    assert where.startswith(str(wheel_env)), where  # the wheel's syncd, not the checkout's
    syncd = str(wheel_env / "bin" / "syncd")
    demo = Demo("--redis-url", redis_server.url, command=(syncd,), cwd=tmp_path)
    try:
        await demo.wait_for_events()
        demo.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(demo.proc.wait, DEADLINE_S) == 0
        assert "Traceback" not in demo.output()
        assert not [k async for k in redis.scan_iter(match="demo:{100[12]}:*")]
    finally:
        demo.close()
