"""The systemd units: the settings syncd and its mirror rely on, their hardening score, and that
they parse."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from syncd.config import MAX_SHUTDOWN_GRACE_S

UNITS = Path(__file__).resolve().parent.parent / "systemd"
MAIN = UNITS / "syncd.service"
TEMPLATE = UNITS / "syncd@.service"
MIRROR = UNITS / "syncd-mirror.service"
ALL = [MAIN, TEMPLATE, MIRROR]
MAX_EXPOSURE = 2.0
# After the longest shutdown grace the configuration allows, time to close connections.
CLOSE_MARGIN_S = 5
# How long a crashing start may take at most and still count towards the start limit.
CRASHING_START_S = 10

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(path: Path) -> Unit:
    """Sections as ordered (key, value) pairs; repeated keys stay repeated, as in systemd."""
    sections: Unit = {}
    current: list[tuple[str, str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        assert current is not None, f"{path.name}: setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not a KEY=VALUE line: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def value(unit: Unit, section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= set {len(found)} times, expected once"
    return found[0]


def seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)\s*(s|sec|min)?", text)
    assert match, f"unexpected time span {text!r}"
    return int(match[1]) * (60 if match[2] == "min" else 1)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_service_settings(path: Path) -> None:
    unit = parse_unit(path)
    assert value(unit, "Service", "Type") == "notify"
    assert value(unit, "Service", "NotifyAccess") == "main"
    assert seconds(value(unit, "Service", "WatchdogSec")) == 30
    assert value(unit, "Service", "Restart") == "on-failure"
    assert seconds(value(unit, "Service", "RestartSec")) == 5
    assert (
        seconds(value(unit, "Service", "TimeoutStopSec")) >= MAX_SHUTDOWN_GRACE_S + CLOSE_MARGIN_S
    )
    assert value(unit, "Service", "User") == "syncd"
    assert value(unit, "Service", "Group") == "syncd"
    families = value(unit, "Service", "RestrictAddressFamilies").split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert value(unit, "Service", "ProtectSystem") == "strict"
    assert value(unit, "Install", "WantedBy") == "multi-user.target"


@pytest.mark.parametrize("path", [MAIN, TEMPLATE], ids=lambda p: p.name)
def test_the_daemon_reloads_and_holds_the_api_credentials(path: Path) -> None:
    unit = parse_unit(path)
    assert value(unit, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    credentials = dict(c.split(":", 1) for c in values(unit, "Service", "LoadCredential"))
    assert credentials == {
        "app_key": "/etc/syncd/credentials/app_key",
        "tenants": "/etc/syncd/credentials/tenants",
    }


def test_the_mirror_holds_the_database_credential_only_and_does_not_reload() -> None:
    unit = parse_unit(MIRROR)
    assert values(unit, "Service", "ExecReload") == []  # SIGHUP is no reload for it
    credentials = dict(c.split(":", 1) for c in values(unit, "Service", "LoadCredential"))
    assert credentials == {"postgres": "/etc/syncd/credentials/postgres"}
    assert "postgresql.service" in value(unit, "Unit", "After").split()


def test_the_mirror_is_hardened_as_the_daemon() -> None:
    # Every sandboxing and privilege setting of syncd.service, with the same value.
    first = "CapabilityBoundingSet"
    main = parse_unit(MAIN)["Service"]
    hardening = main[[k for k, _ in main].index(first) :]
    mirror = parse_unit(MIRROR)["Service"]
    assert mirror[[k for k, _ in mirror].index(first) :] == hardening
    for key in ("DynamicUser", "LimitCORE", "UMask", "PrivateUsers"):
        assert values(parse_unit(MIRROR), "Service", key) == values(
            parse_unit(MAIN), "Service", key
        )


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_resource_limits_and_crash_loop(path: Path) -> None:
    unit = parse_unit(path)
    assert int(value(unit, "Service", "LimitNOFILE")) >= 16384
    assert value(unit, "Service", "LimitCORE") == "0"
    memory = re.fullmatch(r"(\d+)([KMG])", value(unit, "Service", "MemoryMax"))
    assert memory is not None
    assert int(memory[1]) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[memory[2]] >= 256 << 20
    # A configuration error (exit 2) is not retried: a restart cannot fix the file.
    assert value(unit, "Service", "RestartPreventExitStatus").split() == ["2"]
    # The start limit belongs in [Unit] (systemd ignores it in [Service] on recent versions)
    # and must be reachable by a crash loop: Burst restarts, each RestartSec apart plus a
    # failing start, fit in the interval.
    assert values(unit, "Service", "StartLimitIntervalSec") == []
    interval = seconds(value(unit, "Unit", "StartLimitIntervalSec"))
    burst = int(value(unit, "Unit", "StartLimitBurst"))
    restart = seconds(value(unit, "Service", "RestartSec"))
    assert burst >= 1
    assert burst * (restart + CRASHING_START_S) < interval
    assert value(unit, "Service", "RuntimeDirectoryMode") == "0750"


def test_exec_start() -> None:
    assert (
        value(parse_unit(MAIN), "Service", "ExecStart")
        == "/opt/syncd/.venv/bin/syncd run --config /etc/syncd/syncd.toml --instance %H"
    )
    assert (
        value(parse_unit(MIRROR), "Service", "ExecStart")
        == "/opt/syncd/.venv/bin/syncd mirror --config /etc/syncd/syncd.toml --name %H"
    )
    assert (
        value(parse_unit(TEMPLATE), "Service", "ExecStart")
        == "/opt/syncd/.venv/bin/syncd run --config /etc/syncd/%i.toml --instance %H-%i"
    )


def test_runtime_directories() -> None:
    assert value(parse_unit(MAIN), "Service", "RuntimeDirectory") == "syncd"
    # One per instance: a shared one would vanish when any instance stops.
    assert value(parse_unit(TEMPLATE), "Service", "RuntimeDirectory") == "syncd/%i"


def test_template_differs_only_in_instance_settings() -> None:
    def comparable(unit: Unit) -> Unit:
        skip = {("Unit", "Description"), ("Service", "ExecStart"), ("Service", "RuntimeDirectory")}
        return {s: [kv for kv in kvs if (s, kv[0]) not in skip] for s, kvs in unit.items()}

    assert comparable(parse_unit(TEMPLATE)) == comparable(parse_unit(MAIN))


def systemd_analyze() -> str:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.skip("systemd-analyze is not installed: the units are only checked by parsing here")
    return binary


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_units_parse_without_warnings(path: Path) -> None:
    out = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # The venv's executable does not exist on a test machine; every other complaint counts.
    complaints = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if line.strip() and "is not executable" not in line
    ]
    assert complaints == []


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_security_exposure(path: Path) -> None:
    binary = systemd_analyze()
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    match = re.match(r"systemd (\d+)", version)
    if match is None or int(match[1]) < 250:
        pytest.skip(f"systemd-analyze security --offline needs systemd >= 250, found {version!r}")
    out = subprocess.run(
        [binary, "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    score = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out.stdout)
    assert score is not None, out.stdout + out.stderr
    assert float(score[1]) <= MAX_EXPOSURE, out.stdout
