"""Operator commands: status, reset-cursor, backfill, tail."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import signal
import sys
import time
from typing import Any, TextIO

import msgspec

from syncd.config import ConfigError, OpsConfig, Settings, TenantSettings, check_start
from syncd.daemon import Daemon, redis_client
from syncd.daemon.fleet import FleetStatus, fleet_status
from syncd.fleet.state import read_owners
from syncd.keys import Keys
from syncd.redis.conn import RedisClient


class CommandError(Exception):
    """A command cannot do what was asked; the message says why."""


def _tenant(settings: Settings, tenant: int) -> TenantSettings:
    for t in settings.tenants:
        if t.id == tenant:
            return t
    known = ", ".join(str(t.id) for t in settings.tenants)
    raise CommandError(f"tenant {tenant} is not in {settings.config.path} (configured: {known})")


def _feeds(t: TenantSettings, feed: str | None) -> list[str]:
    if feed is None:
        return list(t.feeds)
    if feed not in t.feeds:
        raise CommandError(f"feed {feed!r} is not configured for tenant {t.id}")
    return [feed]


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _when(ts: str | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(float(ts), dt.UTC).isoformat(timespec="seconds")


async def collect_status(settings: Settings, r: RedisClient) -> list[dict[str, Any]]:
    """Per tenant and feed: cursor, last successful poll, stream length, stale versions dropped,
    why polling is paused, last error."""
    prefix = settings.config.redis.key_prefix
    rows: list[dict[str, Any]] = []
    owners = await read_owners(r, prefix, [t.id for t in settings.tenants])
    for t in settings.tenants:
        k = Keys(prefix, t.id)
        async with r.pipeline(transaction=False) as pipe:
            pipe.hgetall(k.cursors)
            pipe.hgetall(k.state)
            pipe.xlen(k.dead)
            for feed in t.feeds:
                pipe.xlen(k.stream(feed))
            cursors, state, dead, *lengths = await pipe.execute()
        cursors = {_text(a): _text(b) for a, b in cursors.items()}
        state = {_text(a): _text(b) for a, b in state.items()}
        for feed, length in zip(t.feeds, lengths, strict=True):
            rows.append(
                {
                    "tenant": t.id,
                    "feed": feed,
                    "owner": owners.get(t.id),
                    "cursor": cursors.get(feed),
                    "last_success": _when(state.get(f"{feed}:last_ok")),
                    "stream_length": length,
                    "tenant_dead_letters": dead,
                    "last_error": state.get(f"{feed}:last_error"),
                    "last_error_at": _when(state.get(f"{feed}:last_error_at")),
                    "paused": state.get(f"{feed}:paused") or state.get("memory_paused"),
                    "stale_records": int(state.get(f"{feed}:stale") or 0),
                    "last_pass": _last_pass(feed, state),
                }
            )
    return rows


def _last_pass(feed: str, state: dict[str, str]) -> dict[str, Any] | None:
    """The feed's last completed reconciliation pass: when, keys seen, drift, deletes."""
    if f"{feed}:pass_finished" not in state:
        return None
    return {
        "finished": _when(state.get(f"{feed}:pass_finished")),
        "seen": int(state.get(f"{feed}:pass_seen") or 0),
        "drift": int(state.get(f"{feed}:pass_drift") or 0),
        "deleted": int(state.get(f"{feed}:pass_deleted") or 0),
    }


def render_table(rows: list[dict[str, Any]], out: TextIO, *, owner: bool = False) -> None:
    cols = [
        ("tenant", 10),
        *([("owner", 20)] if owner else []),
        ("feed", 42),
        ("last_success", 25),
        ("stream_length", 13),
        ("stale_records", 7),
        ("tenant_dead_letters", 8),
        ("cursor", 14),
        ("paused", 24),
        ("last_pass", 52),
        ("last_error", 40),
    ]
    titles = {
        "stream_length": "events",
        "stale_records": "stale",
        "tenant_dead_letters": "dead",
        "last_success": "last ok",
        "last_pass": "last pass (seen, drift, deleted)",
    }
    out.write("  ".join(titles.get(c, c).ljust(w) for c, w in cols).rstrip() + "\n")
    for row in rows:
        cells = []
        for c, w in cols:
            v = row.get(c)
            if c == "last_pass" and v is not None:
                v = f"{v['finished']} ({v['seen']}, {v['drift']}, {v['deleted']})"
            text = "-" if v is None else str(v)
            cells.append((text[: w - 1] + "…" if len(text) > w else text).ljust(w))
        out.write("  ".join(cells).rstrip() + "\n")


