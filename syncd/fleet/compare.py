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

The cost stays with what differs, not with the tenants: a profile is published as the digests of
its two parts, the feed list (each feed with its options, the same for most tenants) and the
tenant-wide options (where `start` makes every tenant's its own), each part once; tenants seen
the same way by every instance are decided together, and each distinct feed-list signature once.
At most MAX_DIFFERENCES differences are named (the first by feed, option and tenant), the others
counted.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec

Value = str | int | float | bool | None
LISTED = "listed"  # the `option` of a difference in whether a tenant, or a feed, is listed
SAMPLE = 10  # tenants named in a difference's description
MAX_DIFFERENCES = 100  # differences named; more are counted (`Comparison.omitted`)
PART = 16  # hex digits of a part's digest; a profile's digest is its feeds', then its options'


def _part_digest(part: Mapping[str, object]) -> str:
    return hashlib.sha1(msgspec.json.encode(part, order="sorted")).hexdigest()[:PART]


class Profile(msgspec.Struct, frozen=True):
    """What one instance would publish for a tenant: each feed with its options, and the
    tenant-wide options."""

    feeds: dict[str, dict[str, Value]] = msgspec.field(default_factory=dict)
    options: dict[str, Value] = msgspec.field(default_factory=dict)

    def digest(self) -> str:
        return _part_digest(self.feeds) + _part_digest(self.options)


class Published(msgspec.Struct, frozen=True):
    """An instance's effective per-tenant configuration as it publishes it, each part once:
    the distinct feed lists and tenant-wide options by digest, and the tenants of each profile
    by the profile's digest (its feed list's digest, then its options')."""

    feeds: dict[str, dict[str, dict[str, Value]]] = msgspec.field(default_factory=dict)
    options: dict[str, dict[str, Value]] = msgspec.field(default_factory=dict)
    tenants: dict[str, list[int]] = msgspec.field(default_factory=dict)

    @classmethod
    def of(cls, profiles: Mapping[int, Profile]) -> Published:
        feeds: dict[str, dict[str, dict[str, Value]]] = {}
        options: dict[str, dict[str, Value]] = {}
        tenants: dict[str, list[int]] = {}
        for t in sorted(profiles):
            p = profiles[t]
            fd, od = _part_digest(p.feeds), _part_digest(p.options)
            feeds.setdefault(fd, p.feeds)
            options.setdefault(od, p.options)
            tenants.setdefault(fd + od, []).append(t)
        return cls(feeds, options, tenants)

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
    differences: list[Difference]  # the first MAX_DIFFERENCES
    disagreeing: frozenset[int]  # tenants with any difference
    # tenant -> eligible instance -> feeds some live instance lists for it that it does not
    # (only where the lists cannot be reconciled)
    lacking: dict[int, dict[str, tuple[str, ...]]] = field(default_factory=dict)
    omitted: int = 0  # differences past MAX_DIFFERENCES, counted but not named

    def unpolled(self, owners: Mapping[int, str]) -> dict[int, tuple[str, ...]]:
        """tenant -> the feeds its (planned) owner will not poll although another lists them."""
        out: dict[int, tuple[str, ...]] = {}
        for t, by_instance in self.lacking.items():
            missing = by_instance.get(owners.get(t, ""), ())
            if missing:
                out[t] = missing
        return out


def agreement(known: Mapping[str, frozenset[int]]) -> Comparison:
    """The comparison of instances known to publish the same configuration (the same digest):
    nothing differs, each may own every tenant it lists."""
    return Comparison(eligible=dict(known), differences=[], disagreeing=frozenset())


# One tenant as the instances see it: (instance, its profile digest, or "" when it does not list
# the tenant, or None when it publishes no profile for it), by instance name. The same with the
# digest of the profile's feed list instead: a feed signature.
_Signature = tuple[tuple[str, str | None], ...]
_Values = tuple[tuple[str, Value], ...]
_Key = tuple[str, str, _Values]  # feed, option, values: a difference before its tenants
_Found = tuple[frozenset[str], list[_Key], dict[str, tuple[str, ...]]]


def compare(
    known: Mapping[str, Iterable[int]], published: Mapping[str, Published | None]
) -> Comparison:
    """Compare the live instances' configurations.

    `known`: instance -> the tenant ids it lists. `published`: instance -> its configuration,
    or None for an instance that publishes none (or whose configuration was not read).
    """
    instances = sorted(known)
    sets = {i: frozenset(known[i]) for i in instances}
    views = {i: p.by_tenant() for i, p in published.items() if p is not None and i in sets}
    tenants = sorted(set().union(*sets.values())) if sets else []
    alike: dict[_Signature, list[int]] = {}  # most tenants share how they are seen with others
    for t in tenants:
        sig: _Signature = tuple(
            (i, views[i].get(t) if i in views else None) if t in sets[i] else (i, "")
            for i in instances
        )
        alike.setdefault(sig, []).append(t)
    eligible: dict[str, set[int]] = {i: set() for i in instances}
    grouped: dict[_Key, list[int]] = {}
    disagreeing: set[int] = set()
    lacking: dict[int, dict[str, tuple[str, ...]]] = {}
    by_feeds: dict[_Signature, list[int]] = {}
    for sig, ts in alike.items():
        by_feeds.setdefault(tuple((i, d and d[:PART]) for i, d in sig), []).extend(ts)
        for key in _tenant_option_diffs(sig, published):
            grouped.setdefault(key, []).extend(ts)
            disagreeing.update(ts)
    for fsig, ts in by_feeds.items():
        allowed, diffs, lacks = _decide(fsig, published)
        for i in allowed:
            eligible[i].update(ts)
        for key in diffs:
            grouped.setdefault(key, []).extend(ts)
        if diffs:
            disagreeing.update(ts)
        if lacks:
            lacking.update(dict.fromkeys(ts, lacks))
    # Named in order of feed, option and first tenant; the rest only counted.
    first = {key: min(ts) for key, ts in grouped.items()}
    ordered = sorted(grouped, key=lambda k: (k[0], k[1], first[k]))
    named = ordered[:MAX_DIFFERENCES]
    return Comparison(
        eligible={i: frozenset(ts) for i, ts in eligible.items()},
        differences=[Difference(f, o, v, tuple(sorted(grouped[f, o, v]))) for f, o, v in named],
        disagreeing=frozenset(disagreeing),
        lacking=lacking,
        omitted=len(ordered) - len(named),
    )


def _tenant_option_diffs(sig: _Signature, published: Mapping[str, Published | None]) -> list[_Key]:
    """How the tenant-wide options differ between the instances that describe a tenant."""
    stated: dict[str, tuple[str, dict[str, Value]]] = {}  # instance -> (digest, options)
    for i, d in sig:
        p = published.get(i)
        if d and p is not None and (options := p.options.get(d[PART:])) is not None:
            stated[i] = (d[PART:], options)
    if len({d for d, _ in stated.values()}) <= 1:
        return []
    return _option_diffs("", {i: options for i, (_, options) in stated.items()})


def _decide(fsig: _Signature, published: Mapping[str, Published | None]) -> _Found:
    """Who may own a tenant whose feed lists are seen this way (the digests of each instance's
    feed list for it), how the lists differ, and what each eligible instance lacks."""
    listing = [(i, d) for i, d in fsig if d != ""]
    diffs: list[_Key] = []
    if len(listing) < len(fsig):
        diffs.append(("", LISTED, tuple((i, d != "") for i, d in fsig)))
    described: dict[str, dict[str, dict[str, Value]]] = {}
    for i, d in listing:
        p = published.get(i)
        if d is not None and p is not None and (feeds := p.feeds.get(d)) is not None:
            described[i] = feeds
    unknown = {i for i, _ in listing} - set(described)
    if len({d for i, d in listing if i in described}) <= 1:
        return frozenset(i for i, _ in listing), diffs, {}
    lists = {i: frozenset(fs) for i, fs in described.items()}
    maximal = {i for i, fs in lists.items() if not any(fs < other for other in lists.values())}
    union = frozenset().union(*lists.values())
    for feed in sorted(union):
        listed = tuple((i, feed in lists[i]) for i in sorted(described))
        if not all(v for _, v in listed):
            diffs.append((feed, LISTED, listed))
        having = {i: described[i][feed] for i in sorted(described) if feed in lists[i]}
        diffs += _option_diffs(feed, having)
    lacks = {i: tuple(sorted(union - lists[i])) for i in maximal if union - lists[i]}
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
