"""Resolving the configuration: the secrets it points at read (from files, the environment or
the file itself, refusing files others could read), TLS files checked, defaults applied per
tenant, giving the `Settings` the daemon runs on."""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import TypeVar

import msgspec

from syncd import catalogue, redact
from syncd.config.load import fail, load
from syncd.config.model import ENVIRONMENTS, Config, Secret, Settings, TenantSettings
from syncd.config.secretfiles import SecretFileError, read_secret_file

_T = TypeVar("_T")


def _read_secret(
    name: str,
    key: str,
    value: str | None,
    file: str | None,
    env: str | None,
    environ: Mapping[str, str],
    allow_insecure: bool = False,
) -> Secret:
    if value is not None:
        return Secret(value)
    if env is not None:
        if env not in environ:
            raise fail(name, key + "_env", f"environment variable {env} is not set")
        return Secret(environ[env])
    assert file is not None
    path = expand_path(file, environ)
    if path is None:
        raise fail(name, key + "_file", unset_problem(file, environ))
    try:
        return Secret(read_secret_file(path, allow_insecure=allow_insecure))
    except SecretFileError as exc:
        hint = "" if allow_insecure else " (allow_insecure_secret_files = true overrides)"
        what = str(exc) + (hint if "cannot read" not in str(exc) else "")
        raise fail(name, key + "_file", what) from None


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def expand_path(path: str, environ: Mapping[str, str]) -> str | None:
    """Expand $VAR / ${VAR} (e.g. ${CREDENTIALS_DIRECTORY} under systemd); None if unset."""
    missing = False

    def sub(m: re.Match[str]) -> str:
        nonlocal missing
        var = m.group(1) or m.group(2)
        if var not in environ:
            missing = True
            return ""
        return environ[var]

    out = _VAR.sub(sub, path)
    return None if missing else out


# systemd sets it in a service that has credentials (LoadCredential= lines), never elsewhere.
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
CREDENTIALS_HINT = (
    "systemd sets it only inside a service with LoadCredential= lines; run syncd as the unit "
    "does, e.g. with systemd-run and the unit's DynamicUser=, User= and LoadCredential= "
    "properties"
)


def unset_variables(path: str, environ: Mapping[str, str]) -> list[str]:
    """The variables `path` names ($VAR, ${VAR}) that `environ` does not set, in order."""
    names = [m.group(1) or m.group(2) for m in _VAR.finditer(path)]
    return [v for i, v in enumerate(names) if v not in environ and v not in names[:i]]


def unset_problem(path: str, environ: Mapping[str, str], *, hint: bool = True) -> str:
    """What is wrong with a path naming unset variables: which ones, and (`hint`) for systemd's
    credentials directory, who sets it."""
    names = unset_variables(path, environ)
    what = "unset variables:" if len(names) > 1 else "an unset variable,"
    text = f"{path!r} names {what} {', '.join(names)}"
    return f"{text}: {CREDENTIALS_HINT}" if hint and CREDENTIALS_VARIABLE in names else text


