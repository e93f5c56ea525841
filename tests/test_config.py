"""Configuration: valid files load, bad ones fail with FILE: key: what, exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import msgspec
import pytest

from syncd import catalogue, config, redact

GOOD = """
[servicetitan]
app_key = "k"
api_url = "http://127.0.0.1:1"
auth_url = "http://127.0.0.1:1/connect/token"

[defaults]
requests_per_second = 10

[feeds."crm.customers"]
change_detection = false

[[tenants]]
id = 1001
client_id = "client-1001"
client_secret = "secret-1001"
feeds = ["crm.customers", "jpm.jobs"]

[[tenants]]
id = 1002
client_id = "client-1002"
client_secret_file = "SECRET_FILE"
max_in_flight = 2
start = "2024-01-01"
"""


MIRROR = """
[mirror]
url = "postgresql://u@127.0.0.1:5432/db"
"""


def write(tmp_path: Path, text: str, secret: str = "secret-1002\n") -> Path:
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    secret_file.chmod(0o600)
    path = tmp_path / "syncd.toml"
    path.write_text(text.replace("SECRET_FILE", str(secret_file)))
    return path


def test_good_config_resolves(tmp_path: Path) -> None:
    s = config.load_settings(write(tmp_path, GOOD), environ={})
    t1, t2 = s.tenants
    assert t1.feeds == ("crm.customers", "jpm.jobs")
    assert t1.requests_per_second == 10
    assert t2.max_in_flight == 2
    assert t2.client_secret.reveal() == "secret-1002"
    assert t2.feeds == catalogue.default_feeds()
    assert "sales.estimates/export" not in t2.feeds  # a legacy path of sales.estimates
    assert t1.start is None
    assert t2.start == "2024-01-01"
    assert s.feed_options("crm.customers").change_detection is False
    assert s.feed_options("jpm.jobs").change_detection is True
    assert s.api_url == "http://127.0.0.1:1"
    assert "secret-1002" not in repr(t2)
    assert "secret-1002" not in repr(s)


def test_mirror_section(tmp_path: Path) -> None:
    text = GOOD + MIRROR.replace("u@", "u:db%2Fpass@") + "tenants = [1002]\n"
    s = config.load_settings(write(tmp_path, text), environ={})
    m = s.config.mirror
    assert m is not None
    assert (m.schema, m.group, m.tenants, m.feeds, m.batch) == (
        "syncd",
        "syncd-mirror",
        [1002],
        None,
        1000,
    )
    assert "db%2Fpass" not in repr(m)
    assert "db/pass" not in redact.redact("connection to postgres failed: db/pass")
    assert s.mirror_password is None
    secret = tmp_path / "pg"
    secret.write_text("from-a-file\n")
    secret.chmod(0o600)
    s = config.load_settings(
        write(tmp_path, GOOD + MIRROR + f"password_file = '{secret}'\n"), environ={}
    )
    assert s.mirror_password is not None
    assert s.mirror_password.reveal() == "from-a-file"
    assert config.load_settings(write(tmp_path, GOOD), environ={}).config.mirror is None


def test_the_mirror_reads_no_api_secrets(tmp_path: Path) -> None:
    # Its unit holds the database's credential only: the API's are not read, nor needed.
    text = GOOD.replace('app_key = "k"', 'app_key_file = "${CREDENTIALS_DIRECTORY}/app_key"')
    path = write(tmp_path, text.replace("SECRET_FILE", "/nonexistent/secret") + MIRROR)
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    with pytest.raises(config.ConfigError, match="app_key_file: cannot read"):
        config.load_settings(path, environ=env)
    s = config.load_settings(path, environ=env, api_secrets=False)
    assert s.app_key.reveal() == ""
    assert [t.client_secret.reveal() for t in s.tenants] == ["", ""]
    assert s.tenants[0].feeds == ("crm.customers", "jpm.jobs")


def test_environment_picks_urls(tmp_path: Path) -> None:
    text = GOOD.replace('api_url = "http://127.0.0.1:1"\n', "").replace(
        'app_key = "k"', 'app_key_env = "ST_KEY"\nenvironment = "integration"'
    )
    s = config.load_settings(write(tmp_path, text), environ={"ST_KEY": "from-env"})
    assert s.api_url == "https://api-integration.servicetitan.io"
    assert s.app_key.reveal() == "from-env"


def test_credentials_directory_expansion(tmp_path: Path) -> None:
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "app_key").write_text("cred-key\n")
    (tmp_path / "creds" / "app_key").chmod(0o600)
    text = GOOD.replace('app_key = "k"', 'app_key_file = "${CREDENTIALS_DIRECTORY}/app_key"')
    s = config.load_settings(
        write(tmp_path, text), environ={"CREDENTIALS_DIRECTORY": str(tmp_path / "creds")}
    )
    assert s.app_key.reveal() == "cred-key"


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("id = 1001\n", ""), "tenants[0].id: missing required key"),
        (lambda t: t.replace("id = 1001", 'id = "x"'), "tenants[0].id: Expected `int`, got `str`"),
        (
            lambda t: t.replace('"jpm.jobs"', '"jpm.job"'),
            "tenants[0].feeds[1]: unknown feed 'jpm.job'",
        ),
        (
            lambda t: t.replace("max_in_flight = 2", "max_inflight = 2"),
            "tenants[1].max_inflight: unknown key",
        ),
        (lambda t: t.replace('app_key = "k"', ""), "servicetitan.app_key: missing"),
        (
            lambda t: t.replace("requests_per_second = 10", "requests_per_second = 100"),
            "defaults.requests_per_second: must be > 0 and <= 60",
        ),
        (
            lambda t: t.replace('start = "2024-01-01"', 'start = "yesterday"'),
            "tenants[1].start: expected 'beginning' or a date",
        ),
        (
            lambda t: t.replace('[feeds."crm.customers"]', '[feeds."crm.nope"]'),
            "feeds.crm.nope: unknown feed",
        ),
        (
            lambda t: t + "\n[[tenants]]\nid = 1001\nclient_id = 'a'\nclient_secret = 'b'\n",
            "tenants[2].id: tenant 1001 is configured twice",
        ),
        (lambda t: t.replace("[defaults]", "[defaults\n"), "not valid TOML"),
        (lambda t: t.replace('"crm.customers", "jpm.jobs"', ""), "tenants[0].feeds: empty"),
        (
            lambda t: t + '[feeds."jpm.jobs"]\npoll_interval = 0\n',
            "feeds.jpm.jobs.poll_interval: must be > 0",
        ),
        (lambda t: t + "[engine]\njitter = 1.5\n", "engine.jitter: must be a share in [0, 1)"),
        (lambda t: t + "[redis]\ntimeout = 0\n", "redis.timeout: must be > 0"),
        (
            lambda t: t.replace("[servicetitan]\n", "[servicetitan]\ntoken_timeout = 0\n"),
            "servicetitan.token_timeout: must be > 0",
        ),
        (lambda t: t + '[ops]\nlisten = "h:99999"\n', "ops.listen:"),
        (lambda t: t + "[streams]\nmax_memory = 2\n", "streams.max_memory: must be a share"),
        (lambda t: t + "[mirror]\nschema = 'x'\n", "mirror.url: missing required key"),
        (lambda t: t + MIRROR.replace("postgresql:", "mysql:"), "mirror.url: expected a postgres"),
        (
            lambda t: t + MIRROR.replace("u@", "u:pw#1@"),
            "mirror.url: has an '@' after its host: a '/', '?' or '#' in the user name or "
            "password must be percent-encoded (%2F, %3F, %23) (in postgresql://***@127.0.0.1",
        ),
        (
            lambda t: t + MIRROR.replace("u@", "u:pw@") + "password_env = 'PW'\n",
            "mirror.password: more than one given",
        ),
        (lambda t: t + MIRROR + "schema = 'Mirror'\n", "mirror.schema: expected a lower-case"),
        (lambda t: t + MIRROR + "schema = 'pg_x'\n", "mirror.schema: expected a lower-case"),
        (lambda t: t + MIRROR + "group = 'a b'\n", "mirror.group: not a usable group name"),
        (lambda t: t + MIRROR + "batch = 0\n", "mirror.batch: must be > 0"),
        (lambda t: t + MIRROR + "batch = 20000\n", "mirror.batch: must be at most 10000"),
        (lambda t: t + MIRROR + "workers = 0\n", "mirror.workers: must be 1 to 16, got 0"),
        (lambda t: t + MIRROR + "workers = 17\n", "mirror.workers: must be 1 to 16, got 17"),
        (lambda t: t + MIRROR + "tenants = [1003]\n", "mirror.tenants[0]: tenant 1003 is not"),
        (lambda t: t + MIRROR + "tenants = []\n", "mirror.tenants: empty"),
        (
            lambda t: t + MIRROR + "[redis]\ncluster = true\n",
            "mirror.tenants: with redis.cluster = true a mirror reads one tenant",
        ),
        (lambda t: t + MIRROR + "feeds = ['jpm.jbs']\n", "mirror.feeds[0]: unknown feed"),
        (
            lambda t: t + MIRROR + "tenants = [1001]\nfeeds = ['crm.leads']\n",
            "mirror.feeds[0]: 'crm.leads' is synced for no mirrored tenant",
        ),
        (
            lambda t: t + MIRROR + "password_file = '/nonexistent/pw'\n",
            "mirror.password_file: cannot read /nonexistent/pw",
        ),
    ],
)
def test_bad_config_names_key(tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, edit(GOOD))
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(path, environ={})
    assert str(err.value).startswith(f"{path}: ")
    assert message in str(err.value)


def test_unreadable_secret_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("SECRET_FILE", str(tmp_path / "missing")))
    with pytest.raises(config.ConfigError, match=r"tenants\[1\]\.client_secret_file: cannot read"):
        config.load_settings(path, environ={})


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "syncd", *args], capture_output=True, text=True, timeout=60
    )


def test_check_config_command(tmp_path: Path) -> None:
    ok = run_cli("check-config", str(write(tmp_path, GOOD)))
    assert ok.returncode == 0, ok.stderr
    assert "ok (2 tenants, 56 feeds)" in ok.stdout
    bad = write(tmp_path, GOOD.replace('"jpm.jobs"', '"jpm.jbs"'))
    res = run_cli("check-config", str(bad))
    assert res.returncode == 2
    assert f"{bad}: tenants[0].feeds[1]: unknown feed 'jpm.jbs'" in res.stderr


def test_run_with_bad_config_exits_2(tmp_path: Path) -> None:
    res = run_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert res.returncode == 2
    assert "nope.toml: cannot read" in res.stderr
    secret = write(tmp_path, GOOD.replace("SECRET_FILE", "/nonexistent/secret"))
    res = run_cli("run", "--config", str(secret), "--once")
    assert res.returncode == 2
    assert "tenants[1].client_secret_file: cannot read /nonexistent/secret" in res.stderr


def test_example_config_is_valid() -> None:
    root = Path(__file__).parent.parent
    cfg = config.load(root / "config" / "example.toml")
    assert cfg.tenants


def _float_settings(
    t: msgspec.inspect.Type, path: tuple[str, ...] = (), default: object = None
) -> list[tuple[tuple[str, ...], float]]:
    """Every float setting in the configuration schema: its path, e.g. ("feeds", "*",
    "max_age"), and a valid finite value for it (its default where it has one)."""
    mi = msgspec.inspect
    if isinstance(t, mi.FloatType):
        return [(path, default if isinstance(default, float) else 0.5)]
    if isinstance(t, mi.UnionType):
        return [p for member in t.types for p in _float_settings(member, path, default)]
    if isinstance(t, mi.StructType):
        return [p for f in t.fields for p in _float_settings(f.type, (*path, f.name), f.default)]
    if isinstance(t, mi.ListType):
        return _float_settings(t.item_type, (*path, "[]"))
    if isinstance(t, mi.DictType):
        return _float_settings(t.value_type, (*path, "*"))
    assert not isinstance(t, mi.CollectionType | mi.DictType), f"unhandled schema at {path}"
    return []


FLOAT_SETTINGS = dict(_float_settings(msgspec.inspect.type_info(config.Config)))


def _toml(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)  # int, float: nan, inf and -inf are TOML literals


def _with_float(path: tuple[str, ...], literal: float) -> tuple[str, str]:
    """A configuration whose setting at `path` is `literal`, and that setting's key path."""
    tenant: dict[str, object] = {"id": 1001, "client_id": "c", "client_secret": "s"}
    sections: dict[str, dict[str, object]] = {
        "servicetitan": {"app_key": "k", "api_url": "http://127.0.0.1:1"}
    }
    tables: list[str] = []
    match path:
        case ("tenants", "[]", field):
            tenant[field] = literal
            key = f"tenants[0].{field}"
        case ("feeds", "*", field):
            tables.append(f'[feeds."jpm.jobs"]\n{field} = {_toml(literal)}\n')
            key = f"feeds.jpm.jobs.{field}"
        case ("mirror", field):
            sections["mirror"] = {"url": "postgresql://127.0.0.1/db", field: literal}
            key = f"mirror.{field}"
        case (section, field):
            sections.setdefault(section, {})[field] = literal
            key = f"{section}.{field}"
        case _:
            raise AssertionError(f"a float setting the test cannot place yet: {path}")
    text = "".join(
        f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in body.items())
        for name, body in sections.items()
    )
    text += "".join(tables)
    text += "[[tenants]]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in tenant.items())
    return text, key


