"""Configuration: a TOML file validated into immutable typed structures.

Loading is two steps: `load()` parses and validates the file (pure: no connections, no secret
reads), `resolve()` reads the secrets it points at. Every error names the file, the key path and
what is wrong: `syncd.toml: tenants[1].feeds[0]: unknown feed 'crm.customer'`.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import msgspec

from syncd import catalogue, redact
from syncd.keys import DEFAULT_PREFIX
from syncd.redisurl import check_url, redact_url
from syncd.secretfiles import SecretFileError, read_secret_file

ENVIRONMENTS: dict[str, tuple[str, str]] = {
    "production": ("https://auth.servicetitan.io/connect/token", "https://api.servicetitan.io"),
    "integration": (
        "https://auth-integration.servicetitan.io/connect/token",
        "https://api-integration.servicetitan.io",
    ),
}


class ConfigError(Exception):
    """The configuration is invalid; the message names file, key and problem."""


class Secret:
    """A secret string that never shows itself in reprs, logs or tracebacks."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# The longest engine.shutdown_grace: the units' TimeoutStopSec (45 s) leaves 5 s after it for
# closing connections before systemd sends SIGKILL.
MAX_SHUTDOWN_GRACE_S = 40.0


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


def _masked_repr(
    obj: msgspec.Struct, secrets: tuple[str, ...] = (), urls: tuple[str, ...] = ()
) -> str:
    """A repr with inline secrets shown as '***' and URLs without their credentials."""
    parts = []
    for field in obj.__struct_fields__:
        value = getattr(obj, field)
        if field in secrets and value is not None:
            shown = "'***'"
        elif field in urls and isinstance(value, str):
            shown = repr(redact_url(value))
        else:
            shown = repr(value)
        parts.append(f"{field}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


class RedisConfig(_Base, frozen=True):
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = DEFAULT_PREFIX
    # Client-side socket timeout; a page's script must finish within it.
    timeout: float = 30.0
    cluster: bool = False  # the URL names one node of a Redis Cluster
    # Start even when Redis may evict keys (maxmemory-policy allkeys-*): cursors, fingerprints
    # or whole streams can vanish, which means duplicates or lost events.
    allow_eviction: bool = False
    # TLS (rediss://): a CA bundle to verify the server with, and a client certificate and key
    # for servers that require one (tls-auth-clients).
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # Redis Sentinel: "host:port" of each sentinel; the URL then gives the primary's
    # credentials, database and TLS, and the sentinels name the primary.
    sentinels: list[str] = msgspec.field(default_factory=list)
    sentinel_service: str = "mymaster"
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    sentinel_password_file: str | None = None
    sentinel_password_env: str | None = None
    sentinel_tls: bool = False
    # After each page, WAIT until this many replicas have it (0: do not wait).
    wait_replicas: int = 0
    wait_timeout: float = 5.0  # seconds one WAIT may take before the page is retried

    def __repr__(self) -> str:
        return _masked_repr(self, secrets=("sentinel_password",), urls=("url",))


class ServiceTitanConfig(_Base, frozen=True):
    environment: Literal["production", "integration"] = "production"
    auth_url: str | None = None
    api_url: str | None = None
    app_key: str | None = None
    app_key_file: str | None = None
    app_key_env: str | None = None
    # ServiceTitan gives up after 100 s; wait a little longer than that.
    request_timeout: float = 105.0
    connect_timeout: float = 10.0
    # The token endpoint answers in well under a second; one that hangs must not hold polls.
    token_timeout: float = 10.0
    max_connections: int = 256

    def __repr__(self) -> str:
        return _masked_repr(self, secrets=("app_key",))


class TenantDefaults(_Base, frozen=True):
    """Per-tenant settings; each tenant may override any of them."""

    requests_per_second: float = 20.0
    max_in_flight: int = 8
    poll_interval: float = 300.0
    include_recent_changes: bool = True
    start: str = "beginning"  # or a date: "2024-01-01"
    feeds: list[str] | None = None


class FeedOptions(_Base, frozen=True):
    change_detection: bool = True
    poll_interval: float | None = None
    max_len: int | None = None  # retention; overrides [streams]
    max_age: float | None = None


class StreamsConfig(_Base, frozen=True):
    """Consumer groups the daemon creates, retention and backpressure, for every stream."""

    groups: list[str] = msgspec.field(default_factory=list)
    max_len: int = 0  # keep at most this many entries (0: no limit), never unacknowledged ones
    max_age: float = 0.0  # seconds (0: no limit)
    max_lag: int = 0  # pause a feed while a configured group lags more (0: off)
    resume_lag: int | None = None  # resume a paused feed at this lag or less (None: max_lag / 2)
    max_memory: float = 0.9  # pause polling above this share of Redis maxmemory
    check_interval: float = 5.0  # seconds between retention/backpressure checks
    protect_unlisted: bool = True  # retention keeps unacknowledged events of unlisted groups too
    consumer_idle: float = 86400.0  # remove consumer names idle this long, nothing pending (0: off)

    def resume_mark(self) -> int:
        """The lag at or below which a feed paused by `max_lag` is polled again."""
        return self.max_lag // 2 if self.resume_lag is None else self.resume_lag


class TenantConfig(_Base, frozen=True):
    id: int
    client_id: str
    client_secret: str | None = None
    client_secret_file: str | None = None
    client_secret_env: str | None = None
    name: str | None = None
    requests_per_second: float | None = None
    max_in_flight: int | None = None
    poll_interval: float | None = None
    include_recent_changes: bool | None = None
    start: str | None = None
    feeds: list[str] | None = None

    def __repr__(self) -> str:
        return _masked_repr(self, secrets=("client_secret",))


class EngineConfig(_Base, frozen=True):
    workers: int = 64
    shutdown_grace: float = 30.0
    # Consecutive failures of one feed after which `--once` gives up on it.
    once_max_failures: int = 6
    backoff_base: float = 1.0
    backoff_max: float = 300.0
    jitter: float = 0.1


class LogConfig(_Base, frozen=True):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class FleetConfig(_Base, frozen=True):
    """Several instances on one Redis and key prefix dividing the tenants among them."""

    enabled: bool = False
    lease: float = 15.0  # seconds a tenant stays with an instance that stops renewing


class OpsConfig(_Base, frozen=True):
    listen: str | None = None  # "HOST:PORT" or "unix:/PATH"
    # A bearer token required on /metrics and /readyz (/healthz stays open for probes).
    token_file: str | None = None
    header_timeout: float = 10.0  # seconds for a client to send its request headers
    idle_timeout: float = 30.0  # seconds a kept-alive connection may wait for its next request
    max_connections: int = 256  # open connections held for long; see syncd.opshttp
    readiness_interval: float = 2.0  # seconds between background readiness checks
    # "tenant": series per tenant and per feed, never per tenant and feed (about 23,000 series at
    # 1,000 tenants x 55 feeds); "tenant_feed" adds every tenant x feed pair (about 300,000).
    metrics_detail: Literal["tenant", "tenant_feed"] = "tenant"


class Config(_Base, frozen=True):
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)
    servicetitan: ServiceTitanConfig = msgspec.field(default_factory=ServiceTitanConfig)
    defaults: TenantDefaults = msgspec.field(default_factory=TenantDefaults)
    feeds: dict[str, FeedOptions] = msgspec.field(default_factory=dict)
    streams: StreamsConfig = msgspec.field(default_factory=StreamsConfig)
    engine: EngineConfig = msgspec.field(default_factory=EngineConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    ops: OpsConfig = msgspec.field(default_factory=OpsConfig)
    fleet: FleetConfig = msgspec.field(default_factory=FleetConfig)
    tenants: list[TenantConfig] = msgspec.field(default_factory=list)
    # Accept secret files that group or others can read, owned by someone else, or reached
    # through a symlink out of their directory.
    allow_insecure_secret_files: bool = False
    path: str = ""  # set by load(); not a configuration key


@dataclass(frozen=True, slots=True)
class TenantSettings:
    """A tenant's effective settings: its own values over the defaults, secrets read."""

    id: int
    client_id: str
    client_secret: Secret
    requests_per_second: float
    max_in_flight: int
    poll_interval: float
    include_recent_changes: bool
    start: str | None  # None: from the beginning; else a date string for `from`
    feeds: tuple[str, ...]
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the daemon needs, resolved: URLs chosen, secrets read."""

    config: Config
    auth_url: str
    api_url: str
    app_key: Secret
    tenants: tuple[TenantSettings, ...]
    ops_token: Secret | None = None
    sentinel_password: Secret | None = None

    def feed_options(self, feed: str) -> FeedOptions:
        return self.config.feeds.get(feed) or _DEFAULT_FEED_OPTIONS

    def retention(self, feed: str) -> tuple[int, float]:
        """(max_len, max_age) of a feed's stream; zeros mean no limit."""
        own, st = self.feed_options(feed), self.config.streams
        return (
            st.max_len if own.max_len is None else own.max_len,
            st.max_age if own.max_age is None else own.max_age,
        )

    def poll_interval(self, tenant: TenantSettings, feed: str) -> float:
        own = self.feed_options(feed).poll_interval
        return own if own is not None else tenant.poll_interval


_DEFAULT_FEED_OPTIONS = FeedOptions()
_T = TypeVar("_T")
_AT_PATH = re.compile(r"\s*-\s*at `\$(?P<path>[^`]*)`$")


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


def _fail(name: str, key: str, what: str) -> ConfigError:
    return ConfigError(f"{name}: {key}: {what}")


def _check_feeds(name: str, key: str, feeds: list[str] | None) -> None:
    if feeds is not None and not feeds:
        raise _fail(name, key, "empty: list at least one feed, or leave the key out for all")
    known = catalogue.feeds()
    for i, feed in enumerate(feeds or ()):
        if feed not in known:
            raise _fail(name, f"{key}[{i}]", f"unknown feed {feed!r} (see `syncd feeds`)")


def check_start(name: str, key: str, start: str | None) -> None:
    if start is None or start == "beginning":
        return
    try:
        dt.date.fromisoformat(start[:10])
        if len(start) > 10:
            dt.datetime.fromisoformat(start.replace("Z", "+00:00"))
    except ValueError:
        what = f"expected 'beginning' or a date like 2024-01-01, got {start!r}"
        raise _fail(name, key, what) from None


def _check_secret_source(name: str, key: str, obj: Any, field: str) -> None:
    given = [s for s in ("", "_file", "_env") if getattr(obj, field + s) is not None]
    if len(given) != 1:
        options = f"{field}, {field}_file or {field}_env"
        what = "missing" if not given else "more than one given"
        raise _fail(name, key + field, f"{what}: set exactly one of {options}")


def check_finite(value: Any, name: str, key: str = "") -> None:
    """Reject NaN and infinities in every float of a parsed configuration, wherever it is.

    TOML has `nan` and `inf` literals, and every range check below passes NaN (each comparison
    with it is false); an infinite interval or timeout would wait forever. This walks the values
    rather than a list of settings, so a float added later is covered too.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _fail(name, key, f"must be a finite number, got {value}")
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
            raise _fail(name, f"servicetitan.{field}", f"expected an http(s) URL, got {shown!r}")
    _check_redis(cfg.redis, name)
    if not cfg.redis.key_prefix or "{" in cfg.redis.key_prefix:
        raise _fail(name, "redis.key_prefix", "must be non-empty and without '{'")
    _check_ha(cfg, name)
    _check_numbers(cfg, name)
    sc = cfg.streams
    if sc.max_len < 0 or sc.max_age < 0 or sc.max_lag < 0:
        raise _fail(name, "streams", "max_len, max_age and max_lag must be >= 0")
    if sc.resume_lag is not None and not 0 <= sc.resume_lag < max(sc.max_lag, 1):
        raise _fail(name, "streams.resume_lag", "must be >= 0 and below streams.max_lag")
    if sc.consumer_idle < 0:
        raise _fail(name, "streams.consumer_idle", "must be >= 0 seconds (0: never remove)")
    if not 0 < sc.max_memory <= 1:
        raise _fail(name, "streams.max_memory", "must be a share of maxmemory in (0, 1]")
    if sc.check_interval <= 0:
        raise _fail(name, "streams.check_interval", "must be > 0 seconds")
    for i, g in enumerate(sc.groups):
        if not g or any(c.isspace() for c in g):
            raise _fail(name, f"streams.groups[{i}]", f"not a usable group name: {g!r}")
    if cfg.engine.workers < 1:
        raise _fail(name, "engine.workers", "must be at least 1")
    for feed in cfg.feeds:
        if feed not in catalogue.feeds():
            raise _fail(name, f"feeds.{feed}", f"unknown feed {feed!r}")
    _check_feeds(name, "defaults.feeds", cfg.defaults.feeds)
    check_start(name, "defaults.start", cfg.defaults.start)
    _check_limits(name, "defaults", cfg.defaults)
    if not cfg.tenants:
        raise _fail(name, "tenants", "no tenants configured: add at least one [[tenants]]")
    seen: set[int] = set()
    for i, t in enumerate(cfg.tenants):
        key = f"tenants[{i}]"
        if t.id <= 0:
            raise _fail(name, f"{key}.id", f"expected a positive tenant id, got {t.id}")
        if t.id in seen:
            raise _fail(name, f"{key}.id", f"tenant {t.id} is configured twice")
        seen.add(t.id)
        if not t.client_id.strip():
            raise _fail(name, f"{key}.client_id", "empty")
        _check_secret_source(name, f"{key}.", t, "client_secret")
        _check_feeds(name, f"{key}.feeds", t.feeds)
        check_start(name, f"{key}.start", t.start)
        _check_limits(name, key, t)
    if cfg.ops.listen is not None:
        from syncd.ops import check_listen

        try:
            check_listen(cfg.ops.listen)
        except ValueError as exc:
            raise _fail(name, "ops.listen", str(exc)) from None


def _check_ha(cfg: Config, name: str) -> None:
    """Sentinel, WAIT and the fleet's lease."""
    r = cfg.redis
    if r.sentinels:
        from syncd.sentinel import parse_sentinel

        for i, entry in enumerate(r.sentinels):
            try:
                parse_sentinel(entry)
            except ValueError as exc:
                raise _fail(name, f"redis.sentinels[{i}]", str(exc)) from None
        if r.cluster:
            raise _fail(name, "redis.sentinels", "a Redis Cluster fails over by itself: use one")
        if r.url.startswith("unix://"):
            raise _fail(name, "redis.url", "with sentinels, a redis:// or rediss:// URL")
        if not r.sentinel_service.strip():
            raise _fail(name, "redis.sentinel_service", "empty")
    given = [s for s in ("", "_file", "_env") if getattr(r, "sentinel_password" + s) is not None]
    if len(given) > 1:
        raise _fail(
            name,
            "redis.sentinel_password",
            "more than one given: set at most one of sentinel_password, _file or _env",
        )
    if r.wait_replicas < 0:
        raise _fail(name, "redis.wait_replicas", f"must be >= 0, got {r.wait_replicas}")
    if r.wait_replicas and r.cluster:
        raise _fail(name, "redis.wait_replicas", "not supported with cluster = true")
    if r.wait_timeout <= 0:
        raise _fail(name, "redis.wait_timeout", f"must be > 0 seconds, got {r.wait_timeout}")
    if cfg.fleet.lease < 1:
        raise _fail(name, "fleet.lease", f"must be at least 1 second, got {cfg.fleet.lease}")


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
            raise _fail(name, key, f"must be > 0, got {value}")
    e = cfg.engine
    if e.backoff_max < e.backoff_base:
        raise _fail(name, "engine.backoff_max", "must be at least engine.backoff_base")
    if not 0 <= e.jitter < 1:
        raise _fail(name, "engine.jitter", f"must be a share in [0, 1), got {e.jitter}")
    if not 0 <= e.shutdown_grace <= MAX_SHUTDOWN_GRACE_S:
        raise _fail(
            name,
            "engine.shutdown_grace",
            f"must be 0..{MAX_SHUTDOWN_GRACE_S:g} seconds, got {e.shutdown_grace:g} (it must end "
            "before the unit's TimeoutStopSec=45 sends SIGKILL)",
        )
    o = cfg.ops
    for key in ("header_timeout", "idle_timeout", "readiness_interval", "max_connections"):
        if getattr(o, key) <= 0:
            raise _fail(name, f"ops.{key}", f"must be > 0, got {getattr(o, key)}")
    for feed, opts in cfg.feeds.items():
        if opts.poll_interval is not None and opts.poll_interval <= 0:
            raise _fail(name, f"feeds.{feed}.poll_interval", "must be > 0 seconds")
        for key in ("max_len", "max_age"):
            value = getattr(opts, key)
            if value is not None and value < 0:
                raise _fail(name, f"feeds.{feed}.{key}", "must be >= 0 (0: no limit)")


def _check_redis(rc: RedisConfig, name: str) -> None:
    problem = check_url(rc.url)
    if problem is not None:
        raise _fail(name, "redis.url", f"{problem} (in {redact_url(rc.url)})")
    tls = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(rc, k)]
    if tls and not rc.url.startswith("rediss://"):
        raise _fail(name, f"redis.{tls[0]}", "needs a rediss:// URL")
    if (rc.tls_cert_file is None) != (rc.tls_key_file is None):
        raise _fail(name, "redis.tls_cert_file", "set tls_cert_file and tls_key_file together")


