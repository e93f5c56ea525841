"""Series kept in plain dicts and written in Prometheus' text format without prometheus_client.

prometheus_client spends about 10 us per series per scrape (a child object, a lock, a Sample
tuple, generic formatting); at tens of thousands of series that is most of a scrape's budget.
A dict of numbers written with cached label strings costs a tenth of that. Each family can also
yield a prometheus_client `Metric`, so a `CollectorRegistry` (tests, `get_sample_value`) sees
exactly the same samples as the fast text.

A `Snapshot` holds copies of every family's values, so that another thread can write them as
one body (gzip-compressed with `zlib_gzip` when large) or yield them as `Metric`s.
"""

from __future__ import annotations

import bisect
import gzip as gzip_module
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

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
    """Label strings cached per key: shared by every family with the same label names.

    Read and filled only by the thread that renders (see `Family.text`), so that no other
    thread ever changes it while the renderer iterates over it.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.text: dict[Key, str] = {}

    def get(self, key: Key) -> str:
        text = self.text.get(key)
        if text is None:
            text = self.text[key] = label_text(self.names, key)
        return text

    def purge(self, firsts: set[str]) -> None:
        """Drop the strings of keys whose first label value is one of `firsts` (tenants)."""
        if firsts:
            for key in [k for k in self.text if k[0] in firsts]:
                del self.text[key]


class Family:
    """A counter or gauge: one number per label key.

    `values` belongs to the event loop; what `text` keeps belongs to the render thread. With
    `cache_lines`, each series' line is kept with the value it shows: between two scrapes most
    values do not change (limits, intervals, errors, pauses, record counts of polls that found
    nothing), so a scrape writes only the lines that did, and a family with no change costs one
    dict comparison. Families with a series per tenant and feed do not keep their lines, to
    keep hundreds of thousands of strings out of memory.
    """

    def __init__(
        self, name: str, help_text: str, kind: str, labels: Labels, *, cache_lines: bool = True
    ) -> None:
        # Counters are named with their `_total` suffix, as they appear in the text.
        self.name, self.help, self.kind, self.labels = name, help_text, kind, labels
        self.values: dict[Key, float] = {}
        self.cache_lines = cache_lines
        self._lines: dict[Key, str] = {}
        self._shown: dict[Key, float] = {}  # the value each line shows
        self._chunk = ""  # every line, joined

    def inc(self, key: Key, n: float = 1) -> None:
        values = self.values
        values[key] = values.get(key, 0) + n

    def drop_where(self, first: str) -> None:
        """Forget every series whose first label value is `first` (a tenant's); the render
        thread drops their lines when it no longer sees them."""
        for key in [k for k in self.values if k[0] == first]:
            del self.values[key]

    def text(self, values: dict[Key, float], out: list[str]) -> None:
        # Values are finite counts, seconds and rates: repr is the text format's spelling.
        out.append(header(self.name, self.help, self.kind))
        if not self.cache_lines:
            name, label = self.name, self.labels.get
            out.extend([f"{name}{label(key)} {v!r}\n" for key, v in values.items()])
            return
        shown, lines = self._shown, self._lines
        if values == shown:
            out.append(self._chunk)
            return
        name, label, was = self.name, self.labels.get, shown.get
        changed = [(key, v) for key, v in values.items() if was(key) != v]
        added = sum(key not in shown for key, _ in changed)
        if len(shown) + added != len(values):  # some series are gone (a tenant removed)
            for key in shown.keys() - values.keys():
                del shown[key], lines[key]
        # Order within a family does not matter to Prometheus: lines stay where they were.
        for key, v in changed:
            shown[key] = v
            lines[key] = f"{name}{label(key)} {v!r}\n"
        self._chunk = "".join(lines.values())
        out.append(self._chunk)

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


@dataclass(slots=True)
class Snapshot:
    """Copies of every series, taken on the event loop, safe to format in another thread."""

    counters: list[tuple[Family, dict[Key, float]]]
    histograms: list[tuple[Histogram, dict[Key, list[float]]]]
    forgotten: set[str]  # tenants removed since the last render

    def text(self) -> bytes:
        """Every series in the text format, counters and gauges first, in snapshot order."""
        out: list[str] = []
        for family, values in self.counters:
            family.text(values, out)
        for histogram, counts in self.histograms:
            histogram.text(counts, out)
        return "".join(out).encode()

    def metrics(self) -> Iterator[Metric]:
        """The same samples as `text`, as prometheus_client `Metric`s."""
        for family, values in self.counters:
            yield family.metric(values)
        for histogram, counts in self.histograms:
            yield histogram.metric(counts)


def zlib_gzip(body: bytes) -> bytes:
    """`body` in gzip format at compression level 1."""
    return gzip_module.compress(body, compresslevel=1, mtime=0)
