"""Simulator quirks of data and gateways over real HTTP: on for one tenant, off for another.

Order and timestamps, records off their schema, keyless records, deletions, HTML and text error
bodies, gzip. Each test also checks that the ground truth stays what a correct consumer ends with.
"""

from __future__ import annotations

import asyncio
import calendar
import gzip
import re
import time
from collections.abc import AsyncIterator
from random import Random
from typing import Any

import aiohttp
import msgspec
import pytest

from syncd import catalogue
from syncd.simulator.cache import SizedCache
from syncd.simulator.data import ChangeQuirks, FeedLog
from syncd.simulator.offschema import FeedShape, RecordStyle, naive_timestamp, restyle
from syncd.simulator.quirks import Quirks, parse_assignments
from syncd.testing.simulator import RunningSimulator, SimulatorProcess, credentials, run_simulator
from tests.test_simulator import Client, check_problem, get_token, key_of

TENANT = 1001
OTHER = 1002
CUSTOMERS = "crm.customers"
RECENT = {"includeRecentChanges": "true"}
_ZONED = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,7})?Z")
_NAIVE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def client_for(session: aiohttp.ClientSession, sim: RunningSimulator, tenant: int) -> Client:
    return Client(session, sim, await get_token(session, sim, tenant))


async def pages(client: Client, tenant: int, **params: str) -> tuple[list[list[Any]], str]:
    """The records of every page until hasMore is false (decoded), and the final cursor."""
    served: list[list[Any]] = []
    for _ in range(1000):
        status, body, _ = await client.get(CUSTOMERS, tenant=tenant, **params)
        assert status == 200, body
        page = msgspec.json.decode(body)
        served.append(page["data"])
        params["from"] = page["continueFrom"]
        if not page["hasMore"]:
            return served, page["continueFrom"]
    raise AssertionError("the feed never drained")


async def truth(session: aiohttp.ClientSession, sim: RunningSimulator, tenant: int) -> list[Any]:
    async with session.get(sim.sim_url(tenant, CUSTOMERS, "records")) as resp:
        assert resp.status == 200
        records: list[Any] = await resp.json()
    return records


def by_key(records: list[Any]) -> dict[str, Any]:
    return {key_of(CUSTOMERS, msgspec.json.encode(r)): r for r in records}


def instant(value: Any) -> int:
    """A timestamp in any form the simulator sends, as 100 ns ticks since the epoch (UTC)."""
    if isinstance(value, int):
        return value * 10_000  # Unix milliseconds
    head, _, fraction = str(value).removesuffix("Z").partition(".")
    seconds = calendar.timegm(time.strptime(head, "%Y-%m-%dT%H:%M:%S"))
    return seconds * 10_000_000 + int(fraction[:7].ljust(7, "0"))


def newest(records: list[Any]) -> dict[str, Any]:
    """What a correct consumer keeps: per key, the version with the latest timestamp."""
    kept: dict[str, Any] = {}
    for record in records:
        key = key_of(CUSTOMERS, msgspec.json.encode(record))
        if key not in kept or instant(record["modifiedOn"]) > instant(kept[key]["modifiedOn"]):
            kept[key] = record
    return kept


def flat(served: list[list[Any]]) -> list[Any]:
    return [record for page in served for record in page]


async def stats(session: aiohttp.ClientSession, sim: RunningSimulator, tenant: int) -> Any:
    async with session.get(sim.url + "/_sim/stats") as resp:
        return (await resp.json())["tenants"][str(tenant)]


# -- order and shared timestamps ------------------------------------------------------------


