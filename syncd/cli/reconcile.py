"""`syncd reconcile`: a reconciliation pass of a tenant's feeds now, then exit.

Each feed is re-exported from its beginning on a cursor of its own (the incremental one, and a
daemon polling it, carry on); what changed is published (drift), and once the feed has
drained every key published before and not seen is published as `deleted`. A pass under way
(killed, or another process's) is resumed rather than begun again. It spends at most
`--share` of the tenant's `requests_per_second`, leaving the rest to the daemon's polls.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from syncd import catalogue
from syncd.cli.commands import CommandError, _feeds, _tenant
from syncd.config import Settings
from syncd.daemon import redis_client
from syncd.daemon.state import http_session
from syncd.engine.publisher import Publisher
from syncd.engine.reconcile import PassFailed, PassFigures, Progress, Reconciler, paced_at
from syncd.errors import AuthFailed, BadRequest, FeedUnavailable, TransientError
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.client import ExportClient

# The tenant's request budget a pass takes by default: the rest stays with the daemon.
DEFAULT_SHARE = 0.25


async def reconcile(
    settings: Settings,
    tenant: int,
    feed: str | None,
    *,
    share: float,
    out: TextIO,
    progress: bool,
    as_json: bool = False,
) -> int:
    """Run (or finish) a pass of each feed; 0 when all completed, 1 when one could not."""
    if not 0 < share <= 1:
        raise CommandError(
            f"--share: expected a share of the request budget in (0, 1], got {share}"
        )
    t = _tenant(settings, tenant)
    feeds = _feeds(t, feed)
    undetected = [f for f in feeds if not settings.feed_options(f).change_detection]
    if undetected and feed is not None:
        raise CommandError(
            f"{', '.join(undetected)}: change_detection is off, so syncd keeps no index to "
            "reconcile against"
        )
    if undetected:  # the tenant's other feeds are reconciled
        print(
            f"syncd: skipped {', '.join(undetected)}: change_detection is off, so syncd keeps "
            "no index to reconcile against",
            file=sys.stderr,
        )
        feeds = [f for f in feeds if f not in undetected]
        if not feeds:
            raise CommandError(
                f"tenant {tenant}: no feed has change_detection on, so there is nothing to "
                "reconcile"
            )
    cfg = settings.config
    r = redis_client(cfg, settings.sentinel_password)
    failed = 0
    try:
        async with http_session(settings) as session:
            publisher = Publisher(
                r,
                cfg.redis.key_prefix,
                wait_replicas=cfg.redis.wait_replicas,
                wait_timeout=cfg.redis.wait_timeout,
            )
            client = ExportClient(session, settings.api_url, settings.app_key)
            tokens = TokenProvider(session, settings.auth_url, t.id, t.client_id, t.client_secret)
            reconciler = Reconciler(
                publisher,
                client,
                tokens,
                pace=paced_at(max(t.requests_per_second * share, 0.1)),
            )
            for name in feeds:
                started = time.monotonic()

                def show(p: Progress, name: str = name, started: float = started) -> None:
                    if progress:
                        _bar(out, name, p, time.monotonic() - started)

                try:
                    figures = await reconciler.run(catalogue.feed(name), show)
                except (PassFailed, AuthFailed, BadRequest, FeedUnavailable, TransientError) as exc:
                    failed += 1
                    if progress:
                        out.write("\n")
                    out.write(f"{name}: pass not completed ({exc}); run again to resume\n")
                    continue
                if progress:
                    out.write("\n")
                _report(out, name, figures, as_json)
    finally:
        await r.aclose()
    return 1 if failed else 0


def _bar(out: TextIO, feed: str, p: Progress, elapsed: float) -> None:
    if p.phase == "sweep" and p.buckets:
        where = f"sweep {p.swept:,}/{p.buckets:,} buckets"
    else:
        where = f"{p.pages:,} pages, {p.records:,} records"
    out.write(f"\r{feed}: {where}, {elapsed:.0f}s ")
    out.flush()


def _report(out: TextIO, feed: str, f: PassFigures, as_json: bool) -> None:
    if as_json:
        out.write(
            json.dumps(
                {
                    "feed": feed,
                    "seen": f.seen,
                    "fetched": f.fetched,
                    "drift": f.drift,
                    "deleted": f.deleted,
                    "started": f.started,
                    "finished": f.finished,
                }
            )
            + "\n"
        )
        return
    out.write(
        f"{feed}: {f.seen:,} keys seen ({f.fetched:,} records fetched), {f.drift:,} drifted, "
        f"{f.deleted:,} deleted, "
        f"in {f.finished - f.started:.1f}s\n"
    )
