"""Series kept in plain dicts and written in Prometheus' text format without prometheus_client.

prometheus_client spends about 10 us per series per scrape (a child object, a lock, a Sample
tuple, generic formatting); at tens of thousands of series that is most of a scrape's budget.
A dict of numbers written with cached label strings costs a tenth of that. Each family can also
yield a prometheus_client `Metric`, so a `CollectorRegistry` (tests, `get_sample_value`) sees
exactly the same samples as the fast text.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

Key = tuple[str, ...]


def escape(value: str) -> str:
    """A label value as the text format wants it."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
    return value


def label_text(names: Sequence[str], key: Key) -> str:
    """`{a="x",b="y"}` with label names sorted, as prometheus_client writes them."""
    if not names:
        return ""
    pairs = sorted(zip(names, key, strict=True))
    return "{" + ",".join(f'{n}="{escape(v)}"' for n, v in pairs) + "}"


def number(value: float) -> str:
    """A sample value as the text format spells it: "+Inf", "NaN", else Python's shortest repr."""
    if math.isfinite(value):
        return repr(value)
    return "NaN" if math.isnan(value) else ("+Inf" if value > 0 else "-Inf")


def header(name: str, help_text: str, kind: str) -> str:
    return f"# HELP {name} {help_text}\n# TYPE {name} {kind}\n"


class Labels:
    """Label strings cached per key: shared by every family with the same label names."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.text: dict[Key, str] = {}

    def get(self, key: Key) -> str:
        text = self.text.get(key)
        if text is None:
            text = self.text[key] = label_text(self.names, key)
        return text

    def drop(self, key: Key) -> None:
        self.text.pop(key, None)


class Family:
    """A counter or gauge: one number per label key.

    With `cache_lines`, the text before each value (`name{labels} `) is kept per key: a scrape
    then costs one dict lookup and one float repr per series. Families with a series per tenant
    and feed share the label strings instead, to keep hundreds of thousands of copies out of
    memory.
    """

    def __init__(
        self, name: str, help_text: str, kind: str, labels: Labels, *, cache_lines: bool = True
    ) -> None:
        # Counters are named with their `_total` suffix, as they appear in the text.
        self.name, self.help, self.kind, self.labels = name, help_text, kind, labels
        self.values: dict[Key, float] = {}
        self._prefix: dict[Key, str] | None = {} if cache_lines else None

    def inc(self, key: Key, n: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + n

    def drop_where(self, first: str) -> None:
        """Forget every series whose first label value is `first` (a tenant's)."""
        for cache in (self.values, self._prefix or {}):
            for key in [k for k in cache if k[0] == first]:
                del cache[key]
        for key in [k for k in self.labels.text if k[0] == first]:
            self.labels.drop(key)

    def text(self, values: Mapping[Key, float], out: list[str]) -> None:
        # Values are finite counts, seconds and rates: repr is the text format's spelling.
        out.append(header(self.name, self.help, self.kind))
        prefix = self._prefix
        if prefix is None:
            name, label = self.name, self.labels.get
            out.extend([f"{name}{label(key)} {v!r}\n" for key, v in values.items()])
            return
        try:
            out.extend([f"{prefix[key]}{v!r}\n" for key, v in values.items()])
        except KeyError:
            for key in values.keys() - prefix.keys():
                prefix[key] = f"{self.name}{self.labels.get(key)} "
            out.extend([f"{prefix[key]}{v!r}\n" for key, v in values.items()])

    def metric(self, values: Mapping[Key, float]) -> Metric:
        family: CounterMetricFamily | GaugeMetricFamily
        names = list(self.labels.names)
        if self.kind == "counter":
            family = CounterMetricFamily(self.name.removesuffix("_total"), self.help, labels=names)
        else:
            family = GaugeMetricFamily(self.name, self.help, labels=names)
        for key, value in values.items():
            family.add_metric(list(key), value)
        return family


class Histogram:
    """A histogram per label key: bucket counts (not cumulative), then the sum."""

    def __init__(self, name: str, help_text: str, bounds: Sequence[float], labels: Labels) -> None:
        self.name, self.help, self.labels = name, help_text, labels
        self.bounds = tuple(bounds)
        self.le = [number(float(b)) for b in self.bounds] + ["+Inf"]
        self.values: dict[Key, list[float]] = {}
        self._cache: dict[Key, list[str]] = {}

    def observe(self, key: Key, value: float) -> None:
        counts = self.values.get(key)
        if counts is None:
            counts = self.values[key] = [0.0] * (len(self.bounds) + 2)
        # `le` buckets: the first bound at or above the value; past the last one only +Inf.
        counts[bisect.bisect_left(self.bounds, value)] += 1
        counts[-1] += value

    def snapshot(self) -> dict[Key, list[float]]:
        return {key: counts.copy() for key, counts in self.values.items()}

    def _rows(self, counts: list[float]) -> Iterable[tuple[str, float]]:
        total = 0.0
        for le, n in zip(self.le, counts, strict=False):
            total += n
            yield le, total

    def _prefixes(self, key: Key) -> list[str]:
        """`name_bucket{...,le="..."} ` per bucket, then `name_count{...} ` and `name_sum{...} `."""
        prefixes = self._cache.get(key)
        if prefixes is None:
            name, names = self.name, (*self.labels.names, "le")
            prefixes = [f"{name}_bucket{label_text(names, (*key, le))} " for le in self.le]
            plain = self.labels.get(key)
            prefixes += [f"{name}_count{plain} ", f"{name}_sum{plain} "]
            self._cache[key] = prefixes
        return prefixes

    def drop(self, key: Key) -> None:
        self.values.pop(key, None)
        self._cache.pop(key, None)

    def text(self, values: Mapping[Key, list[float]], out: list[str]) -> None:
        out.append(header(self.name, self.help, "histogram"))
        for key, counts in values.items():
            prefixes = self._prefixes(key)
            total = 0.0
            for i in range(len(self.le)):
                total += counts[i]
                prefix = prefixes[i]
                out.append(f"{prefix}{number(total)}\n")
            out.append(f"{prefixes[-2]}{number(total)}\n")
            out.append(f"{prefixes[-1]}{number(counts[-1])}\n")

    def metric(self, values: Mapping[Key, list[float]]) -> Metric:
        family = HistogramMetricFamily(self.name, self.help, labels=list(self.labels.names))
        for key, counts in values.items():
            family.add_metric(list(key), list(self._rows(counts)), counts[-1])
        return family
