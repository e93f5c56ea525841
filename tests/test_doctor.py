"""`syncd doctor`: the verdicts by tables, then whole runs against a real Redis and the simulator
in each state an operator may meet (healthy, Redis down, evicting, unpersisted, a Redis user
missing a permission, credentials refused, a secret file others can read, an API clock off)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bench.common import to_toml
from syncd import config
from syncd.cli import doctor
from syncd.cli.doctor import Line
from syncd.cli.doctor_facts import (
    AclFacts,
    ClockSample,
    Outcome,
    RedisFacts,
    SecretFile,
    TenantFacts,
    command_name,
    inline_secrets,
    outcome_of,
    secret_files,
)
from syncd.errors import (
    AuthFailed,
    BadRequest,
    FeedUnavailable,
    RateLimited,
    SyncError,
    TransientError,
)
from syncd.redis.checks import NodeSettings
from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import RunningSimulator, run_simulator
from tests.engine_helpers import config_dict
from tests.test_redis_acl import PASSWORD as ACL_PASSWORD
from tests.test_redis_acl import USER as ACL_USER
from tests.test_redis_acl import readme_acl_line

TENANTS = [5101, 5102]
FEEDS = ["crm.customers", "crm.locations"]


# -- verdicts -------------------------------------------------------------------------------


def where(status: str, lines: list[Line], check: str) -> Line:
    found = [ln for ln in lines if ln.check == check]
    assert len(found) == 1, (check, lines)
    assert found[0].status == status, found[0]
    return found[0]


HEALTHY_NODE = NodeSettings("n1", policy="noeviction", appendonly="yes", save="")
HEALTHY_ACL = AclFacts("probe", 16)


@pytest.mark.parametrize(
    ("facts", "allow", "expected"),
    [
        (
            RedisFacts("redis://h:6379/0", version="7.2.4", nodes=(HEALTHY_NODE,), acl=HEALTHY_ACL),
            False,
            {"redis": "ok", "redis eviction": "ok", "redis persistence": "ok"},
        ),
        (
            RedisFacts("redis://h:6379/0", error="ConnectionError: refused"),
            False,
            {"redis": "fail"},
        ),
        (RedisFacts("r", version="6.2.14", nodes=(HEALTHY_NODE,)), False, {"redis": "fail"}),
        (
            RedisFacts("r", version_error="NOPERM info", nodes=(HEALTHY_NODE,)),
            False,
            {"redis": "warn"},
        ),
        (
            RedisFacts(
                "r", version="7.0.15", nodes=(NodeSettings("n1", "allkeys-lru", "yes", ""),)
            ),
            False,
            {"redis eviction": "fail", "redis persistence": "ok"},
        ),
        (
            RedisFacts(
                "r", version="7.0.15", nodes=(NodeSettings("n1", "allkeys-lru", "yes", ""),)
            ),
            True,
            {"redis eviction": "warn"},
        ),
        (
            RedisFacts(
                "r", version="7.0.15", nodes=(NodeSettings("n1", "volatile-lru", "no", ""),)
            ),
            False,
            {"redis eviction": "ok", "redis persistence": "warn"},
        ),
        (
            RedisFacts("r", version="7.0.15", nodes=(NodeSettings("n1", error="NOPERM config"),)),
            False,
            {"redis eviction": "warn", "redis persistence": "warn"},
        ),
        (
            RedisFacts(
                "r",
                version="7.0.15",
                nodes=(HEALTHY_NODE,),
                acl=AclFacts("ACL DRYRUN", 16, (("XADD", "no permissions to run 'xadd'"),)),
            ),
            False,
            {"redis permissions": "fail"},
        ),
    ],
)
def test_redis_verdicts(facts: RedisFacts, allow: bool, expected: dict[str, str]) -> None:
    lines = doctor.judge_redis(facts, allow_eviction=allow, prefix="st")
    got = {ln.check: ln.status for ln in lines}
    assert {k: got.get(k) for k in expected} == expected
    for ln in lines:
        assert (ln.status == "ok") == (ln.action == ""), ln
    if facts.error is not None:
        assert len(lines) == 1  # nothing else is known about a Redis that does not answer


def test_acl_verdict_names_the_missing_commands() -> None:
    denied = AclFacts("probe", 16, (("XADD", "NOPERM xadd"), ("XGROUP CREATE", "NOPERM x")))
    line = doctor.judge_acl(denied, "st")
    assert line.status == "fail"
    assert "may not run XADD, XGROUP CREATE on keys under st:*" in line.detail
    assert "NOPERM xadd" in line.detail
    ok = doctor.judge_acl(AclFacts("ACL DRYRUN", 16), "app")
    assert (ok.status, ok.detail) == (
        "ok",
        "the user may run the 16 commands syncd needs on keys under app:* (asked with ACL DRYRUN)",
    )


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (("HSET", "k", "f", "v"), "HSET"),
        (("XGROUP", "CREATE", "s", "g", "$"), "XGROUP CREATE"),
        (("script", "exists", "0"), "SCRIPT EXISTS"),
        (("PING",), "PING"),
    ],
)
def test_command_names(command: tuple[str, ...], name: str) -> None:
    assert command_name(command) == name


OK = Outcome("ok")


@pytest.mark.parametrize(
    ("facts", "expected"),
    [
        (TenantFacts(1, "tenants[0]", "f", OK, OK, 3), [("token", "ok"), ("export", "ok")]),
        (TenantFacts(1, "tenants[0]", "f", Outcome("refused", "400")), [("token", "fail")]),
        (TenantFacts(1, "tenants[0]", "f", Outcome("rate_limited", "3 s")), [("token", "warn")]),
        (TenantFacts(1, "tenants[0]", "f", Outcome("transient", "down")), [("token", "fail")]),
        (
            TenantFacts(1, "tenants[0]", "f", OK, Outcome("unavailable", "HTTP 403: scope")),
            [("token", "ok"), ("export", "fail")],
        ),
        (
            TenantFacts(1, "tenants[0]", "f", OK, Outcome("rate_limited", "wait")),
            [("token", "ok"), ("export", "warn")],
        ),
        (
            TenantFacts(1, "tenants[0]", "f", OK, Outcome("refused", "401")),
            [("token", "ok"), ("export", "fail")],
        ),
    ],
)  # fmt: skip
def test_tenant_verdicts(facts: TenantFacts, expected: list[tuple[str, str]]) -> None:
    lines = doctor.judge_tenant(facts)
    assert [(ln.check, ln.status) for ln in lines] == expected
    assert all(ln.tenant == 1 for ln in lines)
    if facts.token.kind == "refused":
        assert "tenants[0].client_id" in lines[0].action
        assert "export not tried" in lines[0].detail


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (AuthFailed("token endpoint answered 400: invalid_client"), "refused"),
        (RateLimited(3.0), "rate_limited"),
        (FeedUnavailable(403, "no scope"), "unavailable"),
        (BadRequest("from: bad"), "bad_request"),
        (TransientError("HTTP 503"), "transient"),
    ],
)
def test_outcomes(exc: SyncError, kind: str) -> None:
    assert outcome_of(exc).kind == kind


def sample(offset: float, rtt: float = 0.0) -> ClockSample:
    """A Date header stamped `offset` seconds off, mid-way through a request of `rtt` seconds."""
    sent = 1_700_000_000.25
    server = int(sent + rtt / 2 + offset)  # HTTP dates are whole seconds
    return ClockSample(1, float(server), sent, sent + rtt)


@pytest.mark.parametrize(
    ("samples", "status"),
    [
        ([], "warn"),
        ([sample(0.0)], "ok"),
        ([sample(4.0)], "ok"),
        ([sample(-4.0)], "ok"),
        ([sample(8.0)], "warn"),
        ([sample(-8.0)], "warn"),
        ([sample(0.0), sample(-90.0)], "fail"),
        ([sample(3600.0)], "fail"),
        # A slow round trip leaves the offset uncertain: no warning it cannot back.
        ([sample(6.0, rtt=4.0)], "ok"),
    ],
)
def test_clock_verdicts(samples: list[ClockSample], status: str) -> None:
    line = doctor.judge_clock(samples)
    assert line.status == status, line
    if status != "ok":
        assert line.action
    if status in ("warn", "fail") and samples:
        assert "Retry-After" in line.detail


def test_clock_offset_bounds_the_truth() -> None:
    for true_offset in (-61.3, -5.0, 0.0, 0.4, 0.99, 7.5):
        for rtt in (0.0, 0.3, 2.0):
            offset, margin = doctor.clock_offset(sample(true_offset, rtt))
            assert abs(offset - true_offset) <= margin + 1e-9


@pytest.mark.parametrize(
    ("statuses", "usable", "code"),
    [
        ([], True, 0),
        (["ok", "warn"], True, 0),
        (["ok", "fail", "warn"], True, 1),
        (["fail"], False, 2),
    ],
)
def test_exit_codes(statuses: list[Any], usable: bool, code: int) -> None:
    lines = [Line("c", s, "d") for s in statuses]
    assert doctor.exit_code(lines, config_usable=usable) == code


def test_secret_file_verdicts() -> None:
    assert doctor.judge_secret_file(SecretFile("k", "/p", None)).status == "ok"
    bad = doctor.judge_secret_file(SecretFile("tenants[1].client_secret_file", "/p", "mode 0644"))
    assert (bad.status, bad.detail) == ("fail", "tenants[1].client_secret_file: mode 0644")
    assert "chmod 0600 /p" in bad.action
    assert doctor.judge_inline_secrets("c.toml", [], "mode 0644") is None
    inline = doctor.judge_inline_secrets("c.toml", ["servicetitan.app_key"], "is accessible; x")
    assert inline is not None
    assert inline.status == "warn"
    assert "servicetitan.app_key" in inline.detail
    assert "chmod 0600 c.toml" in inline.action


def test_table_folds_healthy_tenants_and_json_keeps_each() -> None:
    lines = [
        Line("configuration", "ok", "c.toml: 3 tenants, 3 feeds"),
        Line("token", "ok", "granted", tenant=1),
        Line("token", "fail", "credentials refused", "check tenants[1]", tenant=2),
        Line("token", "ok", "granted", tenant=3),
        Line("clock", "warn", "off", "use NTP"),
    ]
    table = doctor.render_table(lines, 1)
    assert table.splitlines() == [
        "ok    configuration       c.toml: 3 tenants, 3 feeds",
        "ok    token               granted for 2 tenants (1, 3)",
        "fail  token 2             credentials refused",
        "                          -> check tenants[1]",
        "warn  clock               off",
        "                          -> use NTP",
        "1 failed, 1 warning, 3 ok: exit 1",
    ]
    body = json.loads(doctor.render_json(lines, 1))
    assert body["exit"] == 1
    assert body["summary"] == {"ok": 3, "warn": 1, "fail": 1}
    assert [c.get("tenant") for c in body["checks"]] == [None, 1, 2, 3, None]
    assert body["checks"][2]["action"] == "check tenants[1]"


# -- whole runs against a real Redis and the simulator ---------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    """A Redis of its own (its settings are changed here): AOF on, nothing evicted."""
    s = RedisServer(extra_args=["--appendonly", "yes"])
    s.start()
    yield s
    s.stop()


@pytest.fixture
async def admin(server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    """The unrestricted user on that Redis, emptied and set back to healthy settings."""
    client = aioredis.Redis.from_url(server.url)
    await client.flushall()
    await client.config_set("maxmemory-policy", "noeviction")
    await client.config_set("appendonly", "yes")
    yield client
    await client.execute_command("ACL", "DELUSER", ACL_USER)
    await client.aclose()


@pytest.fixture
async def sim() -> AsyncIterator[RunningSimulator]:
    async with run_simulator(tenants=TENANTS, records=30, page_size=10) as running:
        yield running


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(data))
    path.chmod(0o600)  # it holds the app key and client secrets inline
    return path


def healthy(redis_url: str, sim: RunningSimulator) -> dict[str, Any]:
    return config_dict(redis_url, sim.url, sim.app_key, TENANTS, FEEDS)


def stats(sim: RunningSimulator) -> dict[int, dict[str, Any]]:
    body = sim.state.stats_json()
    return {int(t): s for t, s in body["tenants"].items()}


async def run_cli(*args: str) -> tuple[int, str, str]:
    """`python -m syncd doctor ARGS` in a child process: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "syncd", *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def statuses(lines: list[Line]) -> dict[str, str]:
    """check (with its tenant) -> status."""
    return {(f"{ln.check} {ln.tenant}" if ln.tenant else ln.check): ln.status for ln in lines}