def resolve(
    cfg: Config, environ: Mapping[str, str] | None = None, *, api_secrets: bool = True
) -> Settings:
    """Read secrets and compute each tenant's effective settings.

    `api_secrets=False` leaves ServiceTitan's (the app key, the tenants' client secrets) unread
    and empty, for a process that never calls the API (`syncd mirror`): it need not hold them.
    """
    env = os.environ if environ is None else environ
    name, st, d = cfg.path or "<config>", cfg.servicetitan, cfg.defaults
    default_auth, default_api = ENVIRONMENTS[st.environment]
    insecure = cfg.allow_insecure_secret_files
    app_key = Secret("")
    if api_secrets:
        app_key = _read_secret(
            name, "servicetitan.app_key", st.app_key, st.app_key_file, st.app_key_env, env, insecure
        )
    tenants = []
    all_feeds = catalogue.default_feeds()
    for i, t in enumerate(cfg.tenants):
        secret = Secret("")
        if api_secrets:
            secret = _read_secret(
                name,
                f"tenants[{i}].client_secret",
                t.client_secret,
                t.client_secret_file,
                t.client_secret_env,
                env,
                insecure,
            )
        start = t.start if t.start is not None else d.start
        feeds = t.feeds if t.feeds is not None else d.feeds
        tenants.append(
            TenantSettings(
                id=t.id,
                name=t.name,
                client_id=t.client_id,
                client_secret=secret,
                requests_per_second=_pick(t.requests_per_second, d.requests_per_second),
                max_in_flight=_pick(t.max_in_flight, d.max_in_flight),
                poll_interval=_pick(t.poll_interval, d.poll_interval),
                include_recent_changes=_pick(t.include_recent_changes, d.include_recent_changes),
                start=None if start == "beginning" else start,
                feeds=tuple(dict.fromkeys(feeds)) if feeds is not None else all_feeds,
            )
        )
    ops_token = None
    if cfg.ops.token_file is not None:
        ops_token = _read_secret(name, "ops.token", None, cfg.ops.token_file, None, env, insecure)
    cfg = _resolve_tls(cfg, name, env)
    r = cfg.redis
    sentinel_password = None
    if (r.sentinel_password, r.sentinel_password_file, r.sentinel_password_env) != (None,) * 3:
        sentinel_password = _read_secret(
            name,
            "redis.sentinel_password",
            r.sentinel_password,
            r.sentinel_password_file,
            r.sentinel_password_env,
            env,
            insecure,
        )
    mirror_password = None
    m = cfg.mirror
    if m is not None and (m.password_file, m.password_env) != (None, None):
        mirror_password = _read_secret(
            name, "mirror.password", None, m.password_file, m.password_env, env, insecure
        )
    settings = Settings(
        config=cfg,
        ops_token=ops_token,
        auth_url=(st.auth_url or default_auth),
        api_url=(st.api_url or default_api).rstrip("/"),
        app_key=app_key,
        tenants=tuple(tenants),
        sentinel_password=sentinel_password,
        mirror_password=mirror_password,
    )
    register_secrets(settings)
    return settings


def register_secrets(settings: Settings) -> None:
    """Make every secret of `settings` known to `syncd.redact` as soon as it is read: masked in
    every log line and error, and refused in a page (whichever tenant's page it is, and
    whether or not this instance polls its tenant)."""
    redact.register("app_key", settings.app_key.reveal())
    for t in settings.tenants:
        redact.register(("client_secret", t.id), t.client_secret.reveal())
    for slot, secret in (
        ("ops_token", settings.ops_token),
        ("sentinel_password", settings.sentinel_password),
        ("mirror_password", settings.mirror_password),
    ):
        redact.register(slot, None if secret is None else secret.reveal())
    mirror = settings.config.mirror
    for slot, url in (
        ("redis_password", settings.config.redis.url),
        ("mirror_url_password", mirror.url if mirror is not None else ""),
    ):
        try:
            password = urllib.parse.urlsplit(url).password
        except ValueError:
            password = None
        redact.register(slot, urllib.parse.unquote(password) if password else None)


def _resolve_tls(cfg: Config, name: str, env: Mapping[str, str]) -> Config:
    """Expand ${VAR} in the TLS file paths and check that the files load."""
    rc = cfg.redis
    paths: dict[str, str | None] = {}
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(rc, key)
        if value is not None:
            value = expand_path(value, env)
            if value is None:
                raise fail(name, f"redis.{key}", unset_problem(getattr(rc, key), env))
        paths[key] = value
    if paths["tls_key_file"] is not None and not cfg.allow_insecure_secret_files:
        try:
            read_secret_file(paths["tls_key_file"])
        except SecretFileError as exc:
            what = f"{exc} (allow_insecure_secret_files = true overrides)"
            raise fail(name, "redis.tls_key_file", what) from None
    import ssl

    context = ssl.create_default_context()
    try:
        if paths["tls_ca_file"] is not None:
            key = "tls_ca_file"
            context.load_verify_locations(cafile=paths["tls_ca_file"])
        if paths["tls_cert_file"] is not None:
            key = "tls_cert_file"
            context.load_cert_chain(paths["tls_cert_file"], paths["tls_key_file"])
    except (OSError, ssl.SSLError) as exc:
        raise fail(name, f"redis.{key}", f"cannot load: {exc.strerror or exc}") from None
    return msgspec.structs.replace(cfg, redis=msgspec.structs.replace(rc, **paths))


def _pick(own: _T | None, default: _T) -> _T:
    return default if own is None else own


def load_settings(
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
    *,
    api_secrets: bool = True,
) -> Settings:
    """load() then resolve(): the one call the daemon and the commands use."""
    return resolve(load(path), environ, api_secrets=api_secrets)