async def test_out_of_order_pages_for_one_tenant(session: aiohttp.ClientSession) -> None:
    bodies = []
    for _ in range(2):  # the same seed and requests give the same pages
        async with run_simulator(
            records=40, page_size=10, tenant_quirks={TENANT: {"out_of_order": 1.0}}
        ) as sim:
            seen = {}
            for tenant in (TENANT, OTHER):
                served, _ = await pages(await client_for(session, sim, tenant), tenant)
                stamps = [[instant(r["modifiedOn"]) for r in page] for page in served]
                shuffled = [s != sorted(s) for s in stamps if len(s) > 1]
                assert shuffled
                assert all(shuffled) == (tenant == TENANT), stamps
                assert newest(flat(served)) == by_key(await truth(session, sim, tenant))
                seen[tenant] = served
            bodies.append(seen)
    assert bodies[0] == bodies[1]


async def test_shared_timestamps_in_a_batch_of_changes(session: aiohttp.ClientSession) -> None:
    async with run_simulator(
        records=20, page_size=50, recent_delay=0, tenant_quirks={TENANT: {"shared_timestamps": 1}}
    ) as sim:
        for tenant in (TENANT, OTHER):
            client = await client_for(session, sim, tenant)
            first, cursor = await pages(client, tenant)
            changed = set(sim.mutate(tenant, CUSTOMERS, "update", 5))
            later, _ = await pages(client, tenant, **{"from": cursor})
            records = flat(later)
            assert set(by_key(records)) == changed
            stamps = {r["modifiedOn"] for r in records}
            assert len(stamps) == (1 if tenant == TENANT else 5)
            # Resuming from that date (not from continueFrom) still finds every one of them.
            since, _ = await pages(client, tenant, **{"from": min(stamps)})
            assert changed <= set(by_key(flat(since)))
            served = flat(first) + records
            assert newest(served) == by_key(await truth(session, sim, tenant))


# -- records off their schema ---------------------------------------------------------------


def customer_shape() -> FeedShape:
    feed = catalogue.feed(CUSTOMERS)
    assert feed.schema is not None
    return FeedShape.of(feed.schema, feed.key_fields, feed.timestamp_field)


@pytest.mark.parametrize("quirk", ["required_nulls", "enum_integers", "numeric_modified_on"])
async def test_off_schema_values(session: aiohttp.ClientSession, quirk: str) -> None:
    shape = customer_shape()
    async with run_simulator(
        records=30, page_size=12, recent_delay=0, tenant_quirks={TENANT: {quirk: 1.0}}
    ) as sim:
        truths = {}
        for tenant in (TENANT, OTHER):
            client = await client_for(session, sim, tenant)
            sim.mutate(tenant, CUSTOMERS, "update", 5)
            served, _ = await pages(client, tenant, **RECENT)
            records = flat(served)
            assert all(isinstance(r["id"], int) for r in records), "the key is always usable"
            for record in records:
                off = {
                    "required_nulls": any(record[f] is None for f in shape.required),
                    "enum_integers": isinstance(record["type"], int),
                    "numeric_modified_on": isinstance(record["modifiedOn"], int),
                }
                assert off == {name: name == quirk and tenant == TENANT for name in off}
            truths[tenant] = by_key(await truth(session, sim, tenant))
            assert newest(records) == truths[tenant], "served as the ground truth has them"
        # The same versions, the quirk off: what the deviations stand for.
        sim.set_quirks(TENANT, **{quirk: 0.0})
        plain = by_key(await truth(session, sim, TENANT))
    assert plain.keys() == truths[TENANT].keys()
    for key, odd in truths[TENANT].items():
        normal = plain[key]
        if quirk == "enum_integers":
            values = dict(shape.enums)["type"]
            assert values[odd["type"]] == normal["type"]
        elif quirk == "numeric_modified_on":
            assert odd["modifiedOn"] == instant(normal["modifiedOn"]) // 10_000
        else:
            nulled = {f for f in shape.required if odd[f] is None and normal[f] is not None}
            assert 1 <= len(nulled) <= 3
            # Never the key nor the timestamp; every other field as the plain version has it.
            assert not nulled & {"id", "modifiedOn"}
            rest = [f for f in normal if f not in nulled]
            assert [odd[f] for f in rest] == [normal[f] for f in rest]
            assert {k: v for k, v in odd.items() if k not in nulled} == {
                k: v for k, v in normal.items() if k not in nulled
            }


