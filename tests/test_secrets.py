"""Secrets never leave: a hostile upstream echoes the app key, client secrets and live tokens
in every answer it can shape, and none of them shows in any sink syncd writes or serves.

Upstream shapes (one tenant each): an HTML 500 page echoing the request headers, JSON
ProblemDetails (title, detail, errors, traceId) on 403 and 400, Azure API Management's 429
`message`, a 401 echo, a valid page whose cursor and records are the secrets, a redirect whose
Location carries them, an undecodable page, plain-text 404, and token endpoint errors
(`error`/`error_description`, an HTML 500, plain text) echoing the form it was posted. Every
answer also carries the secrets in response headers.
Sinks: the daemon's log, every Redis key and value, `syncd status` (text and JSON), `/metrics`
and `/readyz`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from syncd.testing.redis_server import RedisServer
from tests.engine_helpers import DaemonProcess, config_dict
from tests.upstream_helpers import serve

pytestmark = pytest.mark.slow

APP_KEY = "ak-" + secrets.token_hex(10)
# Export shapes, by tenant.
HTML_500, PROBLEM_403, PROBLEM_400, APIM_429, ECHO_401, REDIRECT, BAD_PAGE, TEXT_404 = range(
    201, 209
)
PAGE_ECHO = 209  # a valid page whose cursor and records are the secrets
# Token endpoint shapes, by tenant.
TOKEN_JSON_401, TOKEN_HTML_500, TOKEN_TEXT_400 = range(211, 214)
EXPORT_TENANTS = [HTML_500, PROBLEM_403, PROBLEM_400, APIM_429, ECHO_401, REDIRECT, BAD_PAGE]
EXPORT_TENANTS += [TEXT_404, PAGE_ECHO]
TOKEN_TENANTS = [TOKEN_JSON_401, TOKEN_HTML_500, TOKEN_TEXT_400]
TENANTS = EXPORT_TENANTS + TOKEN_TENANTS
CLIENT_SECRETS = {t: f"cs-{t}-{secrets.token_hex(8)}" for t in TENANTS}
# Tokens look like nothing in particular: only knowing them can mask them.
TOKENS = {t: f"tk{secrets.token_hex(12)}" for t in TENANTS}


def planted(tenant: int) -> list[str]:
    return [APP_KEY, CLIENT_SECRETS[tenant], TOKENS[tenant]]


def every_secret() -> list[str]:
    return [APP_KEY, *CLIENT_SECRETS.values(), *TOKENS.values()]


def echo_headers(tenant: int) -> dict[str, str]:
    return {
        "X-Echo-App-Key": APP_KEY,
        "X-Echo-Token": TOKENS[tenant],
        "X-Echo": CLIENT_SECRETS[tenant],
        "WWW-Authenticate": f'Bearer error="invalid_token", token="{TOKENS[tenant]}"',
    }


def tenant_of(request: web.Request) -> int:
    return int(request.path.split("/")[4])


def echo_text(request: web.Request, tenant: int) -> str:
    """What a careless server prints: the request's headers, and everything else it knows."""
    headers = " ".join(f"{k}: {v}" for k, v in request.headers.items())
    return f"{headers} {TOKENS[tenant]} {APP_KEY} {CLIENT_SECRETS[tenant]}"


async def exports(request: web.Request) -> web.Response:
    t = tenant_of(request)
    echo = echo_text(request, t)
    h = echo_headers(t)
    if t == HTML_500:
        html = (
            f"<html><head><title>Error {TOKENS[t]}</title></head><body><h1>Server Error</h1>"
            f"<pre>{echo}</pre><p>key {APP_KEY}</p></body></html>"
        )
        return web.Response(text=html, status=500, content_type="text/html", headers=h)
    if t in (PROBLEM_403, PROBLEM_400):
        body = {
            "title": f"Denied for {TOKENS[t]} with {APP_KEY}",
            "detail": echo,
            "status": 403 if t == PROBLEM_403 else 400,
            "errors": {"from": [f"bad {CLIENT_SECRETS[t]}", echo], APP_KEY: [TOKENS[t]]},
            "traceId": TOKENS[t],
        }
        return web.json_response(body, status=body["status"], headers=h)
    if t == APIM_429:
        body = {
            "statusCode": 429,
            "message": f"Rate limit is exceeded. {echo} Try again in 1 seconds.",
        }
        return web.json_response(body, status=429, headers={**h, "Retry-After": APP_KEY})
    if t == ECHO_401:
        return web.json_response({"title": echo, "detail": TOKENS[t]}, status=401, headers=h)
    if t == REDIRECT:
        location = f"http://{CLIENT_SECRETS[t]}.example/{APP_KEY}?token={TOKENS[t]}"
        return web.Response(status=302, headers={**h, "Location": location})
    if t == PAGE_ECHO:
        records = [{"id": 1, "name": APP_KEY, "note": CLIENT_SECRETS[t], "x": echo}]
        body = {"hasMore": False, "continueFrom": TOKENS[t], "data": records}
        return web.json_response(body, headers=h)
    if t == BAD_PAGE:
        text = f'{{"hasMore": true, "continueFrom": "{TOKENS[t]}", "data": [{echo}'
        return web.Response(text=text, content_type="application/json", headers=h)
    return web.Response(text=echo, status=404, headers=h)


