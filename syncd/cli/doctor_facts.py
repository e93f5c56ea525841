"""What `syncd doctor` looks at, gathered: the thin I/O under the verdicts of syncd.cli.doctor.

Nothing here changes anything. Redis sees reads, and (where `ACL DRYRUN` is refused) the ACL
probe's commands, which leave no key behind. ServiceTitan sees, per tenant, exactly one token
grant and one export request for the first configured feed, starting from the current time (so
the page is small); no cursor is stored and no event is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import email.utils
import os
import time
import urllib.parse
from collections.abc import Mapping, MutableSequence, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, Literal

import aiohttp
import redis.exceptions

from syncd import catalogue, redact
from syncd.config import (
    Config,
    RedisConfig,
    Settings,
    TenantSettings,
    expand_path,
    unset_problem,
    unset_variables,
)
from syncd.config.secretfiles import SecretFileError, check_mode, read_secret_file
from syncd.config.urls import redact_url
from syncd.daemon import http_session
from syncd.errors import (
    AuthFailed,
    BadRequest,
    FeedUnavailable,
    RateLimited,
    SyncError,
)
from syncd.redis import acl as redisacl
from syncd.redis import checks as redischeck
from syncd.redis.checks import NodeSettings
from syncd.redis.conn import RedisClient, connect
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.client import ExportClient

OutcomeKind = Literal["ok", "refused", "rate_limited", "unavailable", "bad_request", "transient"]


# -- the facts doctor judges -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SecretFile:
    """A secret file the configuration names, and what the daemon's reader says of it."""

    key: str  # e.g. tenants[0].client_secret_file
    path: str
    problem: str | None  # None: the daemon would accept it
    unset: tuple[str, ...] = ()  # the variables the path names that are not set


@dataclass(frozen=True, slots=True)
class AclFacts:
    """Which of the commands syncd needs the Redis user may run on a key under its prefix."""

    method: Literal["ACL DRYRUN", "probe"]
    checked: int
    denied: tuple[tuple[str, str], ...] = ()  # (command, Redis' refusal)


@dataclass(frozen=True, slots=True)
class RedisFacts:
    where: str  # the URL without credentials
    error: str | None = None  # could not connect or log in
    version: str | None = None
    version_error: str | None = None  # INFO refused
    nodes: tuple[NodeSettings, ...] = ()
    acl: AclFacts | None = None


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one request to ServiceTitan ended."""

    kind: OutcomeKind
    text: str = ""


@dataclass(frozen=True, slots=True)
class TenantFacts:
    tenant: int
    key: str  # tenants[i]
    feed: str  # the feed asked for one page
    token: Outcome
    export: Outcome | None = None  # None: not asked (no token)
    records: int = 0


@dataclass(frozen=True, slots=True)
class ClockSample:
    """One API answer's Date header against this host's clock around the request."""

    tenant: int
    server: float  # Unix time of the Date header (whole seconds)
    sent: float
    received: float


# Tenants checked at once: each costs two requests, and the token endpoint has its own throttle.
CONCURRENCY = 8
# Commands named by their first two words (a subcommand) rather than the first.
_CONTAINERS = frozenset({"ACL", "CLIENT", "CONFIG", "OBJECT", "SCRIPT", "XGROUP", "XINFO"})


def command_name(command: Sequence[Any]) -> str:
    """`XGROUP CREATE`, `HSET`: how the README's ACL line and Redis' refusals name a command."""
    words = [str(w).upper() for w in command[:2]]
    return " ".join(words) if words[0] in _CONTAINERS and len(words) > 1 else words[0]


def outcome_of(exc: SyncError) -> Outcome:
    """The kind of failure a request to ServiceTitan ended in, with its (redacted) text."""
    kind: OutcomeKind = "transient"
    if isinstance(exc, AuthFailed):
        kind = "refused"
    elif isinstance(exc, RateLimited):
        kind = "rate_limited"
    elif isinstance(exc, FeedUnavailable):
        kind = "unavailable"
    elif isinstance(exc, BadRequest):
        kind = "bad_request"
    return Outcome(kind, redact.redact(str(exc)))


# -- files ------------------------------------------------------------------------------------


def secret_files(cfg: Config, environ: Mapping[str, str]) -> list[SecretFile]:
    """Every secret file the configuration names, judged by the daemon's own reader."""
    named: list[tuple[str, str]] = []
    if cfg.servicetitan.app_key_file is not None:
        named.append(("servicetitan.app_key_file", cfg.servicetitan.app_key_file))
    for i, t in enumerate(cfg.tenants):
        if t.client_secret_file is not None:
            named.append((f"tenants[{i}].client_secret_file", t.client_secret_file))
    if cfg.redis.tls_key_file is not None:
        named.append(("redis.tls_key_file", cfg.redis.tls_key_file))
    if cfg.ops.token_file is not None:
        named.append(("ops.token_file", cfg.ops.token_file))
    out = []
    for key, given in named:
        path = expand_path(given, environ)
        if path is None:
            unset = tuple(unset_variables(given, environ))
            problem = unset_problem(given, environ, hint=False)
            out.append(SecretFile(key, given, problem, unset))
            continue
        try:
            read_secret_file(path)
        except SecretFileError as exc:
            out.append(SecretFile(key, path, str(exc)))
        else:
            out.append(SecretFile(key, path, None))
    return out


