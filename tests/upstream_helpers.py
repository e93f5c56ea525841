"""A tiny real HTTP server playing a hostile or odd upstream: a token endpoint and export feeds
whose answers each test shapes, recording every request it receives."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class Upstream:
    url: str
    seen: list[Seen] = field(default_factory=list)

    def paths(self) -> list[str]:
        return [s.path for s in self.seen]


async def token_ok(request: web.Request) -> web.Response:
    form = await request.post()
    tenant = str(form.get("client_id", "x")).removeprefix("client-")
    return web.json_response(
        {"access_token": f"tok-{tenant}-live-4f1c9e", "expires_in": 900, "token_type": "Bearer"}
    )


def page(records: list[dict[str, Any]], cursor: str = "c1", more: bool = False) -> bytes:
    return json.dumps({"hasMore": more, "continueFrom": cursor, "data": records}).encode()


@contextlib.asynccontextmanager
async def serve(
    exports: Handler, token: Handler = token_ok, **app_kwargs: Any
) -> AsyncIterator[Upstream]:
    """A server on a free local port: POST /connect/token -> `token`, anything else -> `exports`."""
    up = Upstream("")

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        up.seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                dict(request.headers),
                await request.read(),
            )
        )
        return await handler(request)

    app = web.Application(middlewares=[record], **app_kwargs)
    app.router.add_post("/connect/token", token)
    app.router.add_route("*", "/{tail:.*}", exports)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    up.url = f"http://127.0.0.1:{port}"
    try:
        yield up
    finally:
        await runner.cleanup()
