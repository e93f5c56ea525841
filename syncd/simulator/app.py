"""The simulated API over HTTP: the token endpoint and every Export feed of the catalogue."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gzip
import logging
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableSequence
from datetime import UTC, datetime, timedelta
from email.utils import formatdate
from typing import Any

from aiohttp import BasicAuth, web

from syncd.simulator import control
from syncd.simulator.data import ActiveFilter, Entry, FeedLog
from syncd.simulator.faults import BodyFault, body_fault, damage, error_status, latency_s
from syncd.simulator.limits import retry_after_seconds
from syncd.simulator.pages import Page
from syncd.simulator.problems import (
    JSON_TYPE,
    error_response,
    json_response,
    problem,
    rate_limited,
)
from syncd.simulator.quirks import Quirks, echo_in_page, edit_entries
from syncd.simulator.state import STATE_KEY, SimState, TenantStats, now_ticks

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_log = logging.getLogger(__name__)
_ACTIVE_VALUES: dict[str, ActiveFilter] = {"true": "True", "false": "False", "any": "Any"}
_MUTATOR_TICK_S = 0.05
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_HANG_POLL_S = 0.1  # how often a hung request looks whether its client gave up
_INJECTED_429_WAIT_S = 3  # the wait an injected 429 announces


class _Query:
    """What an export request asks for."""

    __slots__ = ("active", "cursor", "raw_from", "recent", "start")

    def __init__(
        self, start: int, cursor: int, recent: bool, active: ActiveFilter, raw_from: str
    ) -> None:
        self.start = start  # first log position of the page
        self.cursor = cursor  # the position the request's cursor points at
        self.recent = recent
        self.active = active
        self.raw_from = raw_from


def build_app(state: SimState) -> web.Application:
    """The aiohttp application serving `state`."""
    app = web.Application(middlewares=[_problem_middleware])
    app[STATE_KEY] = state
    # Through a plain sequence: aiohttp before 3.13 mistypes its signals' callbacks.
    on_shutdown: MutableSequence[Any] = app.on_shutdown
    on_shutdown.append(_release_hung)
    app.router.add_post("/connect/token", _token)
    for name, feed in state.feeds.items():
        path = feed.path.replace("{tenant}", "{tenant:\\d+}")
        app.router.add_get(path, _export_handler(name), allow_head=False)
    control.add_routes(app)
    app.cleanup_ctx.append(_mutator)
    return app


@web.middleware
async def _problem_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Route misses and unexpected failures still answer with ProblemDetails."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400:
            return problem(exc.status)
        raise
    except ConnectionError:
        raise
    except Exception:
        request.app[STATE_KEY].internal_errors += 1
        _log.exception("simulator handler failed", extra={"path": request.path})
        return problem(500)


async def _token(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    form = await request.post()
    client_id, client_secret = str(form.get("client_id", "")), str(form.get("client_secret", ""))
    basic = request.headers.get("Authorization", "")
    if not client_id and basic.startswith("Basic "):
        with contextlib.suppress(ValueError):
            creds = BasicAuth.decode(basic)
            client_id, client_secret = creds.login, creds.password
    claimed = client_id.removeprefix("client-")
    claimed_tenant = int(claimed) if claimed.isdigit() else 0
    stats = state.tenant_stats(claimed_tenant)
    quirks = state.quirks(claimed_tenant)
    if quirks.hang_token > 0 and state.quirk_rng(claimed_tenant).random() < quirks.hang_token:
        stats.hung += 1
        return await _hang(request, state)
    now = time.monotonic()
    settings = state.settings(claimed_tenant)
    status = error_status(state.fault_rng, settings, settings.token_error_rate)
    if status is not None:
        stats.errors += 1
        return error_response(status, quirks.error_body)
    window = state.grant_window(client_id)
    wait = window.wait(now)
    if wait > 0:
        stats.token_rejected += 1
        seconds = retry_after_seconds(wait)
        return problem(
            429,
            f"Too many token requests. Try again in {seconds} seconds.",
            headers={"Retry-After": str(seconds)},
        )
    tenant = state.check_client(client_id, client_secret)
    if tenant is None:
        return json_response({"error": "invalid_client"}, status=400)
    if form.get("grant_type") != "client_credentials":
        return json_response({"error": "unsupported_grant_type"}, status=400)
    window.record(now)
    stats.token_grants += 1
    return json_response(
        {
            "access_token": state.issue_token(tenant, now),
            "token_type": "Bearer",
            "expires_in": math.ceil(state.options.token_ttl),
            "scope": state.scope,
        }
    )


def _export_handler(feed_name: str) -> Handler:
    async def export(request: web.Request) -> web.StreamResponse:
        state = request.app[STATE_KEY]
        tenant = int(request.match_info["tenant"])
        stats = state.tenant_stats(tenant)
        stats.requests += 1
        stats.feeds[feed_name] += 1
        stats.in_flight += 1
        stats.max_in_flight = max(stats.max_in_flight, stats.in_flight)
        try:
            response = await _export(request, state, stats, tenant, feed_name)
        finally:
            stats.in_flight -= 1
        quirks = state.quirks(tenant)
        if quirks.gzip and _accepts_gzip(request):
            _compress(response)
        if quirks.date_offset and not response.prepared:
            response.headers["Date"] = formatdate(time.time() + quirks.date_offset, usegmt=True)
        return response

    return export


async def _export(
    request: web.Request, state: SimState, stats: TenantStats, tenant: int, feed_name: str
) -> web.StreamResponse:
    if request.headers.get("ST-App-Key") != state.options.app_key:
        return problem(401, "The ST-App-Key header is missing or not valid.")
    now = time.monotonic()
    token = request.headers.get("Authorization", "").strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    owner = state.token_tenant(token, now) if token else None
    if owner is None:
        return problem(401, "The access token is missing, not valid or expired.")
    if owner != tenant:
        return problem(403, f"The access token does not grant access to tenant {tenant}.")
    stats.polled_by(token, time.time())

    quirks = state.quirks(tenant)
    wait = state.bucket(tenant).take(now)
    if wait > 0:
        stats.rate_limited += 1
        return rate_limited(retry_after_seconds(wait), quirks.rate_limit_body)
    quirk_rng = state.quirk_rng(tenant)
    if quirks.hang > 0 and quirk_rng.random() < quirks.hang:
        stats.hung += 1
        return await _hang(request, state)
    settings = state.settings(tenant)
    rng = state.fault_rng
    delay = latency_s(rng, settings)
    if delay > 0:
        await asyncio.sleep(delay)
    status = error_status(rng, settings, settings.error_rate)
    if status is not None:
        stats.errors += 1
        if status == 429 and quirks.rate_limit_body != "problem":
            return rate_limited(_INJECTED_429_WAIT_S, quirks.rate_limit_body)
        return error_response(status, quirks.error_body)

    log = state.log(tenant, feed_name)
    wanted = _read_query(request.query, state, log, tenant, quirks)
    if isinstance(wanted, dict):
        return problem(400, errors=wanted)
    if quirks.no_progress > 0 and quirk_rng.random() < quirks.no_progress:
        stats.no_progress += 1
        return json_response(_no_progress(state, log, wanted, quirks))
    ticks = now_ticks()
    style = quirks.record_style
    if quirks.edits_pages:
        tail_end = wanted.cursor if wanted.recent else 0

        def edit(entries: list[Entry]) -> list[Entry]:
            return edit_entries(log, entries, quirks, quirk_rng, tail_end)

        page = await state.pager.edited_page(
            log, wanted.start, wanted.recent, wanted.active, ticks, edit, style
        )
    else:
        page = await state.pager.page(log, wanted.start, wanted.recent, wanted.active, ticks, style)
    if quirks.echo_credential != "none":
        secret = _echoed(state, tenant, quirks, token, now)
        if secret is not None:
            body = echo_in_page(
                page.body,
                secret,
                quirks.echo_in,
                quirks.echo_escaped,
                log.feed.key_fields,
                log.feed.timestamp_field,
            )
            page = dataclasses.replace(page, body=body)
    return await _send(request, state, stats, log, page)


def _echoed(state: SimState, tenant: int, quirks: Quirks, token: str, now: float) -> str | None:
    """The credential the `echo_credential` quirk puts into tenant's pages; None when there is
    none to echo (no other tenant, or none with a live token)."""
    kind = quirks.echo_credential
    if kind == "token":
        return token
    if kind == "app_key":
        return state.options.app_key
    other = next((t for t in state.tenants if t != tenant), None)
    if other is None:
        return None
    if kind == "other_secret":
        return f"secret-{other}"
    live = [k for k, (owner, expiry) in state.tokens.items() if owner == other and expiry > now]
    return live[-1] if live else None


def _no_progress(state: SimState, log: FeedLog, wanted: _Query, quirks: Quirks) -> dict[str, Any]:
    """A page that says there is more, holds nothing and offers no way forward."""
    body: dict[str, Any] = {"hasMore": True, "data": []}
    mode = quirks.no_progress_cursor
    if mode == "same":
        same = wanted.raw_from or state.codec.encode(log.tenant, log.feed_no, wanted.cursor)
        body["continueFrom"] = same
    elif mode == "null":
        body["continueFrom"] = None
    elif mode == "empty":
        body["continueFrom"] = ""
    elif mode == "alternate":
        body["continueFrom"] = state.codec.encode(log.tenant, log.feed_no, wanted.cursor ^ 1)
    return body


async def _hang(request: web.Request, state: SimState) -> web.Response:
    """Answer nothing until the client gives up (or the server stops)."""
    while not state.stopping.is_set():
        transport = request.transport
        if transport is None or transport.is_closing():
            break
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(_HANG_POLL_S):
                await state.stopping.wait()
    return problem(504)


async def _release_hung(app: web.Application) -> None:
    app[STATE_KEY].stopping.set()


def _read_query(
    query: Mapping[str, str], state: SimState, log: FeedLog, tenant: int, quirks: Quirks
) -> _Query | dict[str, list[str]]:
    """What the request asks for, or validation errors by field."""
    errors: dict[str, list[str]] = {}
    recent_raw = query.get("includeRecentChanges", "false").strip().lower()
    if recent_raw not in ("true", "false"):
        errors["includeRecentChanges"] = [f"The value '{recent_raw[:80]}' is not valid."]
    recent = recent_raw == "true"
    active = state.default_active(log.feed.name)
    if "active" in query and any(name == "active" for name, _ in log.feed.params):
        chosen = _ACTIVE_VALUES.get(query["active"].strip().lower())
        if chosen is None:
            errors["active"] = [f"The value '{query['active'][:80]}' is not valid."]
        else:
            active = chosen
    start = cursor = 0
    raw_from = query.get("from", "").strip()
    decoded = state.codec.decode(raw_from) if raw_from else None
    if decoded is not None:
        token_tenant, feed_no, cursor = decoded
        start = cursor
        if token_tenant != tenant or feed_no != log.feed_no:
            errors["from"] = ["The continuation token belongs to another feed or tenant."]
        elif recent and quirks.repeat_tail:
            # With recent changes the real API repeats the tail of the previous page.
            start = log.overlap_start(cursor, state.options.effective_overlap, active)
    elif raw_from:
        since = parse_date(raw_from)
        if since is None:
            errors["from"] = [f"The value '{raw_from[:80]}' is not a valid continuation token."]
        else:
            start = cursor = log.position_at_or_after(since)
    return errors or _Query(start, cursor, recent, active, raw_from)


async def _send(
    request: web.Request, state: SimState, stats: TenantStats, log: FeedLog, page: Page
) -> web.StreamResponse:
    body = page.body
    fault = body_fault(state.fault_rng, state.settings(log.tenant))
    headers = {"Content-Type": JSON_TYPE}
    if fault is BodyFault.NONE:
        if page.keyless:
            log.count_served(page.keyless)
            stats.keyless_served += len(page.keyless)
        return web.Response(body=body, headers=headers)
    stats.errors += 1
    sent = damage(state.fault_rng, body, fault)
    if fault is not BodyFault.DROP:
        return web.Response(body=sent, headers=headers)
    # Promise the whole body, send part of it, then hang up: a connection lost mid-response.
    response = web.StreamResponse(headers=headers)
    response.content_length = len(body)
    await response.prepare(request)
    await response.write(sent)
    if request.transport is not None:
        request.transport.close()
    return response


def _accepts_gzip(request: web.Request) -> bool:
    for part in request.headers.get("Accept-Encoding", "").split(","):
        coding, _, params = part.partition(";")
        if coding.strip().lower() in ("gzip", "*"):
            quality = params.strip().lower().removeprefix("q=").strip()
            return quality not in ("0", "0.0", "0.00", "0.000")
    return False


def _compress(response: web.StreamResponse) -> None:
    """gzip a response that is still to be sent in one piece (others are left as they are)."""
    if type(response) is not web.Response or response.prepared:
        return
    body = response.body
    if not isinstance(body, bytes) or not body:
        return
    response.body = gzip.compress(body, compresslevel=5, mtime=0)
    response.headers["Content-Encoding"] = "gzip"
    response.headers["Vary"] = "Accept-Encoding"


def parse_date(text: str) -> int | None:
    """A `from` date or date-time (UTC unless it says otherwise) as ticks, or None."""
    if len(text) < 10 or not text[:4].isdigit() or text[4] != "-":
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // timedelta(microseconds=1) * 10


async def _mutator(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE_KEY]
    task = None
    if state.options.mutation_rate > 0:
        task = asyncio.create_task(_mutate_forever(state))
    yield
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _mutate_forever(state: SimState) -> None:
    rate = state.options.mutation_rate
    last = time.monotonic()
    carry = 0.0
    while True:
        await asyncio.sleep(min(_MUTATOR_TICK_S, 1.0 / rate))
        now = time.monotonic()
        carry += (now - last) * rate
        last = now
        count = int(carry)
        carry -= count
        for _ in range(count):
            for tenant in state.tenants:
                state.mutate_random(tenant)


class RunningServer:
    """A started simulator site; `close()` stops it."""

    def __init__(self, runner: web.AppRunner, host: str, port: int) -> None:
        self.runner = runner
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Base URL of the API (and of the token endpoint, under /connect/token)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        """Stop accepting connections and close the open ones (hung requests end at once)."""
        self.runner.app[STATE_KEY].stopping.set()
        await self.runner.cleanup()


async def start_server(state: SimState) -> RunningServer:
    """Serve `state` on its configured host and port (0: a free port, read back)."""
    options = state.options
    if options.prerender:
        state.prerender()
    app = build_app(state)
    if options.log_requests:
        runner = web.AppRunner(app, handle_signals=False)
    else:
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, options.host, options.port, reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    port = int(runner.addresses[0][1])
    return RunningServer(runner, options.host, port)
