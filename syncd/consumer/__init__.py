"""The downstream side: the consumer library, its pure delivery decisions, the event model and
`syncd tail`.

This package is syncd's stable public API for consumer authors: the names below keep their
meaning within a major version (see CHANGELOG.md), and `from syncd.consumer import Consumer,
Event` works as the README shows. The modules inside (`consumer`, `capped`, `deadletter`,
`delivery`, `each`, `events`, `held`, `keyed`, `loop`, `metrics`, `signals`, `stopping`,
`tail`, ...) are not part of that promise.

May use `syncd.redis`, `syncd.keys`, `syncd.catalogue`, `syncd.instants` and `syncd.lines`;
knows nothing of the engine, the fleet, ServiceTitan or the ops server.
"""

from syncd.consumer.consumer import Consumer, Start
from syncd.consumer.delivery import entry_order, is_newer_or_same
from syncd.consumer.each import EventHandler
from syncd.consumer.events import Event, Failed, MalformedEvent, Subscription, parse_stream_reply
from syncd.consumer.loop import Handler
from syncd.consumer.metrics import ConsumerMetrics
from syncd.consumer.signals import run_until_signal

__all__ = [
    "Consumer",
    "ConsumerMetrics",
    "Event",
    "EventHandler",
    "Failed",
    "Handler",
    "MalformedEvent",
    "Start",
    "Subscription",
    "entry_order",
    "is_newer_or_same",
    "parse_stream_reply",
    "run_until_signal",
]