def render_fleet(fleet: FleetStatus, out: TextIO) -> None:
    out.write(f"fleet: {len(fleet.instances)} instance(s)\n")
    for i in fleet.instances:
        age = max(0.0, time.time() - i["renewed"])
        out.write(
            f"  {i['instance']:30} {i['tenants']:6} tenants"
            f"  (knows {i['known']}, renewed {age:.1f}s ago, {i['host']} pid {i['pid']})\n"
        )
        clash = i.get("name_clash")
        if clash:
            out.write(
                f"    NAME CLASH: another process waits for this name ({clash['host']} pid"
                f" {clash['pid']}), polling nothing until this one leaves or stops renewing\n"
            )
    if fleet.differences:
        out.write("configurations differ:\n")
        for d in fleet.differences:
            out.write(f"  {d.text()}\n")
        if fleet.omitted:
            out.write(
                f"  ... and {fleet.omitted} more difference(s);"
                f" {fleet.disagreeing} tenant(s) differ in all\n"
            )
    if fleet.unpolled:
        pairs = sum(len(fs) for fs in fleet.unpolled.values())
        sample = "; ".join(f"{t}: {', '.join(fs)}" for t, fs in list(fleet.unpolled.items())[:10])
        out.write(
            f"NOT POLLED: {pairs} feed(s) of {len(fleet.unpolled)} tenant(s) that an instance"
            f" lists but the tenant's owner does not ({sample})\n"
        )


async def status(
    settings: Settings, *, as_json: bool, out: TextIO, fleet_only: bool = False
) -> int:
    """Per tenant and feed rows (with each tenant's owner), and in a fleet a summary of the
    instances and of how their configurations differ; `fleet_only`: the summary alone."""
    in_fleet = settings.config.fleet.enabled
    r = redis_client(settings.config, settings.sentinel_password)
    try:
        rows = [] if fleet_only else await collect_status(settings, r)
        fleet = FleetStatus([], [], {})
        if in_fleet or fleet_only:
            prefix = settings.config.redis.key_prefix
            fleet = await fleet_status(r, prefix, [t.id for t in settings.tenants])
    finally:
        await r.aclose()
    if fleet_only:
        if as_json:
            out.write(json.dumps(fleet.instances, indent=2) + "\n")
        else:
            render_fleet(fleet, out)
    elif as_json:
        out.write(json.dumps(rows, indent=2) + "\n")
    else:
        render_table(rows, out, owner=in_fleet)
        if in_fleet:
            out.write("\n")
            render_fleet(fleet, out)
    return 0


async def reset_cursor(settings: Settings, tenant: int, feed: str, out: TextIO) -> int:
    """Forget a feed's stored cursor: the next poll starts from the configured start.

    Fingerprints stay, so records already published come back as unchanged: no duplicates.
    """
    t = _tenant(settings, tenant)
    _feeds(t, feed)
    r = redis_client(settings.config, settings.sentinel_password)
    try:
        removed = await r.hdel(Keys(settings.config.redis.key_prefix, tenant).cursors, feed)
    finally:
        await r.aclose()
    out.write(
        f"tenant {tenant} feed {feed}: {'cursor removed' if removed else 'no cursor was stored'}\n"
    )
    return 0


