"""`syncd tail --group G | head -n 3` as real processes joined by a real pipe: tail stops at once
and quietly when head goes, and acknowledges only what it wrote and flushed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis

from bench.common import to_toml
from syncd.keys import Keys
from syncd.testing.redis_server import RedisServer
from tests.engine_helpers import config_dict

TENANT = 4242
STREAM = Keys("st", TENANT).stream("crm.customers")
GROUP = "ops"
DEADLINE_S = 60.0


@pytest.fixture
def sync_redis(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def config_file(redis_server: RedisServer, tmp_path: Path) -> Path:
    data = config_dict(redis_server.url, "http://127.0.0.1:9", "app-key", [TENANT], [])
    data["tenants"][0]["feeds"] = ["crm.customers"]
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(data))
    return path


def publish(client: redis.Redis, count: int, size: int = 0) -> list[str]:
    ids = []
    for key in range(count):
        data = msgspec.json.encode({"id": key, "name": f"Customer {key}", "pad": "x" * size})
        fields = {"op": "created", "key": str(key), "data": data, "modified_on": ""}
        ids.append(client.xadd(STREAM, fields).decode())  # type: ignore[union-attr]
    return ids


def tail_into_head(config: Path, *extra: str) -> tuple[int, str, list[str]]:
    """Run `syncd tail ... | head -n 3`; tail's exit code, its stderr and what head printed."""
    env = {**os.environ, "PYTHONUNBUFFERED": "0"}
    args = [sys.executable, "-m", "syncd", "tail", "--config", str(config), "--tenant"]
    tail = subprocess.Popen(
        [*args, str(TENANT), "--group", GROUP, "--from-start", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert tail.stdout is not None
        head = subprocess.Popen(["head", "-n", "3"], stdin=tail.stdout, stdout=subprocess.PIPE)
        tail.stdout.close()  # head holds the only reading end now
        shown, _ = head.communicate(timeout=DEADLINE_S)
        # Nothing more is published: tail must notice on its own that its reader is gone.
        deadline = time.monotonic() + DEADLINE_S
        while tail.poll() is None:
            assert time.monotonic() < deadline, "tail kept running after head exited"
            time.sleep(0.05)
        assert tail.stderr is not None
        errors = tail.stderr.read().decode()
        return tail.returncode, errors, shown.decode().splitlines()
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait()
        if tail.stderr is not None:
            tail.stderr.close()


def group_counts(client: redis.Redis) -> tuple[int, int]:
    """(entries delivered to the group, entries still pending); none without a group."""
    groups = client.xinfo_groups(STREAM)
    if not groups:
        return 0, 0
    (info,) = groups  # type: ignore[misc]
    return int(info["entries-read"] or 0), int(info["pending"])


def acknowledged(client: redis.Redis, ids: list[str]) -> list[str]:
    if not client.xinfo_groups(STREAM):
        return []  # tail never got as far as creating its group
    pending = {
        row["message_id"].decode()
        for row in client.xpending_range(STREAM, GROUP, "-", "+", 1000)  # type: ignore[union-attr]
    }
    delivered, _ = group_counts(client)
    return [i for i in ids[:delivered] if i not in pending]


def test_stops_quietly_when_head_exits_without_waiting_for_another_event(
    sync_redis: redis.Redis, config_file: Path
) -> None:
    ids = publish(sync_redis, 3)

    code, errors, shown = tail_into_head(config_file)

    assert code == 0
    assert "Traceback" not in errors, errors
    assert "BrokenPipe" not in errors, errors
    assert [msgspec.json.decode(line)["id"] for line in shown] == ids
    assert acknowledged(sync_redis, ids) == ids


def test_acknowledges_only_what_reached_the_pipe(
    sync_redis: redis.Redis, config_file: Path
) -> None:
    # Lines of 20 kB: the pipe's buffer holds a few, then the writes fail once head is gone.
    ids = publish(sync_redis, 50, size=20_000)

    code, errors, shown = tail_into_head(config_file)

    assert code == 0
    assert "Traceback" not in errors, errors
    assert "BrokenPipe" not in errors, errors
    assert [msgspec.json.decode(line)["id"] for line in shown] == ids[:3]
    acked = acknowledged(sync_redis, ids)
    # Acknowledged: a prefix that head read or the pipe's buffer held (64 kB: a few lines);
    # whatever tail read beyond what it could write stays pending for the group.
    assert 3 <= len(acked) < 10
    assert acked == ids[: len(acked)]
    delivered, pending = group_counts(sync_redis)
    assert pending == delivered - len(acked)


def test_count_takes_and_acknowledges_exactly_n(sync_redis: redis.Redis, config_file: Path) -> None:
    ids = publish(sync_redis, 50)

    code, errors, shown = tail_into_head(config_file, "--count", "3")

    assert code == 0
    assert "Traceback" not in errors, errors
    assert [msgspec.json.decode(line)["id"] for line in shown] == ids[:3]
    assert group_counts(sync_redis) == (3, 0)  # three taken, three acknowledged, none pending


def run_tail(config: Path, stdout: Any, *, shell: str = "") -> tuple[int, str]:
    """Run `syncd tail --group ... --count 3` writing to `stdout` (through `sh -c shell`, when
    given); its exit code and stderr."""
    args = [sys.executable, "-m", "syncd", "tail", "--config", str(config), "--tenant"]
    args += [str(TENANT), "--group", GROUP, "--from-start", "--count", "3"]
    done = subprocess.run(
        ["sh", "-c", shell, "sh", *args] if shell else args,
        stdout=stdout,
        stderr=subprocess.PIPE,
        timeout=DEADLINE_S,
    )
    return done.returncode, done.stderr.decode()


def test_a_full_disk_ends_tail_with_one_line_and_acknowledges_nothing_unwritten(
    sync_redis: redis.Redis, config_file: Path
) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    ids = publish(sync_redis, 5)
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        code, errors = run_tail(config_file, full)

    assert code == 1
    assert "Traceback" not in errors, errors
    (line,) = errors.strip().splitlines()
    assert line.startswith("syncd: tail: cannot write to the output: No space left on device")
    assert acknowledged(sync_redis, ids) == []


def test_a_closed_stdout_ends_tail_with_one_line(
    sync_redis: redis.Redis, config_file: Path
) -> None:
    ids = publish(sync_redis, 5)

    # `syncd tail ... >&-`: the process starts without a standard output.
    code, errors = run_tail(config_file, subprocess.DEVNULL, shell='exec "$@" >&-')

    assert code == 1
    assert "Traceback" not in errors, errors
    assert errors.strip().splitlines() == ["syncd: tail: standard output is closed"]
    assert acknowledged(sync_redis, ids) == []


def test_a_pipe_closed_before_tail_writes_ends_it_quietly(
    sync_redis: redis.Redis, config_file: Path
) -> None:
    ids = publish(sync_redis, 5, size=20_000)
    read_end, write_end = os.pipe()
    os.close(read_end)  # nobody will ever read: every write fails with EPIPE
    try:
        code, errors = run_tail(config_file, write_end)
    finally:
        os.close(write_end)

    assert code == 0  # as with `| head`: its reader is gone, nothing is wrong with tail
    assert "Traceback" not in errors, errors
    assert "Error" not in errors, errors
    assert acknowledged(sync_redis, ids) == []


def test_help_explains_count() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "syncd", "tail", "--help"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert "--count N" in out
    assert "cannot be known" in " ".join(out.split())
