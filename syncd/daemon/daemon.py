"""The daemon: startup, main loop, shutdown. Signal handlers only set flags."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import msgspec
import redis.exceptions
import structlog

from syncd import catalogue
from syncd.config import Config, ConfigError, Secret, Settings, TenantSettings, load_settings
from syncd.daemon.fleet import FleetMember
from syncd.engine import upkeep
from syncd.engine.publisher import Publisher
from syncd.engine.scheduler import Scheduler, resume_delay
from syncd.fleet.fleet import default_instance_name
from syncd.keys import Keys
from syncd.ops.metrics import EngineStatus, Metrics, TenantStatus
from syncd.ops.sdnotify import Notifier, watchdog_interval
from syncd.ops.server import OpsServer
from syncd.redis import acl as redisacl
from syncd.redis import checks as redischeck
from syncd.redis.conn import RedisClient, connect
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.client import ExportClient

log = structlog.get_logger("syncd.daemon")

_T = TypeVar("_T")

# /healthz fails when the dispatcher has not ticked for this long (it ticks at least each second).
LIVENESS_S = 30.0
STATUS_EVERY_S = 10.0

EXIT_OK = 0
EXIT_FEEDS_FAILED = 1
EXIT_CONFIG = 2


def redis_client(cfg: Config, sentinel_password: Secret | None = None) -> RedisClient:
    """The Redis (Cluster, or Sentinel-named primary) client of a configuration."""
    return connect(cfg.redis, sentinel_password.reveal() if sentinel_password else None)


@contextlib.asynccontextmanager
async def http_session(
    settings: Settings, trace_configs: list[aiohttp.TraceConfig] | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    """The HTTP session for ServiceTitan; `trace_configs` let a caller see each response."""
    st = settings.config.servicetitan
    connector = aiohttp.TCPConnector(limit=st.max_connections, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=st.request_timeout, sock_connect=st.connect_timeout)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        raise_for_status=False,
        # No cookies: one session serves every tenant, and a cookie one tenant's answer set
        # must never ride along with another's request.
        cookie_jar=aiohttp.DummyCookieJar(),
        trace_configs=trace_configs,
    ) as session:
        yield session


# How long shutdown waits for its helper tasks to end once cancelled.
CANCEL_WITHIN_S = 10.0


async def cancel_all(tasks: Sequence[asyncio.Future[Any]], within: float = CANCEL_WITHIN_S) -> bool:
    """Cancel `tasks` and wait for them to end, cancelling again while one goes on: on Python
    3.11 redis-py can drop a cancellation that lands while a command is being sent, and a loop
    that swallowed it would hold shutdown for ever. False when some still run after `within`."""
    pending = {t for t in tasks if not t.done()}
    deadline = time.monotonic() + within
    while pending and time.monotonic() < deadline:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: a helper's error is not reported again at exit
    return not pending


class Daemon:
    """Owns the connections and the scheduler for one configuration."""

    def __init__(
        self,
        settings: Settings,
        *,
        once: bool = False,
        config_path: str | None = None,
        environ: Mapping[str, str] | None = None,
        instance: str | None = None,
    ) -> None:
        self.settings = settings
        self.once = once
        self.instance = instance or default_instance_name()
        self.fleet: FleetMember | None = None
        self.config_path = config_path
        self.environ = os.environ if environ is None else environ
        self.metrics = Metrics(detail=settings.config.ops.metrics_detail)
        self.notifier = Notifier(self.environ)
        self.ops: OpsServer | None = None
        self._signals = 0
        self.scheduler: Scheduler | None = None
        self._session: aiohttp.ClientSession | None = None
        self.redis: RedisClient | None = None
        self.publisher: Publisher | None = None
        self._reloads: asyncio.Queue[None] = asyncio.Queue()
        self.reloaded = 0  # configurations applied by SIGHUP
        self.live = False  # startup done: the scheduler is expected to tick
        self.refused: str | None = None  # Redis settings (or permissions) syncd will not run on
        self.redis_persistence: str | None = None  # stated by /readyz while Redis saves nothing
        self.memory_advice: str | None = None  # set while polling is paused on Redis memory
        self._next_sweep = 0.0  # when upkeep next removes idle consumer names (monotonic)

    # -- starting feeds ----------------------------------------------------------------

    async def _prepare_feeds(
        self, settings: Settings, t: TenantSettings, new: Sequence[str], *, wait: bool
    ) -> FeedStart:
        """The one way feeds start: read the tenant's stored cursors and state, and create the
        configured consumer groups on the streams of the `new` feeds, before anything can be
        published to them. Schedules nothing: `_start` does, once every start is prepared.

        With `wait`, a Redis outage is waited out (startup); else it fails (reload).
        """
        publisher, r = self.publisher, self.redis
        assert publisher is not None
        assert r is not None
        assert self.scheduler is not None

        async def call(fn: Callable[[], Awaitable[_T]]) -> _T:
            return await (self._wait_for_redis(fn) if wait else fn())

        # Feeds already running keep their own cursors: nothing to read for them.
        cursors, state = await call(lambda: publisher.resume_state(t.id)) if new else ({}, {})
        groups = self.settings.config.streams.groups  # fixed until a restart
        if groups and new:
            keys = Keys(self.settings.config.redis.key_prefix, t.id)
            streams = [keys.stream(f) for f in new]
            await call(lambda: upkeep.ensure_groups(r, streams, groups))
        now = time.time()
        delays, successes = {}, {}
        for feed in t.feeds:
            last_ok = state.get(f"{feed}:last_ok")
            if last_ok:
                successes[feed] = float(last_ok)
            delays[feed] = resume_delay(
                now,
                float(last_ok) if last_ok else None,
                state.get(f"{feed}:more") == "1",
                settings.poll_interval(t, feed),
                self.scheduler.rng,
            )
        feeds = [
            (
                catalogue.feed(name),
                cursors.get(name),
                settings.feed_options(name).change_detection,
                settings.poll_interval(t, name),
            )
            for name in t.feeds
        ]
        return FeedStart(t, feeds, delays, resumed=len(cursors), last_ok=successes)

    def _tokens(self, t: TenantSettings) -> TokenProvider:
        assert self._session is not None
        return TokenProvider(
            self._session,
            self.settings.auth_url,
            t.id,
            t.client_id,
            t.client_secret,
            on_renewal=self.metrics.token_renewed,
            timeout=self.settings.config.servicetitan.token_timeout,
        )

    async def add_tenant(self, t: TenantSettings) -> None:
        """Schedule one tenant now (the fleet acquired it); a Redis error fails, not waits."""
        start = await self._prepare_feeds(self.settings, t, t.feeds, wait=False)
        self._start(start, self._tokens(t))

    def _start(self, start: FeedStart, tokens: TokenProvider) -> None:
        """Schedule a prepared tenant (no awaits: applied at once with the rest of a reload)."""
        assert self.scheduler is not None
        t = start.settings
        self.metrics.track_tenant(t.id)
        self.metrics.set_feeds(t.id, start.intervals(), start.last_ok)
        self.metrics.set_rate_limit(t.id, t.requests_per_second)
        self.scheduler.add_tenant(t, tokens, start.feeds, start.delays)
        log.info("tenant_added", tenant=t.id, feeds=len(t.feeds), resumed=start.resumed)

    async def _upkeep(self) -> None:
        """Retention and backpressure, every `streams.check_interval` seconds."""
        while True:
            await asyncio.sleep(self.settings.config.streams.check_interval)
            try:
                await self._upkeep_once()
            except Exception as exc:
                log.warning("upkeep_failed", error=f"{type(exc).__name__}: {exc}")

    async def _upkeep_once(self) -> None:
        assert self.redis is not None
        assert self.scheduler is not None
        r, sched, s = self.redis, self.scheduler, self.settings
        sc = s.config.streams
        prefix = s.config.redis.key_prefix
        over, used, limit = await upkeep.memory_pressure(r, sc.max_memory)
        sweep = bool(sc.consumer_idle) and time.monotonic() >= self._next_sweep
        if sweep:
            self._next_sweep = time.monotonic() + upkeep.sweep_interval(sc.consumer_idle)
        holders: list[upkeep.Holder] = []
        retention = False
        for t in list(sched.tenants.values()):
            keys = Keys(prefix, t.id)
            paused = 0
            for fs in list(t.feeds.values()):
                max_len, max_age = s.retention(fs.name)
                retention = retention or bool(max_len or max_age)
                if not ((sc.groups and sc.max_lag) or max_len or max_age or sweep or over):
                    continue  # nothing to decide on this stream in this check
                stream = keys.stream(fs.name)
                state = await upkeep.stream_state(r, stream, sc.groups)
                behind = {g.name: g.unacknowledged(state.length) for g in state.groups}
                holders += [upkeep.Holder(stream, g, n) for g, n in behind.items() if n]
                configured = {g: n for g, n in behind.items() if g in sc.groups}
                if state.missing:
                    configured = {}
                reason = upkeep.pause_reason(fs.paused, configured, sc.max_lag, sc.resume_mark())
                if reason != fs.paused:
                    if reason:
                        log.warning("backpressure_paused", tenant=t.id, feed=fs.name, reason=reason)
                    else:
                        log.info("backpressure_resumed", tenant=t.id, feed=fs.name)
                    fs.paused = reason
                    await self._record_pause(keys, fs.name, reason)
                paused += fs.paused is not None
                if max_len or max_age:
                    result = await upkeep.trim(
                        r,
                        stream,
                        state,
                        configured=sc.groups,
                        protect_unlisted=sc.protect_unlisted,
                        max_len=max_len,
                        max_age=max_age,
                    )
                    if result.removed:
                        log.debug(
                            "stream_trimmed", tenant=t.id, feed=fs.name, entries=result.removed
                        )
                if sweep:
                    names = [g.name for g in state.groups]
                    await upkeep.forget_idle_consumers(r, stream, names, sc.consumer_idle)
            self.metrics.set_feeds_paused(t.id, paused)
        advice = upkeep.memory_advice(used, limit, sc.max_memory, holders, retention)
        if over != sched.memory_full:
            if over:
                log.warning("backpressure_memory", used_bytes=used, maxmemory=limit, advice=advice)
            else:
                log.info("backpressure_memory_cleared", used_bytes=used, maxmemory=limit)
            sched.set_memory_full(over)
        if over != (self.memory_advice is not None):
            for tid in sched.tenants:
                await self._record_pause(Keys(prefix, tid), None, advice if over else None)
        self.memory_advice = advice if over else None

    async def _record_pause(self, keys: Keys, feed: str | None, reason: str | None) -> None:
        """Record why a feed (or, with feed None, all polling on Redis memory) is paused."""
        assert self.redis is not None
        field = f"{feed}:paused" if feed else "memory_paused"
        if reason:
            await self.redis.hset(keys.state, field, reason)
        else:
            await self.redis.hdel(keys.state, field)

    async def _wait_for_redis(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run `call` until Redis answers; at startup an outage waits rather than exits."""
        delay = 0.5
        while True:
            try:
                return await call()
            except (redisacl.RedisPermissionError, redis.exceptions.NoPermissionError):
                raise  # waiting will not grant it
            except Exception as exc:
                if self.scheduler is not None and self.scheduler.stopping:
                    raise
                log.warning("redis_unavailable", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- signals -----------------------------------------------------------------------

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        assert self.scheduler is not None
        if self._signals == 1:
            log.info("shutdown_requested", signal=name)
            self.notifier.stopping()
            if self.fleet is not None:
                self.fleet.drain()
            self.scheduler.stop()
        else:
            log.warning("shutdown_forced", signal=name)
            self.scheduler.force()
            if self.fleet is not None:
                self.fleet.cancel()  # no handover: the leases run out

    def _on_hup(self) -> None:
        self._reloads.put_nowait(None)

    # -- reload ------------------------------------------------------------------------

    async def _reload_loop(self) -> None:
        while True:
            await self._reloads.get()
            self.notifier.reloading()
            try:
                await self.reload()
            except Exception:
                log.exception("reload_failed")
            self.notifier.ready(self._status())

    async def reload(self) -> bool:
        """Re-read the configuration file and apply it, all of it or nothing.

        Everything that can fail happens first: parse and validate, read secrets, read the
        stored state of new tenants and feeds, create their consumer groups, build token
        providers. Only then is the new configuration applied, without an await in between; a
        failure before leaves the running configuration as it was.
        """
        if self.config_path is None:
            log.warning("reload_ignored", reason="no configuration file")
            return False
        try:
            new = load_settings(self.config_path, self.environ)
        except ConfigError as exc:
            log.error("reload_rejected", error=str(exc))
            return False
        try:
            plan = await self._prepare_reload(new)
        except Exception as exc:
            log.error("reload_failed", error=f"{type(exc).__name__}: {exc}", applied=False)
            return False
        self._apply_reload(plan)
        self.reloaded += 1
        log.info("reloaded", tenants=len(plan.settings.tenants))
        return True

    async def _prepare_reload(self, new: Settings) -> ReloadPlan:
        old = self.settings
        fixed = ("redis", "servicetitan", "engine", "ops", "log", "streams", "fleet")
        changed = [k for k in fixed if getattr(old.config, k) != getattr(new.config, k)]
        if changed or new.app_key != old.app_key:
            # Connections and pools are built once; these need a restart to change.
            log.warning("reload_needs_restart", sections=changed or ["servicetitan.app_key"])
        settings = msgspec_replace_tenants(old, new)
        assert self.scheduler is not None
        running = self.scheduler.tenants
        wanted = {t.id for t in settings.tenants}
        plan = ReloadPlan(settings, remove=[tid for tid in running if tid not in wanted])
        for t in settings.tenants:
            state = running.get(t.id)
            if state is None:
                if self.fleet is not None:  # in a fleet, a tenant comes with its lease
                    continue
                start = await self._prepare_feeds(settings, t, t.feeds, wait=False)
                plan.add.append((start, self._tokens(t)))
                continue
            added = [f for f in t.feeds if f not in state.feeds]
            start = await self._prepare_feeds(settings, t, added, wait=False)
            credentials = (
                state.settings.client_id != t.client_id
                or state.settings.client_secret != t.client_secret
            )
            plan.change.append((start, credentials))
        return plan

    def _apply_reload(self, plan: ReloadPlan) -> None:
        """Switch to a prepared configuration: no awaits, so nothing runs half-way through."""
        sched = self.scheduler
        assert sched is not None
        self.settings = plan.settings
        if self.fleet is not None:
            self.fleet.reloaded(plan.settings)
        for tid in plan.remove:
            sched.remove_tenant(tid)
            log.info("tenant_removed", tenant=tid)
        for start, tokens in plan.add:
            self._start(start, tokens)
        for start, credentials in plan.change:
            t = start.settings
            if credentials:
                sched.tenants[t.id].tokens.set_credentials(t.client_id, t.client_secret)
            added, removed = sched.reconfigure_tenant(t, start.feeds)
            self.metrics.set_feeds(t.id, start.intervals(), start.last_ok)
            self.metrics.set_rate_limit(t.id, t.requests_per_second)
            if added or removed:
                log.info("tenant_feeds_changed", tenant=t.id, added=added, removed=removed)

    # -- health ------------------------------------------------------------------------

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Alive when the scheduler's dispatcher ticked within the last 30 seconds."""
        if self.scheduler is None or not self.live:
            return True, {"phase": "starting"}
        idle = time.monotonic() - self.scheduler.last_progress
        ok = idle < LIVENESS_S
        details: dict[str, object] = {"scheduler_idle_s": round(idle, 3)}
        if not ok:
            details["reason"] = f"scheduler made no progress for {idle:.0f}s"
        return ok, details

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Ready when Redis answers and no tenant's last token request failed."""
        reasons: list[str] = []
        details: dict[str, object] = {}
        try:
            assert self.redis is not None
            await self.redis.ping()
            details["redis"] = "ok"
        except Exception as exc:
            details["redis"] = "unavailable"
            reasons.append(f"redis: {type(exc).__name__}")
        if self.redis_persistence is not None:
            details["redis_persistence"] = self.redis_persistence  # still ready: a warning
        failing = {}
        if self.scheduler is not None:
            for tid, t in self.scheduler.tenants.items():
                if t.tokens.last_error is not None:
                    failing[str(tid)] = t.tokens.last_error
        else:
            reasons.append("starting")
        if self.memory_advice is not None:
            details["paused_on_memory"] = self.memory_advice
        if self.fleet is not None:
            details["fleet"] = self.fleet.status()
        if failing:
            details["tenants_failing_auth"] = failing
            reasons.append(f"{len(failing)} tenant(s) cannot authenticate")
        if reasons:
            details["reasons"] = reasons
        return not reasons, details

    def _status(self) -> str:
        sched = self.scheduler
        if sched is None:
            return "starting"
        feeds = sum(len(t.feeds) for t in sched.tenants.values())
        text = f"{len(sched.tenants)} tenants, {feeds} feeds, {sched.pages} pages"
        if self.fleet is not None:
            f = self.fleet.status()
            text += f"; fleet: instance {f['instance']} of {f['members']}"
        if not sched.redis_ok.is_set():
            text += "; waiting for Redis"
        return text

    async def _watchdog(self) -> None:
        """Ping systemd's watchdog while the scheduler is alive; report STATUS now and then."""
        interval = watchdog_interval(self.environ)
        period = interval if interval is not None else STATUS_EVERY_S
        last_status = 0.0
        while True:
            await asyncio.sleep(min(period, STATUS_EVERY_S))
            if interval is not None and self.liveness()[0]:
                self.notifier.watchdog()
            if time.monotonic() - last_status >= STATUS_EVERY_S:
                self.notifier.status(self._status())
                last_status = time.monotonic()

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        """Run until a signal (or, with once, until every feed drained once)."""
        cfg = self.settings.config
        started = time.monotonic()
        self.redis = redis_client(cfg, self.settings.sentinel_password)
        loop = asyncio.get_running_loop()
        helpers: list[asyncio.Task[None]] = []
        try:
            async with http_session(self.settings) as session:
                self._session = session
                self.publisher = Publisher(
                    self.redis,
                    cfg.redis.key_prefix,
                    wait_replicas=cfg.redis.wait_replicas,
                    wait_timeout=cfg.redis.wait_timeout,
                )
                client = ExportClient(
                    session, self.settings.api_url, self.settings.app_key, self.metrics
                )
                e = cfg.engine
                self.scheduler = Scheduler(
                    client,
                    self.publisher,
                    workers=e.workers,
                    once=self.once,
                    once_max_failures=e.once_max_failures,
                    backoff_base=e.backoff_base,
                    backoff_max=e.backoff_max,
                    jitter=e.jitter,
                    metrics=self.metrics,
                )
                self.metrics.set_status_source(self._engine_status)
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self._on_signal, sig)
                loop.add_signal_handler(signal.SIGHUP, self._on_hup)
                if cfg.ops.listen is not None:
                    self.ops = OpsServer(
                        cfg.ops.listen, self.metrics, self, cfg.ops, self.settings.ops_token
                    )
                    await self.ops.start()
                if not await self._unless_stopped(self._startup()):
                    return self._exit_code(started, interrupted=True)
                if self._in_fleet:
                    self.fleet = FleetMember(self, self.redis, self.instance)
                    self.fleet.start()
                helpers.append(asyncio.create_task(self._watchdog()))
                helpers.append(asyncio.create_task(self._reload_loop()))
                helpers.append(asyncio.create_task(self._upkeep()))
                log.info(
                    "started",
                    tenants=len(self.settings.tenants),
                    feeds=sum(len(t.feeds) for t in self.settings.tenants),
                    once=self.once,
                )
                self.notifier.ready(self._status())
                await self.scheduler.run(grace=e.shutdown_grace)
                if self.fleet is not None:
                    # In-flight pages are done: hand the tenants over at once.
                    await self.fleet.leave(timeout=cfg.fleet.lease)
        finally:
            self.notifier.stopping()
            if self.fleet is not None and self.fleet.task is not None:
                helpers.append(self.fleet.task)  # gone before Redis is closed below
            if not await cancel_all(helpers):
                log.warning("helpers_did_not_stop", within_s=CANCEL_WITHIN_S)
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            if self.ops is not None:
                await self.ops.stop()
            with contextlib.suppress(redis.exceptions.RedisError):
                await self.redis.aclose()
        return self._exit_code(started)

    async def _unless_stopped(self, startup: Coroutine[object, object, bool]) -> bool:
        """Run `startup` until it ends, or until a stop signal: False then, at once. A Redis
        that accepts connections and does not answer would otherwise hold a stopping daemon
        for its socket timeout (per call), past any shutdown grace."""
        assert self.scheduler is not None
        work = asyncio.ensure_future(startup)
        stop = asyncio.ensure_future(self.scheduler.until_stopped())
        try:
            await asyncio.wait([work, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            await cancel_all([stop] if work.done() else [work, stop])
        # Startup's own error is raised here when it ended on one.
        return False if work.cancelled() or not work.done() else work.result()

    async def _startup(self) -> bool:
        """Check Redis, schedule every tenant; False when stopped (or Redis unusable) first."""
        assert self.scheduler is not None
        try:
            version = await self._wait_for_redis(self._redis_version)
            if version < (7, 0):
                log.error("redis_too_old", version=".".join(map(str, version)), required="7.0")
                self.scheduler.crashed = True
                return False
            if not await self._check_redis_settings():
                return False
            prefix = self.settings.config.redis.key_prefix
            r = self.redis
            assert r is not None
            fleet, wait = self._in_fleet, self.settings.config.redis.wait_replicas > 0
            await self._wait_for_redis(lambda: redisacl.check(r, prefix, fleet=fleet, wait=wait))
            if not self._in_fleet:  # in a fleet, tenants come with their leases
                for t in self.settings.tenants:
                    start = await self._prepare_feeds(self.settings, t, t.feeds, wait=True)
                    self._start(start, self._tokens(t))
        except (redisacl.RedisPermissionError, redis.exceptions.NoPermissionError) as exc:
            text = str(exc) if isinstance(exc, redisacl.RedisPermissionError) else f"NOPERM: {exc}"
            log.error("redis_permission_denied", error=text)
            self.refused = text
            return False
        except Exception:
            if self.scheduler.stopping:
                return False
            raise
        if self.ops is not None:
            await self.ops.refresh_readiness()  # /readyz says "ready" as soon as syncd is
        self.live = True
        return True

    async def _check_redis_settings(self) -> bool:
        """Refuse an evicting Redis, warn about one that saves nothing (see redischeck)."""
        r = self.redis
        assert r is not None
        nodes = await self._wait_for_redis(lambda: redischeck.read_settings(r))
        found = redischeck.assess(nodes, allow_eviction=self.settings.config.redis.allow_eviction)
        for node, error in found.unreadable.items():
            log.warning(
                "redis_settings_unreadable",
                node=node,
                error=error,
                unchecked="maxmemory-policy and persistence (CONFIG GET not permitted)",
            )
        if found.refusals:
            for reason in found.refusals:
                log.error("redis_settings_refused", error=reason)
            self.refused = "; ".join(found.refusals)
            return False
        if found.evicting:
            log.warning(
                "redis_may_evict", nodes=found.evicting, allowed_by="[redis] allow_eviction"
            )
        if found.persistence is not None:
            log.warning("redis_no_persistence", nodes=found.unpersisted, detail=found.persistence)
        self.redis_persistence = found.persistence
        return True

    @property
    def _in_fleet(self) -> bool:
        """--once polls every configured tenant, fleet or not."""
        return self.settings.config.fleet.enabled and not self.once

    async def _redis_version(self) -> tuple[int, ...]:
        assert self.redis is not None
        return redischeck.version_tuple(await redischeck.read_version(self.redis))

    def _exit_code(self, started: float, *, interrupted: bool = False) -> int:
        sched = self.scheduler
        failed = sched.failed_feeds if sched else []
        elapsed = round(time.monotonic() - started, 3)
        for fs in failed:
            log.error("feed_failed", tenant=fs.tenant.id, feed=fs.name, error=fs.last_error)
        unfinished = 0
        if self.once and sched is not None:
            unfinished = sum(
                not (fs.drained or fs.failed)
                for t in sched.tenants.values()
                for fs in t.feeds.values()
            )
            if interrupted:
                unfinished = unfinished or sum(len(t.feeds) for t in self.settings.tenants)
        crashed = sched is not None and sched.crashed
        log.info(
            "stopped",
            elapsed_s=elapsed,
            pages=sched.pages if sched else 0,
            failed_feeds=len(failed),
            unfinished_feeds=unfinished,
        )
        if self.refused is not None:
            return EXIT_CONFIG
        if failed or unfinished or crashed:
            return EXIT_FEEDS_FAILED
        return EXIT_OK

    def _engine_status(self) -> EngineStatus:
        """What /metrics reports of the tenants not at rest, read on the event loop."""
        sched = self.scheduler
        if sched is None:
            return EngineStatus(())
        now = sched.clock()
        rows = []
        for t in sched.tenants.values():
            bucket, paused = t.bucket, t.paused_until > now
            failing = t.tokens.last_error is not None
            if paused or failing or bucket.current < bucket.rate:
                rows.append(TenantStatus(t.id, bucket.allowed(now), len(t.feeds), paused, failing))
        return EngineStatus(
            rows,
            redis_memory_full=sched.memory_full,
            redis_unavailable=not sched.redis_ok.is_set(),
        )


@dataclass(frozen=True, slots=True)
class FeedStart:
    """A tenant's feeds prepared to be scheduled: state read, groups created."""

    settings: TenantSettings
    feeds: list[tuple[catalogue.Feed, str | None, bool, float]]
    delays: dict[str, float]
    resumed: int  # feeds with a stored cursor
    last_ok: dict[str, float]  # unix time of each feed's last success stored by an earlier run

    def intervals(self) -> dict[str, float]:
        return {feed.name: interval for feed, _, _, interval in self.feeds}


@dataclass(slots=True)
class ReloadPlan:
    """A reload, prepared and not yet applied."""

    settings: Settings
    remove: list[int]
    add: list[tuple[FeedStart, TokenProvider]] = dataclasses.field(default_factory=list)
    change: list[tuple[FeedStart, bool]] = dataclasses.field(default_factory=list)


def msgspec_replace_tenants(old: Settings, new: Settings) -> Settings:
    """Take the tenants and per-feed options of `new`, keep the connection settings of `old`."""
    config = msgspec.structs.replace(
        old.config,
        tenants=new.config.tenants,
        defaults=new.config.defaults,
        feeds=new.config.feeds,
    )
    return dataclasses.replace(old, config=config, tenants=new.tenants)
