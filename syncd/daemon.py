"""The daemon: startup, main loop, shutdown. Signal handlers only set flags."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import aiohttp
import redis.asyncio as aioredis
import redis.exceptions
import structlog

from syncd import catalogue
from syncd.auth import TokenProvider
from syncd.client import ExportClient
from syncd.config import Config, Settings, TenantSettings
from syncd.metrics import Metrics
from syncd.publisher import Publisher
from syncd.scheduler import Scheduler, TenantState

log = structlog.get_logger("syncd.daemon")

_T = TypeVar("_T")

EXIT_OK = 0
EXIT_FEEDS_FAILED = 1
EXIT_CONFIG = 2


def redis_client(cfg: Config) -> aioredis.Redis:
    """A Redis client for the configured URL (redis://, rediss://, unix://)."""
    return aioredis.Redis.from_url(
        cfg.redis.url,
        socket_timeout=cfg.redis.timeout,
        socket_connect_timeout=5.0,
        health_check_interval=30,
    )


@contextlib.asynccontextmanager
async def http_session(settings: Settings) -> AsyncIterator[aiohttp.ClientSession]:
    st = settings.config.servicetitan
    connector = aiohttp.TCPConnector(limit=st.max_connections, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=st.request_timeout, sock_connect=st.connect_timeout)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, raise_for_status=False
    ) as session:
        yield session


class Daemon:
    """Owns the connections and the scheduler for one configuration."""

    def __init__(self, settings: Settings, *, once: bool = False) -> None:
        self.settings = settings
        self.once = once
        self.metrics = Metrics()
        self._signals = 0
        self.scheduler: Scheduler | None = None
        self._session: aiohttp.ClientSession | None = None
        self.redis: aioredis.Redis | None = None
        self.publisher: Publisher | None = None

    def _tenant_feeds(
        self, t: TenantSettings, cursors: dict[str, str]
    ) -> list[tuple[catalogue.Feed, str | None, bool, float]]:
        s = self.settings
        return [
            (
                catalogue.feed(name),
                cursors.get(name),
                s.feed_options(name).change_detection,
                s.poll_interval(t, name),
            )
            for name in t.feeds
        ]

    async def _add_tenant(self, t: TenantSettings) -> TenantState:
        assert self.scheduler is not None
        assert self.publisher is not None
        assert self._session is not None
        publisher = self.publisher
        cursors = await self._wait_for_redis(lambda: publisher.cursors(t.id))
        tokens = TokenProvider(
            self._session,
            self.settings.auth_url,
            t.id,
            t.client_id,
            t.client_secret,
            on_renewal=self.metrics.token_renewed,
        )
        state = self.scheduler.add_tenant(t, tokens, self._tenant_feeds(t, cursors))
        log.info("tenant_added", tenant=t.id, feeds=len(t.feeds), resumed=len(cursors))
        return state

    async def _wait_for_redis(self, call: Callable[[], Awaitable[_T]]) -> _T:
        """Run `call` until Redis answers; at startup an outage waits rather than exits."""
        delay = 0.5
        while True:
            try:
                return await call()
            except Exception as exc:
                if self.scheduler is not None and self.scheduler.stopping:
                    raise
                log.warning("redis_unavailable", error=str(exc), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        assert self.scheduler is not None
        if self._signals == 1:
            log.info("shutdown_requested", signal=name)
            self.scheduler.stop()
        else:
            log.warning("shutdown_forced", signal=name)
            self.scheduler.force()

    async def run(self) -> int:
        """Run until a signal (or, with once, until every feed drained once)."""
        cfg = self.settings.config
        started = time.monotonic()
        self.redis = redis_client(cfg)
        loop = asyncio.get_running_loop()
        try:
            async with http_session(self.settings) as session:
                self._session = session
                self.publisher = Publisher(self.redis, cfg.redis.key_prefix)
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
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self._on_signal, sig)
                for t in self.settings.tenants:
                    await self._add_tenant(t)
                log.info(
                    "started",
                    tenants=len(self.settings.tenants),
                    feeds=sum(len(t.feeds) for t in self.settings.tenants),
                    once=self.once,
                )
                await self.scheduler.run(grace=e.shutdown_grace)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(redis.exceptions.RedisError):
                await self.redis.aclose()
        failed = self.scheduler.failed_feeds if self.scheduler else []
        elapsed = round(time.monotonic() - started, 3)
        if failed:
            for fs in failed:
                log.error("feed_failed", tenant=fs.tenant.id, feed=fs.name, error=fs.last_error)
            log.info("stopped", elapsed_s=elapsed, failed_feeds=len(failed))
            return EXIT_FEEDS_FAILED
        log.info("stopped", elapsed_s=elapsed, pages=self.scheduler.pages if self.scheduler else 0)
        return EXIT_OK