def _check_limits(name: str, key: str, obj: TenantDefaults | TenantConfig) -> None:
    if obj.requests_per_second is not None and not 0 < obj.requests_per_second <= 60:
        raise _fail(
            name, f"{key}.requests_per_second", "must be > 0 and <= 60 (ServiceTitan's limit)"
        )
    if obj.max_in_flight is not None and obj.max_in_flight < 1:
        raise _fail(name, f"{key}.max_in_flight", "must be at least 1")
    if obj.poll_interval is not None and obj.poll_interval <= 0:
        raise _fail(name, f"{key}.poll_interval", "must be > 0 seconds")


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
            raise _fail(name, key + "_env", f"environment variable {env} is not set")
        return Secret(environ[env])
    assert file is not None
    path = _expand(file, environ)
    if path is None:
        raise _fail(name, key + "_file", f"{file!r} names an unset variable")
    try:
        return Secret(read_secret_file(path, allow_insecure=allow_insecure))
    except SecretFileError as exc:
        hint = "" if allow_insecure else " (allow_insecure_secret_files = true overrides)"
        what = str(exc) + (hint if "cannot read" not in str(exc) else "")
        raise _fail(name, key + "_file", what) from None


_VAR = re.compile(r"\$\{(\w+)\}|\$(\w+)")


