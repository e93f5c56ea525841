"""`ConsumerMetrics`: the text Prometheus reads (checked by prometheus_client's own parser), and
counts that match what a consumer did against a real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families

from syncd.consumer import Consumer, ConsumerMetrics, Event, Failed
from syncd.consumer.metrics import HANDLER_BUCKETS
from tests.test_consumer import CUSTOMERS, JOBS, KEYS, publish
from tests.test_consumer_faults import until


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, parsed as Prometheus does: (name, labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def event(feed: str = "crm.customers", key: str = "1") -> Event:
    return Event(
        stream=KEYS.stream(feed),
        id="1-0",
        tenant=KEYS.tenant,
        feed=feed,
        op="created",
        key=key,
        data=b"{}",
        modified_on=None,
        deliveries=1,
    )


def test_rendering() -> None:
    metrics = ConsumerMetrics()
    metrics.handled("billing", [event(), event(), event("jpm.jobs")])
    metrics.failed('odd "group"\\\n', [event()])
    metrics.dead_lettered("billing", "crm.customers", "max_deliveries")
    metrics.stream_sampled("billing", CUSTOMERS, "crm.customers", lag=4, pending=2)
    metrics.stream_sampled("billing", KEYS.stream("crm.locations"), "crm.locations", None, 1)
    for seconds in (0.003, 0.2, 0.2, 120.0):
        metrics.observe("billing", seconds)

    text = metrics.render()
    got = samples(text)
    billing = ("group", "billing")
    customers = (("feed", "crm.customers"), billing)
    assert got[("syncd_consumer_events_handled_total", customers)] == 2
    assert got[("syncd_consumer_events_handled_total", (("feed", "jpm.jobs"), billing))] == 1
    odd = (("feed", "crm.customers"), ("group", 'odd "group"\\\n'))
    assert got[("syncd_consumer_events_failed_total", odd)] == 1
    dead = (("feed", "crm.customers"), billing, ("reason", "max_deliveries"))
    assert got[("syncd_consumer_events_dead_lettered_total", dead)] == 1
    assert got[("syncd_consumer_lag_events", customers)] == 4
    assert got[("syncd_consumer_pending_events", customers)] == 2
    # A lag Redis could not tell is left out rather than written as 0.
    locations = (("feed", "crm.locations"), billing)
    assert ("syncd_consumer_lag_events", locations) not in got
    assert got[("syncd_consumer_pending_events", locations)] == 1
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in got.items()
        if name == "syncd_consumer_handler_seconds_bucket"
    }
    assert buckets["0.005"] == 1
    assert buckets["0.25"] == 3
    assert buckets["60.0"] == 3
    assert buckets["+Inf"] == 4
    assert len(buckets) == len(HANDLER_BUCKETS) + 1
    assert got[("syncd_consumer_handler_seconds_count", (billing,))] == 4
    assert got[("syncd_consumer_handler_seconds_sum", (billing,))] == pytest.approx(120.403)
    assert "# TYPE syncd_consumer_handler_seconds histogram" in text
    assert metrics.value("syncd_consumer_events_handled_total") == 3
    assert metrics.value("events_handled_total", feed="jpm.jobs") == 1
    assert metrics.value("syncd_consumer_events_failed_total", group="billing") is None


def test_nothing_yet_is_still_valid_text() -> None:
    text = ConsumerMetrics().render()
    assert {f.name for f in text_string_to_metric_families(text)} == {
        "syncd_consumer_events_handled",
        "syncd_consumer_events_failed",
        "syncd_consumer_events_dead_lettered",
        "syncd_consumer_events_missed",
        "syncd_consumer_lag_events",
        "syncd_consumer_pending_events",
        "syncd_consumer_handler_seconds",
    }
    assert ConsumerMetrics.content_type.startswith("text/plain; version=0.0.4")


def make(client: aioredis.Redis, metrics: ConsumerMetrics, **options: Any) -> Consumer:
    options.setdefault("streams", [CUSTOMERS, JOBS])
    options.setdefault("block_ms", 50)
    return Consumer(client, "billing", "c1", metrics=metrics, **options)


async def test_run_counts_what_happened(redis: aioredis.Redis) -> None:
    for key in range(5):
        await publish(redis, CUSTOMERS, key)
    poison = await publish(redis, JOBS, 9)
    metrics = ConsumerMetrics(lag_interval=0.05)
    calls = 0

    async def handler(batch: list[Event]) -> list[Failed]:
        nonlocal calls
        calls += 1
        return [Failed(e, "refused") for e in batch if (e.stream, e.id) == (JOBS, poison)]

    consumer = make(redis, metrics, claim_idle_ms=100, max_deliveries=2)
    stop = asyncio.Event()
    await consumer.ensure_groups()
    task = asyncio.create_task(consumer.run(handler, stop=stop))
    await until(lambda: metrics.value("events_dead_lettered_total") == 1, "the poison buried")
    await until(lambda: metrics.value("lag_events") == 0, "the lag sampled after reading")
    await until(lambda: metrics.value("pending_events") == 0, "nothing pending")
    stop.set()
    await asyncio.wait_for(task, 30)

    assert metrics.value("events_handled_total", feed="crm.customers") == 5
    assert metrics.value("events_handled_total", feed="jpm.jobs") is None
    assert metrics.value("events_failed_total", feed="jpm.jobs") == 2  # one per delivery
    assert metrics.value("events_dead_lettered_total", reason="max_deliveries") == 1
    got = samples(metrics.render())
    assert got[("syncd_consumer_handler_seconds_count", (("group", "billing"),))] == calls


async def test_the_first_sample_sees_the_lag(redis: aioredis.Redis) -> None:
    for key in range(5):
        await publish(redis, CUSTOMERS, key)
    metrics = ConsumerMetrics(lag_interval=60)
    consumer = make(redis, metrics)
    await consumer.ensure_groups()
    events = await consumer.read()
    assert len(events) == 5
    assert metrics.value("lag_events", feed="crm.customers") == 5  # sampled before the read
    assert metrics.value("pending_events") == 0
    await consumer.read()  # within lag_interval: no new sample
    assert metrics.value("lag_events", feed="crm.customers") == 5


async def test_run_each_counts_and_times_each_call(redis: aioredis.Redis) -> None:
    for key in range(6):
        await publish(redis, CUSTOMERS, key)
    metrics = ConsumerMetrics()
    seen: list[str] = []

    async def handle(event: Event) -> None:
        seen.append(event.key)
        if event.key == "3" and event.deliveries == 1:
            raise RuntimeError("once")

    consumer = make(redis, metrics, concurrency=3, claim_idle_ms=100)
    task = asyncio.create_task(consumer.run_each(handle))
    await until(lambda: metrics.value("events_handled_total") == 6, "every event handled")
    await consumer.stop()
    await task
    assert metrics.value("events_failed_total") == 1
    got = samples(metrics.render())
    assert got[("syncd_consumer_handler_seconds_count", (("group", "billing"),))] == len(seen) == 7


def test_lag_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="lag_interval"):
        ConsumerMetrics(lag_interval=0)
