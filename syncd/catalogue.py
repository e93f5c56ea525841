"""The catalogue of ServiceTitan Export feeds, built from the packaged OpenAPI extract."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

# Feeds whose records have no `id`: their key fields, per ServiceTitan's documentation.
_KEY_EXCEPTIONS: dict[str, tuple[str, ...]] = {
    "customer-interactions.technician-ratings": ("technicianId", "jobId"),
    "payroll.payroll-settings": ("employeeId",),
    "jpm.job-history": ("jobId",),
}

# Legacy paths serving the same data as another feed: syncable by name, not by default.
LEGACY = {"sales.estimates/export": "sales.estimates"}

# Feeds taking `active`: a sync wants every record, active or not.
_ACTIVE_ANY = {"active": "Any"}


def key_part(value: object) -> str | None:
    """One key field as text, or None when it cannot identify a record."""
    if type(value) is int:  # not bool
        return str(value)
    if isinstance(value, str) and value:
        if ":" in value or "\\" in value:
            return value.replace("\\", "\\\\").replace(":", "\\:")
        return value
    return None  # null, empty, bool, float, object, array


def encode_key(values: tuple[object, ...] | list[object]) -> str | None:
    """A record key from its key fields' values: each part as text (integers in decimal), `\\`
    and `:` inside a part escaped with `\\`, parts joined with `:`. Distinct values never give
    the same key, and keys whose parts hold neither character read as before (`1:2`).
    None when a part is missing, null, empty, or not a string or an integer."""
    parts = []
    for value in values:
        part = key_part(value)
        if part is None:
            return None
        parts.append(part)
    return ":".join(parts)


@dataclass(frozen=True, slots=True, eq=False)
class Feed:
    """One Export feed: where to fetch it and how to key and date its records.

    Feeds are singletons of the catalogue: compared and hashed by identity.
    """

    name: str  # "<module>.<resource>", e.g. "crm.customers"
    module: str
    resource: str
    path: str  # with a "{tenant}" placeholder
    key_fields: tuple[str, ...]
    timestamp_field: str | None  # modifiedOn, else createdOn, else None
    params: tuple[tuple[str, str], ...]  # extra query parameters
    schema: dict[str, Any] | None  # JSON schema of one record; None where the spec has none

    def url_path(self, tenant: int) -> str:
        return self.path.replace("{tenant}", str(tenant))

    def record_key(self, record: dict[str, Any]) -> str | None:
        """The record's key (see `encode_key`), or None when it has no usable one."""
        return encode_key([record.get(f) for f in self.key_fields])


def _timestamp_field(schema: dict[str, Any] | None) -> str | None:
    if schema is None:
        return "modifiedOn"
    props = schema.get("properties", {})
    for name in ("modifiedOn", "createdOn"):
        if name in props:
            return name
    return None


def _build(raw: dict[str, Any]) -> Feed:
    name = raw["feed"]
    module, _, resource = name.partition(".")
    extra = [q["name"] for q in raw["query"] if q["name"] not in ("from", "includeRecentChanges")]
    params = tuple((k, _ACTIVE_ANY[k]) for k in extra if k in _ACTIVE_ANY)
    schema = raw.get("record_schema")
    return Feed(
        name=name,
        module=module,
        resource=resource,
        path=raw["path"],
        key_fields=_KEY_EXCEPTIONS.get(name, ("id",)),
        timestamp_field=_timestamp_field(schema),
        params=params,
        schema=schema,
    )


@functools.cache
def _load() -> tuple[dict[str, Feed], dict[str, Any]]:
    text = resources.files("syncd").joinpath("data/export-feeds.json").read_text("utf-8")
    raw = json.loads(text)
    feeds = {f["feed"]: _build(f) for f in raw["feeds"]}
    return feeds, raw["error_schema"]


def feeds() -> dict[str, Feed]:
    """Every export feed by name, in the catalogue's order."""
    return _load()[0]


def default_feeds() -> tuple[str, ...]:
    """The feeds a tenant syncs when its configuration names none: all but legacy paths."""
    return tuple(name for name in _load()[0] if name not in LEGACY)


def feed(name: str) -> Feed:
    """The feed called `name`; KeyError if there is none."""
    return _load()[0][name]


def error_schema() -> dict[str, Any]:
    """JSON schema of ServiceTitan's ProblemDetails error body."""
    return _load()[1]
