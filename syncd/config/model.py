"""The configuration's model: the TOML file's immutable typed structures (`Config` and its
sections) and the resolved `Settings` the daemon runs on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from syncd.config.urls import redact_url
from syncd.keys import DEFAULT_PREFIX

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
    # Seconds between reconciliation passes of each feed (0: none); `[feeds.<name>]` overrides.
    reconcile_interval: float = 0.0


class FeedOptions(_Base, frozen=True):
    change_detection: bool = True
    poll_interval: float | None = None
    reconcile_interval: float | None = None  # None: [defaults] reconcile_interval
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
    max_connections: int = 256  # open connections held for long; see syncd.ops.http
    readiness_interval: float = 2.0  # seconds between background readiness checks
    # "tenant": series per tenant and per feed, never per tenant and feed (about 23,000 series at
    # 1,000 tenants x 55 feeds); "tenant_feed" adds every tenant x feed pair (about 300,000).
    metrics_detail: Literal["tenant", "tenant_feed"] = "tenant"


class MirrorConfig(_Base, frozen=True):
    """`syncd mirror`: the feeds' events kept as tables in PostgreSQL, one per feed."""

    url: str  # postgresql://user@host:5432/dbname
    # The database password, when the URL holds none (else libpq's PGPASSWORD or ~/.pgpass).
    password_file: str | None = None
    password_env: str | None = None
    schema: str = "syncd"  # created when missing; holds the tables and their schema version
    group: str = "syncd-mirror"  # the consumer group the mirror reads as
    tenants: list[int] | None = None  # default: every configured tenant
    feeds: list[str] | None = None  # default: each tenant's configured feeds
    batch: int = 1000  # events read per stream per round, applied in one transaction
    # Consumers in the group (each with its own PostgreSQL connection) applying batches side
    # by side: `<name>`, `<name>.2`...
    workers: int = 2
    claim_idle: float = 60.0  # seconds before events a dead mirror held are taken over
    max_deliveries: int = 5  # a record refused this often goes to the dead stream
    connect_timeout: float = 10.0  # seconds to reach PostgreSQL
    listen: str | None = None  # ops endpoint: /metrics, /healthz, /readyz ("127.0.0.1:9109")

    def __repr__(self) -> str:
        return _masked_repr(self, urls=("url",))


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
    mirror: MirrorConfig | None = None
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
    mirror_password: Secret | None = None  # [mirror] password_file or password_env

    def feed_options(self, feed: str) -> FeedOptions:
        return self.config.feeds.get(feed) or _DEFAULT_FEED_OPTIONS

    def retention(self, feed: str) -> tuple[int, float]:
        """(max_len, max_age) of a feed's stream; zeros mean no limit."""
        own, st = self.feed_options(feed), self.config.streams
        return (
            st.max_len if own.max_len is None else own.max_len,
            st.max_age if own.max_age is None else own.max_age,
        )

    def reconcile_interval(self, feed: str) -> float:
        """Seconds between reconciliation passes of `feed` (0: none; never without change
        detection, which keeps the index a pass reconciles)."""
        own = self.feed_options(feed)
        if not own.change_detection:
            return 0.0
        if own.reconcile_interval is not None:
            return own.reconcile_interval
        return self.config.defaults.reconcile_interval

    def poll_interval(self, tenant: TenantSettings, feed: str) -> float:
        own = self.feed_options(feed).poll_interval
        return own if own is not None else tenant.poll_interval


_DEFAULT_FEED_OPTIONS = FeedOptions()
