"""The export and token clients against real HTTP servers answering odd and hostile things:
gzip, redirects, oversized bodies, HTML errors, 429 bodies, cookies."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from syncd import catalogue
from syncd.config import Secret
from syncd.daemon import http_session
from syncd.errors import RateLimited, TransientError
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.client import THREAD_MIN_BYTES, ExportClient, Page
from syncd.servicetitan.upstream import MAX_BODY_BYTES, MAX_JSON_DEPTH, BodyTooLarge
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import DaemonProcess, config_dict, settings
from tests.upstream_helpers import Upstream, page, serve

CUSTOMERS = catalogue.feed("crm.customers")
APP_KEY = "ak-http-test-0001"
RECORDS = [{"id": i, "modifiedOn": "2025-01-01T00:00:00Z", "name": f"c{i}"} for i in range(50)]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """The daemon's own session, as configured for production."""
    data = config_dict(
        "redis://127.0.0.1:1/0", "http://127.0.0.1:1", APP_KEY, [1], ["crm.customers"]
    )
    async with http_session(settings(data)) as s:
        yield s


def tokens(session: aiohttp.ClientSession, up: Upstream, tenant: int = 1) -> TokenProvider:
    return TokenProvider(
        session, up.url + "/connect/token", tenant, f"client-{tenant}", Secret(f"secret-{tenant}")
    )


async def fetch(session: aiohttp.ClientSession, up: Upstream, tenant: int = 1) -> Page:
    client = ExportClient(session, up.url, Secret(APP_KEY))
    return await client.fetch(
        tokens(session, up, tenant), CUSTOMERS, None, include_recent_changes=False
    )


def gzipped(body: bytes, status: int = 200, content_type: str = "application/json") -> web.Response:
    return web.Response(
        body=gzip.compress(body),
        status=status,
        headers={"Content-Encoding": "gzip", "Content-Type": content_type},
    )


async def test_gzip_encoded_pages_and_errors_are_read(session: aiohttp.ClientSession) -> None:
    answers = [
        gzipped(b"<html><head><title>502 Bad Gateway</title></head></html>", 502, "text/html"),
        gzipped(page(RECORDS, "next")),
    ]

    async def exports(request: web.Request) -> web.Response:
        return answers.pop(0)

    async with serve(exports) as up:
        with pytest.raises(TransientError, match=r"^HTTP 502: 502 Bad Gateway$"):
            await fetch(session, up)
        got = await fetch(session, up)
    assert got.keys == [str(i) for i in range(50)]
    assert got.continue_from == "next"
    api = [s for s in up.seen if s.path != "/connect/token"]
    assert all("gzip" in s.headers.get("Accept-Encoding", "") for s in api)


async def test_a_gzip_bomb_stops_at_the_body_cap(session: aiohttp.ClientSession) -> None:
    # A few tens of kilobytes on the wire, more than the cap once decompressed.
    bomb = b'{"hasMore": false, "continueFrom": "x", "data": ["' + b"a" * MAX_BODY_BYTES + b'"]}'

    async def exports(request: web.Request) -> web.Response:
        return gzipped(bomb)

    async with serve(exports) as up:
        with pytest.raises(BodyTooLarge, match="page body over"):
            await fetch(session, up)