async def test_naive_timestamps(session: aiohttp.ClientSession) -> None:
    async with run_simulator(
        records=40, page_size=15, recent_delay=0, tenant_quirks={TENANT: {"naive_timestamps": 1}}
    ) as sim:
        lengths: set[int] = set()
        truths = {}
        for tenant in (TENANT, OTHER):
            client = await client_for(session, sim, tenant)
            sim.mutate(tenant, CUSTOMERS, "update", 5)
            served, _ = await pages(client, tenant, **RECENT)
            records = flat(served)
            for stamp in (r[f] for r in records for f in ("modifiedOn", "createdOn")):
                if tenant == OTHER:
                    assert _ZONED.fullmatch(stamp), stamp
                    continue
                assert _NAIVE.fullmatch(stamp), stamp
                lengths.add(len(stamp.partition(".")[2]))
            truths[tenant] = by_key(await truth(session, sim, tenant))
            assert newest(records) == truths[tenant]
        assert lengths == {0, 3, 6, 7, 9}
        sim.set_quirks(TENANT, naive_timestamps=0.0)
        plain = by_key(await truth(session, sim, TENANT))
    for key, record in truths[TENANT].items():
        for field in ("modifiedOn", "createdOn"):
            digits = len(record[field].partition(".")[2])
            assert record[field] == naive_timestamp(plain[key][field], digits)
            # Read as UTC, it is the same instant up to the digits it kept.
            step = 10 ** max(0, 7 - digits)
            assert instant(record[field]) == instant(plain[key][field]) // step * step


@pytest.mark.parametrize(
    ("text", "digits", "expected"),
    [
        ("2025-10-13T00:00:00Z", 0, "2025-10-13T00:00:00"),
        ("2025-10-13T00:00:00Z", 3, "2025-10-13T00:00:00.000"),
        ("2021-07-19T20:35:38.2876004Z", 0, "2021-07-19T20:35:38"),
        ("2021-07-19T20:35:38.2876004Z", 3, "2021-07-19T20:35:38.287"),
        ("2021-07-19T20:35:38.2876004Z", 6, "2021-07-19T20:35:38.287600"),
        ("2021-07-19T20:35:38.2876004Z", 7, "2021-07-19T20:35:38.2876004"),
        ("2021-07-19T20:35:38.12Z", 9, "2021-07-19T20:35:38.120000000"),
        ("not a date Z", 3, "not a date Z"),
        ("2021-07-19", 3, "2021-07-19"),
    ],
)
def test_naive_timestamp_forms(text: str, digits: int, expected: str) -> None:
    assert naive_timestamp(text, digits) == expected


def test_restyle_is_a_function_of_the_version_and_rates_are_independent() -> None:
    shape = customer_shape()
    assert "id" not in shape.required
    assert "modifiedOn" not in shape.required
    assert dict(shape.enums)["type"] == ("Residential", "Commercial")
    record = {"id": 1, "type": "Commercial", "modifiedOn": "2021-07-19T20:35:38.2876004Z"}
    record |= {field: "x" for field in shape.required if field not in record}

    def styled(style: RecordStyle, seed: int) -> dict[str, Any]:
        copy = dict(record)
        restyle(copy, style, shape, seed, 16267221382876004)
        return copy

    everything = RecordStyle(1.0, 1.0, 1.0, 1.0)
    assert styled(everything, 5) == styled(everything, 5)
    assert styled(everything, 5)["modifiedOn"] == 1626722138287
    assert styled(everything, 5)["type"] == 1
    assert styled(RecordStyle(), 5) == record
    # Whether a version deviates one way does not depend on the other rates.
    numeric: list[bool] = []
    for seed in range(50):
        alone = styled(RecordStyle(numeric_modified_on=0.5), seed)["modifiedOn"]
        mixed = styled(RecordStyle(0.5, 0.5, 0.5, 0.5), seed)["modifiedOn"]
        assert isinstance(mixed, int) == isinstance(alone, int)
        numeric.append(isinstance(alone, int))
    assert any(numeric)
    assert not all(numeric)