async def token(request: web.Request) -> web.Response:
    form = await request.post()
    t = int(str(form["client_id"]).removeprefix("client-"))
    form_echo = " ".join(f"{k}={v}" for k, v in form.items())
    h = echo_headers(t)
    if t == TOKEN_JSON_401:
        body = {
            "error": f"invalid_client {CLIENT_SECRETS[t]}",
            "error_description": f"{form_echo} key {APP_KEY}",
        }
        return web.json_response(body, status=401, headers=h)
    if t == TOKEN_HTML_500:
        html = f"<html><body><h1>Oops</h1><pre>{form_echo}</pre>{APP_KEY}</body></html>"
        return web.Response(text=html, status=500, content_type="text/html", headers=h)
    if t == TOKEN_TEXT_400:
        return web.Response(text=f"bad request: {form_echo} {APP_KEY}", status=400, headers=h)
    return web.json_response({"access_token": TOKENS[t], "expires_in": 900}, headers=h)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def redis_dump(r: aioredis.Redis) -> str:
    """Every key and every value of every type, as text."""
    out: list[str] = []
    async for key in r.scan_iter(count=1000):
        out.append(key.decode("utf-8", "replace"))
        kind = (await r.type(key)).decode()
        values: Any
        if kind == "string":
            values = [await r.get(key)]
        elif kind == "hash":
            values = [x for kv in (await r.hgetall(key)).items() for x in kv]
        elif kind == "stream":
            values = [x for _, fields in await r.xrange(key) for kv in fields.items() for x in kv]
            for group in await r.xinfo_groups(key):
                values.append(group["name"])
        elif kind == "set":
            values = list(await r.smembers(key))
        elif kind == "zset":
            values = [m for m, _ in await r.zrange(key, 0, -1, withscores=True)]
        elif kind == "list":
            values = await r.lrange(key, 0, -1)
        else:
            raise AssertionError(f"unexpected key type {kind} of {key!r}")
        out.extend(v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in values)
    return "\n".join(out)


def hits(text: str) -> list[str]:
    return [s for s in every_secret() if s in text]


async def test_planted_secrets_reach_no_sink(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with serve(exports, token=token) as up:
        data = config_dict(redis_server.url, up.url, APP_KEY, TENANTS, ["crm.customers"])
        for t in data["tenants"]:
            t["client_secret"] = CLIENT_SECRETS[t["id"]]
        port = free_port()
        data["ops"] = {"listen": f"127.0.0.1:{port}"}
        daemon = DaemonProcess(data)
        try:
            daemon.start()
            # Every tenant's feed records an error, and the token failures show in /readyz.
            async with aiohttp.ClientSession() as http:
                for _ in range(600):
                    states = [await redis.hgetall(f"st:{{{t}}}:state") for t in TENANTS]
                    with_error = [s for s in states if b"crm.customers:last_error" in s]
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                            readyz = await resp.text()
                    except aiohttp.ClientError:
                        readyz = ""
                    if len(with_error) == len(TENANTS) and all(
                        f'"{t}"' in readyz for t in TOKEN_TENANTS
                    ):
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(
                        f"not every tenant failed: {len(with_error)} of {len(TENANTS)}; "
                        f"readyz {readyz}\n" + "\n".join(daemon.log_lines()[-20:])
                    )
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    metrics = await resp.text()
                async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                    healthz = await resp.text()
            status_text = await asyncio.to_thread(_status, daemon, "--json")
            status_table = await asyncio.to_thread(_status, daemon)
            dump = await redis_dump(redis)
            daemon.signal(signal.SIGTERM)
            assert await asyncio.to_thread(daemon.wait, 30) == 0
            log = daemon.log_path.read_text()
        finally:
            daemon.close()
    # The upstream did receive the real secrets (the test plants what it was sent) ...
    sent = {s.headers.get("ST-App-Key") for s in up.seen}
    assert APP_KEY in sent
    assert any(f"Bearer {TOKENS[HTML_500]}" == s.headers.get("Authorization") for s in up.seen)
    # ... and the errors were recorded, with what syncd decided ...
    status = json.loads(status_text)
    errors = {int(row["tenant"]): row["last_error"] for row in status if row.get("last_error")}
    assert set(errors) == set(TENANTS), errors
    assert "HTTP 500: Error" in errors[HTML_500]
    assert "HTTP 403" in errors[PROBLEM_403]
    assert "redirect to" in errors[REDIRECT]
    assert "token endpoint answered 401" in errors[TOKEN_JSON_401]
    assert "page contains a credential" in errors[PAGE_ECHO]
    # ... but no sink holds any secret.
    for name, text in [
        ("log", log),
        ("redis", dump),
        ("status --json", status_text),
        ("status", status_table),
        ("/readyz", readyz),
        ("/metrics", metrics),
        ("/healthz", healthz),
    ]:
        assert text, name
        assert hits(text) == [], f"{name} leaks {hits(text)}"


def _status(daemon: DaemonProcess, *extra: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "syncd", "status", "--config", str(daemon.config_path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "400"},
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr


def test_standard_library_log_records_are_redacted_json_too() -> None:
    """asyncio and aiohttp log through the standard library: same JSON lines, same redaction."""
    script = """
import logging
from syncd import log, redact
log.configure("info", "json")
redact.register("k", "planted-secret-xyz")
try:
    raise ValueError("boom planted-secret-xyz")
except ValueError:
    logging.getLogger("asyncio").exception("Task exception was never retrieved")
logging.getLogger("aiohttp.server").warning("echo %s", "Bearer abcdef123")
"""
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [e["event"] for e in lines] == ["Task exception was never retrieved", "echo Bearer ***"]
    assert "ValueError: boom ***" in lines[0]["exception"]
    assert "planted-secret-xyz" not in proc.stderr
    assert "abcdef123" not in proc.stderr
