"""Simulator quirks over real HTTP: each happens when on, for its tenant only, not when off."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from email.utils import parsedate_to_datetime
from random import Random
from typing import Any

import aiohttp
import msgspec
import pytest

from syncd import catalogue
from syncd.simulator.cache import SizedCache
from syncd.simulator.cli import add_arguments, quirks_from_args
from syncd.simulator.data import FeedLog
from syncd.simulator.quirks import EchoPlace, Quirks, echo_in_page, edit_entries, parse_assignments
from syncd.testing.simulator import (
    RunningSimulator,
    SimulatorProcess,
    credentials,
    make_options,
    run_simulator,
)
from tests.test_simulator import Client, Envelope, check_problem, get_token, key_of

TENANT = 1001
OTHER = 1002
CUSTOMERS = "crm.customers"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def clients(session: aiohttp.ClientSession, sim: RunningSimulator) -> tuple[Client, Client]:
    mine = Client(session, sim, await get_token(session, sim, TENANT))
    other = Client(session, sim, await get_token(session, sim, OTHER))
    return mine, other


async def raw_page(client: Client, tenant: int, feed: str, **params: str) -> dict[str, Any]:
    status, body, _ = await client.get(feed, tenant=tenant, **params)
    assert status == 200, body
    decoded: dict[str, Any] = msgspec.json.decode(body)
    return decoded


async def drain(client: Client, tenant: int, feed: str, **params: str) -> tuple[list[bytes], str]:
    """Every record until hasMore is false, and the final continueFrom."""
    records: list[bytes] = []
    for _ in range(1000):
        status, body, _ = await client.get(feed, tenant=tenant, **params)
        assert status == 200, body
        page = msgspec.json.decode(body, type=Envelope)
        records.extend(bytes(raw) for raw in page.data)
        params["from"] = page.continueFrom
        if not page.hasMore:
            return records, page.continueFrom
    raise AssertionError("the feed never drained")


async def truth_by_key(
    session: aiohttp.ClientSession, sim: RunningSimulator, tenant: int, feed: str
) -> dict[str, dict[str, Any]]:
    async with session.get(sim.sim_url(tenant, feed, "records")) as resp:
        assert resp.status == 200
        records = msgspec.json.decode(await resp.read(), type=list[msgspec.Raw])
    return {key_of(feed, bytes(r)): msgspec.json.decode(r) for r in records}


def newest_by_key(feed: str, records: list[bytes]) -> dict[str, dict[str, Any]]:
    """What a correct consumer keeps: per key, the version with the latest modifiedOn."""
    newest: dict[str, dict[str, Any]] = {}
    for raw in records:
        record = msgspec.json.decode(raw)
        key = key_of(feed, raw)
        if key not in newest or record["modifiedOn"] > newest[key]["modifiedOn"]:
            newest[key] = record
    return newest


async def stats(session: aiohttp.ClientSession, sim: RunningSimulator, tenant: int) -> Any:
    async with session.get(sim.url + "/_sim/stats") as resp:
        return (await resp.json())["tenants"][str(tenant)]


async def wait_for_stat(
    session: aiohttp.ClientSession, sim: RunningSimulator, tenant: int, name: str, value: int
) -> None:
    for _ in range(600):
        if (await stats(session, sim, tenant))[name] == value:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} of tenant {tenant} never became {value}")


# -- plumbing -------------------------------------------------------------------------------


async def test_quirks_control_endpoint(session: aiohttp.ClientSession) -> None:
    async with run_simulator(
        records=5, quirks={"hang": 0.25}, tenant_quirks={OTHER: {"no_progress": 1.0}}
    ) as sim:
        url = f"{sim.url}/_sim/tenants/{{}}/quirks"
        async with session.get(url.format(TENANT)) as resp:
            mine = (await resp.json())["quirks"]
        async with session.get(url.format(OTHER)) as resp:
            other = (await resp.json())["quirks"]
        assert (mine["hang"], mine["no_progress"]) == (0.25, 0.0)
        assert (other["hang"], other["no_progress"]) == (0.25, 1.0)
        assert mine["repeat_tail"] is True

        async with session.post(url.format(TENANT), json={"stale_repeats": 0.5}) as resp:
            assert resp.status == 200
            assert (await resp.json())["quirks"]["stale_repeats"] == 0.5
        assert sim.quirks(TENANT).stale_repeats == 0.5
        assert sim.quirks(OTHER).stale_repeats == 0.0
        # Each change starts from what the tenant started with; {} goes back to it.
        async with session.post(url.format(TENANT), json={"hang": 0}) as resp:
            assert (await resp.json())["quirks"]["stale_repeats"] == 0.0
        async with session.post(url.format(OTHER), json={}) as resp:
            assert (await resp.json())["quirks"]["no_progress"] == 1.0

        bad_bodies: list[tuple[Any, str]] = [
            ({"hang": 1.5}, "hang"),
            ({"surprise": 1}, "surprise"),
            ({"repeat_tail": "yes"}, "repeat_tail"),
            ({"no_progress_cursor": "sideways"}, "no_progress_cursor"),
            ([1, 2], "JSON object"),
        ]
        for body, named in bad_bodies:
            async with session.post(url.format(TENANT), json=body) as resp:
                assert resp.status == 400, body
                problem = await resp.json()
                check_problem(problem, 400)
                assert named in problem["errors"]["body"][0]
        async with session.post(url.format(TENANT), data=b"{nope") as resp:
            assert resp.status == 400
        async with session.post(url.format(4242), json={"hang": 1}) as resp:
            assert resp.status == 404
        assert sim.quirks(TENANT).hang == 0.0

        sim.set_quirks(OTHER, hang=1.0, no_progress=0.0)
        async with session.get(sim.url + "/_sim/info") as resp:
            info = (await resp.json())["quirks"]
        assert info[str(OTHER)]["hang"] == 1.0
        assert info[str(TENANT)]["hang"] == 0.0
        with pytest.raises(ValueError, match="duplicate_keys"):
            sim.set_quirks(OTHER, duplicate_keys=-1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hang": float("nan")}, "hang=nan: must be a probability"),
        ({"stale_repeats": float("inf")}, "stale_repeats=inf"),
        ({"duplicate_keys": -0.5}, "duplicate_keys=-0.5"),
        ({"no_progress": True}, "no_progress"),
        ({"rate_limit_body": "xml"}, "rate_limit_body"),
        ({"error_body": "json"}, "error_body"),
        ({"gzip": 1.0}, "gzip"),
        ({"keyless": 1.01}, "keyless=1.01"),
        ({"naive_timestamps": float("nan")}, "naive_timestamps=nan"),
        ({"date_offset": float("nan")}, "date_offset=nan"),
        ({"date_offset": -4e7}, "date_offset=-40000000.0: must be seconds within a year"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_quirk_validation(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Quirks().apply(changes)


def test_quirk_assignments() -> None:
    parsed = parse_assignments("hang=1, no-progress-cursor=null,repeat_tail=off", "here")
    assert parsed == {"hang": 1.0, "no_progress_cursor": "null", "repeat_tail": False}
    assert Quirks().apply(parsed).hang == 1.0
    for bad in ("hang", "bogus=1", "=1"):
        with pytest.raises(ValueError, match=r"here: .* is not NAME=VALUE"):
            parse_assignments(bad, "here")


def test_page_edits_are_deterministic_and_keep_current_versions() -> None:
    log = FeedLog(catalogue.feed(CUSTOMERS), 7, TENANT, 0, 30, SizedCache(10**8))
    log.mutate("update", 10, Random(3), 2_000_000_000 * 10_000_000)
    entries, _ = log.scan(0, len(log.log), 100, "Any")
    quirks = Quirks(duplicate_keys=0.5, stale_repeats=0.5)
    tail_end = entries[-5].position
    first = edit_entries(log, entries, quirks, Random("x"), tail_end)
    assert first == edit_entries(log, entries, quirks, Random("x"), tail_end)
    extra = [e for e in first if e not in entries]
    assert extra, "some edits were made"
    for entry in extra:
        older = log.previous_entry(entry.index)
        assert entry == older
        assert older.version == log.versions[entry.index] - 1
    # Stale versions replace entries only in the repeated tail; duplicates only add.
    replaced = [e for e in entries if e not in first]
    assert replaced
    assert all(e.position < tail_end for e in replaced)
    assert edit_entries(log, entries, Quirks(), Random("x"), tail_end) == entries


def test_make_options_rejects_bad_quirks() -> None:
    with pytest.raises(ValueError, match="hang_token"):
        make_options(quirks={"hang_token": 2})
    with pytest.raises(ValueError, match="tenant_quirks: 4242 is not a tenant"):
        make_options(tenant_quirks={4242: {"hang": 1}})
    with pytest.raises(ValueError, match=r"tenant 1002.*no_progress"):
        make_options(tenant_quirks={OTHER: {"no_progress": -0.1}})


async def test_cli_quirk_flags(session: aiohttp.ClientSession) -> None:
    args = ["--records", "6", "--tenants", "1001,1002", "--page-size", "4", "--hang-token", "0"]
    args += ["--tenant-quirks", "1002:no_progress=1,no-progress-cursor=null"]
    args += ["--rate-limit-body", "apim", "--no-repeat-tail"]
    proc = SimulatorProcess(args)
    await asyncio.to_thread(proc.start)
    try:
        bodies = {}
        for tenant in (TENANT, OTHER):
            client_id, secret = credentials(tenant)
            form = {"grant_type": "client_credentials", "client_id": client_id}
            async with session.post(proc.auth_url, data={**form, "client_secret": secret}) as r:
                token = (await r.json())["access_token"]
            headers = {"Authorization": token, "ST-App-Key": proc.app_key}
            url = f"{proc.url}/crm/v2/tenant/{tenant}/export/customers"
            async with session.get(url, headers=headers) as resp:
                bodies[tenant] = await resp.json()
        assert len(bodies[TENANT]["data"]) == 4
        assert bodies[OTHER] == {"hasMore": True, "continueFrom": None, "data": []}
        changed = await asyncio.to_thread(lambda: proc.set_quirks(OTHER, no_progress=0))
        assert changed["no_progress"] == 0.0
        assert changed["no_progress_cursor"] == "null"
        assert changed["rate_limit_body"] == "apim"
        assert changed["repeat_tail"] is False
        async with session.get(url, headers=headers) as resp:
            assert len((await resp.json())["data"]) == 4
    finally:
        assert await asyncio.to_thread(proc.stop) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--hang", "1.5"], "exited with status 2"),
        (["--tenant-quirks", "1002:bogus=1"], "exited with status 2"),
        (["--tenant-quirks", "nope"], "exited with status 2"),
        (["--tenant-quirks", "1002:hang=2"], "exited with status 2"),
        (["--tenant-quirks", "4242:hang=1"], "exited with status 2"),
        (["--no-progress-cursor", "sideways"], "exited with status 2"),
    ],
)
def test_cli_rejects_bad_quirks(args: list[str], message: str) -> None:
    with pytest.raises(RuntimeError, match=message):
        SimulatorProcess(args).start()


# -- repeated tails, stale repeats, duplicate keys ------------------------------------------


async def test_repeat_tail_on_by_default_and_off_per_tenant(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(records=30, page_size=10, overlap=3) as sim:
        mine, other = await clients(session, sim)
        sim.set_quirks(OTHER, repeat_tail=False)
        recent = {"includeRecentChanges": "true"}
        _, cursor = await drain(mine, TENANT, CUSTOMERS, **recent)
        again = await raw_page(mine, TENANT, CUSTOMERS, **recent, **{"from": cursor})
        assert (again["hasMore"], again["continueFrom"], len(again["data"])) == (False, cursor, 3)
        seen, cursor = await drain(other, OTHER, CUSTOMERS, **recent)
        assert len(seen) == 30, "no page repeats the previous one's tail"
        again = await raw_page(other, OTHER, CUSTOMERS, **recent, **{"from": cursor})
        assert (again["hasMore"], again["continueFrom"], again["data"]) == (False, cursor, [])


async def test_stale_repeats_in_a_drained_tail(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=40, page_size=10, overlap=4) as sim:
        sim.set_quirks(TENANT, stale_repeats=1.0)
        mine, other = await clients(session, sim)
        recent = {"includeRecentChanges": "true"}
        for tenant, client in ((TENANT, mine), (OTHER, other)):
            changed = sim.state.mutate(tenant, CUSTOMERS, "update", 4)
            served, cursor = await drain(client, tenant, CUSTOMERS, **recent)
            latest = newest_by_key(CUSTOMERS, served)
            truth = await truth_by_key(session, sim, tenant, CUSTOMERS)
            assert latest == truth
            again = await raw_page(client, tenant, CUSTOMERS, **recent, **{"from": cursor})
            assert again["continueFrom"] == cursor
            repeated = {key_of(CUSTOMERS, msgspec.json.encode(r)): r for r in again["data"]}
            assert set(repeated) == set(changed)
            for key, record in repeated.items():
                if tenant == TENANT:
                    assert record["modifiedOn"] < truth[key]["modifiedOn"], "an older version"
                    assert record != truth[key]
                else:
                    assert record == truth[key]
            # What a correct consumer keeps is still the ground truth.
            repeats = [msgspec.json.encode(r) for r in again["data"]]
            assert newest_by_key(CUSTOMERS, served + repeats) == truth


@pytest.mark.parametrize("recent", ["true", "false"])
async def test_duplicate_keys_in_a_page(session: aiohttp.ClientSession, recent: str) -> None:
    async with run_simulator(records=40, page_size=15, recent_delay=0) as sim:
        sim.set_quirks(TENANT, duplicate_keys=1.0)
        mine, other = await clients(session, sim)
        for tenant, client in ((TENANT, mine), (OTHER, other)):
            changed = set(sim.state.mutate(tenant, CUSTOMERS, "update", 6))
            doubled: set[str] = set()
            served: list[bytes] = []
            params = {"includeRecentChanges": recent}
            while True:
                page = await raw_page(client, tenant, CUSTOMERS, **params)
                records = [msgspec.json.encode(r) for r in page["data"]]
                counts = Counter(key_of(CUSTOMERS, r) for r in records)
                for key in (k for k, n in counts.items() if n > 1):
                    versions = {r for r in records if key_of(CUSTOMERS, r) == key}
                    assert len(versions) == counts[key] == 2, "same key, different versions"
                    doubled.add(key)
                served += records
                params["from"] = page["continueFrom"]
                if not page["hasMore"]:
                    break
            assert doubled == (changed if tenant == TENANT else set())
            truth = await truth_by_key(session, sim, tenant, CUSTOMERS)
            assert newest_by_key(CUSTOMERS, served) == truth


# -- no progress ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("same", "same"), ("missing", "absent"), ("null", None), ("empty", "")],
)
async def test_no_progress_pages(
    session: aiohttp.ClientSession, mode: str, expected: str | None
) -> None:
    async with run_simulator(records=30, page_size=10) as sim:
        mine, other = await clients(session, sim)
        first = await raw_page(mine, TENANT, CUSTOMERS)
        cursor = first["continueFrom"]
        sim.set_quirks(TENANT, no_progress=1.0, no_progress_cursor=mode)
        for _ in range(3):
            page = await raw_page(mine, TENANT, CUSTOMERS, **{"from": cursor})
            assert page["hasMore"] is True
            assert page["data"] == []
            if expected == "absent":
                assert "continueFrom" not in page
            elif expected == "same":
                assert page["continueFrom"] == cursor
            else:
                assert page["continueFrom"] == expected
        beside = await raw_page(other, OTHER, CUSTOMERS)
        assert len(beside["data"]) == 10
        assert (await stats(session, sim, TENANT))["no_progress"] == 3
        assert (await stats(session, sim, OTHER))["no_progress"] == 0
        sim.set_quirks(TENANT)
        page = await raw_page(mine, TENANT, CUSTOMERS, **{"from": cursor})
        assert len(page["data"]) == 10
        assert page["continueFrom"] != cursor


async def test_no_progress_first_page_cursor_leads_back_to_the_start(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(records=30, page_size=10) as sim:
        mine, _ = await clients(session, sim)
        sim.set_quirks(TENANT, no_progress=1.0)
        stuck = await raw_page(mine, TENANT, CUSTOMERS)
        sim.set_quirks(TENANT)
        resumed = await raw_page(mine, TENANT, CUSTOMERS, **{"from": stuck["continueFrom"]})
        assert resumed["data"] == (await raw_page(mine, TENANT, CUSTOMERS))["data"]


# -- hanging requests -----------------------------------------------------------------------


async def test_hanging_requests_for_one_tenant(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=10, tenant_quirks={TENANT: {"hang": 1.0}}) as sim:
        mine, other = await clients(session, sim)
        hung = asyncio.create_task(mine.get(CUSTOMERS))
        await wait_for_stat(session, sim, TENANT, "hung", 1)
        assert (await other.get(CUSTOMERS, tenant=OTHER))[0] == 200
        assert not hung.done()
        hung.cancel()  # the client gives up: the simulator lets the request go
        with pytest.raises(asyncio.CancelledError):
            await hung
        await wait_for_stat(session, sim, TENANT, "in_flight", 0)
        timeout = aiohttp.ClientTimeout(total=0.3)
        url = sim.feed_url(TENANT, CUSTOMERS)
        with pytest.raises(TimeoutError):
            async with session.get(url, headers=mine.headers(), timeout=timeout):
                pass
        await wait_for_stat(session, sim, TENANT, "in_flight", 0)
        assert (await stats(session, sim, TENANT))["hung"] == 2
        assert (await stats(session, sim, OTHER))["hung"] == 0
        sim.set_quirks(TENANT, hang=0.0)
        assert (await mine.get(CUSTOMERS))[0] == 200


async def test_hung_requests_end_when_the_simulator_stops(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(records=10, quirks={"hang": 1.0}) as sim:
        mine, _ = await clients(session, sim)
        hung = asyncio.create_task(mine.get(CUSTOMERS))
        await wait_for_stat(session, sim, TENANT, "hung", 1)
    # Closing released the handler instead of waiting for aiohttp's shutdown timeout.
    done, _ = await asyncio.wait({hung}, timeout=30)
    assert done


async def test_hanging_token_endpoint_for_one_tenant(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=5, tenant_quirks={TENANT: {"hang_token": 1.0}}) as sim:
        timeout = aiohttp.ClientTimeout(total=0.3)
        client_id, secret = credentials(TENANT)
        form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
        with pytest.raises(TimeoutError):
            async with session.post(sim.auth_url, data=form, timeout=timeout):
                pass
        await get_token(session, sim, OTHER)
        await wait_for_stat(session, sim, TENANT, "hung", 1)
        assert (await stats(session, sim, OTHER))["hung"] == 0
        sim.set_quirks(TENANT, hang_token=0.0)
        await get_token(session, sim, TENANT)


# -- 429 bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("style", ["apim", "apim-retry-after"])
async def test_api_management_429_bodies(session: aiohttp.ClientSession, style: str) -> None:
    async with run_simulator(
        records=5, rate_limit=2, tenant_quirks={TENANT: {"rate_limit_body": style}}
    ) as sim:
        mine, other = await clients(session, sim)
        for client, tenant in ((mine, TENANT), (other, OTHER)):
            results = await asyncio.gather(
                *(client.get(CUSTOMERS, tenant=tenant) for _ in range(5))
            )
            limited = [(body, resp) for status, body, resp in results if status == 429]
            assert len(limited) == 3
            for body, resp in limited:
                decoded = msgspec.json.decode(body)
                if tenant == OTHER:
                    check_problem(decoded, 429)
                    assert int(resp.headers["Retry-After"]) >= 1
                    continue
                assert set(decoded) == {"statusCode", "message"}
                assert decoded["statusCode"] == 429
                assert decoded["message"].startswith("Rate limit is exceeded. Try again in ")
                assert decoded["message"].endswith(" seconds.")
                seconds = int(decoded["message"].split()[-2])
                assert seconds >= 1
                if style == "apim":
                    assert "Retry-After" not in resp.headers
                else:
                    assert int(resp.headers["Retry-After"]) == seconds


async def test_injected_429s_take_the_tenants_style(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=5, rate_limit=10_000) as sim:
        mine, _ = await clients(session, sim)
        url = f"{sim.url}/_sim/tenants/{TENANT}/faults"
        async with session.post(url, json={"error_rate": 1.0, "status": 429}) as resp:
            assert resp.status == 200
        status, body, _ = await mine.get(CUSTOMERS)
        assert status == 429
        check_problem(msgspec.json.decode(body), 429)
        sim.set_quirks(TENANT, rate_limit_body="apim")
        status, body, resp = await mine.get(CUSTOMERS)
        assert status == 429
        assert msgspec.json.decode(body) == {
            "statusCode": 429,
            "message": "Rate limit is exceeded. Try again in 3 seconds.",
        }
        assert "Retry-After" not in resp.headers


# -- the API's clock -------------------------------------------------------------------------


def date_offset_of(resp: aiohttp.ClientResponse, sent: float, received: float) -> float:
    """How far the Date header (whole seconds, so +0.5) is from this clock's midpoint."""
    return parsedate_to_datetime(resp.headers["Date"]).timestamp() + 0.5 - (sent + received) / 2


