"""A fleet member's tenants: taking leases, starting and stopping the polling, handing back.

Each tenant's transitions run one after another in the order they were decided; the lease holds
`<name>#<token>`, so only this process (not another one under its name) renews or releases it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog

from syncd.fleet.state import ACQUIRE, CHUNK, RELEASE, chunks, holder
from syncd.keys import FleetKeys, Keys
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.fleet")

Callback = Callable[[int], Awaitable[None]]


@dataclass
class Held:
    """One tenant this process holds a lease on, or is handing back."""

    renewed: float  # monotonic time the last successful renewal was sent
    releasing: bool = False


class Transitions:
    """The tenants of one process: leases held, polling started and stopped."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        instance: str,
        token: str,
        lease: float,
        *,
        on_acquire: Callback,
        on_release: Callback,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = FleetKeys(prefix)
        self.instance = instance
        self.token = token
        self.holder = holder(instance, token)  # the value of every lease this process holds
        self.lease = lease
        self.on_acquire = on_acquire
        self.on_release = on_release
        self.held: dict[int, Held] = {}
        self.active: set[int] = set()  # on_acquire done, on_release not yet called
        self._tasks: dict[int, asyncio.Task[None]] = {}

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease * 1000))

    def _lease(self, redis: Any, script: str, tenant: int) -> Any:
        """Send a lease script (ACQUIRE, RENEW, RELEASE of syncd.fleet.state) for `tenant` on
        `redis` (a client, or a pipeline to queue it in), acting for this process only."""
        owner = Keys(self.prefix, tenant).owner
        return redis.eval(script, 1, owner, self.holder, self.lease_ms, self.instance)

    async def _acquire(self, tenants: list[int]) -> None:
        for chunk in chunks(tenants, CHUNK):
            sent = time.monotonic()
            pipe = self.redis.pipeline(transaction=False)
            for t in chunk:
                self._lease(pipe, ACQUIRE, t)
            results = await pipe.execute()
            for t, ok in zip(chunk, results, strict=True):
                if ok and t not in self.held:
                    self.held[t] = Held(renewed=sent)
                    self._then(t, functools.partial(self._start, t))

    def _release(self, tenant: int) -> None:
        """Hand a tenant back: the daemon stops polling it, then the lease goes."""
        self.held[tenant].releasing = True
        self._then(tenant, functools.partial(self._hand_back, tenant))

    def _release_all(self) -> None:
        for tenant, state in list(self.held.items()):
            if not state.releasing:
                self._release(tenant)

    def _drop(self, tenant: int) -> None:
        """Stop polling a tenant whose lease is lost or may be: no Redis call."""
        if self.held.pop(tenant, None) is not None:
            self._then(tenant, functools.partial(self._stop_polling, tenant))

    def _then(self, tenant: int, step: Callable[[], Awaitable[None]]) -> None:
        """Run a tenant's transitions one after another, in the order they were decided."""
        before = self._tasks.get(tenant)

        async def chained() -> None:
            if before is not None:
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await before
            try:
                await step()
            except Exception as exc:
                log.error(
                    "fleet_transition_failed",
                    instance=self.instance,
                    tenant=tenant,
                    error=f"{type(exc).__name__}: {exc}",
                )

        task = asyncio.create_task(chained())
        self._tasks[tenant] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._tasks.get(tenant) is done:
                del self._tasks[tenant]

        task.add_done_callback(forget)

    async def _start(self, tenant: int) -> None:
        if tenant not in self.held or tenant in self.active:
            return
        try:
            await self.on_acquire(tenant)
        except Exception as exc:
            log.error(
                "fleet_acquire_failed",
                instance=self.instance,
                tenant=tenant,
                error=f"{type(exc).__name__}: {exc}",
            )
            if tenant in self.held:
                self.held[tenant].releasing = True
                await self._hand_back(tenant)
            return
        self.active.add(tenant)
        log.info("fleet_tenant_acquired", instance=self.instance, tenant=tenant)

    async def _stop_polling(self, tenant: int) -> None:
        if tenant in self.active:
            self.active.discard(tenant)
            await self.on_release(tenant)

    async def _hand_back(self, tenant: int) -> None:
        await self._stop_polling(tenant)
        if self.held.pop(tenant, None) is None:
            return
        try:
            await self._lease(self.redis, RELEASE, tenant)
            await self.redis.incr(self.keys.epoch)
        except Exception as exc:
            # The lease runs out by itself.
            log.warning(
                "fleet_release_failed", instance=self.instance, tenant=tenant, error=str(exc)
            )
            return
        log.info("fleet_tenant_released", instance=self.instance, tenant=tenant)

    async def _stop_all(self) -> list[int]:
        """Stop polling every tenant held (in-flight work finishes in on_release); the tenants."""
        for task in list(self._tasks.values()):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        tenants = list(self.held)
        results = await asyncio.gather(
            *(self._stop_polling(t) for t in tenants), return_exceptions=True
        )
        for t, result in zip(tenants, results, strict=True):
            if isinstance(result, Exception):
                log.error(
                    "fleet_release_failed", instance=self.instance, tenant=t, error=repr(result)
                )
        return tenants

    async def _release_leases(self, tenants: list[int]) -> None:
        for chunk in chunks(tenants, CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for t in chunk:
                self._lease(pipe, RELEASE, t)
            await pipe.execute()