# -- keyless records ------------------------------------------------------------------------


async def test_keyless_records_in_a_drained_tail(session: aiohttp.ClientSession) -> None:
    async with run_simulator(
        records=20, page_size=10, overlap=3, tenant_quirks={TENANT: {"keyless": 1.0}}
    ) as sim:
        for tenant in (TENANT, OTHER):
            client = await client_for(session, sim, tenant)
            url = sim.sim_url(tenant, CUSTOMERS, "mutate")
            async with session.post(url, params={"kind": "create", "count": "2"}) as resp:
                made = await resp.json()
            assert made["keyless"] == (2 if tenant == TENANT else 0)
            assert len(made["keys"]) == (0 if tenant == TENANT else 2)
            served, cursor = await pages(client, tenant, **RECENT)
            for _ in range(3):  # the drained feed answers its tail again, keyless records too
                again = await raw(client, tenant, **RECENT, **{"from": cursor})
                assert (again["continueFrom"], len(again["data"])) == (cursor, 3)
                served.append(again["data"])
            records = flat(served)
            keyless = [r for r in records if r.get("id") is None]
            live = await truth(session, sim, tenant)
            assert len(live) == (20 if tenant == TENANT else 22)
            assert all(r.get("id") is not None for r in live)
            summary = sim.truth(tenant, CUSTOMERS)["keyless"]
            if tenant == OTHER:
                assert keyless == []
                assert summary == {"records": [], "served": 0, "distinct_served": 0}
                continue
            # Each sent every time the tail came again: once in the drain and three times more.
            assert len(keyless) == 2 * 4
            assert [("id" in r) for r in summary["records"]] == [True, False], "null, missing"
            assert {msgspec.json.encode(r) for r in keyless} == {
                msgspec.json.encode(r) for r in summary["records"]
            }
            assert summary["served"] == len(keyless)
            assert summary["distinct_served"] == 2
            assert (await stats(session, sim, TENANT))["keyless_served"] == len(keyless)
            keyed = [r for r in records if r.get("id") is not None]
            assert newest(keyed) == by_key(live)
            # Updates never pick a keyless record; a damaged page does not count as served.
            assert len(sim.mutate(TENANT, CUSTOMERS, "update", 100)) == 20
            url = f"{sim.url}/_sim/tenants/{TENANT}/faults"
            async with session.post(url, json={"truncate_rate": 1.0}) as resp:
                assert resp.status == 200
            await client.get(CUSTOMERS, tenant=TENANT, **RECENT, **{"from": cursor})
            assert sim.truth(TENANT, CUSTOMERS)["keyless"]["served"] == len(keyless)
        assert (await stats(session, sim, OTHER))["keyless_served"] == 0


async def raw(client: Client, tenant: int, **params: str) -> dict[str, Any]:
    status, body, _ = await client.get(CUSTOMERS, tenant=tenant, **params)
    assert status == 200, body
    page: dict[str, Any] = msgspec.json.decode(body)
    return page


# -- deletions ------------------------------------------------------------------------------