async def test_healthy_installation(
    tmp_path: Path, server: RedisServer, admin: aioredis.Redis, sim: RunningSimulator
) -> None:
    path = write_config(tmp_path, healthy(server.url, sim))
    code, out, err = await run_cli("doctor", "--config", str(path))
    assert code == 0, out + err
    assert "0 failed, 0 warnings" in out, out
    assert "ok    token               granted for 2 tenants (5101, 5102)" in out
    assert sim.app_key not in out + err
    assert "secret-5101" not in out + err

    lines, code = await doctor.diagnose(str(path))
    assert code == 0
    assert statuses(lines) == {
        "configuration": "ok",
        "secret file": "ok",  # the configuration holds secrets inline, and only its owner reads it
        "redis": "ok",
        "redis eviction": "ok",
        "redis persistence": "ok",
        "redis permissions": "ok",
        "token 5101": "ok",
        "export 5101": "ok",
        "token 5102": "ok",
        "export 5102": "ok",
        "clock": "ok",
    }
    # Two runs: exactly two token grants and two export requests per tenant, each of the
    # first configured feed; nothing else spent, nothing written to Redis.
    for tenant, s in stats(sim).items():
        assert (s["token_grants"], s["requests"], s["rate_limited"]) == (2, 2, 0), tenant
        assert s["feeds"] == {FEEDS[0]: 2}, tenant
    assert await admin.dbsize() == 0


