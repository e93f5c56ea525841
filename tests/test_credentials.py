"""Credentials in the places an upstream or an operator can put them, spelt so that a check of
the plain form misses them:

- a Redis URL whose password holds a `/`, `?` or `#` (the parser then misreads it).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from bench.common import to_toml
from syncd import config
from syncd.cli import doctor
from syncd.config.urls import check_url, redact_url

# -- Redis URLs whose password the parser misreads ---------------------------------------------

PIECES = ["Xq7", "Zr9", "Wk3", "Vb5"]


@pytest.mark.parametrize(
    "url",
    [
        "redis://default:Xq7/Zr9Wk3Vb5@redis.local:6379/0",
        "redis://default:Xq7?Zr9Wk3Vb5@redis.local:6379/0",
        "redis://default:Xq7#Zr9Wk3Vb5@redis.local:6379/0",
        "rediss://:Xq7/Zr9?Wk3#Vb5@redis.local:6380/1",
        "redis://u:1234#Xq7Zr9Wk3Vb5@redis.local",  # parses: host u, port 1234
        "redis://default:Xq7/Zr9Wk3Vb5@redis.local:6379/0?password=Xq7Zr9Wk3Vb5",
        "default:Xq7/Zr9Wk3Vb5@redis.local:6379",  # no scheme
        "redis://default:Xq7[Zr9Wk3Vb5@redis.local",  # urlsplit fails
    ],
)
def test_a_password_the_url_parser_misreads_is_never_shown(url: str) -> None:
    shown = redact_url(url)
    assert not any(p in shown for p in PIECES), shown
    problem = check_url(url)
    assert problem is not None
    assert not any(p in problem for p in PIECES), problem
    data = {
        "redis": {"url": url},
        "servicetitan": {"app_key": "k"},
        "tenants": [{"id": 1, "client_id": "c", "client_secret": "s"}],
    }
    with pytest.raises(config.ConfigError) as info:
        config.parse(data, "t.toml")
    assert str(info.value).startswith("t.toml: redis.url: ")
    assert not any(p in str(info.value) for p in PIECES), str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://default:pw-xyz@redis.local:6379/0", "redis://default:***@redis.local:6379/0"),
        ("redis://:p@ss@redis.local/0", "redis://:***@redis.local/0"),
        ("redis://redis.local:6379/0", "redis://redis.local:6379/0"),
        ("redis://redis.local/0?password=pw-xyz", "redis://redis.local/0?password=***"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ],
)
def test_urls_that_parse_are_shown_as_before(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_check_config_doctor_and_run_never_show_such_a_password(tmp_path: Path) -> None:
    url = "redis://default:Xq7/Zr9?Wk3#Vb5@redis.local:6379/0"
    path = tmp_path / "syncd.toml"
    path.write_text(
        to_toml(
            {
                "redis": {"url": url},
                "servicetitan": {"app_key": "app-key-1234"},
                "tenants": [{"id": 1, "client_id": "c", "client_secret": "secret-1234"}],
            }
        )
    )
    path.chmod(0o600)
    outputs = []
    for args in (
        ["check-config", str(path)],
        ["doctor", "--config", str(path)],
        ["doctor", "--config", str(path), "--json"],
        ["run", "--config", str(path), "--once"],
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "syncd", *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        outputs.append(proc.stdout + proc.stderr)
        assert "redis.url" in outputs[-1], args
        assert "percent-encoded" in outputs[-1], args
    lines, code = asyncio.run(doctor.diagnose(str(path)))
    assert code == 2
    outputs += [doctor.render_table(lines, code), doctor.render_json(lines, code)]
    for out in outputs:
        assert not any(p in out for p in PIECES), out
