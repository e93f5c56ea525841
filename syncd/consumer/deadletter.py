"""Dead-lettering: copy an entry the consumer will not deliver (poison, malformed) to its
tenant's dead stream, with why and where it came from, and acknowledge it, in one script.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from redis.exceptions import ResponseError

from syncd.consumer.events import StreamRef

log = structlog.get_logger("syncd.consumer")

# Copy first, acknowledge second, in one script: an error in XADD stops the script, so an entry
# is never acknowledged without its copy, and a crash cannot leave a copy of a still-pending
# entry (which would be dead-lettered twice). An entry no longer pending was already copied
# (or acknowledged by someone): a retried script does nothing. Both keys share the tenant's
# hash slot. KEYS: event stream, dead stream. ARGV: group, entry id, field, value, ...
DEAD_LETTER_LUA = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
return redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
"""

Script = Callable[..., Awaitable[Any]]
"""`DEAD_LETTER_LUA` registered on a client (`redis.register_script`)."""


async def bury(
    script: Script,
    stream: str,
    ref: StreamRef,
    entry_id: str,
    fields: dict[str, bytes],
    *,
    group: str,
    consumer: str,
    reason: str,
    deliveries: int,
    detail: str = "",
) -> None:
    """Dead-letter one pending entry of `stream` (`ref` is that stream's parsed name).

    The copy holds the entry's fields and, over any of the same name, `feed`, `reason`,
    `stream`, `entry_id`, `group`, `consumer`, `deliveries` and `detail` (when given).
    """
    meta: dict[str, str | bytes] = {
        "feed": ref.feed,
        "reason": reason,
        "stream": stream,
        "entry_id": entry_id,
        "group": group,
        "consumer": consumer,
        "deliveries": str(deliveries),
    }
    if detail:
        meta["detail"] = detail
    payload = {**{k: v for k, v in fields.items() if k not in meta}, **meta}
    args: list[str | bytes] = [group, entry_id]
    for name, value in payload.items():
        args.extend((name, value))
    try:
        await script(keys=[stream, ref.dead], args=args)
    except ResponseError as exc:
        # Left pending: it is taken over and tried again after claim_idle_ms.
        log.error("consumer_dead_letter_failed", stream=stream, entry_id=entry_id, error=str(exc))
        return
    log.warning(
        "consumer_dead_lettered",
        stream=stream,
        entry_id=entry_id,
        group=group,
        reason=reason,
        deliveries=deliveries,
    )