def inline_secrets(cfg: Config) -> list[str]:
    """The configuration keys holding a secret in the file itself."""
    keys = ["redis.url (its password)"] if urllib.parse.urlsplit(cfg.redis.url).password else []
    keys += ["servicetitan.app_key"] if cfg.servicetitan.app_key is not None else []
    keys += [f"tenants[{i}].client_secret" for i, t in enumerate(cfg.tenants) if t.client_secret]
    return keys


def file_mode_problem(path: str) -> str | None:
    """What makes `path` readable by others (as a secret file's check says), or None."""
    try:
        return check_mode(os.stat(path), os.geteuid())
    except OSError as exc:
        return f"cannot stat: {exc.strerror or exc}"


# -- Redis ------------------------------------------------------------------------------------


async def gather_redis(
    rc: RedisConfig, *, fleet: bool = False, sentinel_password: str | None = None
) -> RedisFacts:
    where = redact_url(rc.url)
    client = connect(rc, sentinel_password)
    try:
        try:
            version, version_error = await redischeck.read_version(client), None
        except redis.exceptions.NoPermissionError as exc:
            version, version_error = None, _text(exc)
        nodes = await redischeck.read_settings(client)
        acl = await gather_acl(client, rc.key_prefix, fleet=fleet, wait=rc.wait_replicas > 0)
    except (redis.exceptions.RedisError, OSError) as exc:
        return RedisFacts(where, error=_text(exc))
    finally:
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await client.aclose()
    return RedisFacts(
        where, version=version, version_error=version_error, nodes=tuple(nodes), acl=acl
    )


def _text(exc: BaseException) -> str:
    return redact.redact(f"{type(exc).__name__}: {exc}")


async def gather_acl(
    client: RedisClient, prefix: str, *, fleet: bool = False, wait: bool = False
) -> AclFacts:
    """Ask Redis (`ACL DRYRUN`) whether the user may run each command syncd needs on a key
    under `prefix`; where the user may not ask that, run each command in the harmless form of
    syncd.redis.acl's start-time probe and collect the refusals."""
    commands = redisacl.probes(prefix, fleet=fleet, wait=wait)
    with contextlib.suppress(redis.exceptions.ResponseError):
        user = _decode(await client.execute_command("ACL", "WHOAMI"))
        denied = []
        for command in commands:
            reply = _decode(await client.execute_command("ACL", "DRYRUN", user, *command))
            if reply != "OK":
                denied.append((command_name(command), reply))
        return AclFacts("ACL DRYRUN", len(commands), tuple(denied))
    refused = [(command_name(c), await redisacl.refusal(client, c)) for c in commands]
    return AclFacts("probe", len(commands), tuple((n, m) for n, m in refused if m is not None))


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- ServiceTitan -----------------------------------------------------------------------------