async def test_deleted_records_vanish_from_later_exports(session: aiohttp.ClientSession) -> None:
    deleted_by_run = []
    for _ in range(2):  # the same seed deletes the same records
        async with run_simulator(records=30, page_size=10, recent_delay=0) as sim:
            deleted_by_run.append({})
            for tenant in (TENANT, OTHER):
                client = await client_for(session, sim, tenant)
                first, cursor = await pages(client, tenant)  # every page is cached now
                if tenant == TENANT:
                    deleted = sim.mutate(TENANT, CUSTOMERS, "delete", 4)
                else:
                    url = sim.sim_url(OTHER, CUSTOMERS, "mutate")
                    async with session.post(url, params={"kind": "delete", "count": "4"}) as r:
                        deleted = (await r.json())["keys"]
                assert len(set(deleted)) == 4
                assert set(deleted) <= set(by_key(flat(first)))
                after, _ = await pages(client, tenant, **{"from": cursor})
                assert flat(after) == [], "a deletion leaves no trace in the feed"
                again, _ = await pages(client, tenant)
                exported = by_key(flat(again))
                assert len(exported) == 26
                assert not set(deleted) & set(exported)
                assert exported == by_key(await truth(session, sim, tenant))
                summary = sim.truth(tenant, CUSTOMERS)
                assert (summary["live"], summary["deleted"]) == (26, deleted)
                # Deleted records are never changed again.
                updated = sim.mutate(tenant, CUSTOMERS, "update", 30)
                assert len(updated) == 26
                assert not set(deleted) & set(updated)
                deleted_by_run[-1][tenant] = deleted
            async with session.get(sim.sim_url(TENANT, "crm.nothing", "truth")) as resp:
                assert resp.status == 404
    assert deleted_by_run[0] == deleted_by_run[1]


async def test_deletions_by_the_mutator_for_one_tenant() -> None:
    async with run_simulator(
        records=200, feeds=[CUSTOMERS], mutation_rate=40, tenant_quirks={TENANT: {"deletions": 1}}
    ) as sim:
        for _ in range(600):
            if len(sim.truth(TENANT, CUSTOMERS)["deleted"]) >= 5:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the mutator deleted nothing")
        # Read both without yielding to the mutator in between.
        summary = sim.truth(TENANT, CUSTOMERS)
        live = by_key(msgspec.json.decode(sim.state.log(TENANT, CUSTOMERS).ground_truth()))
        assert summary["live"] == len(live) == 200 - len(summary["deleted"])
        assert not set(summary["deleted"]) & set(live)
        assert sim.truth(OTHER, CUSTOMERS)["deleted"] == []
        assert len(sim.state.log(OTHER, CUSTOMERS).log) > 200, "the other tenant changed too"


# -- error bodies ---------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["html", "text"])
async def test_5xx_bodies_of_gateways(session: aiohttp.ClientSession, style: str) -> None:
    async with run_simulator(records=5, tenant_quirks={TENANT: {"error_body": style}}) as sim:
        mine, other = await client_for(session, sim, TENANT), await client_for(session, sim, OTHER)
        for status in (500, 502, 503, 504, 400):
            for tenant in (TENANT, OTHER):
                url = f"{sim.url}/_sim/tenants/{tenant}/faults"
                async with session.post(url, json={"error_rate": 1.0, "status": status}) as r:
                    assert r.status == 200
            got, body, resp = await mine.get(CUSTOMERS, tenant=TENANT)
            assert got == status
            if status < 500:
                check_problem(msgspec.json.decode(body), status)
            elif style == "text":
                assert resp.content_type == "text/plain"
                assert (
                    body.decode()
                    == {
                        500: "Internal Server Error",
                        502: "Bad Gateway",
                        503: "Service Unavailable",
                        504: "Gateway Timeout",
                    }[status]
                )
            else:
                assert resp.content_type == "text/html"
                text = body.decode()
                assert text.lstrip().lower().startswith(("<html", "<!doctype"))
                assert str(status) in text
                marker = {500: "Server Error", 503: "HTTP Error 503"}.get(status, "nginx")
                assert marker in text
                with pytest.raises(msgspec.DecodeError):
                    msgspec.json.decode(body)
            got, body, _ = await other.get(CUSTOMERS, tenant=OTHER)
            assert got == status
            check_problem(msgspec.json.decode(body), status)
        # The token endpoint's injected failures take the tenant's style too.
        async with session.post(
            f"{sim.url}/_sim/tenants/{TENANT}/faults", json={"token_error_rate": 1, "status": 503}
        ) as resp:
            assert resp.status == 200
        client_id, secret = credentials(TENANT)
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        async with session.post(sim.auth_url, data=form) as resp:
            assert resp.status == 503
            assert resp.content_type == ("text/html" if style == "html" else "text/plain")


