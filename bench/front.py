"""A real HTTP server in front of the simulator that misbehaves for chosen tenants.

Everything is passed through to the simulator, except:
- `hang_requests`: export requests of these tenants hang until `release()`;
- `hang_tokens`: token requests of these tenants (by client id) hang until `release()`;
- `no_progress`: (tenant, feed path suffix) pairs answered, once they carry a `from`, with
  `hasMore: true`, no records and the cursor they were asked with.
Released requests answer 503. Used by the scheduler's tests and bench/hanging.py.
"""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

_TENANT = re.compile(r"/tenant/(\d+)/")
_PASSED_HEADERS = ("Authorization", "ST-App-Key", "Content-Type")
_RETURNED_HEADERS = ("Content-Type", "Retry-After")


@dataclass
class Front:
    """The misbehaviours in force and what the front saw."""

    upstream: str
    hang_requests: set[int] = field(default_factory=set)
    hang_tokens: set[int] = field(default_factory=set)
    no_progress: set[tuple[int, str]] = field(default_factory=set)
    url: str = ""
    hanging: Counter[int] = field(default_factory=Counter)  # requests hanging now, by tenant
    stalled: Counter[int] = field(default_factory=Counter)  # no-progress pages served
    _release: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def auth_url(self) -> str:
        return self.url + "/connect/token"

    def release(self) -> None:
        """End every hang (now and from now on): they answer 503."""
        self._release.set()

    async def _hang(self, tenant: int) -> web.Response:
        self.hanging[tenant] += 1
        try:
            await self._release.wait()
        finally:
            self.hanging[tenant] -= 1
        return web.Response(status=503, text="released")

    async def handle(self, request: web.Request, session: aiohttp.ClientSession) -> web.Response:
        body = await request.read()
        if request.path == "/connect/token":
            form = dict(await request.post())
            claimed = str(form.get("client_id", "")).removeprefix("client-")
            if claimed.isdigit() and int(claimed) in self.hang_tokens:
                return await self._hang(int(claimed))
        else:
            m = _TENANT.search(request.path)
            tenant = int(m.group(1)) if m else 0
            if tenant in self.hang_requests:
                return await self._hang(tenant)
            sent = request.query.get("from")
            if sent and any(
                t == tenant and request.path.endswith(suffix) for t, suffix in self.no_progress
            ):
                self.stalled[tenant] += 1
                page = {"hasMore": True, "continueFrom": sent, "data": []}
                return web.json_response(page)
        headers = {k: request.headers[k] for k in _PASSED_HEADERS if k in request.headers}
        async with session.request(
            request.method,
            self.upstream + request.path_qs,
            data=body,
            headers=headers,
            allow_redirects=False,
        ) as resp:
            data = await resp.read()
            out = {k: resp.headers[k] for k in _RETURNED_HEADERS if k in resp.headers}
            return web.Response(status=resp.status, body=data, headers=out)


@asynccontextmanager
async def run_front(front: Front) -> AsyncIterator[Front]:
    """Serve `front` on a free port of 127.0.0.1 for the duration of the block."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def handler(request: web.Request) -> web.Response:
            return await front.handle(request, session)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handler)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = int(runner.addresses[0][1])
        front.url = f"http://127.0.0.1:{port}"
        try:
            yield front
        finally:
            front.release()
            await runner.cleanup()
