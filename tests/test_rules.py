"""contrib/prometheus/syncd-rules.yml: valid, each alert tested by promtool, over series syncd
exports."""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import NoReturn

import pytest

from tests.exported import FLEET_ONLY, daemon_names, exported_by_metrics, names_used

__all__ = ["daemon_names"]  # a fixture, used by name

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "contrib" / "prometheus"
RULES = CONTRIB / "syncd-rules.yml"
RULE_TESTS = CONTRIB / "syncd-rules.test.yml"
ALERTS = {
    "SyncdFeedStale",
    "SyncdTenantStale",
    "SyncdTenantAuthFailing",
    "SyncdTenantRequestsFailing",
    "SyncdRateLimitedSustained",
    "SyncdBackpressurePaused",
    "SyncdPollingPausedRedisMemory",
    "SyncdDeadLettersGrowing",
    "SyncdRedisErrors",
    "SyncdRedisUnavailable",
    "SyncdReplicasBehind",
    "SyncdFleetMemberGone",
    "SyncdFleetConfigDisagrees",
    "SyncdFleetFeedsUnpolled",
    "SyncdFleetInstanceNameClash",
    "SyncdReconcileOverdue",
}


LOCKED = ROOT / "lock" / "debian.txt"


def locked_version(package: str) -> str:
    """The upstream version lock/debian.txt pins for a Debian package."""
    for line in LOCKED.read_text().splitlines():
        name, _, version = line.partition(" ")
        if name == package:
            return version.strip()
    raise LookupError(f"{package} is not in {LOCKED}")


def version_of(path: str) -> str:
    """The upstream version of a promtool ("promtool, version 2.42.0+ds (...)": 2.42.0)."""
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    found = re.search(r"^promtool, version (\d[\d.]*)", done.stdout + done.stderr, re.M)
    return found.group(1).rstrip(".") if found else "of unknown version"


def unavailable(why: str) -> NoReturn:
    """Skip, saying why; under CI a missing or unlocked promtool is a failure, not a skip."""
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)


@functools.cache
def promtool() -> str:
    path = shutil.which("promtool")
    locked = locked_version("prometheus")
    if path is None:
        unavailable(
            f"promtool not found: `make test` installs it (Debian package prometheus {locked},"
            " lock/debian.txt) where it runs as root with apt-get; elsewhere install it to"
            " test the alerting rules"
        )
    elif (have := version_of(path)) != locked:
        unavailable(f"promtool {have} is not the {locked} of lock/debian.txt")
    return path


def run_promtool(*args: str, cwd: Path = CONTRIB) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def alerts() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), re.M)


def test_rules_are_valid() -> None:
    done = run_promtool("check", "rules", RULES.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in done.stdout


def test_every_alert_required_is_there() -> None:
    assert sorted(alerts()) == sorted(ALERTS)


def test_rule_tests_pass() -> None:
    done = run_promtool("test", "rules", RULE_TESTS.name)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


@pytest.mark.parametrize("alert", sorted(ALERTS))
def test_each_alert_has_a_test_that_sees_it_fire(alert: str, tmp_path: Path) -> None:
    """With the alert's expression replaced by one that never holds, the tests fail on it."""
    text = RULES.read_text()
    # The expression runs from `expr:` (one line, or a block) to the rule's `for:`.
    expr = re.compile(rf"(- alert: {alert}\n\s+expr:).*?(\n\s+for:)", re.S)
    broken = expr.sub(r"\1 syncd_never_exported > 0\2", text, count=1)
    assert broken != text
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    done = run_promtool("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert done.returncode != 0, f"no test of {alert} noticed that it never fires"
    assert f"alertname: {alert}" in done.stdout + done.stderr


def test_rules_use_series_a_daemon_serves(daemon_names: set[str]) -> None:
    used = names_used(RULES.read_text())
    assert used, "no syncd series found in the rules"
    # Fleet membership is exported by instances in a fleet only.
    assert used - FLEET_ONLY <= daemon_names, used - FLEET_ONLY - daemon_names
    assert used <= exported_by_metrics(), used - exported_by_metrics()


def test_rule_tests_feed_series_syncd_exports() -> None:
    used = names_used(RULE_TESTS.read_text())
    assert used <= exported_by_metrics(), used - exported_by_metrics()
