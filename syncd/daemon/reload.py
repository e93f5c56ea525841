"""Reloading on SIGHUP: the configuration re-read and every fallible step prepared first (a
`ReloadPlan`), then applied without an await in between, all of it or nothing."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import msgspec
import structlog

from syncd.config import ConfigError, Settings, load_settings
from syncd.daemon.tenants import FeedStart, TenantStarts
from syncd.servicetitan.auth import TokenProvider

log = structlog.get_logger("syncd.daemon")


class Reloading(TenantStarts):
    """Preparing and applying a new configuration."""

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
