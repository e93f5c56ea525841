"""Configuration of the fleet, Redis Sentinel and WAIT: defaults, and errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from syncd import config

BASE = """
[servicetitan]
app_key = "k"

[[tenants]]
id = 1001
client_id = "client-1001"
client_secret = "secret-1001"
"""


def load(tmp_path: Path, extra: str, environ: dict[str, str] | None = None) -> config.Settings:
    path = tmp_path / "syncd.toml"
    path.write_text(extra + BASE)
    return config.load_settings(path, environ=environ or {})


def test_defaults_leave_everything_off(tmp_path: Path) -> None:
    s = load(tmp_path, "")
    assert s.config.fleet.enabled is False
    assert s.config.fleet.lease == 15.0
    assert s.config.redis.sentinels == []
    assert s.config.redis.sentinel_service == "mymaster"
    assert s.config.redis.wait_replicas == 0
    assert s.sentinel_password is None


def test_sentinel_and_fleet_settings(tmp_path: Path) -> None:
    s = load(
        tmp_path,
        '[redis]\nurl = "redis://:pw@ignored/2"\n'
        'sentinels = ["10.0.0.1:26379", "[::1]:26380"]\nsentinel_service = "prod"\n'
        'sentinel_password_env = "SENTINEL_PW"\nwait_replicas = 1\nwait_timeout = 2.5\n'
        "[fleet]\nenabled = true\nlease = 6\n",
        environ={"SENTINEL_PW": "s3cret"},
    )
    assert s.config.redis.sentinels == ["10.0.0.1:26379", "[::1]:26380"]
    assert s.sentinel_password is not None
    assert s.sentinel_password.reveal() == "s3cret"
    assert "s3cret" not in repr(s)
    inline = load(tmp_path, '[redis]\nsentinels = ["a:1"]\nsentinel_password = "inl1ne"\n')
    assert inline.sentinel_password is not None
    assert inline.sentinel_password.reveal() == "inl1ne"
    assert "inl1ne" not in repr(inline.config)
    assert s.config.redis.wait_replicas == 1
    assert s.config.fleet.enabled is True
    assert s.config.fleet.lease == 6


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            '[redis]\nsentinels = ["a:1", "b"]\n',
            "redis.sentinels[1]: expected 'host:port', got 'b'",
        ),
        (
            '[redis]\nsentinels = ["a:1"]\ncluster = true\n',
            "redis.sentinels: a Redis Cluster fails over by itself",
        ),
        (
            '[redis]\nsentinels = ["a:1"]\nurl = "unix:///run/redis.sock"\n',
            "redis.url: with sentinels, a redis:// or rediss:// URL",
        ),
        ('[redis]\nsentinels = ["a:1"]\nsentinel_service = " "\n', "redis.sentinel_service: empty"),
        (
            '[redis]\nsentinel_password = "x"\nsentinel_password_env = "Y"\n',
            "redis.sentinel_password: more than one given",
        ),
        ("[redis]\nwait_replicas = -1\n", "redis.wait_replicas: must be >= 0"),
        (
            "[redis]\nwait_replicas = 1\ncluster = true\n",
            "redis.wait_replicas: not supported with cluster = true",
        ),
        ("[redis]\nwait_timeout = 0\n", "redis.wait_timeout: must be > 0"),
        ("[fleet]\nlease = 0.5\n", "fleet.lease: must be at least 1 second"),
        ("[fleet]\nleases = 5\n", "fleet.leases: unknown key"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as err:
        load(tmp_path, extra)
    assert message in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "syncd.toml"))


def test_unset_sentinel_password_variable(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"redis\.sentinel_password_env: environment"):
        load(tmp_path, '[redis]\nsentinels = ["a:1"]\nsentinel_password_env = "NOPE"\n')
