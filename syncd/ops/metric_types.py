"""What `Metrics` is configured with and fed: the detail levels, the content type it is served
as, the record counters, pause reasons and histogram buckets its series are built from, the
`status` label of a request, and the engine status it reads at each scrape.

Plain values and types, no prometheus_client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

Detail = Literal["tenant", "tenant_feed"]
DETAILS: tuple[str, ...] = get_args(Detail)

# The classic text format: every series name syncd exports is a legacy Prometheus name, so this
# is what every Prometheus and compatible scraper understands.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# A page is one HTTP round trip for up to a few thousand records, usually well under a second;
# the long tail reaches into the client's timeout.
PAGE_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Lateness stays near zero while workers keep up; seconds to minutes mean the pool is saturated.
LATENESS_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0)

# Counted per page, exported per tenant (`syncd_tenant_<name>_total`), per feed
# (`syncd_feed_<name>_total`) and, at "tenant_feed" detail, per both (`syncd_<name>_total`).
RECORD_COUNTERS = (
    ("fetched", "records_fetched", "Records received in export pages."),
    ("published", "records_published", "Records published as change events."),
    (
        "unchanged",
        "records_unchanged",
        "Records dropped because their content had already been published.",
    ),
    ("pages", "pages", "Export pages fetched and applied."),
    (
        "dead",
        "dead_letters",
        "Records written to the dead-letter stream instead of a feed stream.",
    ),
    (
        "stale",
        "stale_records",
        "Record versions not published because a newer version of their key was published"
        " before or came in the same page.",
    ),
)
# Why feeds are not polled (the `reason` label of `syncd_feeds_paused`): a consumer group lags
# more than `[streams] max_lag`, or the tenant waits out a 429.
PAUSE_REASONS = ("consumer_lag", "rate_limit")


def status_class(status: int | None) -> str:
    """The `status` label of a response: "2xx".."5xx", "429" on its own, "error" for none."""
    if status is None or not 200 <= status <= 599:
        # No response at all (timeout, refused connection, TLS failure); aiohttp never hands 1xx
        # to the caller, so anything outside 200..599 is just as broken.
        return "error"
    if status == 429:
        return "429"
    return f"{status // 100}xx"


@dataclass(frozen=True, slots=True)
class TenantStatus:
    """What the engine knows about one tenant right now, read once per scrape.

    A tenant without a row is at rest: allowed its configured rate, not paused, authenticated.
    """

    tenant: int
    rate: float  # what the limiter allows now, lowered after 429s
    feeds: int
    rate_limit_paused: bool  # waiting out a 429
    auth_failing: bool  # the last token request failed


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """The tenants not at rest, and whether polling has stopped for Redis (or its replicas)."""

    tenants: Sequence[TenantStatus]
    redis_memory_full: bool = False
    redis_unavailable: bool = False
    replicas_behind: bool = False  # fewer than `[redis] wait_replicas` replicas answer
    # Seconds polling has been held for them since start, the hold under way included.
    replicas_behind_s: float = 0.0


StatusSource = Callable[[], EngineStatus]