async def test_a_too_big_streamed_page_fails_without_reading_it_all(
    session: aiohttp.ClientSession,
) -> None:
    sent = 0
    chunk = b" " * (1024 * 1024)

    async def exports(request: web.Request) -> web.StreamResponse:
        nonlocal sent
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            # Far more than the cap; the client hangs up once it has read past it.
            for _ in range(4 * MAX_BODY_BYTES // len(chunk)):
                await resp.write(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async with serve(exports) as up:
        with pytest.raises(BodyTooLarge):
            await fetch(session, up)
    assert sent < 4 * MAX_BODY_BYTES


async def test_html_and_plain_text_errors_are_short_clean_errors(
    session: aiohttp.ClientSession,
) -> None:
    noisy = "<html><body><h1>Oops</h1>" + "<p>line &amp; more\n\n</p>" * 5000 + "</body></html>"
    answers = [
        web.Response(text=noisy, status=500, content_type="text/html"),
        web.Response(text="  service\r\n\tunavailable  ", status=503),
    ]

    async def exports(request: web.Request) -> web.Response:
        return answers.pop(0)

    async with serve(exports) as up:
        with pytest.raises(TransientError) as first:
            await fetch(session, up)
        with pytest.raises(TransientError) as second:
            await fetch(session, up)
    assert str(first.value).startswith("HTTP 500: Oops line & more line & more")
    assert len(str(first.value)) < 230
    assert "<" not in str(first.value)
    assert str(second.value) == "HTTP 503: service unavailable"


@pytest.mark.parametrize(
    ("headers", "body", "wait"),
    [
        (
            {},
            {"statusCode": 429, "message": "Rate limit is exceeded. Try again in 3 seconds."},
            3.0,
        ),
        ({"Retry-After": "inf"}, {"title": "Too many. Try again in 2 seconds."}, 2.0),
        ({"Retry-After": "1.5"}, {"title": "Try again in 9 seconds."}, 1.5),
        ({"Retry-After": "999999"}, {}, 600.0),
        ({"Retry-After": "nan"}, {}, None),
    ],
)
async def test_429_waits(
    session: aiohttp.ClientSession, headers: dict[str, str], body: dict[str, Any], wait: float
) -> None:
    async def exports(request: web.Request) -> web.Response:
        return web.json_response(body, status=429, headers=headers)

    async with serve(exports) as up:
        with pytest.raises(RateLimited) as exc:
            await fetch(session, up)
    assert exc.value.retry_after == wait


async def test_an_export_redirect_is_not_followed(session: aiohttp.ClientSession) -> None:
    async def elsewhere(request: web.Request) -> web.Response:
        return web.Response(body=page(RECORDS, "EVIL-CURSOR"), content_type="application/json")

    async with serve(elsewhere) as evil:
        target = evil.url + "/crm/v2/tenant/1/export/customers?from=EVIL"

        async def exports(request: web.Request) -> web.Response:
            return web.Response(status=302, headers={"Location": target})

        async with serve(exports) as up:
            with pytest.raises(TransientError) as exc:
                await fetch(session, up)
    assert str(exc.value) == (
        f"the API answered HTTP 302, a redirect to 127.0.0.1:{evil.url.rsplit(':', 1)[1]}; "
        "redirects are not followed"
    )
    assert evil.seen == []


async def test_a_token_redirect_is_not_followed(session: aiohttp.ClientSession) -> None:
    async def anything(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "stolen-token", "expires_in": 900})

    async with serve(anything, token=anything) as evil:

        async def token(request: web.Request) -> web.Response:
            return web.Response(status=307, headers={"Location": evil.url + "/connect/token"})

        async def exports(request: web.Request) -> web.Response:
            return web.Response(body=page(RECORDS))

        async with serve(exports, token=token) as up:
            with pytest.raises(TransientError, match=r"token endpoint answered HTTP 307"):
                await fetch(session, up)
            assert up.paths() == ["/connect/token"]
    assert evil.seen == []


@pytest.mark.parametrize("token", ["zq-1\r\nX-Injected: 1", "zq\x00-1-live", "", "zq 1 live"])
async def test_a_token_that_cannot_be_a_header_is_refused(
    session: aiohttp.ClientSession, token: str
) -> None:
    """An access token with control characters, spaces or nothing in it is the token
    endpoint's error, not a request that fails (or splits its headers) at every poll."""

    async def token_endpoint(request: web.Request) -> web.Response:
        return web.json_response({"access_token": token, "expires_in": 900})

    async def exports(request: web.Request) -> web.Response:
        return web.Response(body=page(RECORDS), content_type="application/json")

    async with serve(exports, token=token_endpoint) as up:
        with pytest.raises(TransientError, match="unusable access_token") as info:
            await fetch(session, up)
        assert up.paths() == ["/connect/token"]
    assert "zq" not in str(info.value)


@pytest.mark.parametrize("expires_in", [0, -5])
async def test_a_token_said_to_live_no_time_is_not_renewed_before_every_request(
    session: aiohttp.ClientSession, expires_in: int
) -> None:
    async def token_endpoint(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-1-live-4f1c9e", "expires_in": expires_in})

    async def exports(request: web.Request) -> web.Response:
        return web.Response(body=page(RECORDS), content_type="application/json")

    async with serve(exports, token=token_endpoint) as up:
        client = ExportClient(session, up.url, Secret(APP_KEY))
        # A clock standing still: the five requests fall within the token's least life.
        provider = TokenProvider(
            session, up.url + "/connect/token", 1, "client-1", Secret("secret-1"), clock=lambda: 1e3
        )
        for _ in range(5):
            await client.fetch(provider, CUSTOMERS, None, include_recent_changes=False)
    assert up.paths().count("/connect/token") == 1


async def test_a_cookie_from_one_tenant_is_not_sent_for_another(
    session: aiohttp.ClientSession,
) -> None:
    async def exports(request: web.Request) -> web.Response:
        resp = web.Response(body=page(RECORDS), content_type="application/json")
        if "/tenant/1/" in request.path:
            resp.set_cookie("affinity", "tenant-1-session", path="/")
        return resp

    async with serve(exports) as up:
        # A host name: aiohttp's default jar ignores cookies set by IP addresses.
        up.url = up.url.replace("127.0.0.1", "localhost")
        await fetch(session, up, tenant=1)
        await fetch(session, up, tenant=2)
        await fetch(session, up, tenant=1)
    api = [s for s in up.seen if s.path != "/connect/token"]
    assert [s.path.split("/")[4] for s in api] == ["1", "2", "1"]
    assert all("Cookie" not in s.headers for s in api), [s.headers.get("Cookie") for s in api]


async def test_a_redirected_export_stores_no_cursor(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    """The daemon end to end: the redirect target receives nothing, no cursor comes from it."""

    async def elsewhere(request: web.Request) -> web.Response:
        return web.Response(body=page(RECORDS, "EVIL-CURSOR"), content_type="application/json")

    async with serve(elsewhere) as evil:

        async def exports(request: web.Request) -> web.Response:
            return web.Response(status=302, headers={"Location": evil.url + request.path_qs})

        async with serve(exports) as up:
            data = config_dict(redis_server.url, up.url, APP_KEY, [1], ["crm.customers"])
            data["engine"]["once_max_failures"] = 2
            daemon = DaemonProcess(data)
            try:
                daemon.start("--once")
                assert await asyncio.to_thread(daemon.wait, 60) == 1
            finally:
                daemon.close()
            assert len([s for s in up.seen if s.path != "/connect/token"]) >= 2
    assert evil.seen == []
    dump = []
    for key in await redis.keys("*"):
        kind = (await redis.type(key)).decode()
        if kind == "hash":
            dump.append(
                json.dumps({k.decode(): v.decode() for k, v in (await redis.hgetall(key)).items()})
            )
        elif kind == "string":
            dump.append((await redis.get(key) or b"").decode())
    text = "\n".join(dump)
    assert "EVIL" not in text
    assert "redirect to 127.0.0.1" in text  # the recorded last_error says why


async def test_the_simulators_api_management_429_gives_its_wait(
    session: aiohttp.ClientSession,
) -> None:
    async with run_simulator(
        tenants=[1], records=50, page_size=5, rate_limit=1.0, quirks={"rate_limit_body": "apim"}
    ) as sim:
        client = ExportClient(session, sim.url, Secret(sim.app_key))
        provider = TokenProvider(
            session, sim.url + "/connect/token", 1, "client-1", Secret("secret-1")
        )
        waits = []
        for _ in range(20):
            try:
                await client.fetch(provider, CUSTOMERS, None, include_recent_changes=False)
            except RateLimited as exc:
                waits.append(exc.retry_after)
                break
    # Without Retry-After, the wait comes from the body's "Try again in N seconds".
    assert waits
    assert waits[0] is not None
    assert 0 < waits[0] <= 60


@pytest.mark.parametrize("echoed", ["app key", "token", "client secret"])
async def test_a_page_echoing_a_credential_is_not_applied(
    session: aiohttp.ClientSession, echoed: str
) -> None:
    value = {"app key": APP_KEY, "token": "tok-1-live-4f1c9e", "client secret": "secret-1"}[echoed]

    async def exports(request: web.Request) -> web.Response:
        records = [{"id": 1, "modifiedOn": "2025-01-01T00:00:00Z", "name": f"x{value}y"}]
        return web.Response(body=page(records, "c2"), content_type="application/json")

    async with serve(exports) as up:
        with pytest.raises(TransientError, match="page contains a credential it was sent"):
            await fetch(session, up)


async def test_a_page_echoing_an_escaped_credential_is_not_applied(
    session: aiohttp.ClientSession,
) -> None:
    """Serialisers escape what they echo (`\\u002B` for `+` in .NET, `\\/` in others); a
    cursor's JSON escapes are undone when it is decoded, so whatever they spell is stored."""
    app_key = "ak1.Zx9+Qw/Er7=Ty8Ui"
    token = "tok-1-live-4f1c9e"
    dotnet = app_key.replace("+", "\\u002B")
    every_char = "".join(f"\\u{ord(c):04x}" for c in token)

    def envelope(cursor: str, value: str = "x") -> str:
        # By hand: json.dumps would escape the escapes.
        record = '{"id": 1, "k": "' + value + '"}'
        return '{"hasMore": false, "continueFrom": "' + cursor + '", "data": [' + record + "]}"

    bodies = [envelope("c2", dotnet), envelope(app_key.replace("/", "\\/")), envelope(every_char)]

    async def token_endpoint(request: web.Request) -> web.Response:
        return web.json_response({"access_token": token, "expires_in": 900})

    async def exports(request: web.Request) -> web.Response:
        return web.Response(text=bodies.pop(0), content_type="application/json")

    async with serve(exports, token=token_endpoint) as up:
        client = ExportClient(session, up.url, Secret(app_key))
        provider = tokens(session, up)
        for _ in range(3):
            with pytest.raises(TransientError, match="credential it was sent; not applied"):
                await client.fetch(provider, CUSTOMERS, None, include_recent_changes=False)


async def test_the_simulators_gzip_pages_and_gateway_error_pages(
    session: aiohttp.ClientSession,
) -> None:
    quirks = {1: {"gzip": True, "error_body": "html"}, 2: {"error_body": "text"}}
    async with run_simulator(tenants=[1, 2], records=40, page_size=15, tenant_quirks=quirks) as sim:
        client = ExportClient(session, sim.url, Secret(sim.app_key))
        for tenant in (1, 2):
            provider = TokenProvider(
                session,
                sim.url + "/connect/token",
                tenant,
                f"client-{tenant}",
                Secret(f"secret-{tenant}"),
            )
            keys: list[str] = []
            cursor = None
            for _ in range(10):
                got = await client.fetch(provider, CUSTOMERS, cursor, include_recent_changes=False)
                keys += got.keys
                cursor = got.continue_from
                if not got.has_more:
                    break
            assert len(set(keys)) == 40
            texts = {}
            for status in (500, 502, 503):
                url = f"{sim.url}/_sim/tenants/{tenant}/faults"
                async with session.post(url, json={"error_rate": 1.0, "status": status}) as r:
                    assert r.status == 200
                with pytest.raises(TransientError) as exc:
                    await client.fetch(provider, CUSTOMERS, cursor, include_recent_changes=False)
                texts[status] = str(exc.value)
            async with session.post(f"{sim.url}/_sim/tenants/{tenant}/faults", json={}) as r:
                assert r.status == 200
            for status, text in texts.items():
                assert text.startswith(f"HTTP {status}: "), text
                assert "<" not in text
                assert len(text) <= 230
            if tenant == 2:
                assert texts[502] == "HTTP 502: Bad Gateway"
            else:
                assert "502 Bad Gateway" in texts[502]


async def test_a_big_page_is_checked_and_decoded_as_a_small_one(
    session: aiohttp.ClientSession,
) -> None:
    """Pages from THREAD_MIN_BYTES on are checked and decoded in a worker thread: the same
    Page, and the same refusals (a credential echoed, nesting past the cap), as on the loop."""
    token = "tok-1-live-4f1c9e"
    filler = "f" * 200
    many = [{"id": i, "modifiedOn": "2025-01-01T00:00:00Z", "name": filler} for i in range(2000)]
    echoing = [*many, {"id": 9999, "name": f"x{token}y"}]
    deep: Any = "x"
    for _ in range(MAX_JSON_DEPTH + 1):
        deep = {"a": deep}
    too_deep = [*many, {"id": 9999, "deep": deep}]
    bodies = [page(many, "c2"), page(echoing, "c3"), page(too_deep, "c4")]
    assert all(len(body) >= THREAD_MIN_BYTES for body in bodies)

    async def token_endpoint(request: web.Request) -> web.Response:
        return web.json_response({"access_token": token, "expires_in": 900})

    async def exports(request: web.Request) -> web.Response:
        return web.Response(body=bodies.pop(0), content_type="application/json")

    async with serve(exports, token=token_endpoint) as up:
        client = ExportClient(session, up.url, Secret(APP_KEY))
        provider = tokens(session, up)
        got = await client.fetch(provider, CUSTOMERS, None, include_recent_changes=False)
        assert got.keys == [str(i) for i in range(2000)]
        assert got.continue_from == "c2"
        assert got.data[7] == json.dumps(many[7]).encode()
        with pytest.raises(TransientError, match="credential it was sent; not applied"):
            await client.fetch(provider, CUSTOMERS, None, include_recent_changes=False)
        with pytest.raises(TransientError, match="nested deeper"):
            await client.fetch(provider, CUSTOMERS, None, include_recent_changes=False)
