"""`/_sim/...`: ground truth and runtime controls for tests and benchmarks (no auth)."""

from __future__ import annotations

from typing import cast
from urllib.parse import unquote

import msgspec
from aiohttp import web

from syncd.simulator.data import MutationKind
from syncd.simulator.faults import FaultOverrides
from syncd.simulator.problems import JSON_TYPE, json_response, problem
from syncd.simulator.state import STATE_KEY, SimState, UnknownFeed

_KINDS = ("update", "deactivate", "create", "delete")
_MAX_MUTATIONS = 100_000


def add_routes(app: web.Application) -> None:
    """Register the control endpoints."""
    feed = "/_sim/tenants/{tenant:\\d+}/feeds/{feed:.+}"
    app.router.add_get(f"{feed}/records", _records)
    app.router.add_get(f"{feed}/truth", _truth)
    app.router.add_post(f"{feed}/mutate", _mutate)
    app.router.add_post("/_sim/tenants/{tenant:\\d+}/faults", _faults)
    app.router.add_post("/_sim/tenants/{tenant:\\d+}/quirks", _set_quirks)
    app.router.add_get("/_sim/tenants/{tenant:\\d+}/quirks", _get_quirks)
    app.router.add_get("/_sim/stats", _stats)
    app.router.add_post("/_sim/reset-stats", _reset_stats)
    app.router.add_post("/_sim/tokens/expire", _expire_tokens)
    app.router.add_get("/_sim/info", _info)


def _target(request: web.Request) -> tuple[SimState, int, str]:
    return (
        request.app[STATE_KEY],
        int(request.match_info["tenant"]),
        unquote(request.match_info["feed"]),
    )


async def _records(request: web.Request) -> web.Response:
    state, tenant, feed = _target(request)
    try:
        body = state.log(tenant, feed).ground_truth(state.quirks(tenant).record_style)
    except UnknownFeed:
        return problem(404, f"No feed {feed!r} for tenant {tenant}.")
    return web.Response(body=body, headers={"Content-Type": JSON_TYPE})


async def _truth(request: web.Request) -> web.Response:
    state, tenant, feed = _target(request)
    try:
        return json_response(state.truth(tenant, feed))
    except UnknownFeed:
        return problem(404, f"No feed {feed!r} for tenant {tenant}.")


async def _mutate(request: web.Request) -> web.Response:
    state, tenant, feed = _target(request)
    raw_count = request.query.get("count", "1")
    kind = request.query.get("kind", "update")
    if not raw_count.isdigit() or not 0 <= int(raw_count) <= _MAX_MUTATIONS:
        return problem(400, errors={"count": [f"count must be 0..{_MAX_MUTATIONS}"]})
    if kind not in _KINDS:
        return problem(400, errors={"kind": [f"kind must be one of {', '.join(_KINDS)}"]})
    try:
        log = state.log(tenant, feed)
    except UnknownFeed:
        return problem(404, f"No feed {feed!r} for tenant {tenant}.")
    before = log.keyless_created
    keys = state.mutate(tenant, feed, cast(MutationKind, kind), int(raw_count))
    return json_response({"keys": keys, "keyless": log.keyless_created - before})


async def _faults(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tenant = int(request.match_info["tenant"])
    raw = await request.read()
    try:
        overrides = msgspec.json.decode(raw or b"{}", type=FaultOverrides)
    except msgspec.ValidationError as exc:
        return problem(400, errors={"body": [str(exc)]})
    except msgspec.DecodeError as exc:
        return problem(400, errors={"body": [f"not JSON: {exc}"]})
    message = overrides.check()
    if message is not None:
        return problem(400, errors={"body": [message]})
    state.set_overrides(tenant, overrides)
    return json_response({"tenant": tenant, "overrides": msgspec.to_builtins(overrides)})


async def _set_quirks(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tenant = int(request.match_info["tenant"])
    raw = await request.read()
    try:
        changes = msgspec.json.decode(raw or b"{}")
    except msgspec.DecodeError as exc:
        return problem(400, errors={"body": [f"not JSON: {exc}"]})
    if not isinstance(changes, dict):
        return problem(400, errors={"body": ["expected a JSON object of quirk settings"]})
    if tenant not in state.tenants:
        return problem(404, f"Tenant {tenant} is not served.")
    try:
        quirks = state.set_quirks(tenant, changes)
    except ValueError as exc:
        return problem(400, errors={"body": [str(exc)]})
    return json_response({"tenant": tenant, "quirks": quirks.to_json()})


async def _get_quirks(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    tenant = int(request.match_info["tenant"])
    if tenant not in state.tenants:
        return problem(404, f"Tenant {tenant} is not served.")
    return json_response({"tenant": tenant, "quirks": state.quirks(tenant).to_json()})


async def _stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE_KEY].stats_json())


async def _reset_stats(request: web.Request) -> web.Response:
    request.app[STATE_KEY].reset_stats()
    return json_response({"reset": True})


async def _expire_tokens(request: web.Request) -> web.Response:
    return json_response({"expired": request.app[STATE_KEY].expire_tokens()})


async def _info(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    options = state.options
    return json_response(
        {
            "tenants": list(state.tenants),
            "feeds": {name: feed.path for name, feed in state.feeds.items()},
            "records": options.records,
            "page_size": options.page_size,
            "overlap": options.effective_overlap,
            "recent_delay": options.recent_delay,
            "rate_limit": options.rate_limit,
            "seed": options.seed,
            "quirks": {str(t): state.quirks(t).to_json() for t in state.tenants},
        }
    )
