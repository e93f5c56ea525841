"""Running a consumer until SIGTERM or SIGINT, the way a consumer service lives under systemd,
Kubernetes or a terminal: the first signal stops it gracefully (`Consumer.stop` with the
grace period), a second one cuts the grace short.

The signal handlers only ask for the stop; the loop running the consumer does the rest.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Sequence

import structlog

from syncd.consumer.consumer import Consumer
from syncd.consumer.each import EventHandler
from syncd.consumer.loop import Handler

log = structlog.get_logger("syncd.consumer")


async def run_until_signal(
    consumer: Consumer,
    handler: Handler | None = None,
    *,
    each: EventHandler | None = None,
    grace: float = 30.0,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
) -> signal.Signals | None:
    """Run `consumer` until one of `signals` arrives, then stop it gracefully; returns the
    signal (None when it ended otherwise: `close()`, `stop()`).

    Pass `handler` (batches: `Consumer.run`) or `each` (one event per call, up to the
    consumer's `concurrency` at once: `Consumer.run_each`). The consumer is entered (its groups
    created) and closed here. On the first signal reading stops at once, handler calls in
    flight get `grace` seconds to finish, and those still running then are cancelled, their
    events left pending (they come back after `claim_idle_ms`). A second signal cancels them
    at once. Installs its handlers on the running event loop (so: in the main thread) and
    removes them on its way out.
    """
    if (handler is None) == (each is None):
        raise TypeError("run_until_signal needs a handler or each=, not both or neither")
    loop = asyncio.get_running_loop()
    received: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig)
        first = len(received) == 1
        consumer.stopping.request(grace if first else 0)
        log.warning(
            "consumer_signal",
            signal=sig.name,
            group=consumer.group,
            consumer=consumer.consumer,
            effect=f"stopping; calls in flight get {grace}s" if first else "cancelling calls now",
        )

    for sig in signals:
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with consumer:
            if each is not None:
                await consumer.run_each(each)
            elif handler is not None:
                await consumer.run(handler)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
    return received[0] if received else None
