"""`syncd feeds | head -n 1` as real processes joined by a real pipe: syncd ends quietly with
exit 0 once head has gone; a broken pipe that is not standard output's stays an error. And
`syncd feeds` marks the feed that is not synced by default."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from syncd import catalogue

cli = importlib.import_module("syncd.cli.main")  # `syncd.cli.main` is also the function


def test_feeds_into_head_exits_quietly() -> None:
    feeds = subprocess.Popen(
        [sys.executable, "-m", "syncd", "feeds"], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert feeds.stdout is not None
    head = subprocess.Popen(["head", "-n", "1"], stdin=feeds.stdout, stdout=subprocess.PIPE)
    feeds.stdout.close()  # head holds the only reading end now
    shown, _ = head.communicate(timeout=60)
    assert feeds.wait(60) == 0
    assert feeds.stderr is not None
    with feeds.stderr:
        assert feeds.stderr.read().decode() == ""
    assert shown.decode().splitlines() == [
        cli_line(next(iter(catalogue.feeds().values())).name).rstrip()
    ]


def cli_line(name: str) -> str:
    f = catalogue.feed(name)
    return f"{f.name:45} key={'+'.join(f.key_fields):22} {f.path}"


def test_a_broken_pipe_elsewhere_is_not_swallowed(monkeypatch: pytest.MonkeyPatch) -> None:
    def dispatch(_: argparse.Namespace) -> int:
        raise BrokenPipeError("a connection, not standard output")

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    with pytest.raises(BrokenPipeError):
        cli.main(["feeds"])


def test_feeds_marks_the_legacy_feed_left_out_by_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["feeds"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(catalogue.feeds())
    marked = [ln.split()[0] for ln in lines if "legacy" in ln]
    assert marked == sorted(catalogue.LEGACY)
    assert set(marked) == set(catalogue.feeds()) - set(catalogue.default_feeds())


def test_no_standard_output_at_all_is_no_traceback() -> None:
    """`syncd feeds >&-`: Python gives the process no sys.stdout; nothing to flush."""
    res = subprocess.run(
        ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "syncd", "feeds"],
        stderr=subprocess.PIPE,
        timeout=60,
        check=False,
    )
    assert "Traceback" not in res.stderr.decode(), res.stderr.decode()
