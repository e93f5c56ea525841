"""`syncd tail`: print a tenant's change events as they arrive, as JSON lines (`json`) or as
readable lines cut to the terminal's width (`text`, also the demo's view).

Without a group, tail only watches (XREAD) and changes nothing in Redis. With a group it joins
that consumer group under its own consumer name and acknowledges each event once its line was
written and flushed to the output, which is how an operator drains or inspects a group by hand.

When the output is a pipe whose reader went away (`| head`), tail stops at once and quietly:
events it read but could not write stay pending in the group. What a pipe's buffer held but its
reader never read cannot be known: `limit` (`--count N`) takes and acknowledges exactly N, in
all streams together, and leaves nothing pending. An output that fails otherwise (a full disk,
a closed descriptor) stops tail with `OutputFailed`; what was not written is not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import os
import select
import socket
from collections.abc import Callable
from typing import Any, Literal, TextIO

import msgspec
import structlog
from redis.typing import KeyT, StreamIdT

from syncd.consumer import Consumer, Event, MalformedEvent, Subscription, parse_stream_reply
from syncd.lines import clean, fit, terminal_width
from syncd.redis.conn import RedisClient

log = structlog.get_logger("syncd.tail")

# Short blocking reads keep tail responsive to `stop` (Ctrl-C) without cancelling a read,
# which with a group could leave delivered entries unseen until they are taken over.
_BLOCK_MS = 500
_BATCH = 100
_SUMMARY_CHARS = 100
_VALUE_CHARS = 40
_PIPE_CHECK_S = 0.1

Format = Literal["text", "json"]
Render = Callable[[Event], str]


class OutputFailed(Exception):
    """The output refused a line for another reason than its reader going away."""

    def __init__(self, error: OSError | ValueError, written: int) -> None:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        super().__init__(f"cannot write to the output: {reason} (after {written} events)")
        self.error = error
        self.written = written


async def tail(
    redis: RedisClient,
    *,
    prefix: str,
    tenant: int,
    feeds: list[str] | None,
    group: str | None,
    from_start: bool,
    out: TextIO,
    fmt: Format,
    stop: asyncio.Event,
    limit: int | None = None,
    width: int | None = None,
) -> int:
    """Print the tenant's events (all catalogue feeds when `feeds` is empty) until stop or limit.

    `from_start` reads each stream from its beginning; otherwise only events added from now on.
    With `group`, `from_start` only applies when the group does not exist yet: an existing group
    goes on from its own position. `fmt="text"` cuts lines to `width` characters (None: the
    terminal's width, read anew for each line). Returns the number of events printed.
    """
    subscription = Subscription(tenant, feeds or None)
    render = _text_renderer(width) if fmt == "text" else render_json
    watcher = asyncio.create_task(_watch_output(out, stop))
    try:
        if group is None:
            return await _watch(redis, subscription, prefix, from_start, out, render, stop, limit)
        return await _consume(
            redis, subscription, prefix, group, from_start, out, render, stop, limit
        )
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher


def output_closed(out: TextIO) -> bool:
    """Whether `out` is a pipe (or socket) whose reading end is gone; False when unknowable."""
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    poller = select.poll()
    poller.register(fd, 0)  # POLLERR and POLLHUP are always reported
    return any(ev & (select.POLLERR | select.POLLHUP) for _, ev in poller.poll(0))


async def _watch_output(out: TextIO, stop: asyncio.Event) -> None:
    """Set `stop` as soon as the reader of `out` goes away, without waiting for an event."""
    while not stop.is_set():
        if output_closed(out):
            log.info("tail_output_closed")
            stop.set()
            return
        await asyncio.sleep(_PIPE_CHECK_S)


def _silence(out: TextIO) -> None:
    """Point `out`'s descriptor at /dev/null, so that flushing it at exit cannot fail again."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, out.fileno())
        os.close(devnull)


async def _watch(
    redis: RedisClient,
    subscription: Subscription,
    prefix: str,
    from_start: bool,
    out: TextIO,
    render: Render,
    stop: asyncio.Event,
    limit: int | None,
) -> int:
    streams = dict(zip(subscription.streams(prefix), subscription.feed_names(), strict=True))
    last: dict[KeyT, StreamIdT]
    if from_start:
        last = dict.fromkeys(streams, "0-0")
    else:
        # Pin "now" to each stream's last id once: passing "$" on every read would miss
        # whatever arrives between two reads.
        async with redis.pipeline(transaction=False) as pipe:
            for stream in streams:
                pipe.xrevrange(stream, count=1)
            newest = await pipe.execute()
        last = {
            stream: _text(entries[0][0]) if entries else "0-0"
            for stream, entries in zip(streams, newest, strict=True)
        }
    printed = 0
    while not stop.is_set() and (limit is None or printed < limit):
        count = _BATCH if limit is None else min(_BATCH, limit - printed)
        reply = await redis.xread(last, count=count, block=_BLOCK_MS)
        events: list[Event] = []
        for stream, entries in parse_stream_reply(reply):
            for entry_id, fields in entries:
                last[stream] = entry_id
                try:
                    events.append(
                        Event.from_entry(
                            stream,
                            entry_id,
                            fields,
                            tenant=subscription.tenant,
                            feed=streams[stream],
                            deliveries=0,
                        )
                    )
                except MalformedEvent as exc:
                    log.warning(
                        "tail_malformed_entry", stream=stream, entry_id=entry_id, error=str(exc)
                    )
        # Across feeds, entry ids are publication times: interleave them in that order.
        events.sort(key=lambda event: _id_order(event.id))
        if limit is not None:
            events = events[: limit - printed]
        written, error = _write(out, render, events)
        printed += written
        if error is not None:
            raise OutputFailed(error, printed)
        if written < len(events):
            break
    return printed


async def _consume(
    redis: RedisClient,
    subscription: Subscription,
    prefix: str,
    group: str,
    from_start: bool,
    out: TextIO,
    render: Render,
    stop: asyncio.Event,
    limit: int | None,
) -> int:
    consumer = Consumer(
        redis,
        group,
        f"tail-{socket.gethostname()}-{os.getpid()}",
        streams=subscription.streams(prefix),
        prefix=prefix,
        start="beginning" if from_start else "new",
        batch=_BATCH,
        block_ms=_BLOCK_MS,
    )
    printed = 0
    try:
        while not stop.is_set() and (limit is None or printed < limit):
            # With a limit, never more than what is still wanted, in all streams together.
            events = await consumer.read(None if limit is None else min(_BATCH, limit - printed))
            written, error = _write(out, render, events)
            await consumer.ack(*events[:written])
            printed += written
            if error is not None:
                raise OutputFailed(error, printed)
            if written < len(events):
                break  # the reader is gone: the rest stays pending for the group
    finally:
        await consumer.close()
    return printed


def _write(
    out: TextIO, render: Render, events: list[Event]
) -> tuple[int, OSError | ValueError | None]:
    """Write and flush one line per event. Returns how many lines reached the output (all of
    them, unless it failed) and, when it failed for another reason than its reader going
    away (a full disk, a closed descriptor), the error."""
    for written, event in enumerate(events):
        try:
            out.write(render(event) + "\n")
            out.flush()
        except BrokenPipeError:
            _silence(out)
            return written, None
        except (OSError, ValueError) as exc:  # ValueError: a closed file object
            _silence(out)
            return written, exc
    return len(events), None


def render_json(event: Event) -> str:
    """One JSON line; `data` is the record itself, embedded as sent whenever it is valid JSON."""
    line = {
        "stream": event.stream,
        "id": event.id,
        "tenant": event.tenant,
        "feed": event.feed,
        "op": event.op,
        "key": event.key,
        "modified_on": event.modified_on,
        "modified_at": event.modified_at,
        "data": _embeddable(event.data),
    }
    return msgspec.json.encode(line).decode()


def _embeddable(data: bytes) -> Any:
    try:
        record = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return data.decode("utf-8", "replace")
    # Newlines can only be whitespace between tokens, but they would break the one-line format.
    if b"\n" in data or b"\r" in data:
        return record
    return msgspec.Raw(data)


def _text_renderer(width: int | None) -> Render:
    def render(event: Event) -> str:
        return render_text(event, width or terminal_width())

    return render


def render_text(event: Event, width: int | None = None) -> str:
    """A readable line: publication time, id, tenant, feed, op, key and a summary of the record,
    the summary filling `width` characters and cut there with an ellipsis (without a width,
    cut at 100). Control characters are escaped: a record's text must not drive the terminal."""
    ms = int(event.id.partition("-")[0])
    when = dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    head = clean(f"{when} {event.id:<15} {event.tenant} {event.feed} {event.op:<7} {event.key}")
    if event.deleted:  # no record: gone upstream
        return head if width is None else fit(head, width)
    if width is None:
        return f"{head}  {summarize(event.data)}".rstrip()
    # The summary takes what the head leaves; a head wider than the terminal is cut too.
    room = max(1, width - len(head) - 2)
    return fit(f"{head}  {summarize(event.data, room)}".rstrip(), width)


def summarize(data: bytes, width: int = _SUMMARY_CHARS) -> str:
    """The record's top-level fields as `name=value`, control characters escaped, cut to
    `width` characters with an ellipsis."""
    try:
        record = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return fit(clean("<not JSON> " + data.decode("utf-8", "replace")), width)
    if not isinstance(record, dict):
        return fit(clean(msgspec.json.encode(record).decode()), width)
    parts = []
    for name, value in record.items():
        if value is None or name == "id":
            continue  # the key is already on the line; nulls say nothing
        if isinstance(value, dict):
            shown = "{...}"
        elif isinstance(value, list):
            shown = f"[{len(value)}]"
        else:
            shown = fit(msgspec.json.encode(value).decode(), _VALUE_CHARS)
        parts.append(f"{name}={shown}")
    return fit(clean(" ".join(parts)), width)


def _id_order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
