"""Everything a running simulator knows: feed logs, issued tokens, throttles, faults, counters."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from random import Random
from typing import Any

import msgspec
from aiohttp import web

from syncd import catalogue
from syncd.catalogue import Feed
from syncd.simulator.cache import SizedCache
from syncd.simulator.cursor import CursorCodec
from syncd.simulator.data import ActiveFilter, FeedLog, MutationKind
from syncd.simulator.faults import FaultOverrides, FaultSettings
from syncd.simulator.limits import SlidingWindow, TokenBucket
from syncd.simulator.options import SimOptions
from syncd.simulator.pages import Page, Pager
from syncd.simulator.quirks import Quirks

_SCOPE = (
    "tn.acc.invoices:r tn.crm.customers:r tn.dsp.appointments:r tn.eqs.installedequipment:r "
    "tn.inv.purchaseorders:r tn.jpm.jobs:r tn.mem.memberships:r tn.pay.payrolls:r "
    "tn.pb.pricebook:r tn.sls.estimates:r tn.sa.serviceagreements:r tn.set.employees:r "
    "tn.tel.calls:r tn.tsm.activities:r"
)
# Share of random mutations of each kind (the mutator's mix; deactivations need `active`).
_MUTATION_MIX: tuple[tuple[MutationKind, float], ...] = (
    ("update", 0.6),
    ("deactivate", 0.15),
    ("create", 0.25),
)
# dispatch.appointment-assignments returns only active records unless asked otherwise.
_DEFAULT_ACTIVE: dict[str, ActiveFilter] = {"dispatch.appointment-assignments": "True"}
_ACTIVE_PARAM: dict[str, ActiveFilter] = {"True": "True", "False": "False", "Any": "Any"}


def now_ticks() -> int:
    """Wall-clock time in the 100 ns ticks record timestamps use."""
    return time.time_ns() // 100


@dataclass(slots=True)
class TenantStats:
    """Counters of one tenant, as `GET /_sim/stats` shows them."""

    requests: int = 0
    rate_limited: int = 0
    errors: int = 0
    token_grants: int = 0
    token_rejected: int = 0
    hung: int = 0  # requests (export or token) left unanswered by the hang quirks
    no_progress: int = 0  # no-progress pages sent
    keyless_served: int = 0  # keyless records sent in well-formed pages, repeats included
    in_flight: int = 0
    max_in_flight: int = 0
    feeds: Counter[str] = field(default_factory=Counter)
    # Access token tag -> [first, last] wall-clock times of its authorised export requests and
    # how many: each process has its own token, so two overlapping spans are two pollers at once.
    pollers: dict[str, list[float]] = field(default_factory=dict)

    def reset(self) -> None:
        """Zero the counters in place (requests in flight keep their reference to this)."""
        self.requests = self.rate_limited = self.errors = 0
        self.token_grants = self.token_rejected = 0
        self.hung = self.no_progress = self.keyless_served = 0
        self.max_in_flight = self.in_flight
        self.feeds.clear()
        self.pollers.clear()

    def polled_by(self, token: str, now: float) -> None:
        """Count an authorised export request under its access token (a tag, not the token)."""
        tag = hashlib.sha256(token.encode()).hexdigest()[:12]
        span = self.pollers.get(tag)
        if span is None:
            self.pollers[tag] = [now, now, 1]
        else:
            span[1] = now
            span[2] += 1

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "requests": self.requests,
            "rate_limited": self.rate_limited,
            "errors": self.errors,
            "token_grants": self.token_grants,
            "token_rejected": self.token_rejected,
            "hung": self.hung,
            "no_progress": self.no_progress,
            "keyless_served": self.keyless_served,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "feeds": dict(self.feeds),
            "pollers": [
                {"token": tag, "first": first, "last": last, "requests": int(n)}
                for tag, (first, last, n) in sorted(self.pollers.items(), key=lambda kv: kv[1][0])
            ],
        }


class UnknownFeed(KeyError):
    """The named feed is not served by this simulator."""


class SimState:
    """The simulated ServiceTitan tenants of one simulator instance."""

    scope = _SCOPE

    def __init__(self, options: SimOptions) -> None:
        self.options = options.validate()
        every = catalogue.feeds()
        self.feed_numbers = {name: n for n, name in enumerate(every)}
        self._names_by_number = {n: name for name, n in self.feed_numbers.items()}
        names = options.feeds if options.feeds is not None else tuple(every)
        unknown = [name for name in names if name not in every]
        if unknown:
            raise ValueError(f"simulator option feeds: unknown feed(s) {', '.join(unknown)}")
        self.feeds: dict[str, Feed] = {name: every[name] for name in names}
        self.tenants = tuple(options.tenants)
        self.codec = CursorCodec(options.seed)
        self.record_cache: SizedCache[bytes] = SizedCache(options.record_cache_mb * 1024 * 1024)
        self.pager = Pager(
            self.codec,
            options.page_size,
            options.recent_delay,
            SizedCache[Page](options.cache_mb * 1024 * 1024),
        )
        self._logs: dict[tuple[int, str], FeedLog] = {}
        self.tokens: dict[str, tuple[int, float]] = {}  # token -> (tenant, monotonic expiry)
        self.grants: dict[str, SlidingWindow] = {}
        self.buckets: dict[int, TokenBucket] = {}
        self.overrides: dict[int, FaultOverrides] = {}
        self._settings: dict[int, FaultSettings] = {}
        self.fault_rng = Random(f"faults:{options.seed}")
        self.mutation_rng = Random(f"mutations:{options.seed}")
        self.stats: dict[int, TenantStats] = {t: TenantStats() for t in self.tenants}
        self.internal_errors = 0  # unexpected exceptions in handlers (a simulator bug)
        self._quirks: dict[int, Quirks] = {t: options.quirks_for(t) for t in self.tenants}
        self._quirk_rngs = {t: Random(f"quirks:{options.seed}:{t}") for t in self.tenants}
        # Quirks of changes draw from their own stream: data never depends on request order.
        self._change_rngs = {t: Random(f"changes:{options.seed}:{t}") for t in self.tenants}
        self.stopping = asyncio.Event()  # set when the server shuts down: hung requests end

    # -- feeds ------------------------------------------------------------------------------

    def log(self, tenant: int, feed_name: str) -> FeedLog:
        """The feed log, created on first use (its initial state depends only on the seed)."""
        found = self._logs.get((tenant, feed_name))
        if found is not None:
            return found
        feed = self.feeds.get(feed_name)
        if feed is None or tenant not in self.stats:
            raise UnknownFeed(feed_name)
        made = FeedLog(
            feed,
            self.feed_numbers[feed_name],
            tenant,
            self.options.seed,
            self.options.records,
            self.record_cache,
        )
        self._logs[(tenant, feed_name)] = made
        return made

    def feed_by_number(self, feed_no: int) -> str | None:
        """The served feed with catalogue number `feed_no`."""
        name = self._names_by_number.get(feed_no)
        return name if name in self.feeds else None

    @staticmethod
    def default_active(feed_name: str) -> ActiveFilter:
        """The `active` filter a feed applies when the request does not say."""
        return _DEFAULT_ACTIVE.get(feed_name, "Any")

    def prerender(self) -> int:
        """Render every feed's first pass in both modes, with the catalogue's parameters."""
        ticks = now_ticks()
        pages = 0
        for tenant in self.tenants:
            for name, feed in self.feeds.items():
                active = _ACTIVE_PARAM.get(dict(feed.params).get("active", ""))
                active = active or self.default_active(name)
                log = self.log(tenant, name)
                pages += self.pager.prerender(log, active, self.options.effective_overlap, ticks)
        return pages

    def mutate(
        self, tenant: int, feed_name: str, kind: MutationKind | None, count: int
    ) -> list[str]:
        """Change, create or delete `count` records now; their keys (keyless records created
        have none). A random kind when None: the mix, or a deletion as the quirks say."""
        log = self.log(tenant, feed_name)
        rng = self.mutation_rng
        quirks = self.quirks(tenant)
        if kind is None:
            kind = "update"
            if quirks.deletions > 0 and rng.random() < quirks.deletions:
                kind = "delete"
            else:
                draw = rng.random()
                for candidate, share in _MUTATION_MIX:
                    if draw < share:
                        kind = candidate
                        break
                    draw -= share
        changes = quirks.change_quirks(self._change_rngs.get(tenant) or Random(0))
        return log.mutate(kind, count, rng, now_ticks(), changes)

    def mutate_random(self, tenant: int) -> None:
        """One random change in a random feed of `tenant` (the background mutator's step)."""
        name = self.mutation_rng.choice(tuple(self.feeds))
        self.mutate(tenant, name, None, 1)

    def truth(self, tenant: int, feed_name: str) -> dict[str, Any]:
        """What `/records` leaves out: deleted keys and the keyless records and their serving."""
        log = self.log(tenant, feed_name)
        style = self.quirks(tenant).record_style
        keyless = b"[" + b",".join(log.keyless_records(style)) + b"]"
        return {
            "live": sum(1 for i in range(len(log.current)) if log.usable(i)),
            "deleted": log.deleted_keys(),
            "deleted_at": log.deletions(),
            "keyless": {
                "records": msgspec.json.decode(keyless),
                "served": log.keyless_served,
                "distinct_served": len(log.keyless_seen),
            },
        }

    # -- auth and throttles -----------------------------------------------------------------

    def check_client(self, client_id: str, client_secret: str) -> int | None:
        """The tenant whose credentials these are, or None."""
        for tenant in self.tenants:
            if client_id == f"client-{tenant}" and secrets.compare_digest(
                client_secret, f"secret-{tenant}"
            ):
                return tenant
        return None

    def issue_token(self, tenant: int, now: float) -> str:
        """A new access token for `tenant`, valid for the configured TTL."""
        token = secrets.token_urlsafe(48)
        self.tokens[token] = (tenant, now + self.options.token_ttl)
        if len(self.tokens) > 10_000:
            self.tokens = {k: v for k, v in self.tokens.items() if v[1] > now}
        return token

    def token_tenant(self, token: str, now: float) -> int | None:
        """The tenant of a valid, unexpired token; None otherwise."""
        found = self.tokens.get(token)
        if found is None or found[1] <= now:
            return None
        return found[0]

    def expire_tokens(self) -> int:
        """Expire every issued token; how many there were."""
        count = len(self.tokens)
        self.tokens = {k: (tenant, 0.0) for k, (tenant, _) in self.tokens.items()}
        return count

    def grant_window(self, client_id: str) -> SlidingWindow:
        """The token endpoint's throttle for one client."""
        window = self.grants.get(client_id)
        if window is None:
            window = self.grants[client_id] = SlidingWindow(self.options.token_throttle)
        return window

    def bucket(self, tenant: int) -> TokenBucket:
        """The request limiter of one tenant (for the single app key)."""
        bucket = self.buckets.get(tenant)
        rate = self.settings(tenant).rate_limit
        if bucket is None or bucket.rate != rate:
            bucket = self.buckets[tenant] = TokenBucket(rate)
        return bucket

    def settings(self, tenant: int) -> FaultSettings:
        """Fault rates in force for `tenant`."""
        found = self._settings.get(tenant)
        if found is None:
            over = self.overrides.get(tenant, FaultOverrides())
            found = self._settings[tenant] = FaultSettings.resolve(self.options, over)
        return found

    def set_overrides(self, tenant: int, overrides: FaultOverrides) -> None:
        """Replace the runtime fault overrides of `tenant` (empty overrides clear them)."""
        self.overrides[tenant] = overrides
        self._settings.pop(tenant, None)

    # -- quirks -----------------------------------------------------------------------------

    def quirks(self, tenant: int) -> Quirks:
        """The quirks in force for `tenant` (the defaults for a tenant not served)."""
        return self._quirks.get(tenant) or self.options.quirks

    def quirk_rng(self, tenant: int) -> Random:
        """The random stream of `tenant`'s quirks (a throwaway one for a tenant not served)."""
        return self._quirk_rngs.get(tenant) or Random(0)

    def set_quirks(self, tenant: int, changes: dict[str, Any]) -> Quirks:
        """Apply `changes` on top of the quirks `tenant` started with (empty: back to those).

        Raises ValueError for an unknown tenant or a bad change.
        """
        if tenant not in self._quirks:
            raise ValueError(f"tenant {tenant} is not served")
        quirks = self.options.quirks_for(tenant).apply(changes)
        self._quirks[tenant] = quirks
        return quirks

    # -- stats ------------------------------------------------------------------------------

    def tenant_stats(self, tenant: int) -> TenantStats:
        """Counters of a served tenant; a throwaway for any other (nothing to report there)."""
        return self.stats.get(tenant) or TenantStats()

    def reset_stats(self) -> None:
        """Zero every counter, keeping the current in-flight numbers."""
        for tenant, old in list(self.stats.items()):
            self.stats[tenant] = TenantStats(in_flight=old.in_flight, max_in_flight=old.in_flight)

    def stats_json(self) -> dict[str, Any]:
        """The body of `GET /_sim/stats`."""
        tenants = {str(t): s.to_json() for t, s in self.stats.items()}
        totals = {
            key: sum(s[key] for s in tenants.values())
            for key in (
                "requests",
                "rate_limited",
                "errors",
                "token_grants",
                "token_rejected",
                "hung",
                "no_progress",
                "keyless_served",
            )
        }
        return {
            "tenants": tenants,
            "totals": totals,
            "internal_errors": self.internal_errors,
            "cache": {
                "pages": len(self.pager.cache),
                "page_bytes": self.pager.cache.size,
                "page_hits": self.pager.cache.hits,
                "page_misses": self.pager.cache.misses,
                "records": len(self.record_cache),
                "record_bytes": self.record_cache.size,
            },
        }


STATE_KEY = web.AppKey("syncd_sim_state", SimState)
