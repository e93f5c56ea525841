"""Startup: the Redis server checked (version, settings that break the promises, the ACL
user's permissions), then every configured tenant scheduled; a stop signal ends it at once."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

import redis.exceptions
import structlog

from syncd.daemon.state import cancel_all
from syncd.daemon.tenants import TenantStarts
from syncd.redis import acl as redisacl
from syncd.redis import checks as redischeck

log = structlog.get_logger("syncd.daemon")


class Startup(TenantStarts):
    """Checking Redis and scheduling the configured tenants."""

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

    async def _redis_version(self) -> tuple[int, ...]:
        assert self.redis is not None
        return redischeck.version_tuple(await redischeck.read_version(self.redis))
