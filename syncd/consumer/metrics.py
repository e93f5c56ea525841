"""Optional metrics of a consumer, in Prometheus' text format: what its handler handled and
failed, what went to the dead stream, how long handler calls took and how far the group lags.

`Consumer(..., metrics=ConsumerMetrics())` updates the object as it goes; serve `render()`
(with `CONTENT_TYPE`) on whatever HTTP server the consumer's process has. No Prometheus library
is needed. One object may serve several consumers: their group is a label, and series are per
feed (all tenants together), so that their number does not grow with the tenants.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from redis.exceptions import RedisError

from syncd.consumer.events import Event, text
from syncd.redis.conn import RedisClient

__all__ = ["CONTENT_TYPE", "HANDLER_BUCKETS", "ConsumerMetrics", "sample_lag"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HANDLER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Upper bounds (seconds) of the handler latency histogram's buckets."""

_PREFIX = "syncd_consumer_"

_HELP = {
    "events_handled_total": "Events the handler handled and the consumer acknowledged.",
    "events_failed_total": "Deliveries the handler failed (raised, timed out or returned).",
    "events_dead_lettered_total": "Events moved to the dead stream, by reason.",
    "events_missed_total": "Events trimmed from a stream before the group read them.",
    "lag_events": "Events in the streams not yet delivered to the group (XINFO GROUPS lag).",
    "pending_events": "Events delivered to the group and not acknowledged yet.",
    "handler_seconds": "Time of each handler call (a batch, or one event with run_each).",
}


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * len(HANDLER_BUCKETS)
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(HANDLER_BUCKETS):
            if seconds <= bound:
                self.counts[i] += 1
                break
        self.total += 1
        self.sum += seconds


class ConsumerMetrics:
    """Counters, gauges and a histogram a consumer updates; `render()` writes them.

    `lag_interval` (seconds, default 15) is how often a consumer reading with this object
    samples its group's lag and pending count on every stream it reads (one XINFO GROUPS per
    stream, pipelined), between two reads.
    """

    content_type = CONTENT_TYPE
    """What to send as the Content-Type of `render()`'s text."""

    def __init__(self, *, lag_interval: float = 15.0) -> None:
        if lag_interval <= 0:
            raise ValueError("lag_interval must be > 0 seconds")
        self.lag_interval = lag_interval
        self._counters: dict[str, dict[tuple[str, ...], float]] = {
            "events_handled_total": {},
            "events_failed_total": {},
            "events_dead_lettered_total": {},
            "events_missed_total": {},
        }
        # (group, stream) -> (feed, lag or None when Redis cannot tell, pending)
        self._streams: dict[tuple[str, str], tuple[str, int | None, int]] = {}
        self._latency: dict[str, _Histogram] = {}

    def handled(self, group: str, events: Iterable[Event]) -> None:
        self._count("events_handled_total", group, events)

    def failed(self, group: str, events: Iterable[Event]) -> None:
        self._count("events_failed_total", group, events)

    def dead_lettered(self, group: str, feed: str, reason: str) -> None:
        series = self._counters["events_dead_lettered_total"]
        series[(group, feed, reason)] = series.get((group, feed, reason), 0) + 1

    def missed(self, group: str, feed: str, count: int) -> None:
        """`count` events of `feed` were trimmed before `group` read them."""
        series = self._counters["events_missed_total"]
        series[(group, feed)] = series.get((group, feed), 0) + count

    def observe(self, group: str, seconds: float) -> None:
        """One handler call took `seconds`."""
        self._latency.setdefault(group, _Histogram()).observe(seconds)

    def stream_sampled(
        self, group: str, stream: str, feed: str, lag: int | None, pending: int
    ) -> None:
        self._streams[(group, stream)] = (feed, lag, pending)

    def value(self, name: str, **labels: str) -> float | None:
        """A counter's or gauge's current value (summed over the labels not given), None when
        it has no such series: for tests and for code that watches a consumer."""
        name = name.removeprefix(_PREFIX)
        total: float | None = None
        for key, number in self._series(name).items():
            names = _LABELS[name]
            if all(dict(zip(names, key, strict=True)).get(k) == v for k, v in labels.items()):
                total = (total or 0) + number
        return total

    def render(self) -> str:
        """Every series in Prometheus' text exposition format (version 0.0.4)."""
        out: list[str] = []
        for name in self._counters:
            out.append(_header(name, "counter"))
            out.extend(_line(name, _LABELS[name], key, v) for key, v in self._series(name).items())
        for name in ("lag_events", "pending_events"):
            out.append(_header(name, "gauge"))
            out.extend(_line(name, _LABELS[name], key, v) for key, v in self._series(name).items())
        out.append(_header("handler_seconds", "histogram"))
        for group, histogram in sorted(self._latency.items()):
            cumulative = 0
            for bound, count in zip(HANDLER_BUCKETS, histogram.counts, strict=True):
                cumulative += count
                le = ("group", "le")
                out.append(_line("handler_seconds_bucket", le, (group, repr(bound)), cumulative))
            inf = (group, "+Inf")
            out.append(_line("handler_seconds_bucket", ("group", "le"), inf, histogram.total))
            out.append(_line("handler_seconds_sum", ("group",), (group,), histogram.sum))
            out.append(_line("handler_seconds_count", ("group",), (group,), histogram.total))
        return "".join(out)

    def _count(self, name: str, group: str, events: Iterable[Event]) -> None:
        series = self._counters[name]
        for event in events:
            series[(group, event.feed)] = series.get((group, event.feed), 0) + 1

    def _series(self, name: str) -> dict[tuple[str, ...], float]:
        if name in self._counters:
            return dict(sorted(self._counters[name].items()))
        if name not in ("lag_events", "pending_events"):
            raise KeyError(f"no series {_PREFIX}{name}")
        summed: dict[tuple[str, ...], float] = {}
        for (group, _), (feed, lag, pending) in sorted(self._streams.items()):
            value = pending if name == "pending_events" else lag
            if value is not None:  # a lag Redis cannot tell is left out, not written as 0
                summed[(group, feed)] = summed.get((group, feed), 0) + value
        return summed


