"""Configuration: the TOML file validated into immutable typed structures (`model`), loaded and
checked without side effects (`load`: every error names the file, the key path and what is
wrong), then resolved into the `Settings` the daemon runs on (`secrets`: secret files, the
environment, TLS files). `addresses`, `urls` and `secretfiles` check what the configuration
points at: listen and sentinel addresses, Redis URLs, secret files.

May use only the shared modules (`syncd.catalogue`, `syncd.keys`, `syncd.redact`): every other
package may import it. The names below are its surface.
"""

from syncd.config.load import check_finite, check_start, load, parse
from syncd.config.model import (
    ENVIRONMENTS,
    MAX_SHUTDOWN_GRACE_S,
    Config,
    ConfigError,
    EngineConfig,
    FeedOptions,
    FleetConfig,
    LogConfig,
    OpsConfig,
    RedisConfig,
    Secret,
    ServiceTitanConfig,
    Settings,
    StreamsConfig,
    TenantConfig,
    TenantDefaults,
    TenantSettings,
)
from syncd.config.secrets import (
    CREDENTIALS_VARIABLE,
    expand_path,
    load_settings,
    resolve,
    unset_problem,
    unset_variables,
)

__all__ = [
    "CREDENTIALS_VARIABLE",
    "ENVIRONMENTS",
    "MAX_SHUTDOWN_GRACE_S",
    "Config",
    "ConfigError",
    "EngineConfig",
    "FeedOptions",
    "FleetConfig",
    "LogConfig",
    "OpsConfig",
    "RedisConfig",
    "Secret",
    "ServiceTitanConfig",
    "Settings",
    "StreamsConfig",
    "TenantConfig",
    "TenantDefaults",
    "TenantSettings",
    "check_finite",
    "check_start",
    "expand_path",
    "load",
    "load_settings",
    "parse",
    "resolve",
    "unset_problem",
    "unset_variables",
]
