"""The daemon's stream upkeep loop: retention, backpressure on consumer lag and on Redis memory,
idle consumer names, every `streams.check_interval` seconds (decisions: `syncd.engine.upkeep`)."""

from __future__ import annotations

import asyncio
import time

import structlog

from syncd.daemon.state import DaemonState
from syncd.engine import upkeep
from syncd.keys import Keys

log = structlog.get_logger("syncd.daemon")


class Upkeep(DaemonState):
    """The stream upkeep loop."""

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
