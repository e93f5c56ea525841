"""The fleet: instances on one Redis share the tenants, one owner per tenant, by leases.

The thin I/O shell around `syncd.fleet.assign`. Every lease/3 seconds (sooner when another instance
joins, leaves or releases) an instance renews its heartbeat and its leases in one pipeline, reads
the members, what each one's configuration knows and who owns what, computes the assignment, gives
up the tenants it should not hold (after the daemon stopped polling them) and takes the free ones
assigned to it. Leases are keys `<prefix>:{<tenant>}:owner` holding the owner's name, taken with
SET NX PX semantics and renewed or released by small scripts that act only for the holder. They
are many and renewed together, so they are pipelined scripts rather than one redis-py Lock each.

Leases make the fleet efficient; they do not make it correct. Two instances may briefly both poll
a tenant (a paused process, a clock jump); the cursor fence in the page script keeps that exactly
once. An instance that cannot reach Redis stops polling its tenants at 2/3 of the lease after its
last renewal, before anyone else may take them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import msgspec
import structlog

from syncd.fleet.assign import Plan, assign, disagreements
from syncd.fleet.state import (
    ACQUIRE,
    CHUNK,
    HEARTBEAT,
    KNOWN,
    RELEASE,
    RENEW,
    Heartbeat,
    Member,
    chunks,
    digest,
    read_members,
    read_owners,
)
from syncd.keys import FleetKeys, Keys
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.fleet")

Callback = Callable[[int], Awaitable[None]]

# Share of the lease after the last renewal at which an instance stops polling a tenant locally.
DROP_AT = 2 / 3


def default_instance_name() -> str:
    """The host name plus the pid: unique per process without configuration."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class _Tenant:
    """One tenant this instance holds a lease on, or is handing back."""

    renewed: float  # monotonic time the last successful renewal was sent
    releasing: bool = False


@dataclass
class FleetView:
    """What the last round saw: for status, logs and tests."""

    members: dict[str, Member] = field(default_factory=dict)
    owners: dict[int, str] = field(default_factory=dict)
    plan: Plan | None = None
    disagreements: dict[int, list[str]] = field(default_factory=dict)


