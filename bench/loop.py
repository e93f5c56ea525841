"""The event loop while a big page is processed: /healthz answers meanwhile.

A local server offers a 30 MiB export page whose records nest 60 levels (inside the caps:
MAX_BODY_BYTES, MAX_JSON_DEPTH); the real client fetches it (credential checks, depth check,
decode) and the publisher applies it to a private Redis, three times, from an empty index each
time. Meanwhile a thread asks an HTTP /healthz served by the same event loop every 10 ms and
records how long each answer took. Side by side in one run: pages from THREAD_MIN_BYTES on
checked and decoded in a worker thread (as the daemon does), and every page checked on the
loop (the threshold raised past the page).

    .venv/bin/python -m bench.loop          # writes bench/results/loop.json

Target: /healthz p99 under 100 ms while such a page is processed.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from typing import Any

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from bench import common
from syncd import catalogue
from syncd.config import Secret
from syncd.engine.publisher import Publisher
from syncd.servicetitan import client as client_module
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.upstream import MAX_BODY_BYTES, MAX_JSON_DEPTH

FEED = catalogue.feed("crm.customers")
DEPTH = 60
ROUNDS = 3


def hostile_page(size: int = 30 * 2**20, depth: int = DEPTH) -> bytes:
    """An export page of about `size` bytes whose records each nest `depth` levels."""
    deep: Any = "x"
    for _ in range(depth - 1):
        deep = {"a": deep}
    one = json.dumps({"id": 0, "modifiedOn": "2024-05-01T12:00:00Z", "deep": deep})
    n = size // len(one)
    records = ",".join(one.replace('"id": 0', f'"id": {i}', 1) for i in range(n))
    return ('{"hasMore": false, "continueFrom": "c", "data": [' + records + "]}").encode()


class Prober(threading.Thread):
    """GET `url` every `interval` seconds until stopped; the seconds each answer took."""

    def __init__(self, url: str, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.url, self.interval = url, interval
        self.latencies: list[float] = []
        self.running = True

    def run(self) -> None:
        while self.running:
            started = time.monotonic()
            try:
                with urllib.request.urlopen(self.url, timeout=30) as resp:
                    resp.read()
            except OSError:
                if self.running:
                    raise
                return  # the server went away as the run ended
            self.latencies.append(time.monotonic() - started)
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))


async def measure(body: bytes, redis_url: str, threshold: int) -> dict[str, Any]:
    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def token(request: web.Request) -> web.Response:
        return web.json_response({"access_token": "tok-bench-loop-0001", "expires_in": 900})

    async def export(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application(client_max_size=1024)
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/connect/token", token)
    app.router.add_get("/{tail:.*}", export)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    client_module.THREAD_MIN_BYTES, saved = threshold, client_module.THREAD_MIN_BYTES
    redis = aioredis.Redis.from_url(redis_url)
    prober = Prober(url + "/healthz")
    try:
        async with aiohttp.ClientSession() as session:
            client = client_module.ExportClient(session, url, Secret("ak-bench-loop-0001"))
            tokens = TokenProvider(session, url + "/connect/token", 1, "c", Secret("s-bench-0001"))
            publisher = Publisher(redis, "st")
            await client.fetch(tokens, FEED, None, include_recent_changes=False)  # warm
            prober.start()
            await asyncio.sleep(0.5)
            idle = len(prober.latencies)
            started = time.monotonic()
            for _ in range(ROUNDS):
                await redis.flushall()
                page = await client.fetch(tokens, FEED, None, include_recent_changes=False)
                await publisher.apply(1, FEED.name, None, page)
            busy_s = time.monotonic() - started
    finally:
        prober.running = False
        prober.join()
        client_module.THREAD_MIN_BYTES = saved
        await redis.aclose()
        await runner.cleanup()
    during = sorted(prober.latencies[idle:])
    return {
        "threshold_bytes": threshold,
        "seconds_per_page": round(busy_s / ROUNDS, 3),
        "healthz_probes": len(during),
        "healthz_p50_ms": round(common.percentile(during, 0.50) * 1000, 1),
        "healthz_p99_ms": round(common.percentile(during, 0.99) * 1000, 1),
        "healthz_max_ms": round(during[-1] * 1000, 1),
    }


def run() -> dict[str, Any]:
    """Measure, write bench/results/loop.json, and return its figures."""
    body = hostile_page()
    assert len(body) <= MAX_BODY_BYTES
    assert DEPTH < MAX_JSON_DEPTH
    common.log(f"loop: a {len(body) / 2**20:.1f} MiB page nested {DEPTH} levels, {ROUNDS} rounds")
    with common.redis_server() as server:
        version = common.redis_version(common.redis_client(server))
        threaded = asyncio.run(measure(body, server.url, client_module.THREAD_MIN_BYTES))
        on_loop = asyncio.run(measure(body, server.url, len(body) + 1))
    figures = {
        "page_bytes": len(body),
        "depth": DEPTH,
        "rounds": ROUNDS,
        "worker_thread": threaded,
        "on_the_loop": on_loop,
        "target_healthz_p99_ms": 100,
        "met": threaded["healthz_p99_ms"] < 100,
    }
    common.write_result("loop", figures, redis_version=version)
    return figures


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