def test_every_float_setting_is_found() -> None:
    # The schema walk sees the settings added over time, nested ones included.
    for path in [
        ("servicetitan", "request_timeout"),
        ("defaults", "requests_per_second"),
        ("feeds", "*", "max_age"),
        ("feeds", "*", "poll_interval"),
        ("streams", "max_memory"),
        ("engine", "jitter"),
        ("tenants", "[]", "poll_interval"),
        ("mirror", "claim_idle"),
    ]:
        assert path in FLOAT_SETTINGS
    assert len(FLOAT_SETTINGS) >= 16


@pytest.mark.parametrize("literal", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", FLOAT_SETTINGS, ids=".".join)
def test_float_settings_reject_nan_and_infinity(
    tmp_path: Path, path: tuple[str, ...], literal: str
) -> None:
    text, key = _with_float(path, float(literal))
    file = tmp_path / "syncd.toml"
    file.write_text(text)
    assert f" = {literal}\n" in text  # written as TOML's own literal
    # The same file with a finite value loads: the error below is about the value alone.
    config.parse(tomllib.loads(_with_float(path, FLOAT_SETTINGS[path])[0]), str(file))
    with pytest.raises(config.ConfigError) as err:
        config.load(file)
    assert str(err.value) == f"{file}: {key}: must be a finite number, got {float(literal)}"


def test_check_config_and_run_refuse_nan(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("requests_per_second = 10", "requests_per_second = nan"))
    for args in (("check-config", str(path)), ("run", "--once", "--config", str(path))):
        res = run_cli(*args)
        assert res.returncode == 2, res.stderr
        assert f"{path}: defaults.requests_per_second: must be a finite number" in res.stderr
    feed = write(tmp_path, GOOD.replace("change_detection = false", "max_age = inf"))
    res = run_cli("check-config", str(feed))
    assert res.returncode == 2
    assert f"{feed}: feeds.crm.customers.max_age: must be a finite number, got inf" in res.stderr
