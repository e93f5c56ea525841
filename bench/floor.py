"""The floor of the backfill benchmark: the least work that moves export pages into streams.

A minimal asyncio script over the same pages the daemon fetches: aiohttp GET, msgspec decode of
the envelope with the records kept as `msgspec.Raw`, a small decode of each record's `id` and
`modifiedOn`, and a pipelined XADD per record with the daemon's fields (op, key, data,
modified_on). No cursor store, no change detection, no fence, no rate limiter; the same
concurrency (one chain of pages per feed, at most `--max-in-flight` requests per tenant).
Prints one JSON line: records, pages, elapsed_s.

    python -m bench.floor --sim-url URL --redis-url URL --tenants 1,2 --feeds a,b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import aiohttp
import msgspec
import redis.asyncio as aioredis

from bench import common
from syncd import catalogue
from syncd.simulator.options import DEFAULT_APP_KEY


class _Envelope(msgspec.Struct):
    hasMore: bool
    continueFrom: str
    data: list[msgspec.Raw]


class _Head(msgspec.Struct):
    id: int | str | None = None
    modifiedOn: str | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)
_HEAD = msgspec.json.Decoder(_Head)


async def _walk(
    session: aiohttp.ClientSession,
    r: aioredis.Redis,
    url: str,
    headers: dict[str, str],
    stream: str,
    gate: asyncio.Semaphore,
    totals: list[int],
) -> None:
    params = {"includeRecentChanges": "true"}
    while True:
        async with gate, session.get(url, params=params, headers=headers) as resp:
            resp.raise_for_status()
            body = await resp.read()
        page = _ENVELOPE.decode(body)
        pipe = r.pipeline(transaction=False)
        for raw in page.data:
            data = bytes(raw)
            head = _HEAD.decode(data)
            pipe.xadd(
                stream,
                {
                    "op": "upsert",
                    "key": str(head.id),
                    "data": data,
                    "modified_on": head.modifiedOn or "",
                },
            )
        await pipe.execute()
        totals[0] += len(page.data)
        totals[1] += 1
        if not page.hasMore:
            return
        params["from"] = page.continueFrom


async def run(args: argparse.Namespace) -> dict[str, float]:
    tenants = [int(t) for t in args.tenants.split(",")]
    feeds = [catalogue.feed(name) for name in args.feeds.split(",")]
    r = aioredis.Redis.from_url(args.redis_url, socket_timeout=120)
    connector = aiohttp.TCPConnector(limit=256)
    timeout = aiohttp.ClientTimeout(total=120)
    totals = [0, 0]
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.monotonic()
        jobs = []
        for tenant in tenants:
            token = await common.fetch_token(session, args.sim_url + "/connect/token", tenant)
            headers = {"Authorization": f"Bearer {token}", "ST-App-Key": args.app_key}
            gate = asyncio.Semaphore(args.max_in_flight)
            for feed in feeds:
                url = args.sim_url + feed.url_path(tenant)
                stream = f"floor:{{{tenant}}}:{feed.name}"
                jobs.append(_walk(session, r, url, headers, stream, gate, totals))
        await asyncio.gather(*jobs)
        elapsed = time.monotonic() - started
    await r.aclose()
    return {"records": totals[0], "pages": totals[1], "elapsed_s": round(elapsed, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sim-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--tenants", required=True)
    parser.add_argument("--feeds", required=True)
    parser.add_argument("--max-in-flight", type=int, default=8)
    parser.add_argument("--app-key", default=DEFAULT_APP_KEY)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
