"""Whether the live instances' configurations agree on each tenant, and which of them may own a
tenant when they do not: a pure function of what each instance publishes with its heartbeat.

What is compared, per tenant: whether an instance lists the tenant at all, the feeds it polls for
it, and the options that change what is published or when (per feed: poll interval, change
detection, retention; per tenant: `include_recent_changes`, `start`). Rates and concurrency are not:
they change how fast, not what.

Who may own a tenant (the rule a rolling change relies on): an instance whose feed list for the
tenant is not a strict subset of another live instance's list for it. When one instance lists more
feeds than another (a rolling change that adds a feed, or that removes one), the tenant goes to the
instances that list more, so no feed that some live instance lists goes unpolled: an added feed is
delivered for every tenant as soon as one instance runs the new configuration, a removed one
stops when the last instance dropped it. Lists that neither contain the other (`a` adds one feed,
`b` another) cannot both be honoured: each tenant still goes to one of them and the feeds its
owner lacks are reported as unpolled. Differing options are reported and do not move tenants.

Instances that publish no configuration (an older syncd) are compared by tenant ids only and may
own any tenant they list.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

Value = str | int | float | bool | None
LISTED = "listed"  # the `option` of a difference in whether a tenant, or a feed, is listed
SAMPLE = 10  # tenants named in a difference's description


class Profile(msgspec.Struct, frozen=True):
    """What one instance would publish for a tenant: each feed with its options, and the
    tenant-wide options."""

    feeds: dict[str, dict[str, Value]] = msgspec.field(default_factory=dict)
    options: dict[str, Value] = msgspec.field(default_factory=dict)

    def digest(self) -> str:
        return hashlib.sha1(msgspec.json.encode(self, order="sorted")).hexdigest()[:16]


class Published(msgspec.Struct, frozen=True):
    """An instance's effective per-tenant configuration as it publishes it: its distinct
    profiles by digest, and the tenants of each (most tenants share a few profiles)."""

    profiles: dict[str, Profile] = msgspec.field(default_factory=dict)
    tenants: dict[str, list[int]] = msgspec.field(default_factory=dict)

    @classmethod
    def of(cls, profiles: Mapping[int, Profile]) -> Published:
        by_digest: dict[str, Profile] = {}
        tenants: dict[str, list[int]] = {}
        for t in sorted(profiles):
            p = profiles[t]
            d = p.digest()
            by_digest.setdefault(d, p)
            tenants.setdefault(d, []).append(t)
        return cls(by_digest, tenants)

    def by_tenant(self) -> dict[int, str]:
        return {t: d for d, ts in self.tenants.items() for t in ts}


@dataclass(frozen=True, slots=True)
class Difference:
    """One way the live instances' configurations differ, and the tenants it concerns.

    `feed` is "" for the tenant itself and its tenant-wide options; `option` is "listed" when the
    difference is whether the tenant (or the feed, for it) is in an instance's configuration at
    all, else the option's name; `values` gives each instance's value, by instance name.
    """

    feed: str
    option: str
    values: tuple[tuple[str, Value], ...]  # (instance, value), by instance name
    tenants: tuple[int, ...]

    def describe(self) -> dict[str, object]:
        """For logs and `syncd status --fleet --json`."""
        out: dict[str, object] = {}
        if self.feed:
            out["feed"] = self.feed
        if self.option == LISTED:
            out["listed_by"] = [i for i, v in self.values if v]
            out["missing_from"] = [i for i, v in self.values if not v]
        else:
            out["option"] = self.option
            out["values"] = dict(self.values)
        out["tenants"] = len(self.tenants)
        out["sample"] = list(self.tenants[:SAMPLE])
        return out

    def text(self) -> str:
        """One line for `syncd status --fleet`."""
        what = f"feed {self.feed}" if self.feed else "the tenant"
        ts = ", ".join(map(str, self.tenants[:SAMPLE]))
        if len(self.tenants) > SAMPLE:
            ts += f", ... ({len(self.tenants)})"
        if self.option == LISTED:
            by = ", ".join(i for i, v in self.values if v)
            missing = ", ".join(i for i, v in self.values if not v)
            return f"{what} listed by {by}, not by {missing}: tenants {ts}"
        values = ", ".join(f"{i}={v}" for i, v in self.values)
        option = f"{self.feed} {self.option}" if self.feed else self.option
        return f"{option} differs ({values}): tenants {ts}"


@dataclass(frozen=True, slots=True)
class Comparison:
    """The configurations of the live instances, compared tenant by tenant."""

    eligible: dict[str, frozenset[int]]  # instance -> the tenants it may own
    differences: list[Difference]
    disagreeing: frozenset[int]  # tenants with any difference
    # tenant -> eligible instance -> feeds some live instance lists for it that it does not
    # (only where the lists cannot be reconciled)
    lacking: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)

    def unpolled(self, owners: Mapping[int, str]) -> dict[int, tuple[str, ...]]:
        """tenant -> the feeds its (planned) owner will not poll although another lists them."""
        out: dict[int, tuple[str, ...]] = {}
        for t, by_instance in self.lacking.items():
            missing = by_instance.get(owners.get(t, ""), ())
            if missing:
                out[t] = missing
        return out


# One tenant as the instances see it: (instance, its profile digest, or "" when it does not list
# the tenant, or None when it publishes no profiles), by instance name.
_Signature = tuple[tuple[str, str | None], ...]
_Values = tuple[tuple[str, Value], ...]
_Key = tuple[str, str, _Values]  # feed, option, values: a difference before its tenants
_Found = tuple[frozenset[str], list[_Key], dict[str, tuple[str, ...]]]


def compare(
    known: Mapping[str, Iterable[int]],
    profiles: Mapping[str, Mapping[int, str] | None],
    catalog: Mapping[str, Profile],
) -> Comparison:
    """Compare the live instances' configurations.

    `known`: instance -> the tenant ids it lists. `profiles`: instance -> (tenant -> the digest
    of its profile for the tenant), or None for an instance that publishes none; `catalog`:
    digest -> profile. Tenants that share how every instance sees them are decided once.
    """
    instances = sorted(known)
    sets = {i: frozenset(known[i]) for i in instances}
    tenants = sorted(set().union(*sets.values())) if sets else []
    decided: dict[_Signature, _Found] = {}
    eligible: dict[str, set[int]] = {i: set() for i in instances}
    grouped: dict[_Key, list[int]] = {}
    lacking: dict[int, dict[str, tuple[str, ...]]] = {}
    for t in tenants:
        sig: _Signature = tuple(
            (i, _profile_of(profiles.get(i), t) if t in sets[i] else "") for i in instances
        )
        found = decided.get(sig)
        if found is None:
            found = decided[sig] = _decide(sig, catalog)
        allowed, diffs, lacks = found
        for i in allowed:
            eligible[i].add(t)
        for key in diffs:
            grouped.setdefault(key, []).append(t)
        if lacks:
            lacking[t] = lacks
    differences = [
        Difference(feed, option, values, tuple(ts))
        for (feed, option, values), ts in sorted(grouped.items(), key=lambda kv: kv[0][:2])
    ]
    return Comparison(
        eligible={i: frozenset(ts) for i, ts in eligible.items()},
        differences=differences,
        disagreeing=frozenset(t for d in differences for t in d.tenants),
        lacking=lacking,
    )


def _profile_of(tenants: Mapping[int, str] | None, tenant: int) -> str | None:
    if tenants is None:
        return None
    return tenants.get(tenant)  # a tenant listed without a profile: unknown, like an old peer


def _decide(sig: _Signature, catalog: Mapping[str, Profile]) -> _Found:
    """Who may own a tenant seen this way, how the views differ, what each eligible one lacks."""
    listing = [(i, d) for i, d in sig if d != ""]
    diffs: list[_Key] = []
    if len(listing) < len(sig):
        diffs.append(("", LISTED, tuple((i, d != "") for i, d in sig)))
    described = {i: catalog[d] for i, d in listing if d is not None and d in catalog}
    unknown = {i for i, _ in listing} - set(described)
    if len({d for i, d in listing if i in described}) <= 1:
        return frozenset(i for i, _ in listing), diffs, {}
    feeds = {i: frozenset(p.feeds) for i, p in described.items()}
    maximal = {i for i, fs in feeds.items() if not any(fs < other for other in feeds.values())}
    union = frozenset().union(*feeds.values())
    for feed in sorted(union):
        listed = tuple((i, feed in feeds[i]) for i in sorted(described))
        if not all(v for _, v in listed):
            diffs.append((feed, LISTED, listed))
        having = {i: described[i].feeds[feed] for i in sorted(described) if feed in feeds[i]}
        diffs += _option_diffs(feed, having)
    diffs += _option_diffs("", {i: described[i].options for i in sorted(described)})
    lacks = {i: tuple(sorted(union - feeds[i])) for i in maximal if union - feeds[i]}
    return frozenset(maximal | unknown), diffs, lacks


def _option_diffs(feed: str, having: Mapping[str, Mapping[str, Value]]) -> list[_Key]:
    """Options stated by two or more instances with different values. An option only some
    state (a newer syncd compares more) is not a difference."""
    if len(having) < 2:
        return []
    out = []
    for option in sorted(set().union(*(opts.keys() for opts in having.values()))):
        values = tuple((i, opts[option]) for i, opts in having.items() if option in opts)
        if len(values) >= 2 and len({msgspec.json.encode(v) for _, v in values}) > 1:
            out.append((feed, option, values))
    return out
