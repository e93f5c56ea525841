"""The daemon's side of the fleet: a tenant is scheduled while this instance holds its lease.

`syncd.fleet.fleet` decides and keeps the leases; this adds a tenant to the scheduler when its
lease is acquired and, when it is released, removes it and waits for its polls under way, so the
next owner starts where this one stopped (the cursor fence covers the rare overlap anyway).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from syncd.config import Settings, TenantSettings
from syncd.engine.scheduler import Scheduler
from syncd.fleet.assign import assign
from syncd.fleet.compare import Difference, Profile, Value
from syncd.fleet.fleet import Fleet
from syncd.fleet.state import (
    compare_members,
    live_owners,
    parse_holder,
    read_holders,
    read_members,
    summary,
)
from syncd.ops.metrics import Metrics
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.fleet")

IN_FLIGHT_POLL_S = 0.05


class _Host(Protocol):
    settings: Settings
    scheduler: Scheduler | None
    metrics: Metrics

    def add_tenant(self, t: TenantSettings) -> Awaitable[Any]: ...


class FleetMember:
    """Joins the fleet for a daemon and turns leases into scheduled tenants."""

    def __init__(self, host: _Host, redis: RedisClient, instance: str) -> None:
        self.host = host
        cfg = host.settings.config
        self.grace = cfg.engine.shutdown_grace
        self.fleet = Fleet(
            redis,
            cfg.redis.key_prefix,
            instance,
            cfg.fleet.lease,
            on_acquire=self.acquire,
            on_release=self.release,
            tenants=[t.id for t in host.settings.tenants],
            profiles=profiles(host.settings),
            on_round=self._gauges,
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def instance(self) -> str:
        return self.fleet.instance

    def start(self) -> None:
        self._task = asyncio.create_task(self.fleet.run())

    async def leave(self, timeout: float) -> None:
        """Hand every tenant back (the scheduler has stopped: nothing is in flight). A forced
        exit (cancel()) leaves the leases to run out instead."""
        if self._task is None:
            return
        self.fleet.stop()
        done, _ = await asyncio.wait({self._task}, timeout=timeout)
        if not done:
            log.warning("fleet_leave_timeout", instance=self.instance, timeout_s=timeout)
        self.cancel()

    def drain(self) -> None:
        """Shutdown began: take no more tenants, keep the leases until leave()."""
        self.fleet.drain()

    def cancel(self) -> None:
        """Stop at once: no handover, the leases run out."""
        if self._task is not None and not self._task.done():
            self._task.cancel()

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The fleet's loop, for the daemon to cancel (and wait for) at exit."""
        return self._task

    def reloaded(self, settings: Settings) -> None:
        """The configuration changed: tell the fleet the tenants and profiles it now has."""
        self.fleet.set_tenants((t.id for t in settings.tenants), profiles(settings))

    def _gauges(self) -> None:
        view = self.fleet.view
        self.host.metrics.set_fleet(
            len(view.members),
            len(self.fleet.held),
            disagreements=len(view.compared.disagreeing),
            unpolled=sum(len(fs) for fs in view.unpolled.values()),
            name_clash=self.fleet.name_clash is not None,
        )

    def owns(self, tenant: int) -> bool:
        return tenant in self.fleet.held

    async def acquire(self, tenant: int) -> None:
        t = next((t for t in self.host.settings.tenants if t.id == tenant), None)
        if t is None:
            raise LookupError(f"tenant {tenant} is not in this instance's configuration")
        sched = self.host.scheduler
        assert sched is not None
        if tenant not in sched.tenants:
            await self.host.add_tenant(t)

    async def release(self, tenant: int) -> None:
        """Stop scheduling the tenant; return once its polls under way finished (or after the
        shutdown grace: a hung request must not hold the handover forever)."""
        sched = self.host.scheduler
        if sched is None or tenant not in sched.tenants:
            return
        state = sched.tenants[tenant]
        sched.remove_tenant(tenant)
        log.info("tenant_removed", tenant=tenant, reason="fleet")
        deadline = time.monotonic() + self.grace
        while state.inflight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(IN_FLIGHT_POLL_S)

    def status(self) -> dict[str, object]:
        """For readiness and STATUS=: this instance and what the last round saw."""
        view = self.fleet.view
        return {
            "instance": self.instance,
            "tenants": len(self.fleet.held),
            "members": len(view.members),
            "disagreements": len(view.compared.disagreeing),
            "feeds_unpolled": sum(len(fs) for fs in view.unpolled.values()),
            "name_clash": self.fleet.name_clash is not None,
            "kept_out": self.fleet.kept_out is not None,
        }


def profiles(settings: Settings) -> dict[int, Profile]:
    """What this instance would publish for each tenant, as the fleet compares it: the feeds,
    each with the options that change what is published or when, and the tenant-wide ones."""
    out = {}
    for t in settings.tenants:
        feeds: dict[str, dict[str, Value]] = {}
        for feed in t.feeds:
            max_len, max_age = settings.retention(feed)
            feeds[feed] = {
                "poll_interval": settings.poll_interval(t, feed),
                "change_detection": settings.feed_options(feed).change_detection,
                "max_len": max_len,
                "max_age": max_age,
            }
        options: dict[str, Value] = {
            "include_recent_changes": t.include_recent_changes,
            "start": t.start,
        }
        out[t.id] = Profile(feeds=feeds, options=options)
    return out


@dataclass
class FleetStatus:
    """The fleet as `syncd status` shows it."""

    instances: list[dict[str, Any]]  # one row per live instance
    differences: list[Difference]  # how the live instances' configurations differ (the first)
    unpolled: dict[int, tuple[str, ...]]  # tenant -> feeds listed but not polled by its owner
    omitted: int = 0  # differences beyond those listed
    disagreeing: int = 0  # tenants concerned by any difference


async def fleet_status(redis: RedisClient, prefix: str, tenants: list[int]) -> FleetStatus:
    """One summary row per live instance and how their configurations compare, for
    `syncd status`: `tenants` (this configuration's) are counted with the ones the fleet knows."""
    members = await read_members(redis, prefix)
    everyone = sorted(set().union(tenants, *(m.known for m in members.values())))
    holders = await read_holders(redis, prefix, everyone)
    compared = await compare_members(redis, prefix, members)
    plan = assign(compared.eligible, live_owners(holders, members))
    unpolled = compared.unpolled(plan.owners)
    rows = summary(members, {t: parse_holder(v)[0] for t, v in holders.items()}, compared)
    for row in rows:
        row["feeds_unpolled"] = {
            str(t): list(fs) for t, fs in unpolled.items() if plan.owners.get(t) == row["instance"]
        }
    return FleetStatus(
        rows, compared.differences, unpolled, compared.omitted, len(compared.disagreeing)
    )
