"""Health: liveness and readiness for the ops server, the STATUS line and watchdog pings for
systemd, and what /metrics reports of the tenants not at rest."""

from __future__ import annotations

import asyncio
import time

import structlog

from syncd.daemon.state import DaemonState
from syncd.ops.metrics import EngineStatus, TenantStatus
from syncd.ops.sdnotify import watchdog_interval

log = structlog.get_logger("syncd.daemon")

# /healthz fails when the dispatcher has not ticked for this long (it ticks at least each second).
LIVENESS_S = 30.0
STATUS_EVERY_S = 10.0


class Health(DaemonState):
    """Liveness, readiness and what systemd and /metrics are told."""

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
            if f["kept_out"]:
                text += " (name held by another process: polling nothing)"
            elif f["disagreements"]:
                text += f", configurations differ for {f['disagreements']} tenant(s)"
        if not sched.redis_ok.is_set():
            text += "; waiting for Redis"
        if not sched.replicas_ok.is_set():
            text += "; waiting for Redis replicas"
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
            replicas_behind=not sched.replicas_ok.is_set(),
            replicas_behind_s=sched.replicas_behind_seconds(),
        )