_LABELS: dict[str, tuple[str, ...]] = {
    "events_handled_total": ("group", "feed"),
    "events_failed_total": ("group", "feed"),
    "events_dead_lettered_total": ("group", "feed", "reason"),
    "events_missed_total": ("group", "feed"),
    "lag_events": ("group", "feed"),
    "pending_events": ("group", "feed"),
}


def _header(name: str, kind: str) -> str:
    return f"# HELP {_PREFIX}{name} {_HELP[name]}\n# TYPE {_PREFIX}{name} {kind}\n"


def _line(name: str, names: tuple[str, ...], key: tuple[str, ...], value: float) -> str:
    labels = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, key, strict=True))
    return f"{_PREFIX}{name}{{{labels}}} {_number(value)}\n"


def _escape(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer()):
        return str(int(value))
    return repr(value) if math.isfinite(value) else "NaN"


async def sample_lag(
    redis: RedisClient, group: str, streams: Mapping[str, str], metrics: ConsumerMetrics
) -> None:
    """Note the group's lag and pending count on each of `streams` (stream -> feed). A Redis
    that cannot answer now leaves the last sample in place: reading goes on regardless."""
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xinfo_groups(stream)
            replies = await pipe.execute(raise_on_error=False)
    except RedisError:
        return
    for (stream, feed), groups in zip(streams.items(), replies, strict=True):
        for info in groups if isinstance(groups, list) else []:
            if _field(info, "name") == group:
                lag = info.get("lag")
                pending = int(info.get("pending") or 0)
                metrics.stream_sampled(
                    group, stream, feed, None if lag is None else int(lag), pending
                )


def _field(info: Any, name: str) -> str:
    value = info.get(name, b"") if isinstance(info, dict) else b""
    return text(value) if isinstance(value, bytes | str) else ""
