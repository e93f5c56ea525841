"""Every simulator setting in one immutable structure, shared by the CLI and the test helpers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from syncd.simulator.quirks import Quirks

DEFAULT_APP_KEY = "demo-app-key"
DEFAULT_TENANTS = (1001, 1002, 1003)
DEFAULT_QUIRKS = Quirks()  # immutable, so one shared default is safe


@dataclass(frozen=True, slots=True)
class SimOptions:
    """Simulator configuration; field names follow the `syncd simulate` flags."""

    host: str = "127.0.0.1"
    port: int = 8080
    tenants: tuple[int, ...] = DEFAULT_TENANTS
    records: int = 1000
    page_size: int = 500
    seed: int = 0
    rate_limit: float = 60.0
    token_ttl: float = 900.0
    app_key: str = DEFAULT_APP_KEY
    recent_delay: float = 900.0  # ServiceTitan: changes show after about 15 minutes
    overlap: int | None = None  # None: derived from page_size, see `effective_overlap`
    mutation_rate: float = 0.0
    feeds: tuple[str, ...] | None = None  # None: every catalogue feed
    fault_5xx: float = 0.0
    fault_latency: float = 0.0  # milliseconds
    fault_truncate: float = 0.0
    fault_invalid_json: float = 0.0
    fault_drop: float = 0.0
    fault_token: float = 0.0
    token_throttle: int = 30  # grants per client per minute
    log_requests: bool = False
    prerender: bool = False
    cache_mb: int = 1024  # budget for rendered pages
    record_cache_mb: int = 256  # budget for rendered records (pages rendered again reuse them)
    quirks: Quirks = DEFAULT_QUIRKS  # for every tenant without its own
    tenant_quirks: tuple[tuple[int, Quirks], ...] = ()  # (tenant, its quirks) at start

    def quirks_for(self, tenant: int) -> Quirks:
        """The quirks `tenant` starts with."""
        for owner, quirks in self.tenant_quirks:
            if owner == tenant:
                return quirks
        return self.quirks

    @property
    def effective_overlap(self) -> int:
        """Records repeated from the previous page when recent changes are included.

        Capped below the page size: a page must move the cursor forward.
        """
        wanted = self.overlap if self.overlap is not None else max(1, min(self.page_size // 10, 50))
        return max(0, min(wanted, self.page_size - 1))

    def validate(self) -> SimOptions:
        """Return self, or raise ValueError naming the first option out of range."""
        checks = [
            ("records", self.records >= 0, "must be >= 0"),
            ("page_size", self.page_size >= 1, "must be >= 1"),
            ("rate_limit", self.rate_limit > 0, "must be > 0"),
            ("token_ttl", self.token_ttl > 0, "must be > 0"),
            ("recent_delay", self.recent_delay >= 0, "must be >= 0"),
            ("mutation_rate", self.mutation_rate >= 0, "must be >= 0"),
            ("token_throttle", self.token_throttle >= 1, "must be >= 1"),
            ("fault_latency", self.fault_latency >= 0, "must be >= 0"),
            ("tenants", len(self.tenants) > 0, "needs at least one tenant"),
        ]
        for name in ("fault_5xx", "fault_truncate", "fault_invalid_json", "fault_drop"):
            value = getattr(self, name)
            checks.append((name, 0.0 <= value <= 1.0, "must be a probability in [0, 1]"))
        checks.append(("fault_token", 0.0 <= self.fault_token <= 1.0, "must be in [0, 1]"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"simulator option {name}={getattr(self, name)!r}: {expected}")
        message = self.quirks.check()
        if message is not None:
            raise ValueError(f"simulator option quirks: {message}")
        for tenant, quirks in self.tenant_quirks:
            if tenant not in self.tenants:
                raise ValueError(f"simulator option tenant_quirks: {tenant} is not a tenant")
            message = quirks.check()
            if message is not None:
                raise ValueError(f"simulator option tenant_quirks, tenant {tenant}: {message}")
        return self

    def replace(self, **changes: Any) -> SimOptions:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
