"""contrib/grafana/syncd.json: every query is valid PromQL over series syncd exports, and the
dashboard covers what an operator asks first."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.exported import FLEET_ONLY, daemon_names, exported_by_metrics, names_used

__all__ = ["daemon_names"]  # a fixture, used by name

DASHBOARD = Path(__file__).resolve().parent.parent / "contrib" / "grafana" / "syncd.json"
# What the dashboard must show, by the series that answer it.
REQUIRED = {
    "failing tenants": {"syncd_tenant_auth_failing", "syncd_requests_total"},
    "stale feeds": {
        "syncd_feed_oldest_seconds_since_success",
        "syncd_feed_poll_interval_seconds",
        "syncd_tenant_seconds_since_success",
        "syncd_tenant_poll_interval_seconds",
    },
    "rate-limit headroom": {
        "syncd_tenant_requests_per_second_limit",
        "syncd_tenant_requests_per_second_allowed",
        "syncd_rate_limited_total",
    },
    "pauses": {"syncd_feeds_paused", "syncd_polling_paused"},
    "dead letters": {"syncd_feed_dead_letters_total", "syncd_tenant_dead_letters_total"},
    "Redis errors": {"syncd_redis_errors_total"},
    "throughput": {"syncd_feed_records_published_total", "syncd_feed_pages_total"},
}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in data["panels"]:
        yield panel
        yield from panel.get("panels", [])


def queries(data: dict[str, Any]) -> list[str]:
    """Every PromQL expression: panel targets and template variable queries."""
    found = [t["expr"] for p in panels(data) for t in p.get("targets", [])]
    for variable in data["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append(query["query"] if isinstance(query, dict) else query)
    return found


def test_every_panel_queries_syncd_series() -> None:
    for panel in panels(dashboard()):
        if panel["type"] == "row":
            continue
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs, f"panel {panel['title']!r} has no query"
        for expr in exprs:
            assert names_used(expr), f"panel {panel['title']!r}: {expr!r} names no syncd series"


def test_queries_name_series_a_daemon_serves(daemon_names: set[str]) -> None:
    used = {name for q in queries(dashboard()) for name in names_used(q)}
    # Fleet membership is exported by instances in a fleet only.
    assert used - FLEET_ONLY <= daemon_names, used - FLEET_ONLY - daemon_names
    assert used <= exported_by_metrics(), used - exported_by_metrics()


def test_dashboard_covers_the_first_questions() -> None:
    used = {name for q in queries(dashboard()) for name in names_used(q)}
    missing = {topic: names - used for topic, names in REQUIRED.items() if names - used}
    assert not missing


def test_panel_ids_unique_and_panels_side_by_side_without_overlap() -> None:
    seen: set[int] = set()
    taken: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard()):
        assert panel["id"] not in seen
        seen.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"{panel['title']!r} overlaps {taken[(x, y)]!r}"
                taken[(x, y)] = panel["title"]


def test_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query, with Grafana's variables given values, as a recording rule."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip(
            "promtool not found: `make test` installs it (Debian package prometheus) where it"
            " runs as root with apt-get; elsewhere install it to check the dashboard's PromQL"
        )
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for i, query in enumerate(queries(dashboard())):
        expr = query.replace("$__rate_interval", "5m").replace("$job", ".+")
        if expr.startswith("label_values("):
            expr = expr.removeprefix("label_values(").split(",")[0]
        lines += [f"      - record: dashboard:query_{i}", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboard-rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [promtool, "check", "rules", str(rules)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
