"""Credentials in the places an upstream or an operator can put them, spelt so that a check of
the plain form misses them:

- error text with a secret percent-encoded, escaped or written as HTML references in full;
- a Redis URL whose password holds a `/`, `?` or `#` (the parser then misreads it);
- a secret file reached through a symlinked directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest

from bench.common import to_toml
from syncd import config, redact
from syncd.cli import doctor
from syncd.config.urls import check_url, redact_url
from syncd.servicetitan.upstream import problem_text

# -- how a secret may be spelt ------------------------------------------------------------


def percent(secret: str, digits: str = "X") -> str:
    return "".join(f"%{b:02{digits}}" for b in secret.encode())


def escaped(secret: str, digits: str = "x") -> str:
    return "".join(f"\\u{ord(c):04{digits}}" for c in secret)


def spellings(secret: str) -> list[str]:
    """The secret as a reader of the text would see it: as is, and its escaped forms."""
    return [secret, escaped(secret), escaped(secret, "X"), percent(secret)]


def leaked(text: str, secret: str) -> bool:
    if any(s in text for s in spellings(secret)):
        return True
    # Whatever mixture of escapes: decoded, the secret must not be there either.
    plain = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text)
    return secret in plain or secret in urllib.parse.unquote(plain)


# -- error text: normalised before it is masked ---------------------------------------------

KNOWN = "Kq4tRz8vWm2nPx7s"  # only unreserved characters: its one registered form is itself


@pytest.fixture
def known() -> Any:
    redact.register("test-known", KNOWN)
    yield KNOWN
    redact.forget("test-known")


@pytest.mark.parametrize(
    ("name", "echoed"),
    [
        ("as is", KNOWN),
        ("percent-encoded in full", percent(KNOWN)),
        ("percent-encoded in full, lower-case hex", percent(KNOWN, "x")),
        ("\\u-escaped in full", escaped(KNOWN)),
        ("\\u-escaped in full, upper-case hex", escaped(KNOWN, "X")),
        ("half of it \\u-escaped", KNOWN[:8] + escaped(KNOWN[8:])),
        ("HTML decimal references", "".join(f"&#{ord(c)};" for c in KNOWN)),
        ("HTML hexadecimal references", "".join(f"&#x{ord(c):x};" for c in KNOWN)),
        ("\\u escapes percent-encoded", percent(escaped(KNOWN))),
        ("percent-encoding percent-encoded", percent(percent(KNOWN))),
    ],
)
def test_a_known_secret_is_masked_however_it_is_spelt(known: str, name: str, echoed: str) -> None:
    for text in (f"HTTP 400: bad value {echoed} here", f"x{echoed}y", echoed):
        out = redact.redact(text)
        assert not leaked(out, KNOWN), (name, out)
        assert redact.MASK in out, name
    # Through the error text an upstream answer becomes (plain text keeps its escapes).
    body = f"rejected {echoed} (see log)".encode()
    assert not leaked(problem_text(body, "text/plain"), KNOWN), name
    # And in a log event.
    event = redact.processor(None, "warning", {"event": "poll_failed", "error": echoed})
    assert not leaked(json.dumps(event), KNOWN), name


@pytest.mark.parametrize(
    "text",
    [
        "100% of 5 & co",
        "GET /a%20b?x=%2F failed",
        'a "quoted\\n" \\u00e9t\\u00e9 &amp; &#65;',
        "HTTP 503: upstream connect error",
    ],
)
def test_text_without_a_known_secret_keeps_its_encodings(known: str, text: str) -> None:
    assert redact.redact(text) == text


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


# -- secret files -------------------------------------------------------------------------


def _settings_with_secret_file(path: Path, **extra: Any) -> config.Settings:
    data: dict[str, Any] = {
        "redis": {"url": "redis://127.0.0.1:6379/0"},
        "servicetitan": {"app_key": "app-key-1234"},
        "tenants": [{"id": 7, "client_id": "cid", "client_secret_file": str(path)}],
        **extra,
    }
    return config.resolve(config.parse(data, "t.toml"), environ={})


def _private(path: Path) -> Path:
    path.write_text("file-secret-7")
    path.chmod(0o600)
    return path


def _not_roots(link: Path) -> None:
    """As a user's own symlink: when the tests run as root, given to another uid."""
    if os.geteuid() == 0:
        os.lchown(link, 12345, 12345)


def test_a_secret_file_through_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    _private(real / "s")
    link = tmp_path / "creds"
    link.symlink_to(real)
    _not_roots(link)
    with pytest.raises(config.ConfigError) as info:
        _settings_with_secret_file(link / "s")
    message = str(info.value)
    assert message.startswith(f"t.toml: tenants[0].client_secret_file: {link}/s is reached ")
    assert f"through {link}, a symlink owned by uid " in message
    assert "allow_insecure_secret_files = true overrides" in message
    # Deeper on the way, and through a relative symlink, the same.
    (real / "sub").mkdir()
    _private(real / "sub" / "s")
    relative = real / "up"
    relative.symlink_to("sub")
    _not_roots(relative)
    with pytest.raises(config.ConfigError, match=rf"through {relative}, a symlink owned by"):
        _settings_with_secret_file(real / "up" / "s")
    # The real path, and the override, are accepted.
    assert _settings_with_secret_file(real / "s").tenants[0].client_secret.reveal()
    insecure = _settings_with_secret_file(link / "s", allow_insecure_secret_files=True)
    assert insecure.tenants[0].client_secret.reveal() == "file-secret-7"


@pytest.mark.skipif(os.geteuid() != 0, reason="a symlink of root's needs root")
def test_roots_symlinks_on_the_way_lead_on(tmp_path: Path) -> None:
    # As /var/run -> /run.
    real = tmp_path / "run"
    real.mkdir()
    _private(real / "s")
    (tmp_path / "var-run").symlink_to(real)
    assert _settings_with_secret_file(tmp_path / "var-run" / "s").tenants


def test_a_kubernetes_secret_volume_is_accepted(tmp_path: Path) -> None:
    """name -> ..data/name, ..data -> ..2026_01_01_00_00_00.1: links within the directory."""
    volume = tmp_path / "secrets"
    (volume / "..2026_01_01_00_00_00.1").mkdir(parents=True)
    _private(volume / "..2026_01_01_00_00_00.1" / "s")
    (volume / "..data").symlink_to("..2026_01_01_00_00_00.1")
    (volume / "s").symlink_to("..data/s")
    _not_roots(volume / "..data")
    _not_roots(volume / "s")
    assert _settings_with_secret_file(volume / "s").tenants[0].client_secret.reveal()
    # A link out of the directory still is not.
    (volume / "out").symlink_to("../elsewhere")
    (tmp_path / "elsewhere").mkdir()
    _private(tmp_path / "elsewhere" / "s")
    (volume / "t").symlink_to("out/s")
    with pytest.raises(config.ConfigError, match=r"is a symlink to .*, outside its own directory"):
        _settings_with_secret_file(volume / "t")
