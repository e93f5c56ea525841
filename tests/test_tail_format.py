"""`syncd tail --format text|json`: readable lines cut to the terminal's width with an ellipsis,
control characters escaped; JSON lines as before. The demo's log lines in the same text."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
import redis

from syncd.consumer import Event
from syncd.consumer.tail import render_text
from tests.test_tail_pipe import STREAM, TENANT, config_file, sync_redis  # noqa: F401

LONG = msgspec.json.encode({f"field{i}": "value " * 3 for i in range(20)})


def event(key: str = "42", data: bytes = LONG, op: str = "updated") -> Event:
    return Event(
        stream=STREAM,
        id="1714564800123-4",
        tenant=TENANT,
        feed="crm.customers",
        op=op,
        key=key,
        data=data,
        modified_on=None,
        deliveries=0,
    )


HEAD = f"2024-05-01 12:00:00.123 1714564800123-4 {TENANT} crm.customers updated 42  "


@pytest.mark.parametrize("width", [100, 132, 200])
def test_a_long_record_is_cut_to_the_width_with_an_ellipsis(width: int) -> None:
    line = render_text(event(), width)
    assert len(line) == width
    assert line.startswith(HEAD + 'field0="value value value "')
    assert line.endswith("…")


def test_a_short_record_is_left_whole() -> None:
    line = render_text(event(data=b'{"id":42,"name":"Acme"}'), 100)
    assert line == HEAD + 'name="Acme"'


def test_a_deleted_record_is_its_key_and_no_summary() -> None:
    line = render_text(event(data=b"", op="deleted"), 100)
    assert line == HEAD.replace("updated", "deleted").rstrip()


def test_a_terminal_narrower_than_the_head_still_gets_lines_that_fit() -> None:
    line = render_text(event(), 30)
    assert len(line) == 30
    assert line.endswith("…")
    assert line.startswith("2024-05-01 12:00:00.123")


def test_control_characters_are_shown_not_obeyed() -> None:
    data = b'{"\\u001b[31mred": 1, "bidi\\u202e": "x"}'
    line = render_text(event(key="4\x1b[2J2", data=data), 200)
    assert "\x1b" not in line
    assert "\u202e" not in line
    assert "4\\x1b[2J2" in line
    assert "\\x1b[31mred=1" in line
    assert "bidi\\u202e=" in line


def publish(client: redis.Redis, count: int) -> list[str]:
    ids = []
    for key in range(count):
        fields = {"op": "created", "key": str(key), "data": LONG, "modified_on": ""}
        ids.append(client.xadd(STREAM, fields).decode())  # type: ignore[union-attr]
    return ids


def run_tail(config: Path, *extra: str, columns: int = 70) -> list[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "syncd",
            "tail",
            "--config",
            str(config),
            "--tenant",
            str(TENANT),
            "--from-start",
            "--count",
            "3",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": str(columns)},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_format_text_fits_the_terminal(
    sync_redis: redis.Redis,  # noqa: F811
    config_file: Path,  # noqa: F811
) -> None:
    ids = publish(sync_redis, 3)
    lines = run_tail(config_file, "--format", "text", columns=70)
    assert len(lines) == 3
    for entry_id, line in zip(ids, lines, strict=True):
        assert len(line) == 70
        assert line.endswith("…")
        assert f" {entry_id} {TENANT} crm.customers created " in line
    assert [len(line) for line in run_tail(config_file, "--format", "text", columns=100)] == [
        100
    ] * 3


def test_format_json_and_the_default_off_a_terminal(
    sync_redis: redis.Redis,  # noqa: F811
    config_file: Path,  # noqa: F811
) -> None:
    ids = publish(sync_redis, 3)
    for extra in (("--format", "json"), ()):
        lines = run_tail(config_file, *extra, columns=70)
        records = [json.loads(line) for line in lines]
        assert [r["id"] for r in records] == ids
        assert records[0]["data"] == json.loads(LONG)  # whole, however wide the terminal


def test_format_is_text_or_json(config_file: Path) -> None:  # noqa: F811
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "syncd",
            "tail",
            "--config",
            str(config_file),
            "--tenant",
            str(TENANT),
            "--format",
            "yaml",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "invalid choice: 'yaml'" in done.stderr


def test_text_log_lines_are_readable_and_fit_the_terminal() -> None:
    # In a child process: structlog's configuration is the process's own.
    code = (
        "import structlog\n"
        "from syncd import log\n"
        "log.configure('warning', 'text')\n"
        "l = structlog.get_logger('syncd')\n"
        "l.info('hidden')\n"
        "l.warning('rate_limited', tenant=1001, feed='crm.customers', retry_after_s=2.5,"
        " error='HTTP 429: slow down', detail='x' * 200)\n"
        "l.warning('short', error='HTTP 429: slow down', note='\\x1b[31m')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "90"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stderr.splitlines()
    assert len(first) == 90
    assert first.endswith("…")
    assert first[23:].startswith(" warning rate_limited  tenant=1001 feed=crm.customers retry_a")
    assert second[23:] == ' warning short  error="HTTP 429: slow down" note=\\x1b[31m'