async def test_json_output(
    tmp_path: Path, server: RedisServer, admin: aioredis.Redis, sim: RunningSimulator
) -> None:
    await admin.config_set("appendonly", "no")
    await admin.config_set("save", "")
    path = write_config(tmp_path, healthy(server.url, sim))
    code, out, _ = await run_cli("doctor", "--config", str(path), "--json")
    assert code == 0  # a warning is no failure
    body = json.loads(out)
    assert body["exit"] == 0
    assert body["summary"]["fail"] == 0
    persistence = [c for c in body["checks"] if c["check"] == "redis persistence"]
    assert persistence[0]["status"] == "warn"
    assert "appendonly" in persistence[0]["action"]
    assert {c.get("tenant") for c in body["checks"] if c["check"] == "export"} == set(TENANTS)


async def test_redis_unreachable(tmp_path: Path, sim: RunningSimulator) -> None:
    data = healthy(f"redis://syncd:redis-pw-3319@127.0.0.1:{free_port()}/0", sim)
    path = write_config(tmp_path, data)
    code, out, err = await run_cli("doctor", "--config", str(path))
    assert code == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("fail  redis "))
    assert "cannot use Redis at redis://syncd:***@127.0.0.1:" in line
    assert "redis-pw-3319" not in out + err
    # The API checks still ran.
    assert "ok    export              answered for 2 tenants" in out


