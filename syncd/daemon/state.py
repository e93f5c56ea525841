"""What every part of the daemon shares: its state (`DaemonState`, built once per run), the
connections it opens (Redis, the HTTP session for ServiceTitan), waiting out a Redis outage,
and cancelling helper tasks at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import aiohttp
import redis.exceptions
import structlog

from syncd.config import Config, Secret, Settings
from syncd.daemon.fleet import FleetMember
from syncd.engine.publisher import Publisher
from syncd.engine.scheduler import Scheduler
from syncd.fleet.fleet import default_instance_name
from syncd.ops.metrics import Metrics
from syncd.ops.sdnotify import Notifier
from syncd.ops.server import OpsServer
from syncd.redis import acl as redisacl
from syncd.redis.conn import RedisClient, connect

log = structlog.get_logger("syncd.daemon")

_T = TypeVar("_T")

# How long shutdown waits for its helper tasks to end once cancelled.
CANCEL_WITHIN_S = 10.0


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


class DaemonState:
    """The daemon's state, shared by the parts it is made of (see `syncd.daemon.daemon`)."""

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
        self.passes_wake = asyncio.Event()  # set: a tenant was added, look for due passes

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

    @property
    def _in_fleet(self) -> bool:
        """--once polls every configured tenant, fleet or not."""
        return self.settings.config.fleet.enabled and not self.once