class Fleet:
    """Membership, leases and the assignment loop of one instance."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        instance: str,
        lease: float,
        *,
        on_acquire: Callback,
        on_release: Callback,
        tenants: Iterable[int] = (),
        on_round: Callable[[], None] | None = None,
    ) -> None:
        self.redis = redis
        self.prefix = prefix
        self.keys = FleetKeys(prefix)
        self.instance = instance
        self.lease = lease
        self.on_acquire = on_acquire
        self.on_release = on_release
        self.on_round = on_round  # after each round: the view and leases held are fresh
        self.known: frozenset[int] = frozenset(tenants)
        self.token = os.urandom(8).hex()
        self.view = FleetView()
        self.held: dict[int, _Tenant] = {}
        self.active: set[int] = set()  # on_acquire done, on_release not yet called
        self.last_renewal: float | None = None  # wall clock, for status
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._known_written = False
        self._epoch: bytes | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._redis_ok = True
        self._clash_logged = False
        self._disagreeing: frozenset[int] = frozenset()
        self._cache: dict[str, frozenset[int]] = {}  # known digest -> tenant ids
        self._due_in: float | None = None  # next round sooner than a period, in seconds
        self._draining = False

    @property
    def lease_ms(self) -> int:
        return max(1, int(self.lease * 1000))

    @property
    def period(self) -> float:
        return self.lease / 3

    def set_tenants(self, tenants: Iterable[int]) -> None:
        """The tenant ids of this instance's configuration (at start and after each reload)."""
        known = frozenset(tenants)
        if known != self.known:
            self.known = known
            self._known_written = False
            self._wake.set()

    def drain(self) -> None:
        """Take no more tenants (shutdown began); keep renewing those held until stop()."""
        self._draining = True

    def stop(self) -> None:
        """Leave the fleet: run() releases every lease and returns."""
        self._stop.set()
        self._wake.set()

    # -- the loop ---------------------------------------------------------------------

    async def run(self) -> None:
        """Take part until stop(); then hand every tenant back at once. Cancelled (a forced
        exit) it releases nothing: its leases run out and the others take over."""
        guard = asyncio.create_task(self._guard())
        try:
            await self._loop()
        except asyncio.CancelledError:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            if tasks:  # bounded: a cancellation lost inside a Redis call must not hold us
                await asyncio.wait(tasks, timeout=self.period)
            raise
        finally:
            guard.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await guard
        await self._leave()

    async def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            started = time.monotonic()
            self._due_in = None
            try:
                async with asyncio.timeout(self.period):
                    await self.round()
                if not self._redis_ok:
                    log.info("fleet_redis_back", instance=self.instance)
                self._redis_ok = True
            except Exception as exc:
                if self._redis_ok:
                    log.warning(
                        "fleet_redis_unavailable",
                        instance=self.instance,
                        error=f"{type(exc).__name__}: {exc}",
                    )
                self._redis_ok = False
            if self.on_round is not None:
                self.on_round()
            deadline = started + self.period
            if self._due_in is not None:
                deadline = min(deadline, time.monotonic() + self._due_in)
            await self._wait(deadline)

    async def _wait(self, deadline: float) -> None:
        """Until the next round is due, or sooner when the fleet's epoch moves."""
        poll = min(1.0, self.period / 2)
        while not self._wake.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(poll, left)):
                    await self._wake.wait()
                    return
            try:
                async with asyncio.timeout(poll):
                    epoch = await self.redis.get(self.keys.epoch)
            except Exception:
                continue
            if epoch != self._epoch:
                return

    async def _guard(self) -> None:
        """Stop polling tenants whose lease may run out: Redis has not confirmed them lately."""
        limit = self.lease * DROP_AT
        while True:
            now = time.monotonic()
            stale = [t for t, state in self.held.items() if now - state.renewed > limit]
            if stale:
                log.warning(
                    "fleet_leases_unconfirmed",
                    instance=self.instance,
                    tenants=len(stale),
                    sample=stale[:10],
                    since_s=round(now - min(self.held[t].renewed for t in stale), 3),
                )
                for tenant in stale:
                    self._drop(tenant)
            earliest = min((s.renewed for s in self.held.values()), default=now)
            await asyncio.sleep(max(0.02, min(self.period, earliest + limit - now + 0.01)))

    async def round(self) -> None:
        """One renewal and rebalancing round."""
        await self._renew()
        view = await self.read_view()
        self.view = view
        if view.plan is None:  # our own heartbeat is not among the members: decide nothing
            return
        self._report(view)
        mine = view.plan.tenants_of(self.instance)
        for tenant, state in list(self.held.items()):
            if tenant not in mine and not state.releasing:
                self._release(tenant)
        wanted = [
            t
            for t in sorted(mine)
            if t not in self.held and view.owners.get(t) in (None, self.instance)
        ]
        if wanted and not self._draining:
            await self._acquire(wanted)
        await self._watch_expiries(view)

    async def _watch_expiries(self, view: FleetView) -> None:
        """Look again right when a silent member's heartbeat or an orphaned lease runs out,
        rather than up to a period later: that is when its tenants become free."""
        soonest = [m.expires_in for n, m in view.members.items() if n != self.instance]
        orphans = [t for t, o in view.owners.items() if o not in view.members]
        if orphans:
            pipe = self.redis.pipeline(transaction=False)
            for t in orphans:
                pipe.pttl(Keys(self.prefix, t).owner)
            soonest += [ms / 1000 for ms in await pipe.execute() if ms >= 0]
        due = min(soonest, default=self.period) + 0.05
        if due < self.period:
            self._due_in = due

    async def _renew(self) -> None:
        sent = time.monotonic()
        heartbeat = Heartbeat(
            token=self.token,
            known=digest(self.known),
            tenants=len(self.held),
            renewed=time.time(),
            host=socket.gethostname(),
            pid=os.getpid(),
        )
        k = self.keys
        joined = False
        if not self._known_written:
            # Before the heartbeat that announces its digest, so nobody reads a stale set.
            await self._write_known()
            joined = True
        tenants = list(self.held)
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(k.epoch)
        pipe.eval(
            HEARTBEAT,
            3,
            k.members,
            k.member(self.instance),
            k.known(self.instance),
            self.instance,
            self.lease_ms,
            msgspec.json.encode(heartbeat),
        )
        for t in tenants:
            pipe.eval(RENEW, 1, Keys(self.prefix, t).owner, self.instance, self.lease_ms)
        results = await pipe.execute()
        self._epoch = results[0]
        has_known, *prev = results[1]
        if prev and not self._clash_logged and self.last_renewal is not None:
            other = msgspec.json.decode(prev[0], type=Heartbeat)
            if other.token != self.token:
                self._clash_logged = True
                log.error(
                    "fleet_instance_name_clash",
                    instance=self.instance,
                    other_host=other.host,
                    other_pid=other.pid,
                )
        joined = joined or not prev
        for t, ok in zip(tenants, results[2:], strict=True):
            if ok:
                self.held[t].renewed = sent
            elif t in self.held:
                log.warning("fleet_lease_lost", instance=self.instance, tenant=t)
                self._drop(t)
        if not has_known:  # expired while Redis was out of reach
            await self._write_known()
            joined = True
        if joined:
            await self.redis.incr(k.epoch)
            log.info("fleet_joined", instance=self.instance, tenants=len(self.known))
        self.last_renewal = heartbeat.renewed

    async def _write_known(self) -> None:
        ids = sorted(self.known)
        await self.redis.eval(KNOWN, 1, self.keys.known(self.instance), self.lease_ms, *ids)
        self._known_written = True

    async def read_view(self) -> FleetView:
        """Members, what each knows, the owners of those tenants and the assignment."""
        members = await read_members(self.redis, self.prefix, self._cache)
        if self.instance not in members:  # our own heartbeat may have just expired
            return FleetView(members=members)
        known = {name: m.known for name, m in members.items()}
        tenants = sorted(set().union(*known.values()))
        owners = await read_owners(self.redis, self.prefix, tenants)
        plan = assign(known, owners)
        return FleetView(members, owners, plan, disagreements(known))

    def _report(self, view: FleetView) -> None:
        disagreeing = frozenset(view.disagreements)
        if disagreeing != self._disagreeing:
            self._disagreeing = disagreeing
            if disagreeing:
                sample = dict(list(view.disagreements.items())[:10])
                log.warning(
                    "fleet_config_disagrees",
                    instance=self.instance,
                    tenants=len(disagreeing),
                    missing_from={str(t): names for t, names in sample.items()},
                )
            else:
                log.info("fleet_config_agrees", instance=self.instance)

    # -- tenants ----------------------------------------------------------------------

    async def _acquire(self, tenants: list[int]) -> None:
        for chunk in chunks(tenants, CHUNK):
            sent = time.monotonic()
            pipe = self.redis.pipeline(transaction=False)
            for t in chunk:
                pipe.eval(ACQUIRE, 1, Keys(self.prefix, t).owner, self.instance, self.lease_ms)
            results = await pipe.execute()
            for t, ok in zip(chunk, results, strict=True):
                if ok and t not in self.held:
                    self.held[t] = _Tenant(renewed=sent)
                    self._then(t, functools.partial(self._start, t))

    def _release(self, tenant: int) -> None:
        """Hand a tenant back: the daemon stops polling it, then the lease goes."""
        self.held[tenant].releasing = True
        self._then(tenant, functools.partial(self._hand_back, tenant))

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
        key = Keys(self.prefix, tenant).owner
        try:
            await self.redis.eval(RELEASE, 1, key, self.instance)
            await self.redis.incr(self.keys.epoch)
        except Exception as exc:
            # The lease runs out by itself.
            log.warning(
                "fleet_release_failed", instance=self.instance, tenant=tenant, error=str(exc)
            )
            return
        log.info("fleet_tenant_released", instance=self.instance, tenant=tenant)

    async def _leave(self) -> None:
        """Stop polling everything (in-flight work finishes in on_release), release every
        lease and the membership, so the others take over at once."""
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
        k = self.keys
        try:
            async with asyncio.timeout(self.lease):
                for chunk in chunks(tenants, CHUNK):
                    pipe = self.redis.pipeline(transaction=False)
                    for t in chunk:
                        pipe.eval(RELEASE, 1, Keys(self.prefix, t).owner, self.instance)
                    await pipe.execute()
                pipe = self.redis.pipeline(transaction=False)
                pipe.delete(k.member(self.instance), k.known(self.instance))
                pipe.srem(k.members, self.instance)
                pipe.incr(k.epoch)
                await pipe.execute()
        except Exception as exc:
            log.warning("fleet_leave_failed", instance=self.instance, error=str(exc))
        else:
            log.info("fleet_left", instance=self.instance, released=len(tenants))
        self.held.clear()