async def test_evicting_redis_fails_unless_allowed(
    tmp_path: Path, server: RedisServer, admin: aioredis.Redis, sim: RunningSimulator
) -> None:
    await admin.config_set("maxmemory-policy", "allkeys-lru")
    data = healthy(server.url, sim)
    lines, code = await doctor.diagnose(str(write_config(tmp_path, data)))
    assert code == 1
    line = where("fail", lines, "redis eviction")
    assert "allkeys-lru" in line.detail
    assert "allow_eviction" in line.action

    data["redis"]["allow_eviction"] = True
    lines, code = await doctor.diagnose(str(write_config(tmp_path, data)))
    assert code == 0
    where("warn", lines, "redis eviction")


async def test_unpersisted_redis_warns(
    tmp_path: Path, server: RedisServer, admin: aioredis.Redis, sim: RunningSimulator
) -> None:
    await admin.config_set("appendonly", "no")
    await admin.config_set("save", "")
    lines, code = await doctor.diagnose(str(write_config(tmp_path, healthy(server.url, sim))))
    assert code == 0
    line = where("warn", lines, "redis persistence")
    assert "no AOF and no RDB save points" in line.detail
    await admin.config_set("save", "3600 1")
    lines, _ = await doctor.diagnose(str(write_config(tmp_path, healthy(server.url, sim))))
    where("ok", lines, "redis persistence")