async def test_date_offset_skews_one_tenants_date_header(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=5, tenant_quirks={OTHER: {"date_offset": -90.0}}) as sim:
        mine, other = await clients(session, sim)
        for client, tenant, expected in ((mine, TENANT, 0.0), (other, OTHER, -90.0)):
            sent = time.time()
            status, _, resp = await client.get(CUSTOMERS, tenant=tenant)
            assert status == 200
            assert date_offset_of(resp, sent, time.time()) == pytest.approx(expected, abs=1.5)
        # Error answers carry it too; a change at runtime applies at once.
        sim.set_quirks(TENANT, date_offset=3600.0)
        sent = time.time()
        status, _, resp = await Client(session, sim, "not-a-token").get(CUSTOMERS, tenant=TENANT)
        assert status == 401
        assert date_offset_of(resp, sent, time.time()) == pytest.approx(3600.0, abs=1.5)


def test_date_offset_flag() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--date-offset", "-30", "--tenant-quirks", "7:date_offset=5"])
    quirks, per_tenant = quirks_from_args(args)
    assert quirks.date_offset == -30.0
    assert dict(per_tenant)[7].date_offset == 5.0


def test_echo_credential_writes_it_where_asked() -> None:
    page = json.dumps(
        {"hasMore": True, "continueFrom": "c1", "data": [{"id": 1, "modifiedOn": "2026"}]}
    ).encode()
    places: list[tuple[EchoPlace, bool]] = [
        ("record", True),
        ("key", True),
        ("timestamp", False),
        ("cursor", True),
    ]
    for place, escape in places:
        body = echo_in_page(page, "tok+en/42", place, escape, ("id",), "modifiedOn")
        assert (b"tok+en/42" in body) is not escape
        decoded = json.loads(body)
        record = decoded["data"][0]
        got = {
            "record": record.get("echo"),
            "key": record["id"],
            "timestamp": record["modifiedOn"],
            "cursor": decoded["continueFrom"],
        }[place]
        assert got == "tok+en/42", place
    empty = json.dumps({"hasMore": False, "continueFrom": "c", "data": []}).encode()
    assert echo_in_page(empty, "tok+en/42", "record", True, ("id",), None) == empty
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(
        ["--echo-credential", "other_token", "--echo-in", "cursor", "--echo-plain"]
    )
    quirks, _ = quirks_from_args(args)
    assert (quirks.echo_credential, quirks.echo_in, quirks.echo_escaped) == (
        "other_token",
        "cursor",
        False,
    )
    with pytest.raises(ValueError, match="echo_in"):
        Quirks().apply({"echo_in": "header"})


# -- defaults -------------------------------------------------------------------------------


async def test_changes_wait_fifteen_minutes_by_default(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=20, page_size=50) as sim:
        assert sim.options.recent_delay == 900.0
        mine, _ = await clients(session, sim)
        _, cursor = await drain(mine, TENANT, CUSTOMERS)
        sim.state.mutate(TENANT, CUSTOMERS, "update", 2)
        hidden = await raw_page(mine, TENANT, CUSTOMERS, **{"from": cursor})
        assert (hidden["data"], hidden["continueFrom"]) == ([], cursor)
        recent = await raw_page(
            mine, TENANT, CUSTOMERS, **{"from": cursor, "includeRecentChanges": "true"}
        )
        assert len(recent["data"]) >= 2