@pytest.mark.parametrize("style", ["html", "text"])
async def test_429_bodies_in_html_and_text(session: aiohttp.ClientSession, style: str) -> None:
    async with run_simulator(
        records=5, rate_limit=2, tenant_quirks={TENANT: {"rate_limit_body": style}}
    ) as sim:
        for tenant in (TENANT, OTHER):
            client = await client_for(session, sim, tenant)
            results = await asyncio.gather(
                *(client.get(CUSTOMERS, tenant=tenant) for _ in range(5))
            )
            limited = [(body, resp) for status, body, resp in results if status == 429]
            assert len(limited) == 3
            for body, resp in limited:
                if tenant == OTHER:
                    check_problem(msgspec.json.decode(body), 429)
                    continue
                assert "Retry-After" not in resp.headers
                if style == "text":
                    assert resp.content_type == "text/plain"
                    assert re.fullmatch(
                        r"Rate limit is exceeded\. Try again in [1-9]\d* seconds\.", body.decode()
                    )
                else:
                    assert resp.content_type == "text/html"
                    assert "<title>429 Too Many Requests</title>" in body.decode()


# -- gzip -----------------------------------------------------------------------------------


async def test_gzip_for_one_tenant() -> None:
    async with (
        run_simulator(records=30, page_size=10) as sim,
        aiohttp.ClientSession(auto_decompress=False) as raw_session,
        aiohttp.ClientSession() as session,
    ):
        async with session.post(f"{sim.url}/_sim/tenants/{TENANT}/quirks", json={"gzip": True}):
            pass
        assert (sim.quirks(TENANT).gzip, sim.quirks(OTHER).gzip) == (True, False)
        for tenant in (TENANT, OTHER):
            token = await get_token(session, sim, tenant)
            headers = {"Authorization": f"Bearer {token}", "ST-App-Key": sim.app_key}
            url = sim.feed_url(tenant, CUSTOMERS)
            bodies = {}
            for accept in ("gzip, deflate", "identity", "gzip;q=0"):
                async with raw_session.get(
                    url, headers={**headers, "Accept-Encoding": accept}
                ) as r:
                    assert r.status == 200
                    encoded = r.headers.get("Content-Encoding")
                    body = await r.read()
                zipped = tenant == TENANT and accept.startswith("gzip,")
                assert encoded == ("gzip" if zipped else None)
                bodies[accept] = gzip.decompress(body) if zipped else body
            assert len(set(bodies.values())) == 1, "the same page, encoded or not"
            # An ordinary aiohttp client (Accept-Encoding: gzip by default) reads every page.
            client = Client(session, sim, token)
            served, _ = await pages(client, tenant)
            assert by_key(flat(served)) == by_key(await truth(session, sim, tenant))
        # Errors are encoded too.
        async with session.post(
            f"{sim.url}/_sim/tenants/{TENANT}/faults", json={"error_rate": 1, "status": 503}
        ) as resp:
            assert resp.status == 200
        token = await get_token(session, sim, TENANT)
        headers = {"Authorization": f"Bearer {token}", "ST-App-Key": sim.app_key}
        url = sim.feed_url(TENANT, CUSTOMERS)
        async with raw_session.get(url, headers={**headers, "Accept-Encoding": "gzip"}) as r:
            assert (r.status, r.headers.get("Content-Encoding")) == (503, "gzip")
            check_problem(msgspec.json.decode(gzip.decompress(await r.read())), 503)


# -- plumbing -------------------------------------------------------------------------------