def _expand(path: str, environ: Mapping[str, str]) -> str | None:
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


def resolve(cfg: Config, environ: Mapping[str, str] | None = None) -> Settings:
    """Read secrets and compute each tenant's effective settings."""
    env = os.environ if environ is None else environ
    name, st, d = cfg.path or "<config>", cfg.servicetitan, cfg.defaults
    default_auth, default_api = ENVIRONMENTS[st.environment]
    insecure = cfg.allow_insecure_secret_files
    app_key = _read_secret(
        name, "servicetitan.app_key", st.app_key, st.app_key_file, st.app_key_env, env, insecure
    )
    tenants = []
    all_feeds = catalogue.default_feeds()
    for i, t in enumerate(cfg.tenants):
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
    return Settings(
        config=cfg,
        ops_token=ops_token,
        auth_url=(st.auth_url or default_auth),
        api_url=(st.api_url or default_api).rstrip("/"),
        app_key=app_key,
        tenants=tuple(tenants),
        sentinel_password=sentinel_password,
    )


def _resolve_tls(cfg: Config, name: str, env: Mapping[str, str]) -> Config:
    """Expand ${VAR} in the TLS file paths and check that the files load."""
    rc = cfg.redis
    paths: dict[str, str | None] = {}
    for key in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        value = getattr(rc, key)
        if value is not None:
            value = _expand(value, env)
            if value is None:
                raise _fail(name, f"redis.{key}", f"{getattr(rc, key)!r} names an unset variable")
        paths[key] = value
    if paths["tls_key_file"] is not None and not cfg.allow_insecure_secret_files:
        try:
            read_secret_file(paths["tls_key_file"])
        except SecretFileError as exc:
            what = f"{exc} (allow_insecure_secret_files = true overrides)"
            raise _fail(name, "redis.tls_key_file", what) from None
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
        raise _fail(name, f"redis.{key}", f"cannot load: {exc.strerror or exc}") from None
    return msgspec.structs.replace(cfg, redis=msgspec.structs.replace(rc, **paths))


def _pick(own: _T | None, default: _T) -> _T:
    return default if own is None else own


def load_settings(
    path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
) -> Settings:
    """load() then resolve(): the one call the daemon and the commands use."""
    return resolve(load(path), environ)