@pytest.mark.parametrize("may_dryrun", [False, True])
async def test_redis_user_missing_a_permission(
    tmp_path: Path,
    server: RedisServer,
    admin: aioredis.Redis,
    sim: RunningSimulator,
    may_dryrun: bool,
) -> None:
    # The README's ACL user, less one command syncd needs.
    await admin.execute_command(*readme_acl_line())
    await admin.execute_command("ACL", "SETUSER", ACL_USER, "-xadd")
    if may_dryrun:
        await admin.execute_command("ACL", "SETUSER", ACL_USER, "+acl|whoami", "+acl|dryrun")
    url = f"redis://{ACL_USER}:{ACL_PASSWORD}@127.0.0.1:{server.port}/0"
    path = write_config(tmp_path, healthy(url, sim))
    lines, code = await doctor.diagnose(str(path))
    assert code == 1
    line = where("fail", lines, "redis permissions")
    assert "may not run XADD on keys under st:*" in line.detail
    assert "'xadd'" in line.detail  # Redis' own refusal, naming the command
    assert ("ACL DRYRUN" in line.detail) == may_dryrun
    assert "ACL SETUSER" in line.action
    # The README's user may not CONFIG GET: those two checks are left to the operator.
    where("warn", lines, "redis eviction")
    assert await admin.dbsize() == 0
    text = doctor.render_table(lines, code)
    assert ACL_PASSWORD not in text
    assert f"redis://{ACL_USER}:***@" in text

    # The README's line as written passes.
    await admin.execute_command("ACL", "SETUSER", ACL_USER, "+xadd")
    lines, code = await doctor.diagnose(str(path))
    where("ok", lines, "redis permissions")
    assert code == 0
    assert await admin.dbsize() == 0


async def test_bad_client_secret_for_one_tenant(
    tmp_path: Path, server: RedisServer, admin: aioredis.Redis, sim: RunningSimulator
) -> None:
    data = healthy(server.url, sim)
    data["tenants"][1]["client_secret"] = "not-the-secret-4471"
    code, out, err = await run_cli("doctor", "--config", str(write_config(tmp_path, data)))
    assert code == 1
    assert "fail  token 5102          credentials refused: " in out, out
    assert "invalid_client" in out
    assert "-> check tenants[1].client_id and its client secret" in out
    assert "ok    token               granted for 1 tenant (5101)" in out
    assert "not-the-secret-4471" not in out + err
    counted = stats(sim)
    assert (counted[5101]["token_grants"], counted[5101]["requests"]) == (1, 1)
    assert (counted[5102]["token_grants"], counted[5102]["requests"]) == (0, 0)


