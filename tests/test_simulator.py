"""The ServiceTitan simulator over real HTTP: paging, auth, throttles, faults, ground truth."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import msgspec
import pytest
import pytest_asyncio

from syncd import catalogue
from syncd.testing.simulator import RunningSimulator, SimulatorProcess, credentials, run_simulator

TENANT = 1001
OTHER = 1002
CUSTOMERS = "crm.customers"


class Envelope(msgspec.Struct):
    hasMore: bool
    continueFrom: str
    data: list[msgspec.Raw]


def check_problem(body: Any, status: int) -> None:
    jsonschema.validate(body, catalogue.error_schema())
    assert body["status"] == status


async def get_token(session: aiohttp.ClientSession, sim: RunningSimulator, tenant: int) -> str:
    client_id, secret = credentials(tenant)
    form = {"grant_type": "client_credentials", "client_id": client_id, "client_secret": secret}
    async with session.post(sim.auth_url, data=form) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["token_type"] == "Bearer"
    assert isinstance(body["expires_in"], int)
    assert body["expires_in"] >= 1
    return str(body["access_token"])


class Client:
    """A minimal export client for one tenant of a simulator."""

    def __init__(self, session: aiohttp.ClientSession, sim: RunningSimulator, token: str) -> None:
        self.session, self.sim, self.token = session, sim, token

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "ST-App-Key": self.sim.app_key}

    async def get(
        self, feed: str, tenant: int = TENANT, **params: str
    ) -> tuple[int, bytes, aiohttp.ClientResponse]:
        url = self.sim.feed_url(tenant, feed)
        async with self.session.get(url, params=params, headers=self.headers()) as resp:
            return resp.status, await resp.read(), resp

    async def page(self, feed: str, **params: str) -> Envelope:
        status, body, _ = await self.get(feed, **params)
        assert status == 200, body
        return msgspec.json.decode(body, type=Envelope)

    async def drain(self, feed: str, **params: str) -> tuple[list[bytes], str]:
        """Every record until hasMore is false; and the final continueFrom."""
        records: list[bytes] = []
        while True:
            page = await self.page(feed, **params)
            records.extend(bytes(raw) for raw in page.data)
            params["from"] = page.continueFrom
            if not page.hasMore:
                return records, page.continueFrom


async def ground_truth(
    session: aiohttp.ClientSession, sim: RunningSimulator, feed: str
) -> list[bytes]:
    async with session.get(sim.sim_url(TENANT, feed, "records")) as resp:
        assert resp.status == 200
        return [
            bytes(raw) for raw in msgspec.json.decode(await resp.read(), type=list[msgspec.Raw])
        ]


def key_of(feed: str, record: bytes) -> str:
    key = catalogue.feed(feed).record_key(msgspec.json.decode(record))
    assert key is not None
    return key


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def sim() -> AsyncIterator[RunningSimulator]:
    async with run_simulator(records=120, page_size=25, seed=7, rate_limit=10_000) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
async def client(session: aiohttp.ClientSession, sim: RunningSimulator) -> Client:
    return Client(session, sim, await get_token(session, sim, TENANT))


@pytest.mark.parametrize(
    "feed",
    [
        CUSTOMERS,
        "customer-interactions.technician-ratings",
        "payroll.payroll-settings",
        "jpm.job-history",
        "sales.opportunities",
        "sales.estimates/export",
    ],
)
async def test_paging_visits_every_record_once(
    client: Client, session: aiohttp.ClientSession, sim: RunningSimulator, feed: str
) -> None:
    records, _ = await client.drain(feed)
    truth = await ground_truth(session, sim, feed)
    keys = [key_of(feed, r) for r in records]
    assert len(keys) == len(set(keys)) == len(truth)
    assert sorted(records) == sorted(truth)


async def test_continue_from_is_opaque_and_resumes_after_the_last_page(client: Client) -> None:
    first = await client.page(CUSTOMERS)
    assert first.hasMore
    assert not re.fullmatch(r"\d+", first.continueFrom)
    _records, final = await client.drain(CUSTOMERS)
    last = await client.page(CUSTOMERS, **{"from": final})
    assert (last.hasMore, last.data, last.continueFrom) == (False, [], final)


async def test_recent_changes_repeat_records_but_miss_nothing(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(records=200, page_size=30, overlap=4, seed=3) as running:
        client = Client(session, running, await get_token(session, running, TENANT))
        seen: list[bytes] = []
        params = {"includeRecentChanges": "true"}
        for step in range(100):
            page = await client.page(CUSTOMERS, **params)
            seen.extend(bytes(raw) for raw in page.data)
            params["from"] = page.continueFrom
            if step in (1, 3):
                kinds = ("update", "create") if step == 1 else ("deactivate", "update")
                for kind in kinds:
                    url = running.sim_url(TENANT, CUSTOMERS, "mutate")
                    async with session.post(url, params={"count": "6", "kind": kind}) as resp:
                        assert resp.status == 200
            if not page.hasMore:
                break
        truth = await ground_truth(session, running, CUSTOMERS)
    counts = Counter(key_of(CUSTOMERS, r) for r in seen)
    assert set(truth) <= set(seen), "the final version of every record was served"
    assert max(counts.values()) > 1, "overlapping pages repeat records"
    assert len(truth) == 206


async def test_changes_wait_for_the_recent_delay(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=40, page_size=100, recent_delay=0.3) as running:
        client = Client(session, running, await get_token(session, running, TENANT))
        _, cursor = await client.drain(CUSTOMERS)
        running.state.mutate(TENANT, CUSTOMERS, "update", 3)
        hidden = await client.page(CUSTOMERS, **{"from": cursor})
        recent = await client.page(CUSTOMERS, **{"from": cursor, "includeRecentChanges": "TRUE"})
        await asyncio.sleep(0.35)
        later = await client.page(CUSTOMERS, **{"from": cursor})
    assert hidden.data == []
    assert hidden.continueFrom == cursor
    assert not hidden.hasMore
    assert len(later.data) == 3
    assert [bytes(r) for r in later.data] == [bytes(r) for r in recent.data][-3:]


async def test_from_date_returns_records_modified_since(
    client: Client, session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    truth = await ground_truth(session, sim, CUSTOMERS)
    stamps = sorted(msgspec.json.decode(r)["modifiedOn"] for r in truth)
    day = stamps[len(stamps) // 2][:10]
    records, _ = await client.drain(CUSTOMERS, **{"from": day})
    served = sorted(msgspec.json.decode(r)["modifiedOn"] for r in records)
    assert served == [s for s in stamps if s >= day]
    exact = stamps[80]
    records, _ = await client.drain(CUSTOMERS, **{"from": exact})
    assert min(msgspec.json.decode(r)["modifiedOn"] for r in records) == exact


async def test_active_filter(client: Client) -> None:
    feed = "dispatch.appointment-assignments"
    default, _ = await client.drain(feed)
    everything, _ = await client.drain(feed, active="Any")
    inactive, _ = await client.drain(feed, active="false")
    assert all(msgspec.json.decode(r)["active"] for r in default)
    assert all(not msgspec.json.decode(r)["active"] for r in inactive)
    assert inactive
    assert sorted(default + inactive) == sorted(everything)
    status, body, _ = await client.get(feed, active="maybe")
    assert status == 400
    check_problem(msgspec.json.decode(body), 400)


async def test_cached_page_follows_mutations(client: Client, sim: RunningSimulator) -> None:
    feed = "crm.locations"
    first = await client.get(feed)
    again = await client.get(feed)
    assert first[1] == again[1]
    page = msgspec.json.decode(first[1], type=Envelope)
    victim = sim.state.log(TENANT, feed).key(0)
    assert victim in {key_of(feed, bytes(r)) for r in page.data}
    sim.state.mutate(TENANT, "crm.leads", "update", 5)  # another feed: page stays cached
    assert (await client.get(feed))[1] == first[1]
    sim.state.mutate(TENANT, feed, "update", sim.options.records)
    after = msgspec.json.decode((await client.get(feed))[1], type=Envelope)
    assert victim not in {key_of(feed, bytes(r)) for r in after.data}


async def test_mutate_endpoint_and_ground_truth(
    session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    url = sim.sim_url(OTHER, CUSTOMERS, "mutate")
    async with session.post(url, params={"count": "4", "kind": "deactivate"}) as resp:
        keys = (await resp.json())["keys"]
    async with session.post(url, params={"count": "2", "kind": "create"}) as resp:
        created = (await resp.json())["keys"]
    async with session.get(sim.sim_url(OTHER, CUSTOMERS, "records")) as resp:
        truth = {str(r["id"]): r for r in await resp.json()}
    assert len(keys) == 4
    assert len(created) == 2
    assert len(truth) == sim.options.records + 2
    for key in keys:
        assert truth[key]["active"] is False
        assert truth[key]["mergedToId"] is not None
    async with session.post(url, params={"kind": "explode"}) as resp:
        assert resp.status == 400
    async with session.get(sim.sim_url(OTHER, "crm.nothing", "records")) as resp:
        assert resp.status == 404
        check_problem(await resp.json(), 404)


async def test_auth_errors(
    session: aiohttp.ClientSession, sim: RunningSimulator, client: Client
) -> None:
    form = {"grant_type": "client_credentials", "client_id": "client-1001", "client_secret": "x"}
    async with session.post(sim.auth_url, data=form) as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "invalid_client"})
    form = {**form, "client_secret": "secret-1001", "grant_type": "password"}
    async with session.post(sim.auth_url, data=form) as resp:
        assert (resp.status, await resp.json()) == (400, {"error": "unsupported_grant_type"})

    url = sim.feed_url(TENANT, CUSTOMERS)
    cases = [
        ({"Authorization": client.token}, 401),
        ({"Authorization": client.token, "ST-App-Key": "wrong"}, 401),
        ({"ST-App-Key": sim.app_key}, 401),
        ({"Authorization": "Bearer nope", "ST-App-Key": sim.app_key}, 401),
        ({"Authorization": client.token, "ST-App-Key": sim.app_key}, 200),
    ]
    for headers, status in cases:
        async with session.get(url, headers=headers) as resp:
            assert resp.status == status, headers
            if status != 200:
                check_problem(await resp.json(), status)

    status, body, _ = await client.get(CUSTOMERS, tenant=OTHER)
    assert status == 403
    check_problem(msgspec.json.decode(body), 403)

    other_token = (await client.page("crm.leads")).continueFrom
    for bad in ("garbage", "MjAyMA", other_token, client.token):
        status, body, _ = await client.get(CUSTOMERS, **{"from": bad})
        problem = msgspec.json.decode(body)
        assert status == 400, bad
        check_problem(problem, 400)
        assert list(problem["errors"]) == ["from"]

    async with session.get(sim.url + "/crm/v2/tenant/1001/export/nothing") as resp:
        assert resp.status == 404
        check_problem(await resp.json(), 404)


async def test_expired_token(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=5, token_ttl=0.2) as running:
        client = Client(session, running, await get_token(session, running, TENANT))
        assert (await client.get(CUSTOMERS))[0] == 200
        await asyncio.sleep(0.25)
        status, body, _ = await client.get(CUSTOMERS)
        assert status == 401
        check_problem(msgspec.json.decode(body), 401)
        client.token = await get_token(session, running, TENANT)
        assert (await client.get(CUSTOMERS))[0] == 200
        async with session.post(running.url + "/_sim/tokens/expire") as resp:
            assert (await resp.json())["expired"] == 2
        assert (await client.get(CUSTOMERS))[0] == 401


async def test_rate_limit(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=5, rate_limit=5) as running:
        client = Client(session, running, await get_token(session, running, TENANT))
        results = await asyncio.gather(*(client.get(CUSTOMERS) for _ in range(12)))
        other = Client(session, running, await get_token(session, running, OTHER))
        assert (await other.get(CUSTOMERS, tenant=OTHER))[0] == 200
        async with session.get(running.url + "/_sim/stats") as resp:
            stats = await resp.json()
    statuses = Counter(status for status, _, _ in results)
    assert statuses == {200: 5, 429: 7}
    for status, body, resp in results:
        if status == 429:
            problem = msgspec.json.decode(body)
            check_problem(problem, 429)
            seconds = int(resp.headers["Retry-After"])
            assert seconds >= 1
            assert problem["title"].endswith(f"Try again in {seconds} seconds.")
    assert stats["tenants"][str(TENANT)]["rate_limited"] == 7


async def test_token_throttle(session: aiohttp.ClientSession) -> None:
    async with run_simulator(records=1, token_throttle=3) as running:
        for _ in range(3):
            await get_token(session, running, TENANT)
        form = {"grant_type": "client_credentials", "client_id": "client-1001"}
        async with session.post(
            running.auth_url, data={**form, "client_secret": "secret-1001"}
        ) as resp:
            assert resp.status == 429
            assert int(resp.headers["Retry-After"]) >= 1
        await get_token(session, running, OTHER)


async def test_configured_fault_rates(session: aiohttp.ClientSession) -> None:
    faults = {"fault_5xx": 0.2, "fault_truncate": 0.1, "fault_invalid_json": 0.1, "fault_drop": 0.1}
    async with run_simulator(records=3, seed=11, rate_limit=100_000, **faults) as running:
        client = Client(session, running, await get_token(session, running, TENANT))
        outcomes: Counter[str] = Counter()
        for _ in range(400):
            try:
                status, body, _ = await client.get(CUSTOMERS)
            except aiohttp.ClientPayloadError:
                outcomes["dropped"] += 1
                continue
            if status >= 500:
                check_problem(msgspec.json.decode(body), status)
                outcomes["5xx"] += 1
                continue
            try:
                msgspec.json.decode(body, type=Envelope)
                outcomes["ok"] += 1
            except msgspec.DecodeError:
                outcomes["bad_body"] += 1
        async with session.get(running.url + "/_sim/stats") as resp:
            stats = await resp.json()
    # Expected: 5xx 80, bad bodies 64, dropped 32, ok 224 (per 400).
    assert 50 <= outcomes["5xx"] <= 115
    assert 35 <= outcomes["bad_body"] <= 95
    assert 12 <= outcomes["dropped"] <= 55
    assert stats["tenants"][str(TENANT)]["errors"] == 400 - outcomes["ok"]


async def test_token_faults_and_latency(session: aiohttp.ClientSession) -> None:
    async with run_simulator(
        records=1, seed=5, fault_token=0.5, token_throttle=1000, fault_latency=40
    ) as running:
        form = {"grant_type": "client_credentials", "client_id": "client-1001"}
        statuses: Counter[int] = Counter()
        token = ""
        for _ in range(60):
            async with session.post(
                running.auth_url, data={**form, "client_secret": "secret-1001"}
            ) as resp:
                statuses[resp.status] += 1
                if resp.status == 200:
                    token = (await resp.json())["access_token"]
        client = Client(session, running, token)
        started = time.monotonic()
        for _ in range(5):
            assert (await client.get(CUSTOMERS))[0] == 200
        elapsed = time.monotonic() - started
    assert 15 <= statuses[200] <= 45
    assert statuses[200] + sum(n for s, n in statuses.items() if s >= 500) == 60
    assert elapsed >= 5 * 0.02


async def test_runtime_fault_overrides(
    session: aiohttp.ClientSession, sim: RunningSimulator
) -> None:
    client = Client(session, sim, await get_token(session, sim, OTHER))
    url = f"{sim.url}/_sim/tenants/{OTHER}/faults"
    async with session.post(url, json={"error_rate": 1.0, "status": 503}) as resp:
        assert resp.status == 200
    try:
        status, body, _ = await client.get(CUSTOMERS, tenant=OTHER)
        assert status == 503
        check_problem(msgspec.json.decode(body), 503)
        async with session.post(url, json={"rate_limit": 2, "latency_ms": 120}) as resp:
            assert resp.status == 200
        async with session.post(sim.url + "/_sim/reset-stats") as resp:
            assert resp.status == 200
        results = await asyncio.gather(*(client.get(CUSTOMERS, tenant=OTHER) for _ in range(4)))
        assert sorted(status for status, _, _ in results) == [200, 200, 429, 429]
        async with session.get(sim.url + "/_sim/stats") as resp:
            stats = (await resp.json())["tenants"][str(OTHER)]
        assert stats["requests"] == 4
        assert stats["rate_limited"] == 2
        assert stats["max_in_flight"] >= 2
        assert stats["feeds"] == {CUSTOMERS: 4}
        # All four came under this client's token (the 429s too: they were attempts).
        assert [p["requests"] for p in stats["pollers"]] == [4]
        second = Client(session, sim, await get_token(session, sim, OTHER))
        assert (await second.get(CUSTOMERS, tenant=OTHER))[0] in (200, 429)
        async with session.get(sim.url + "/_sim/stats") as resp:
            pollers = (await resp.json())["tenants"][str(OTHER)]["pollers"]
        assert len(pollers) == 2, "each access token is a poller of its own"
        assert pollers[0]["first"] <= pollers[0]["last"] <= pollers[1]["first"]
        async with session.post(url, json={"error_rate": 2}) as resp:
            assert resp.status == 400
        async with session.post(url, json={"surprise": 1}) as resp:
            assert resp.status == 400
    finally:
        async with session.post(url, json={}) as resp:
            assert resp.status == 200
    assert (await client.get(CUSTOMERS, tenant=OTHER))[0] == 200


async def test_background_mutations(session: aiohttp.ClientSession) -> None:
    async with run_simulator(
        records=20, feeds=[CUSTOMERS, "jpm.jobs"], mutation_rate=100
    ) as running:
        await asyncio.sleep(0.3)
        grown = [len(running.state.log(t, CUSTOMERS).log) for t in running.state.tenants]
        grown += [len(running.state.log(t, "jpm.jobs").log) for t in running.state.tenants]
        async with session.get(running.url + "/crm/v2/tenant/1001/export/leads") as resp:
            assert resp.status == 404
    assert sum(grown) - 6 * 20 >= 30


async def test_cli_subprocess_serves(session: aiohttp.ClientSession) -> None:
    args = ["--records", "12", "--tenants", "77", "--page-size", "5", "--prerender"]
    proc = SimulatorProcess(args)
    await asyncio.to_thread(proc.start)
    try:
        assert proc.url.startswith("http://127.0.0.1:")
        form = {"grant_type": "client_credentials", "client_id": "client-77"}
        async with session.post(proc.auth_url, data={**form, "client_secret": "secret-77"}) as resp:
            token = (await resp.json())["access_token"]
        headers = {"Authorization": token, "ST-App-Key": proc.app_key}
        async with session.get(proc.url + "/jpm/v2/tenant/77/export/jobs", headers=headers) as resp:
            assert resp.status == 200
            body = msgspec.json.decode(await resp.read(), type=Envelope)
        assert len(body.data) == 5
        assert body.hasMore
    finally:
        status = await asyncio.to_thread(proc.stop)
    assert status == 0


def test_cli_rejects_bad_options() -> None:
    with pytest.raises(RuntimeError, match="exited with status 2"):
        SimulatorProcess(["--feeds", "crm.nothing"]).start()
