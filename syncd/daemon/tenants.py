"""Starting a tenant's feeds, the one way feeds start (at startup, on reload, when the fleet
hands this instance a tenant): stored cursors and state read, consumer groups created, then
scheduled."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import structlog

from syncd import catalogue
from syncd.config import Settings, TenantSettings
from syncd.daemon.state import DaemonState
from syncd.engine import upkeep
from syncd.engine.scheduler import resume_delay
from syncd.keys import Keys
from syncd.servicetitan.auth import TokenProvider

log = structlog.get_logger("syncd.daemon")

_T = TypeVar("_T")


class TenantStarts(DaemonState):
    """Preparing a tenant's feeds and scheduling them."""

    async def _prepare_feeds(
        self, settings: Settings, t: TenantSettings, new: Sequence[str], *, wait: bool
    ) -> FeedStart:
        """The one way feeds start: read the tenant's stored cursors and state, and create the
        configured consumer groups on the streams of the `new` feeds, before anything can be
        published to them. Schedules nothing: `_start` does, once every start is prepared.

        With `wait`, a Redis outage is waited out (startup); else it fails (reload).
        """
        publisher, r = self.publisher, self.redis
        assert publisher is not None
        assert r is not None
        assert self.scheduler is not None

        async def call(fn: Callable[[], Awaitable[_T]]) -> _T:
            return await (self._wait_for_redis(fn) if wait else fn())

        # Feeds already running keep their own cursors: nothing to read for them.
        cursors, state = await call(lambda: publisher.resume_state(t.id)) if new else ({}, {})
        groups = self.settings.config.streams.groups  # fixed until a restart
        if groups and new:
            keys = Keys(self.settings.config.redis.key_prefix, t.id)
            await call(lambda: upkeep.ensure_groups(r, keys, list(new), groups))
        now = time.time()
        delays, successes = {}, {}
        for feed in t.feeds:
            last_ok = state.get(f"{feed}:last_ok")
            if last_ok:
                successes[feed] = float(last_ok)
            delays[feed] = resume_delay(
                now,
                float(last_ok) if last_ok else None,
                state.get(f"{feed}:more") == "1",
                settings.poll_interval(t, feed),
                self.scheduler.rng,
            )
        feeds = [
            (
                catalogue.feed(name),
                cursors.get(name),
                settings.feed_options(name).change_detection,
                settings.poll_interval(t, name),
            )
            for name in t.feeds
        ]
        return FeedStart(t, feeds, delays, resumed=len(cursors), last_ok=successes)

    def _tokens(self, t: TenantSettings) -> TokenProvider:
        assert self._session is not None
        return TokenProvider(
            self._session,
            self.settings.auth_url,
            t.id,
            t.client_id,
            t.client_secret,
            on_renewal=self.metrics.token_renewed,
            timeout=self.settings.config.servicetitan.token_timeout,
        )

    async def add_tenant(self, t: TenantSettings) -> None:
        """Schedule one tenant now (the fleet acquired it); a Redis error fails, not waits."""
        start = await self._prepare_feeds(self.settings, t, t.feeds, wait=False)
        self._start(start, self._tokens(t))

    def _start(self, start: FeedStart, tokens: TokenProvider) -> None:
        """Schedule a prepared tenant (no awaits: applied at once with the rest of a reload)."""
        assert self.scheduler is not None
        t = start.settings
        self.metrics.track_tenant(t.id)
        self.metrics.set_feeds(t.id, start.intervals(), start.last_ok)
        self.metrics.set_rate_limit(t.id, t.requests_per_second)
        self.scheduler.add_tenant(t, tokens, start.feeds, start.delays)
        self.passes_wake.set()
        log.info("tenant_added", tenant=t.id, feeds=len(t.feeds), resumed=start.resumed)


@dataclass(frozen=True, slots=True)
class FeedStart:
    """A tenant's feeds prepared to be scheduled: state read, groups created."""

    settings: TenantSettings
    feeds: list[tuple[catalogue.Feed, str | None, bool, float]]
    delays: dict[str, float]
    resumed: int  # feeds with a stored cursor
    last_ok: dict[str, float]  # unix time of each feed's last success stored by an earlier run

    def intervals(self) -> dict[str, float]:
        return {feed.name: interval for feed, _, _, interval in self.feeds}