async def test_world_readable_and_escaping_secret_files(
    tmp_path: Path, server: RedisServer, admin: aioredis.Redis, sim: RunningSimulator
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    readable = secrets / "5101"
    readable.write_text("secret-5101\n")
    readable.chmod(0o644)
    outside = tmp_path / "elsewhere"
    outside.write_text("secret-5102\n")
    outside.chmod(0o600)
    (secrets / "5102").symlink_to(outside)
    data = healthy(server.url, sim)
    for t, name in zip(data["tenants"], ("5101", "5102"), strict=True):
        del t["client_secret"]
        t["client_secret_file"] = str(secrets / name)
    config = write_config(tmp_path, data)
    lines, code = await doctor.diagnose(str(config))
    # syncd refuses such files: the configuration is invalid, as check-config says ...
    assert code == 2
    check_code, _, check_err = await run_cli("check-config", str(config))
    assert check_code == 2
    line = where("fail", lines, "configuration")
    assert line.detail == check_err.strip().removeprefix("syncd: ")
    files = [ln for ln in lines if ln.check == "secret file"]
    assert [ln.status for ln in files] == ["fail", "fail", "ok"]
    assert files[0].detail.startswith("tenants[0].client_secret_file: ")
    assert "mode 0644" in files[0].detail
    assert "outside its own directory" in files[1].detail
    assert "servicetitan.app_key inline" in files[2].detail
    # ... but the secrets were still read, so every other check ran.
    assert statuses(lines)["token 5101"] == statuses(lines)["token 5102"] == "ok"
    assert statuses(lines)["redis permissions"] == "ok"

    readable.chmod(0o600)
    (secrets / "5102").unlink()
    (secrets / "5102").write_text("secret-5102\n")
    (secrets / "5102").chmod(0o600)
    config.chmod(0o644)  # holds the app key inline: a warning (syncd does not refuse it)
    lines, code = await doctor.diagnose(str(config))
    assert code == 0
    assert [ln.status for ln in lines if ln.check == "secret file"] == ["ok", "ok", "warn"]


@pytest.mark.parametrize(("offset", "status", "code"), [(-12.0, "warn", 0), (120.0, "fail", 1)])
async def test_api_clock_off(
    tmp_path: Path,
    server: RedisServer,
    admin: aioredis.Redis,
    offset: float,
    status: str,
    code: int,
) -> None:
    async with run_simulator(tenants=TENANTS, records=5, quirks={"date_offset": offset}) as sim:
        path = write_config(tmp_path, healthy(server.url, sim))
        lines, got = await doctor.diagnose(str(path))
    assert got == code
    line = where(status, lines, "clock")
    expected = "ahead of" if offset > 0 else "behind"
    assert float(line.detail.split()[4]) == pytest.approx(abs(offset), abs=1.5)
    assert expected in line.detail
    assert "Retry-After" in line.detail
    assert "NTP" in line.action


async def test_invalid_configuration_exits_2_with_check_configs_text(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text('[redis]\nurl = "redis://127.0.0.1:1/0"\n[[tenants]]\nid = "x"\n')
    code, out, _ = await run_cli("doctor", "--config", str(path))
    check_code, _, check_err = await run_cli("check-config", str(path))
    assert (code, check_code) == (2, 2)
    said = check_err.strip().removeprefix("syncd: ")
    assert said
    assert f"fail  configuration       {said}" in out
    assert out.rstrip().endswith("exit 2")

    code, out, _ = await run_cli("doctor", "--config", str(tmp_path / "missing.toml"), "--json")
    assert code == 2
    body = json.loads(out)
    assert body["checks"][0]["status"] == "fail"
    assert "cannot read" in body["checks"][0]["detail"]


async def test_unset_variable_in_a_secret_path_is_a_configuration_error(tmp_path: Path) -> None:
    data = config_dict("redis://127.0.0.1:1/0", "http://127.0.0.1:1", "k", [1], FEEDS)
    del data["tenants"][0]["client_secret"]
    data["tenants"][0]["client_secret_file"] = "${DOCTOR_TEST_UNSET}/secret"
    path = write_config(tmp_path, data)
    env = {k: v for k, v in os.environ.items() if k != "DOCTOR_TEST_UNSET"}
    lines, code = await doctor.diagnose(str(path), env)
    assert code == 2
    where("fail", lines, "configuration")
    assert "unset variable" in lines[0].detail


async def test_an_unset_credentials_directory_is_named_with_who_sets_it(tmp_path: Path) -> None:
    """Run by hand, outside the unit: the advice is how to get systemd's credentials directory,
    not a chmod of a path that does not exist."""
    data = config_dict("redis://127.0.0.1:1/0", "http://127.0.0.1:1", "k", [1], FEEDS)
    del data["servicetitan"]["app_key"]
    data["servicetitan"]["app_key_file"] = "${CREDENTIALS_DIRECTORY}/app_key"
    path = write_config(tmp_path, data)
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    lines, code = await doctor.diagnose(str(path), env)
    assert code == 2
    config_line = where("fail", lines, "configuration")
    assert "CREDENTIALS_DIRECTORY" in config_line.detail
    assert "LoadCredential=" in config_line.detail
    (line,) = [ln for ln in lines if ln.check == "secret file" and ln.status == "fail"]
    assert line.detail == (
        "servicetitan.app_key_file: '${CREDENTIALS_DIRECTORY}/app_key' names an unset variable,"
        " CREDENTIALS_DIRECTORY"
    )
    assert "chmod" not in line.action
    for words in ("systemd sets CREDENTIALS_DIRECTORY", "LoadCredential=", "systemd-run"):
        assert words in line.action, words
    # check-config says the same to whoever runs it by hand.
    command = [sys.executable, "-m", "syncd", "check-config", str(path)]
    res = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, env=env, check=False
    )
    assert res.returncode == 2
    assert "an unset variable, CREDENTIALS_DIRECTORY: systemd sets it only inside" in res.stderr


def test_every_secret_file_is_checked(tmp_path: Path) -> None:
    """The app key, client secrets, the ops token and the Redis TLS key: each a secret file."""
    files = {}
    for name in ("app_key", "client", "ops_token", "tls_key"):
        files[name] = tmp_path / name
        files[name].write_text(f"{name}-value\n")
        files[name].chmod(0o600)
    files["ops_token"].chmod(0o640)
    data = config_dict("rediss://127.0.0.1:1/0", "http://127.0.0.1:1", "unused", [7], FEEDS)
    del data["servicetitan"]["app_key"]
    data["servicetitan"]["app_key_file"] = "${DOCTOR_DIR}/app_key"
    del data["tenants"][0]["client_secret"]
    data["tenants"][0]["client_secret_file"] = str(files["client"])
    data["ops"] = {"token_file": str(files["ops_token"])}
    data["redis"]["tls_cert_file"] = str(tmp_path / "unused.crt")
    data["redis"]["tls_key_file"] = str(files["tls_key"])
    cfg = config.parse(data, "test.toml")
    found = secret_files(cfg, {"DOCTOR_DIR": str(tmp_path)})
    assert [(f.key, f.path, f.problem is None) for f in found] == [
        ("servicetitan.app_key_file", str(files["app_key"]), True),
        ("tenants[0].client_secret_file", str(files["client"]), True),
        ("redis.tls_key_file", str(files["tls_key"]), True),
        ("ops.token_file", str(files["ops_token"]), False),
    ]
    assert "mode 0640" in (found[3].problem or "")
    unset = secret_files(cfg, {})
    assert unset[0].problem == "'${DOCTOR_DIR}/app_key' names an unset variable, DOCTOR_DIR"
    assert unset[0].unset == ("DOCTOR_DIR",)
    line = doctor.judge_secret_file(unset[0])
    assert line.status == "fail"
    assert "DOCTOR_DIR" in line.action
    assert "chmod" not in line.action
    assert inline_secrets(cfg) == []
    data["redis"] = {"url": "redis://syncd:pw-in-the-file@127.0.0.1:1/0"}
    data["servicetitan"]["app_key"] = "inline-app-key"
    del data["servicetitan"]["app_key_file"]
    assert inline_secrets(config.parse(data, "test.toml")) == [
        "redis.url (its password)",
        "servicetitan.app_key",
    ]
