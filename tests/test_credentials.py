"""Credentials in the places an upstream or an operator can put them, spelt so that a check of
the plain form misses them:

- a page whose record, key, timestamp or cursor holds a credential `\\u`-escaped, or another
  tenant's credential, through the real client against the simulator (its `echo_*` quirks);
- error text with a secret percent-encoded, escaped or written as HTML references in full;
- a Redis URL whose password holds a `/`, `?` or `#` (the parser then misreads it);
- a secret file reached through a symlinked directory.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog

from bench.common import to_toml
from syncd import config, redact
from syncd.cli import commands, doctor
from syncd.config.urls import check_url, redact_url
from syncd.daemon import Daemon
from syncd.servicetitan import upstream
from syncd.servicetitan.upstream import (
    escaped_credential,
    page_credential,
    problem_text,
    unescaped_strings,
)
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, settings
from tests.test_secrets import redis_dump

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


@pytest.mark.parametrize(
    "url",
    [
        "redis://h/0?password=pa55#Zq9tail",
        "unix:///tmp/r.sock?password=pa55#Zq9tail",
        "redis://h:6379/0#Zq9tail",
    ],
)
def test_a_hash_sign_is_refused_and_what_follows_it_never_shown(url: str) -> None:
    problem = check_url(url)
    assert problem is not None
    assert "%23" in problem
    assert "Zq9tail" not in problem
    assert "Zq9tail" not in redact_url(url)
    assert "pa55" not in redact_url(url)


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
    # A loop of its own, never made current: asyncio.run would leave the thread without one,
    # which older pytest-asyncio versions need for the async tests that follow.
    loop = asyncio.new_event_loop()
    try:
        lines, code = loop.run_until_complete(doctor.diagnose(str(path)))
    finally:
        loop.close()
    assert code == 2
    outputs += [doctor.render_table(lines, code), doctor.render_json(lines, code)]
    for out in outputs:
        assert not any(p in out for p in PIECES), out


# -- pages ----------------------------------------------------------------------------------


@pytest.mark.parametrize("scanned", [0, 1, 1000])
def test_unescaped_strings_are_what_a_decoder_stores(
    monkeypatch: pytest.MonkeyPatch, scanned: int
) -> None:
    # Past MAX_SCANNED_STRINGS strings, the rest is found by another path: the same strings.
    monkeypatch.setattr(upstream, "MAX_SCANNED_STRINGS", scanned)
    body = (
        b'{"a": "plain", "b\\u0041": "x\\"y\\/z", "c": ["\\u00e9", 1], "d": "e\\\\",'
        b' "f": "q\\"r", "g": "\\\\u0041", "h": "\\ud83d\\ude00\\ud83d"}'
    )
    assert json.loads(body)  # well-formed, as after decoding
    strings = unescaped_strings(body).decode("utf-8", "surrogatepass").split("\x00")
    # Strings with only \" or \\ escapes are left out: no secret hides behind those.
    expected = ["bA", 'x"y/z', "\u00e9", "\\u0041", "\U0001f600\ud83d"]
    if scanned <= 1:  # the regular expression takes every string with an escape
        expected = ["bA", 'x"y/z', "\u00e9", "e\\", 'q"r', "\\u0041", "\U0001f600\ud83d"]
    assert strings == expected
    assert unescaped_strings(b'{"a": "plain", "b": "q\\"r"}') == b""


def test_a_page_holding_any_tenants_credential_is_refused() -> None:
    redact.register(("client_secret", 91), "cs-ninety-one-secret")
    redact.register(("token", 92), "tk-ninety-two-token-live")
    try:
        for body, tenant, raw, expected in [
            (b'{"x": "cs-ninety-one-secret"}', 91, True, "a credential it was sent"),
            (b'{"x": "cs-ninety-one-secret"}', 92, True, "another tenant's credential"),
            (b'{"x": "tk-ninety-two-token-live"}', 91, True, "another tenant's credential"),
            (
                b'{"x": "zz%s"}' % escaped("tk-ninety-two-token-live").encode(),
                91,
                False,
                "another tenant's credential",
            ),
            (b'{"%s": 1}' % escaped("cs-ninety-one-secret").encode(), 91, False, "it was sent"),
            (b'{"x": "tk-ninety-\\u0074wo-token-live"}', 92, False, "it was sent"),
        ]:
            found = page_credential(body, tenant)
            if not raw:
                assert found is None, body
                found = escaped_credential(body, tenant)
            assert found is not None, body
            assert expected in found, body
        clean = b'{"x": "cs-ninety-one-secre", "y": "\\u00e9t\\u00e9"}'
        assert page_credential(clean, 91) is None
        assert escaped_credential(clean, 91) is None
    finally:
        redact.forget(("client_secret", 91))
        redact.forget(("token", 92))


def test_a_page_holding_an_operators_password_is_applied_and_the_password_still_masked() -> None:
    redact.register("redis_password", "CHANGE-ME")
    redact.register("ops_token", "monitoring")
    redact.register(("client_secret", 93), "cs-ninety-three-secret")
    try:
        body = b'{"summary": "tech to CHANGE-ME filter", "note": "monitoring"}'
        assert page_credential(body, 93) is None
        assert escaped_credential(b'{"x": "CHANGE\\u002dME"}', 93) is None
        # An API credential beside it is still found.
        both = b'{"a": "CHANGE-ME", "b": "cs-ninety-three-secret"}'
        assert page_credential(both, 93) == "page contains a credential it was sent; not applied"
        assert "CHANGE-ME" not in redact.redact("redis said CHANGE-ME")
    finally:
        for slot in ("redis_password", "ops_token", ("client_secret", 93)):
            redact.forget(slot)


def test_the_token_sent_is_checked_even_if_renewed_since() -> None:
    body = b'{"x": "%s"}' % escaped("old-token-still-live").encode()
    assert page_credential(body, 1) is None
    assert escaped_credential(body, 1) is None
    found = escaped_credential(body, 1, ["old-token-still-live"])
    assert found is not None
    assert "it was sent" in found


@pytest.mark.parametrize("few", [0, 10**6])
def test_every_known_secret_is_found_wherever_it_lies(
    monkeypatch: pytest.MonkeyPatch, few: int
) -> None:
    """The block index (one pass, any number of secrets) finds a secret of any length at any
    offset; so does the search for each, which known_in does when it knows only a few."""
    monkeypatch.setattr(redact, "FEW_FORMS", few)
    secrets = [f"{n:02d}" + "abcdefghijklmnopqrstuvwxyz"[: n - 2] for n in range(6, 30)]
    for i, s in enumerate(secrets):
        redact.register(("test-len", i), s)
    try:
        for s in secrets:
            for offset in range(9):
                text = b"#" * offset + s.encode() + b"#" * 3
                assert redact.known_in(text) is not None, (s, offset)
                assert redact.known_in(text.replace(s[-1].encode(), b"!")) is None, (s, offset)
    finally:
        for i in range(len(secrets)):
            redact.forget(("test-len", i))
    assert redact.known_in(secrets[-1].encode()) is None


ECHO_TENANT, OTHER = 1801, 1802
FEED = "crm.customers"


async def _poll_once(
    redis_server: RedisServer, r: aioredis.Redis, sim_url: str, app_key: str, tenants: list[int]
) -> tuple[str, str]:
    """Run the daemon once over `tenants`; (its captured log events, `status` text and JSON)."""
    data = config_dict(redis_server.url, sim_url, app_key, tenants, [FEED])
    s = settings(data)
    with structlog.testing.capture_logs() as logs:
        await Daemon(s, once=True).run()
    out = io.StringIO()
    await commands.status(s, as_json=False, out=out)
    await commands.status(s, as_json=True, out=out)
    return json.dumps(logs, default=str), out.getvalue()


@pytest.mark.parametrize(
    ("credential", "place", "escape", "expected"),
    [
        ("token", "key", True, "a credential it was sent"),
        ("token", "timestamp", True, "a credential it was sent"),
        ("token", "record", True, "a credential it was sent"),
        ("app_key", "key", True, "a credential it was sent"),
        ("other_secret", "record", False, "another tenant's credential"),
        ("other_secret", "key", True, "another tenant's credential"),
        ("other_token", "cursor", False, "another tenant's credential"),
        ("other_token", "record", True, "another tenant's credential"),
    ],
)
async def test_a_page_echoing_a_credential_stores_nothing_of_it(
    redis: aioredis.Redis,
    redis_server: RedisServer,
    credential: str,
    place: str,
    escape: bool,
    expected: str,
) -> None:
    quirks = {
        ECHO_TENANT: {"echo_credential": credential, "echo_in": place, "echo_escaped": escape}
    }
    async with run_simulator(
        tenants=[ECHO_TENANT, OTHER], records=8, page_size=5, tenant_quirks=quirks
    ) as sim:
        tenants = [ECHO_TENANT, OTHER]
        if credential == "other_token":
            # The other tenant's live token, obtained (and so known) by this process first;
            # then polled without it, so that it keeps that one token.
            await _poll_once(redis_server, redis, sim.url, sim.app_key, [OTHER])
            issued = [t for t, (owner, _) in sim.state.tokens.items() if owner == OTHER]
            assert len(issued) == 1
            tenants = [ECHO_TENANT]
        log, status = await _poll_once(redis_server, redis, sim.url, sim.app_key, tenants)
        secrets = {
            "token": [t for t, (owner, _) in sim.state.tokens.items() if owner == ECHO_TENANT],
            "app_key": [sim.app_key],
            "other_secret": [f"secret-{OTHER}"],
            "other_token": issued if credential == "other_token" else [],
        }[credential]
    assert secrets
    dump = await redis_dump(redis)
    for name, text in [("redis", dump), ("log", log), ("status", status)]:
        for secret in secrets:
            assert not leaked(text, secret), f"{name} holds {credential} in {place}"
    # The echoing tenant's feed failed for it, and stored nothing of its pages ...
    state = await redis.hgetall(f"st:{{{ECHO_TENANT}}}:state")
    assert expected in state[f"{FEED}:last_error".encode()].decode()
    assert await redis.exists(f"st:{{{ECHO_TENANT}}}:{FEED}") == 0
    assert await redis.hlen(f"st:{{{ECHO_TENANT}}}:cursors") == 0
    assert expected in status
    # ... while the other tenant's went through.
    assert await redis.xlen(f"st:{{{OTHER}}}:{FEED}") == 8


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
