"""`syncd run --once` with `[redis] wait_replicas`: replicas that fall behind now and then hold
the run, they do not fail its feeds; replicas that never catch up end it with a failure that
says so."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any

import pytest
import redis.asyncio as aioredis
import structlog
from structlog.testing import capture_logs

from syncd.daemon import Daemon
from syncd.testing.redis_server import RedisServer
from syncd.testing.simulator import RunningSimulator, run_simulator
from tests.engine_helpers import config_dict, settings
from tests.test_wait_replicas import (
    FEED,
    TENANT,
    assert_replicated_exactly_once,
    client,
    events_named,
    freeze,
    frozen,
    replicated,
    thaw,
)

__all__ = ["client", "replicated"]  # fixtures, used by name


@contextlib.contextmanager
def capture_logs_calling(
    hooks: Mapping[str, Callable[[], None]],
) -> Iterator[list[MutableMapping[str, Any]]]:
    """structlog's capture_logs, also calling `hooks[event]` where an event of that name is
    logged, before the code that logged it goes on."""

    def hook(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        call = hooks.get(event_dict.get("event", ""))
        if call is not None:
            call()
        return event_dict

    with capture_logs() as logs:
        # The list capture_logs configured: bound loggers read it at each call.
        structlog.get_config()["processors"].insert(0, hook)
        yield logs


def once_config(primary: RedisServer, sim: RunningSimulator, **engine: Any) -> dict[str, Any]:
    data = config_dict(primary.url, sim.url, sim.app_key, [TENANT], [FEED.name])
    data["redis"].update(wait_replicas=1, wait_timeout=2.0)
    data["engine"].update(engine)
    return data


async def test_once_waits_out_a_replica_that_falls_behind_again_and_again(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    """The replica stops (SIGSTOP) before the first poll and again every time it has just caught
    up, more times than once_max_failures, so that the feed's next WAIT comes back short each
    time: the feed is held, not failed, and the run ends 0 with every page on the replica."""
    primary, replica = replicated
    stops = 5
    done = 0
    is_frozen = False

    def stop_replica() -> None:
        nonlocal done, is_frozen
        if done < stops:
            freeze(replica)
            done += 1
            is_frozen = True

    def restart_replica_soon() -> None:
        # Within the probe's WAIT (wait_timeout), which then sees it acknowledge.
        def restart() -> None:
            nonlocal is_frozen
            if is_frozen:
                thaw(replica)
                is_frozen = False

        asyncio.get_running_loop().call_later(0.3, restart)

    hooks = {"replicas_behind": restart_replica_soon, "replicas_caught_up": stop_replica}
    async with run_simulator(tenants=[TENANT], records=200, page_size=20) as sim:
        daemon = Daemon(settings(once_config(primary, sim, once_max_failures=3)), once=True)
        try:
            with capture_logs_calling(hooks) as logs:
                stop_replica()
                assert await asyncio.wait_for(daemon.run(), 120) == 0
        finally:
            if is_frozen:
                thaw(replica)
        assert done == stops
        assert len(events_named(logs, "replicas_caught_up")) == stops
        assert len(events_named(logs, "replicas_behind")) >= stops
        assert not events_named(logs, "feed_failed")
        await assert_replicated_exactly_once(client, replica, sim)
    # Every hold counted, though polling is not held at the end.
    held = sum(e["held_s"] for e in events_named(logs, "replicas_caught_up"))
    assert daemon.metrics.sample("syncd_polling_paused", {"reason": "replicas_behind"}) == 0
    behind_s = daemon.metrics.sample("syncd_replicas_behind_seconds_total")
    assert behind_s == pytest.approx(held, abs=0.01)


async def test_once_ends_in_a_failure_naming_the_replicas_when_they_never_catch_up(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    _, replica = replicated
    async with run_simulator(tenants=[TENANT], records=100, page_size=20) as sim:
        data = once_config(replicated[0], sim, once_max_failures=1)
        data["redis"]["wait_timeout"] = 0.2
        daemon = Daemon(settings(data), once=True)
        with capture_logs() as logs, frozen(replica):
            assert await asyncio.wait_for(daemon.run(), 120) == 1
    [gave_up] = events_named(logs, "replicas_given_up")
    assert (gave_up["acked"], gave_up["wanted"], gave_up["attempts"]) == (0, 1, 5)
    [failed] = events_named(logs, "feed_failed")
    assert (failed["tenant"], failed["feed"]) == (TENANT, FEED.name)
    assert failed["error"] == (
        "the replicas did not catch up: only 0 of 1 replicas acknowledged the stored cursor"
        " within 0.2s, 5 times in a row"
    )
    # Nothing was fetched past the cursor no replica holds: not even the first page.
    assert await client.xlen(f"st:{{{TENANT}}}:{FEED.name}") == 0