class _OneGrant(TokenProvider):
    """A tenant's token, granted once: a 401 on the export request is reported rather than
    answered by a second grant."""

    refused = False

    def invalidate(self, token: str) -> None:
        self.refused = True
        super().invalidate(token)

    async def token(self) -> str:
        if self.refused:
            raise AuthFailed(
                "the API refused the token it had just granted (HTTP 401); the app key or the "
                "tenant's API access is wrong"
            )
        return await super().token()


class _DateRecorder:
    """Keeps the Date header of every answer from the API, with the local time around it."""

    def __init__(self, api_url: str, tenants_by_path: dict[str, int]) -> None:
        self.samples: list[ClockSample] = []
        self._api = api_url
        self._by_path = tenants_by_path
        self.config = aiohttp.TraceConfig()
        # Through plain sequences: aiohttp before 3.13 mistypes its signals' callbacks.
        on_start: MutableSequence[Any] = self.config.on_request_start
        on_end: MutableSequence[Any] = self.config.on_request_end
        on_start.append(self._start)
        on_end.append(self._end)

    async def _start(
        self, _s: aiohttp.ClientSession, ctx: SimpleNamespace, _p: aiohttp.TraceRequestStartParams
    ) -> None:
        ctx.sent = time.time()

    async def _end(
        self, _s: aiohttp.ClientSession, ctx: SimpleNamespace, p: aiohttp.TraceRequestEndParams
    ) -> None:
        received = time.time()
        url = str(p.url.with_query(None))
        tenant = (
            self._by_path.get(url.removeprefix(self._api)) if url.startswith(self._api) else None
        )
        header = p.response.headers.get("Date")
        if tenant is None or header is None:
            return  # not an export answer (the token endpoint may share the API's host)
        try:
            server = email.utils.parsedate_to_datetime(header).timestamp()
        except (TypeError, ValueError):
            return
        self.samples.append(ClockSample(tenant, server, ctx.sent, received))


async def gather_api(
    settings: Settings, now: dt.datetime | None = None
) -> tuple[list[TenantFacts], list[ClockSample]]:
    """One token grant and one export request per tenant, and the API's Date headers."""
    since = (now or dt.datetime.now(dt.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    feeds = catalogue.feeds()
    paths = {feeds[t.feeds[0]].url_path(t.id): t.id for t in settings.tenants}
    dates = _DateRecorder(settings.api_url, paths)
    limit = asyncio.Semaphore(CONCURRENCY)
    async with http_session(settings, [dates.config]) as session:
        client = ExportClient(session, settings.api_url, settings.app_key)

        async def one(i: int, t: TenantSettings) -> TenantFacts:
            async with limit:
                return await _tenant(session, client, settings.auth_url, i, t, since)

        facts = await asyncio.gather(*(one(i, t) for i, t in enumerate(settings.tenants)))
    return list(facts), dates.samples


async def _tenant(
    session: aiohttp.ClientSession,
    client: ExportClient,
    auth_url: str,
    index: int,
    t: TenantSettings,
    since: str,
) -> TenantFacts:
    feed = catalogue.feed(t.feeds[0])
    key = f"tenants[{index}]"
    tokens = _OneGrant(session, auth_url, t.id, t.client_id, t.client_secret)
    try:
        await tokens.token()
    except SyncError as exc:
        return TenantFacts(t.id, key, feed.name, outcome_of(exc))
    try:
        page = await client.fetch(tokens, feed, since, include_recent_changes=False)
    except SyncError as exc:
        return TenantFacts(t.id, key, feed.name, Outcome("ok"), outcome_of(exc))
    return TenantFacts(t.id, key, feed.name, Outcome("ok"), Outcome("ok"), page.fetched)