def test_assignments_take_the_type_of_their_quirk() -> None:
    parsed = parse_assignments("gzip=1,keyless=0.5,error_body=html,out-of-order=1", "here")
    assert parsed == {"gzip": True, "keyless": 0.5, "error_body": "html", "out_of_order": 1.0}
    assert parse_assignments("gzip=off", "here") == {"gzip": False}
    with pytest.raises(ValueError, match="gzip"):
        Quirks().apply(parse_assignments("gzip=maybe", "here"))
    assert Quirks().record_style is None
    assert Quirks(naive_timestamps=0.5).record_style == RecordStyle(naive_timestamps=0.5)


def test_change_batches_share_timestamps_and_skip_deleted_records() -> None:
    log = FeedLog(catalogue.feed(CUSTOMERS), 7, TENANT, 0, 30, SizedCache(10**8))
    now = 2_000_000_000 * 10_000_000
    shared = ChangeQuirks(keyless=0.0, shared_timestamps=1.0, rng=Random(1))
    log.mutate("update", 4, Random(2), now, shared)
    log.mutate("create", 3, Random(2), now, shared)
    stamps = [log.ticks_at(p) for p in range(30, 37)]
    assert stamps == [now] * 4 + [now + 1] * 3, "each batch shares its first change's stamp"
    deleted = log.mutate("delete", 5, Random(3), now)
    assert len(set(deleted)) == 5
    entries, _ = log.scan(0, len(log.log), 100, "Any")
    assert len(entries) == 28
    assert not {log.key(e.index) for e in entries} & set(deleted)
    assert log.deleted_keys() == deleted
    assert len(msgspec.json.decode(log.ground_truth())) == 28
    keyless = ChangeQuirks(keyless=1.0, shared_timestamps=0.0, rng=Random(1))
    assert log.mutate("create", 2, Random(4), now, keyless) == []
    assert len(msgspec.json.decode(log.ground_truth())) == 28
    assert [msgspec.json.decode(r).get("id", "absent") for r in log.keyless_records()] == [
        None,
        "absent",
    ]
    assert len(log.mutate("update", 100, Random(5), now)) == 28


async def test_cli_flags_of_the_new_quirks() -> None:
    args = ["--records", "6", "--tenants", "1001,1002", "--gzip", "--error-body", "html"]
    args += ["--naive-timestamps", "1", "--keyless", "0.25", "--deletions", "0.5"]
    args += ["--tenant-quirks", "1002:gzip=off,keyless=1,out-of-order=1,rate_limit_body=text"]
    proc = SimulatorProcess(args)
    await asyncio.to_thread(proc.start)
    try:
        mine = await asyncio.to_thread(proc.set_quirks, TENANT)
        other = await asyncio.to_thread(proc.set_quirks, OTHER)
        assert (mine["gzip"], mine["error_body"], mine["naive_timestamps"]) == (True, "html", 1.0)
        assert (mine["keyless"], mine["deletions"], mine["out_of_order"]) == (0.25, 0.5, 0.0)
        assert (other["gzip"], other["keyless"], other["out_of_order"]) == (False, 1.0, 1.0)
        assert other["rate_limit_body"] == "text"
        assert await asyncio.to_thread(proc.mutate, OTHER, CUSTOMERS, "create", 2) == []
        summary = await asyncio.to_thread(proc.truth, OTHER, CUSTOMERS)
        assert len(summary["keyless"]["records"]) == 2
        deleted = await asyncio.to_thread(proc.mutate, TENANT, CUSTOMERS, "delete", 2)
        assert (await asyncio.to_thread(proc.truth, TENANT, CUSTOMERS))["deleted"] == deleted
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


@pytest.mark.parametrize(
    "args",
    [
        ["--keyless", "2"],
        ["--error-body", "xml"],
        ["--tenant-quirks", "1002:gzip=maybe"],
        ["--tenant-quirks", "1002:naive_timestamps=-1"],
    ],
)
def test_cli_rejects_bad_new_quirks(args: list[str]) -> None:
    with pytest.raises(RuntimeError, match="exited with status 2"):
        SimulatorProcess(args).start()
