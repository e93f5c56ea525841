"""The daemon: one class made of its parts (startup, reload, health, stream upkeep, each in its
own module), with the main loop, the signal handlers (they only set flags) and the exit code."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time

import redis.exceptions
import structlog

from syncd.daemon.fleet import FleetMember
from syncd.daemon.health import Health
from syncd.daemon.passes import Passes
from syncd.daemon.reload import Reloading
from syncd.daemon.startup import Startup
from syncd.daemon.state import CANCEL_WITHIN_S, cancel_all, http_session, redis_client
from syncd.daemon.upkeep import Upkeep
from syncd.engine.publisher import Publisher
from syncd.engine.scheduler import Scheduler
from syncd.ops.server import OpsServer
from syncd.servicetitan.client import ExportClient

log = structlog.get_logger("syncd.daemon")

EXIT_OK = 0
EXIT_FEEDS_FAILED = 1
EXIT_CONFIG = 2


class Daemon(Startup, Reloading, Health, Upkeep, Passes):
    """Owns the connections and the scheduler for one configuration: the main loop, signals and
    the exit code here; startup, reload, health and stream upkeep in their own modules."""

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
                if not self.once:
                    helpers.append(asyncio.create_task(self._passes()))
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

    def _on_hup(self) -> None:
        self._reloads.put_nowait(None)

    async def _reload_loop(self) -> None:
        while True:
            await self._reloads.get()
            self.notifier.reloading()
            try:
                await self.reload()
            except Exception:
                log.exception("reload_failed")
            self.notifier.ready(self._status())
