"""Configuration that would crash at start is caught by check-config; secrets stay hidden.

Redis URLs are checked the way the client parses them; secret files must be private; every
settings object's repr hides secrets; `engine.shutdown_grace` fits in the units' stop timeout.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from bench.common import to_toml
from syncd import config
from syncd.config.secretfiles import check_mode

PASSWORD = "hunter2-redis-pass"


def base(**redis: Any) -> dict[str, Any]:
    return {
        "redis": {"url": "redis://127.0.0.1:6379/0", **redis},
        "servicetitan": {"app_key": "inline-app-key-xyz"},
        "tenants": [{"id": 7, "client_id": "cid", "client_secret": "inline-tenant-secret"}],
    }


def check_config(tmp_path: Path, data: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(data))
    return subprocess.run(
        [sys.executable, "-m", "syncd", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        (f"redis://user:{PASSWORD}@127.0.0.1:abc/0", "Port could not be cast"),
        (f"redis://:{PASSWORD}@127.0.0.1:99999/0", "Port out of range"),
        (f"redis://:{PASSWORD}@127.0.0.1:0/0", "port must be 1..65535"),
        # redis-py quotes the name with ' or ` depending on its version.
        (f"redis://:{PASSWORD}@127.0.0.1:6379/0?socket_timeout=abc", "Invalid value for"),
        (f"redis://:{PASSWORD}@127.0.0.1:6379/0?health_check_interval=x", "health_check_interval"),
        (f"rediss://:{PASSWORD}@127.0.0.1:6379/0?ssl_cert_reqs=bogus", "Certificate Requirements"),
        (f"http://:{PASSWORD}@127.0.0.1:6379/0", "expected a redis://"),
        (f"redis://:{PASSWORD}@127.0.0.1:6379/one", "database must be a number"),
        (f"redis://:{PASSWORD}@[::1:6379/0", "Invalid IPv6 URL"),
        ("unix://", "needs a socket path"),
    ],
)
def test_check_config_rejects_redis_urls_that_would_crash_at_start(
    tmp_path: Path, url: str, message: str
) -> None:
    res = check_config(tmp_path, base(url=url))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "syncd.toml: redis.url: " in res.stderr
    assert message in res.stderr
    assert PASSWORD not in res.stderr + res.stdout
    assert "Traceback" not in res.stderr


def test_daemon_refuses_the_same_url_with_exit_2(tmp_path: Path) -> None:
    path = tmp_path / "syncd.toml"
    path.write_text(to_toml(base(url=f"redis://:{PASSWORD}@127.0.0.1:6379/0?socket_timeout=abc")))
    res = subprocess.run(
        [sys.executable, "-m", "syncd", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 2
    assert "redis.url" in res.stderr
    assert "Traceback" not in res.stderr
    assert PASSWORD not in res.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"redis://127.0.0.1:6379/0?password={PASSWORD}&socket_timeout=abc",
        f"redis://127.0.0.1:abc/0?username=syncd&password={PASSWORD}",
        f"rediss://127.0.0.1:6379/0?ssl_cert_reqs=bogus&ssl_password={PASSWORD}",
    ],
)
def test_a_password_in_the_query_string_is_not_echoed(tmp_path: Path, url: str) -> None:
    # redis-py takes `?password=` as the password: it is as secret as one in the user info.
    res = check_config(tmp_path, base(url=url))
    assert res.returncode == 2, res.stdout + res.stderr
    assert "syncd.toml: redis.url: " in res.stderr
    assert PASSWORD not in res.stderr + res.stdout
    assert PASSWORD not in repr(config.RedisConfig(url=url))
    assert "password=***" in repr(config.RedisConfig(url=url))


def test_good_credentialed_url_passes_and_is_not_echoed(tmp_path: Path) -> None:
    res = check_config(tmp_path, base(url=f"rediss://syncd:{PASSWORD}@redis.example:6380/2"))
    assert res.returncode == 0, res.stderr
    assert PASSWORD not in res.stdout + res.stderr


@pytest.mark.parametrize(
    ("field", "url"),
    [
        ("auth_url", f"htps://client:{PASSWORD}@auth.example/connect/token"),
        ("api_url", f"api.example/?password={PASSWORD}"),
    ],
)
def test_a_mistyped_servicetitan_url_is_not_echoed_with_its_password(field: str, url: str) -> None:
    data = base()
    data["servicetitan"][field] = url
    with pytest.raises(config.ConfigError, match=f"servicetitan.{field}: expected an http") as info:
        config.parse(data, "t.toml")
    assert PASSWORD not in str(info.value)


@pytest.mark.parametrize(
    ("redis", "key", "message"),
    [
        ({"tls_ca_file": "/x"}, "redis.tls_ca_file", "needs a rediss:// URL"),
        (
            {"url": "rediss://h:6380/0", "tls_cert_file": "/x"},
            "redis.tls_cert_file",
            "together",
        ),
    ],
)
def test_tls_options_are_checked(redis: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=f"t.toml: {key}: .*{message}"):
        config.parse(base(**redis), "t.toml")


def test_missing_tls_files_are_named(tmp_path: Path) -> None:
    cfg = config.parse(
        base(url="rediss://h:6380/0", tls_ca_file=str(tmp_path / "no.pem")), "t.toml"
    )
    with pytest.raises(config.ConfigError, match=r"t.toml: redis.tls_ca_file: cannot load"):
        config.resolve(cfg, environ={})


@pytest.mark.parametrize("grace", [-1.0, config.MAX_SHUTDOWN_GRACE_S + 0.5, 600.0])
def test_shutdown_grace_must_fit_the_stop_timeout(grace: float) -> None:
    data = {**base(), "engine": {"shutdown_grace": grace}}
    with pytest.raises(config.ConfigError, match=r"engine.shutdown_grace: .*TimeoutStopSec"):
        config.parse(data, "t.toml")


def test_shutdown_grace_at_the_bound_is_accepted() -> None:
    data = {**base(), "engine": {"shutdown_grace": config.MAX_SHUTDOWN_GRACE_S}}
    assert config.parse(data, "t.toml").engine.shutdown_grace == config.MAX_SHUTDOWN_GRACE_S


# -- secret files ------------------------------------------------------------------------


def with_secret_file(path: Path, **extra: Any) -> dict[str, Any]:
    data = base()
    data["tenants"][0] = {"id": 7, "client_id": "cid", "client_secret_file": str(path)}
    data.update(extra)
    return data


def resolve(data: dict[str, Any]) -> config.Settings:
    return config.resolve(config.parse(data, "t.toml"), environ={})


def private(path: Path, text: str = "file-secret") -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_private_file_is_accepted(tmp_path: Path) -> None:
    settings = resolve(with_secret_file(private(tmp_path / "s")))
    assert settings.tenants[0].client_secret.reveal() == "file-secret"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = private(tmp_path / "s")
    path.chmod(mode)
    pattern = rf"t.toml: tenants\[0\].client_secret_file: {path} is accessible by group or others"
    with pytest.raises(config.ConfigError, match=pattern) as info:
        resolve(with_secret_file(path))
    assert "allow_insecure_secret_files" in str(info.value)
    assert "file-secret" not in str(info.value)
    # The override accepts it.
    settings = resolve(with_secret_file(path, allow_insecure_secret_files=True))
    assert settings.tenants[0].client_secret.reveal() == "file-secret"


def test_symlink_out_of_its_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "creds").mkdir()
    target = private(tmp_path / "elsewhere" / "s")
    link = tmp_path / "creds" / "s"
    link.symlink_to(target)
    with pytest.raises(
        config.ConfigError, match=r"client_secret_file: .* is a symlink to .*outside"
    ):
        resolve(with_secret_file(link))
    assert resolve(with_secret_file(link, allow_insecure_secret_files=True)).tenants


def test_symlink_within_its_directory_is_accepted(tmp_path: Path) -> None:
    # As in Kubernetes secret volumes: name -> ..data/name within the same directory.
    private(tmp_path / "real")
    (tmp_path / "s").symlink_to("real")
    assert resolve(with_secret_file(tmp_path / "s")).tenants[0].client_secret.reveal()


@pytest.mark.skipif(os.geteuid() != 0, reason="changing a file's owner needs root")
def test_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = private(tmp_path / "s")
    os.chown(path, 12345, 12345)
    with pytest.raises(config.ConfigError, match=r"client_secret_file: .*owned by uid 12345"):
        resolve(with_secret_file(path))


@pytest.mark.parametrize(
    ("mode", "uid", "me", "ok"),
    [
        (0o100600, 1000, 1000, True),
        (0o100400, 0, 1000, True),  # root's file, as systemd's credentials are for root
        (0o100600, 1001, 1000, False),
        (0o100644, 1000, 1000, False),
        (0o100620, 1000, 1000, False),
        (0o040700, 1000, 1000, False),  # a directory
    ],
)
def test_check_mode_table(mode: int, uid: int, me: int, ok: bool) -> None:
    st = os.stat_result((mode, 0, 0, 1, uid, 0, 0, 0, 0, 0))
    assert (check_mode(st, me) is None) is ok


def test_directory_and_empty_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="not a regular file"):
        resolve(with_secret_file(tmp_path))
    with pytest.raises(config.ConfigError, match="is empty"):
        resolve(with_secret_file(private(tmp_path / "e", "\n")))


@pytest.mark.parametrize("insecure", [False, True])
def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path, insecure: bool) -> None:
    fifo = tmp_path / "s"
    os.mkfifo(fifo, 0o600)
    errors: list[str] = []

    def read() -> None:
        try:
            resolve(with_secret_file(fifo, allow_insecure_secret_files=insecure))
        except config.ConfigError as exc:
            errors.append(str(exc))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(30)
    hung = reader.is_alive()
    if hung:
        with open(fifo, "w"):  # releases the reader blocked in open()
            pass
        reader.join(30)
    assert not hung, "opening a FIFO waited for a writer"
    assert errors
    assert "not a regular file" in errors[0]


# -- reprs ---------------------------------------------------------------------------------


def test_repr_of_every_settings_object_hides_secrets(tmp_path: Path) -> None:
    data = base(url=f"redis://syncd:{PASSWORD}@127.0.0.1:6379/0")
    data["ops"] = {"listen": "127.0.0.1:0", "token_file": str(private(tmp_path / "t", "ops-tok"))}
    settings = resolve(data)
    secrets = [PASSWORD, "inline-app-key-xyz", "inline-tenant-secret", "ops-tok"]
    objects: list[object] = [
        settings,
        settings.config,
        settings.config.redis,
        settings.config.servicetitan,
        settings.config.ops,
        *settings.config.tenants,
        *settings.tenants,
        settings.app_key,
        settings.ops_token,
    ]
    for obj in objects:
        for text in (repr(obj), str(obj), f"{obj!r}"):
            leaked = [s for s in secrets if s in text]
            assert not leaked, f"{type(obj).__name__} shows {leaked}"
    assert "syncd:***@127.0.0.1" in repr(settings.config.redis)
