"""Every simulated feed's records validate against the feed's schema from the catalogue."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import msgspec
import pytest
import pytest_asyncio

from syncd import catalogue
from syncd.testing.simulator import RunningSimulator, run_simulator

TENANT = 1001
_ANNOTATIONS = {"nullable", "x-enumNames", "deprecated", "x-deprecatedMessage"}
_DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?Z")


def to_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 schema -> JSON Schema: `nullable: true` becomes an allowed null."""
    if isinstance(node, list):
        return [to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in _ANNOTATIONS:
            continue
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        else:
            out[key] = to_json_schema(value)
    if node.get("nullable"):
        if "type" in out and "oneOf" not in out:
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


def _checker() -> jsonschema.FormatChecker:
    checker = jsonschema.FormatChecker(formats=())

    def strings(pattern: str) -> Any:
        compiled = re.compile(pattern)
        return lambda value: not isinstance(value, str) or bool(compiled.fullmatch(value))

    def ints(bits: int) -> Any:
        return lambda value: not isinstance(value, int) or -(2**bits) <= value < 2**bits

    checker.checks("date-time")(lambda v: not isinstance(v, str) or bool(_DATE_TIME.fullmatch(v)))
    checker.checks("date")(strings(r"\d{4}-\d\d-\d\d"))
    checker.checks("duration")(strings(r"\d\d:\d\d:\d\d"))
    checker.checks("email")(strings(r"[^@\s]+@[^@\s]+\.[a-z]+"))
    checker.checks("phone")(strings(r"\d{10}"))
    checker.checks("int64")(ints(63))
    checker.checks("int32")(ints(31))
    return checker


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sim() -> AsyncIterator[RunningSimulator]:
    async with run_simulator(records=40, page_size=60, seed=21, rate_limit=10_000) as running:
        for name in running.state.feeds:
            running.state.mutate(TENANT, name, "deactivate", 3)
            running.state.mutate(TENANT, name, "create", 2)
        yield running


@pytest.mark.parametrize("feed", list(catalogue.feeds()))
async def test_records_match_schema(sim: RunningSimulator, feed: str) -> None:
    url = sim.sim_url(TENANT, feed, "records")
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        records = msgspec.json.decode(await resp.read())
    spec = catalogue.feed(feed)
    assert len(records) == 42
    keys = [spec.record_key(r) for r in records]
    assert None not in keys
    assert len(set(keys)) == len(keys)
    if spec.schema is None:
        for record in records:
            assert {"id", "active", "createdOn", "modifiedOn"} <= set(record)
        return
    validator = jsonschema.Draft7Validator(to_json_schema(spec.schema), format_checker=_checker())
    for record in records:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(record)]
        assert not errors, (feed, errors[:3])
    if spec.timestamp_field is not None:
        stamps = [r[spec.timestamp_field] for r in records]
        assert all(_DATE_TIME.fullmatch(s) for s in stamps)


def test_sizes_are_realistic() -> None:
    """Typical feeds weigh a few hundred bytes to about a kilobyte per record."""
    from syncd.simulator.cache import SizedCache
    from syncd.simulator.data import FeedLog

    sizes = {}
    for number, name in enumerate(("crm.customers", "jpm.jobs", "crm.locations", "telecom.calls")):
        log = FeedLog(catalogue.feed(name), number, TENANT, 0, 200, SizedCache(10**8))
        sizes[name] = len(log.ground_truth()) / 200
    assert all(250 <= size <= 2000 for size in sizes.values()), sizes


def test_validation_is_not_vacuous() -> None:
    schema = to_json_schema(catalogue.feed("crm.customers").schema)
    validator = jsonschema.Draft7Validator(schema, format_checker=_checker())
    good = {"id": 1, "modifiedOn": "2021-07-19T20:35:38.2876004Z", "creditLimit": None}
    assert not [e for e in validator.iter_errors(good) if e.validator != "required"]
    for bad in ({"id": "1"}, {"modifiedOn": "2021-07-19 20:35"}, {"unknown": 1}, {"type": "Alien"}):
        assert [e for e in validator.iter_errors(bad) if e.validator != "required"], bad
