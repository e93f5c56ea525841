"""Injected failures: configured rates from the options, per-tenant overrides at runtime."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from random import Random

import msgspec

from syncd.simulator.options import SimOptions

_STATUSES_5XX = (500, 502, 503, 504)


class FaultOverrides(msgspec.Struct, frozen=True, forbid_unknown_fields=True, omit_defaults=True):
    """Body of `POST /_sim/tenants/<T>/faults`; absent fields keep the command-line setting."""

    error_rate: float | None = None
    status: int | None = None  # status of injected errors; default a random 5xx
    rate_limit: float | None = None  # requests per second for this tenant
    latency_ms: float | None = None
    truncate_rate: float | None = None
    invalid_json_rate: float | None = None
    drop_rate: float | None = None
    token_error_rate: float | None = None

    def check(self) -> str | None:
        """A message naming the first bad field, or None."""
        rates = ("error_rate", "truncate_rate", "invalid_json_rate", "drop_rate")
        for name in (*rates, "token_error_rate"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                return f"{name} must be within [0, 1]"
        if self.status is not None and not 400 <= self.status <= 599:
            return "status must be an HTTP error status (400-599)"
        if self.rate_limit is not None and self.rate_limit <= 0:
            return "rate_limit must be > 0"
        if self.latency_ms is not None and self.latency_ms < 0:
            return "latency_ms must be >= 0"
        return None


@dataclass(frozen=True, slots=True)
class FaultSettings:
    """The fault rates in force for one tenant."""

    error_rate: float
    status: int | None
    rate_limit: float
    latency_ms: float
    truncate_rate: float
    invalid_json_rate: float
    drop_rate: float
    token_error_rate: float

    @classmethod
    def resolve(cls, options: SimOptions, over: FaultOverrides) -> FaultSettings:
        """Options, with any override taking precedence."""

        def pick(value: float | None, default: float) -> float:
            return default if value is None else value

        return cls(
            error_rate=pick(over.error_rate, options.fault_5xx),
            status=over.status,
            rate_limit=pick(over.rate_limit, options.rate_limit),
            latency_ms=pick(over.latency_ms, options.fault_latency),
            truncate_rate=pick(over.truncate_rate, options.fault_truncate),
            invalid_json_rate=pick(over.invalid_json_rate, options.fault_invalid_json),
            drop_rate=pick(over.drop_rate, options.fault_drop),
            token_error_rate=pick(over.token_error_rate, options.fault_token),
        )


class BodyFault(enum.Enum):
    """What goes wrong with a 200 response's body."""

    NONE = "none"
    TRUNCATE = "truncate"
    INVALID_JSON = "invalid_json"
    DROP = "drop"


def latency_s(rng: Random, settings: FaultSettings) -> float:
    """Added latency for one request: the configured value with +-50% jitter."""
    if settings.latency_ms <= 0:
        return 0.0
    return settings.latency_ms * (0.5 + rng.random()) / 1000.0


def error_status(rng: Random, settings: FaultSettings, rate: float) -> int | None:
    """The status of an injected error response, or None for no error."""
    if rate <= 0 or rng.random() >= rate:
        return None
    return settings.status or rng.choice(_STATUSES_5XX)


def body_fault(rng: Random, settings: FaultSettings) -> BodyFault:
    """Whether (and how) to damage a successful response."""
    draw = rng.random()
    for fault, rate in (
        (BodyFault.TRUNCATE, settings.truncate_rate),
        (BodyFault.INVALID_JSON, settings.invalid_json_rate),
        (BodyFault.DROP, settings.drop_rate),
    ):
        if draw < rate:
            return fault
        draw -= rate
    return BodyFault.NONE


def damage(rng: Random, body: bytes, fault: BodyFault) -> bytes:
    """The body as a faulty server would send it (TRUNCATE, INVALID_JSON) or its sent part."""
    cut = 1 + int(rng.random() * max(1, len(body) - 2))
    if fault is BodyFault.INVALID_JSON:
        return body[:cut] + b"\x00<html>Bad Gateway</html>" + body[cut:]
    return body[:cut]
