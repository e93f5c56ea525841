"""Loading the configuration: the TOML file parsed and checked into a `Config`, pure (no
connections, no secret reads). Every error names the file, the key path and what is wrong:
`syncd.toml: tenants[1].feeds[0]: unknown feed 'crm.customer'`."""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tomllib
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from syncd import catalogue, redact
from syncd.config.addresses import check_listen, parse_sentinel
from syncd.config.model import (
    MAX_SHUTDOWN_GRACE_S,
    Config,
    ConfigError,
    MirrorConfig,
    RedisConfig,
    TenantConfig,
    TenantDefaults,
)
from syncd.config.urls import check_postgres_url, check_url, redact_url

_AT_PATH = re.compile(r"\s*-\s*at `\$(?P<path>[^`]*)`$")
# A PostgreSQL name the mirror uses unquoted: lower case, at most 63 bytes, not pg_ (reserved).
_SQL_NAME = re.compile(r"(?!pg_)[a-z_][a-z0-9_]{0,62}")


def _key_path(message: str) -> tuple[str, str]:
    """Split msgspec's "Expected `int`, got `str` - at `$.tenants[0].id`" into path and text."""
    m = _AT_PATH.search(message)
    if not m:
        return "", message
    path = m.group("path").lstrip(".")
    return path, message[: m.start()]


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a configuration file; ConfigError on any problem."""
    name = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: not valid TOML: {exc}") from None
    return parse(data, name)


def parse(data: Mapping[str, Any], name: str = "<config>") -> Config:
    """Validate an already-parsed TOML document."""
    try:
        cfg = msgspec.convert(dict(data), Config, strict=True)
    except msgspec.ValidationError as exc:
        key, text = _key_path(str(exc))
        m = re.fullmatch(r"Object (missing required|contains unknown) field `(.+)`", text)
        if m:
            key = f"{key}.{m.group(2)}" if key else m.group(2)
            text = "missing required key" if m.group(1) == "missing required" else "unknown key"
        raise ConfigError(f"{name}: {key or '(top level)'}: {text}") from None
    _check(cfg, name)
    return msgspec.structs.replace(cfg, path=name)


def fail(name: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{name}: {key}: {what}")


def _check_feeds(name: str, key: str, feeds: list[str] | None) -> None:
    if feeds is not None and not feeds:
        raise fail(name, key, "empty: list at least one feed, or leave the key out for all")
    known = catalogue.feeds()
    for i, feed in enumerate(feeds or ()):
        if feed not in known:
            raise fail(name, f"{key}[{i}]", f"unknown feed {feed!r} (see `syncd feeds`)")


def check_start(name: str, key: str, start: str | None) -> None:
    if start is None or start == "beginning":
        return
    try:
        dt.date.fromisoformat(start[:10])
        if len(start) > 10:
            dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
    except ValueError:
        what = f"expected 'beginning' or a date like 2024-01-01, got {start!r}"
        raise fail(name, key, what) from None


def _check_secret_source(name: str, key: str, obj: Any, field: str) -> None:
    given = [s for s in ("", "_file", "_env") if getattr(obj, field + s) is not None]
    if len(given) != 1:
        options = f"{field}, {field}_file or {field}_env"
        what = "missing" if not given else "more than one given"
        raise fail(name, key + field, f"{what}: set exactly one of {options}")


def check_finite(value: Any, name: str, key: str = "") -> None:
    """Reject NaN and infinities in every float of a parsed configuration, wherever it is.

    TOML has `nan` and `inf` literals, and every range check below passes NaN (each comparison
    with it is false); an infinite interval or timeout would wait forever. This walks the values
    rather than a list of settings, so a float added later is covered too.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise fail(name, key, f"must be a finite number, got {value}")
    elif isinstance(value, msgspec.Struct):
        for field in value.__struct_fields__:
            check_finite(getattr(value, field), name, f"{key}.{field}" if key else field)
    elif isinstance(value, list | tuple):
        for i, item in enumerate(value):
            check_finite(item, name, f"{key}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            check_finite(item, name, f"{key}.{k}" if key else str(k))


def _check(cfg: Config, name: str) -> None:
    check_finite(cfg, name)
    st = cfg.servicetitan
    _check_secret_source(name, "servicetitan.", st, "app_key")
    for field in ("auth_url", "api_url"):
        value = getattr(st, field)
        if value is not None and not value.startswith(("http://", "https://")):
            # Shown as redacted: a mistyped URL may still carry a password.
            shown = redact.redact(value)
            raise fail(name, f"servicetitan.{field}", f"expected an http(s) URL, got {shown!r}")
    _check_redis(cfg.redis, name)
    if not cfg.redis.key_prefix or "{" in cfg.redis.key_prefix:
        raise fail(name, "redis.key_prefix", "must be non-empty and without '{'")
    _check_ha(cfg, name)
    _check_numbers(cfg, name)
    sc = cfg.streams
    if sc.max_len < 0 or sc.max_age < 0 or sc.max_lag < 0:
        raise fail(name, "streams", "max_len, max_age and max_lag must be >= 0")
    if sc.resume_lag is not None and not 0 <= sc.resume_lag < max(sc.max_lag, 1):
        raise fail(name, "streams.resume_lag", "must be >= 0 and below streams.max_lag")
    if sc.consumer_idle < 0:
        raise fail(name, "streams.consumer_idle", "must be >= 0 seconds (0: never remove)")
    if not 0 < sc.max_memory <= 1:
        raise fail(name, "streams.max_memory", "must be a share of maxmemory in (0, 1]")
    if sc.check_interval <= 0:
        raise fail(name, "streams.check_interval", "must be > 0 seconds")
    for i, g in enumerate(sc.groups):
        if not g or any(c.isspace() for c in g):
            raise fail(name, f"streams.groups[{i}]", f"not a usable group name: {g!r}")
    if cfg.engine.workers < 1:
        raise fail(name, "engine.workers", "must be at least 1")
    for feed in cfg.feeds:
        if feed not in catalogue.feeds():
            raise fail(name, f"feeds.{feed}", f"unknown feed {feed!r}")
    _check_feeds(name, "defaults.feeds", cfg.defaults.feeds)
    check_start(name, "defaults.start", cfg.defaults.start)
    _check_limits(name, "defaults", cfg.defaults)
    if not cfg.tenants:
        raise fail(name, "tenants", "no tenants configured: add at least one [[tenants]]")
    seen: set[int] = set()
    for i, t in enumerate(cfg.tenants):
        key = f"tenants[{i}]"
        if t.id <= 0:
            raise fail(name, f"{key}.id", f"expected a positive tenant id, got {t.id}")
        if t.id in seen:
            raise fail(name, f"{key}.id", f"tenant {t.id} is configured twice")
        seen.add(t.id)
        if not t.client_id.strip():
            raise fail(name, f"{key}.client_id", "empty")
        _check_secret_source(name, f"{key}.", t, "client_secret")
        _check_feeds(name, f"{key}.feeds", t.feeds)
        check_start(name, f"{key}.start", t.start)
        _check_limits(name, key, t)
    if cfg.ops.listen is not None:
        try:
            check_listen(cfg.ops.listen)
        except ValueError as exc:
            raise fail(name, "ops.listen", str(exc)) from None
    if cfg.mirror is not None:
        _check_mirror(cfg, cfg.mirror, name)


def _check_mirror(cfg: Config, m: MirrorConfig, name: str) -> None:
    """The [mirror] section: where PostgreSQL is, and which of the configured streams."""
    problem = check_postgres_url(m.url)
    if problem is not None:
        raise fail(name, "mirror.url", f"{problem} (in {redact_url(m.url)})")
    given = [k for k in ("password_file", "password_env") if getattr(m, k) is not None]
    try:
        in_url = urllib.parse.urlsplit(m.url).password is not None
    except ValueError:
        in_url = False
    if len(given) + in_url > 1:
        raise fail(name, "mirror.password", "more than one given: the URL's, password_file or _env")
    if not _SQL_NAME.fullmatch(m.schema):
        raise fail(
            name,
            "mirror.schema",
            f"expected a lower-case name of letters, digits and _ (at most 63, not pg_...), "
            f"got {m.schema!r}",
        )
    if not m.group or any(c.isspace() for c in m.group):
        raise fail(name, "mirror.group", f"not a usable group name: {m.group!r}")
    positive = {"batch": m.batch, "claim_idle": m.claim_idle}
    positive |= {"max_deliveries": m.max_deliveries, "connect_timeout": m.connect_timeout}
    for key, value in positive.items():
        if value <= 0:
            raise fail(name, f"mirror.{key}", f"must be > 0, got {value}")
    if m.batch > 10_000:
        raise fail(name, "mirror.batch", f"must be at most 10000 events, got {m.batch}")
    if not 1 <= m.workers <= 16:
        raise fail(name, "mirror.workers", f"must be 1 to 16, got {m.workers}")
    if m.listen is not None:
        try:
            check_listen(m.listen)
        except ValueError as exc:
            raise fail(name, "mirror.listen", str(exc)) from None
        if m.listen == cfg.ops.listen:
            raise fail(name, "mirror.listen", "the same address as ops.listen: the daemon's")
    configured = {t.id: t for t in cfg.tenants}
    if m.tenants is not None and not m.tenants:
        raise fail(name, "mirror.tenants", "empty: list at least one, or leave the key out for all")
    for i, tenant in enumerate(m.tenants or ()):
        if tenant not in configured:
            raise fail(name, f"mirror.tenants[{i}]", f"tenant {tenant} is not configured")
        if tenant in (m.tenants or [])[:i]:
            raise fail(name, f"mirror.tenants[{i}]", f"tenant {tenant} is listed twice")
    _check_feeds(name, "mirror.feeds", m.feeds)
    tenants = [configured[t] for t in m.tenants] if m.tenants is not None else cfg.tenants
    if cfg.redis.cluster and len(tenants) > 1:
        raise fail(
            name,
            "mirror.tenants",
            "with redis.cluster = true a mirror reads one tenant (its streams share a slot): "
            "list one, and run a mirror per tenant",
        )
    synced: set[str] = set()
    for t in tenants:
        feeds = t.feeds if t.feeds is not None else cfg.defaults.feeds
        synced.update(catalogue.default_feeds() if feeds is None else feeds)
    for i, feed in enumerate(m.feeds or ()):
        if feed not in synced:
            raise fail(name, f"mirror.feeds[{i}]", f"{feed!r} is synced for no mirrored tenant")


def _check_ha(cfg: Config, name: str) -> None:
    """Sentinel, WAIT and the fleet's lease."""
    r = cfg.redis
    if r.sentinels:
        for i, entry in enumerate(r.sentinels):
            try:
                parse_sentinel(entry)
            except ValueError as exc:
                raise fail(name, f"redis.sentinels[{i}]", str(exc)) from None
        if r.cluster:
            raise fail(name, "redis.sentinels", "a Redis Cluster fails over by itself: use one")
        if r.url.startswith("unix://"):
            raise fail(name, "redis.url", "with sentinels, a redis:// or rediss:// URL")
        if not r.sentinel_service.strip():
            raise fail(name, "redis.sentinel_service", "empty")
    given = [s for s in ("", "_file", "_env") if getattr(r, "sentinel_password" + s) is not None]
    if len(given) > 1:
        raise fail(
            name,
            "redis.sentinel_password",
            "more than one given: set at most one of sentinel_password, _file or _env",
        )
    if r.wait_replicas < 0:
        raise fail(name, "redis.wait_replicas", f"must be >= 0, got {r.wait_replicas}")
    if r.wait_replicas and r.cluster:
        raise fail(name, "redis.wait_replicas", "not supported with cluster = true")
    if r.wait_timeout <= 0:
        raise fail(name, "redis.wait_timeout", f"must be > 0 seconds, got {r.wait_timeout}")
    if cfg.fleet.lease < 1:
        raise fail(name, "fleet.lease", f"must be at least 1 second, got {cfg.fleet.lease}")


def _check_numbers(cfg: Config, name: str) -> None:
    """Ranges of the numeric settings: a zero timeout or a negative backoff would spin."""
    positive = {
        "redis.timeout": cfg.redis.timeout,
        "servicetitan.request_timeout": cfg.servicetitan.request_timeout,
        "servicetitan.connect_timeout": cfg.servicetitan.connect_timeout,
        "servicetitan.token_timeout": cfg.servicetitan.token_timeout,
        "servicetitan.max_connections": cfg.servicetitan.max_connections,
        "engine.backoff_base": cfg.engine.backoff_base,
        "engine.once_max_failures": cfg.engine.once_max_failures,
    }
    for key, value in positive.items():
        if value <= 0:
            raise fail(name, key, f"must be > 0, got {value}")
    e = cfg.engine
    if e.backoff_max < e.backoff_base:
        raise fail(name, "engine.backoff_max", "must be at least engine.backoff_base")
    if not 0 <= e.jitter < 1:
        raise fail(name, "engine.jitter", f"must be a share in [0, 1), got {e.jitter}")
    if not 0 <= e.shutdown_grace <= MAX_SHUTDOWN_GRACE_S:
        raise fail(
            name,
            "engine.shutdown_grace",
            f"must be 0..{MAX_SHUTDOWN_GRACE_S:g} seconds, got {e.shutdown_grace:g} (it must end "
            "before the unit's TimeoutStopSec=45 sends SIGKILL)",
        )
    o = cfg.ops
    for key in ("header_timeout", "idle_timeout", "readiness_interval", "max_connections"):
        if getattr(o, key) <= 0:
            raise fail(name, f"ops.{key}", f"must be > 0, got {getattr(o, key)}")
    if cfg.defaults.reconcile_interval < 0:
        raise fail(name, "defaults.reconcile_interval", "must be >= 0 seconds (0: no passes)")
    for feed, opts in cfg.feeds.items():
        if opts.poll_interval is not None and opts.poll_interval <= 0:
            raise fail(name, f"feeds.{feed}.poll_interval", "must be > 0 seconds")
        if opts.reconcile_interval is not None and opts.reconcile_interval < 0:
            raise fail(
                name, f"feeds.{feed}.reconcile_interval", "must be >= 0 seconds (0: no passes)"
            )
        for key in ("max_len", "max_age"):
            value = getattr(opts, key)
            if value is not None and value < 0:
                raise fail(name, f"feeds.{feed}.{key}", "must be >= 0 (0: no limit)")


def _check_redis(rc: RedisConfig, name: str) -> None:
    problem = check_url(rc.url)
    if problem is not None:
        raise fail(name, "redis.url", f"{problem} (in {redact_url(rc.url)})")
    tls = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(rc, k)]
    if tls and not rc.url.startswith("rediss://"):
        raise fail(name, f"redis.{tls[0]}", "needs a rediss:// URL")
    if (rc.tls_cert_file is None) != (rc.tls_key_file is None):
        raise fail(name, "redis.tls_cert_file", "set tls_cert_file and tls_key_file together")


def _check_limits(name: str, key: str, obj: TenantDefaults | TenantConfig) -> None:
    if obj.requests_per_second is not None and not 0 < obj.requests_per_second <= 60:
        raise fail(
            name, f"{key}.requests_per_second", "must be > 0 and <= 60 (ServiceTitan's limit)"
        )
    if obj.max_in_flight is not None and obj.max_in_flight < 1:
        raise fail(name, f"{key}.max_in_flight", "must be at least 1")
    if obj.poll_interval is not None and obj.poll_interval <= 0:
        raise fail(name, f"{key}.poll_interval", "must be > 0 seconds")