async def backfill(
    settings: Settings,
    tenant: int,
    feed: str | None,
    start: str | None,
    *,
    out: TextIO,
    progress: bool,
) -> int:
    """Re-export a tenant's feeds from the beginning (or `start`), then exit.

    Change detection keeps downstream free of duplicates: only records whose content changed
    since they were last published produce events.
    """
    t = _tenant(settings, tenant)
    feeds = _feeds(t, feed)
    if start is not None:
        try:
            check_start("", "", start)
        except ConfigError:
            raise CommandError(f"--from: expected a date like 2024-01-01, got {start!r}") from None
    prefix = settings.config.redis.key_prefix
    r = redis_client(settings.config, settings.sentinel_password)
    try:
        await r.hdel(Keys(prefix, tenant).cursors, *feeds)
    finally:
        await r.aclose()
    only = dataclasses.replace(t, feeds=tuple(feeds), start=start)
    # A daemon may be running with the same configuration: do not take its ops port.
    quiet = msgspec.structs.replace(settings.config, ops=OpsConfig())
    daemon = Daemon(dataclasses.replace(settings, config=quiet, tenants=(only,)), once=True)
    task = asyncio.create_task(daemon.run())
    started = time.monotonic()
    while not task.done():
        await asyncio.wait([task], timeout=0.5)
        if progress:
            _progress(daemon, feeds, started, out)
    if progress:
        out.write("\n")
    code = task.result()
    m = daemon.metrics
    # The daemon ran only these feeds of this tenant: its per-tenant counts are theirs.
    fetched = m.sample("syncd_tenant_records_fetched_total", {"tenant": str(tenant)}) or 0
    published = m.sample("syncd_tenant_records_published_total", {"tenant": str(tenant)}) or 0
    out.write(
        f"backfill of tenant {tenant}: {int(fetched)} records fetched, "
        f"{int(published)} published, {int(fetched - published)} unchanged, "
        f"{time.monotonic() - started:.1f}s\n"
    )
    return code


def _progress(daemon: Daemon, feeds: list[str], started: float, out: TextIO) -> None:
    sched = daemon.scheduler
    if sched is None:
        return
    done = sum(fs.drained or fs.failed for t in sched.tenants.values() for fs in t.feeds.values())
    fetched = 0.0
    for t in sched.tenants.values():
        labels = {"tenant": str(t.id)}
        fetched += daemon.metrics.sample("syncd_tenant_records_fetched_total", labels) or 0
    width = 30
    filled = int(width * done / max(1, len(feeds)))
    elapsed = time.monotonic() - started
    out.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{len(feeds)} feeds  "
        f"{int(fetched):,} records  {fetched / max(elapsed, 1e-6):,.0f}/s  {elapsed:.0f}s "
    )
    out.flush()


async def tail_command(
    settings: Settings,
    tenant: int,
    feed: str | None,
    group: str | None,
    from_start: bool,
    out: TextIO,
    count: int | None = None,
    fmt: str | None = None,
) -> int:
    """`syncd tail`: `fmt` "text" or "json" (None: text on a terminal, else JSON lines)."""
    from syncd.consumer.tail import OutputFailed, tail

    t = _tenant(settings, tenant)
    feeds = _feeds(t, feed)
    if out is None:  # started with its standard output closed (`>&-`)
        raise CommandError("tail: standard output is closed")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    r = redis_client(settings.config, settings.sentinel_password)
    try:
        await tail(
            r,
            prefix=settings.config.redis.key_prefix,
            tenant=tenant,
            feeds=feeds,
            group=group,
            from_start=from_start,
            out=out,
            fmt="json" if fmt == "json" or (fmt is None and not out.isatty()) else "text",
            stop=stop,
            limit=count,
        )
    except OutputFailed as exc:
        raise CommandError(f"tail: {exc}") from None
    finally:
        await r.aclose()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def run(coro: Any) -> int:
    """Run a command coroutine; CommandError becomes a message and exit code 1."""
    try:
        return int(asyncio.run(coro))
    except (CommandError, ConfigError) as exc:
        print(f"syncd: {exc}", file=sys.stderr)
        return 1


__all__ = ["CommandError", "backfill", "collect_status", "reset_cursor", "status"]
