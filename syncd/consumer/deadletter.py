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
# (or acknowledged by someone): a retried script does nothing. An entry of a replay stream is
# deleted once acknowledged (see `syncd.consumer.replay`). Both keys share the tenant's hash
# slot. KEYS: the stream the entry is pending in, dead stream. ARGV: group, entry id, "1" to
# delete it, field, value, ...
DEAD_LETTER_LUA = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then
  return 0
end
redis.call('XADD', KEYS[2], '*', unpack(ARGV, 4))
local acked = redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if ARGV[3] == '1' then
  redis.call('XDEL', KEYS[1], ARGV[2])
end
return acked
"""

Script = Callable[..., Awaitable[Any]]
"""A Lua script registered on a client (`redis.register_script`)."""

BURIAL_FIELDS = frozenset(
    {"feed", "reason", "stream", "entry_id", "group", "consumer", "deliveries", "detail", "replays"}
)
"""What a consumer's dead letter carries beside the event's own fields (`replays` once
`syncd dead replay` handed it back)."""


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
    replayed: tuple[str, str] | None = None,
) -> bool:
    """Dead-letter one pending entry of `stream` (`ref` is that stream's parsed name), or
    with `replayed`, the (replay stream, entry id) in which it was handed back to the group:
    that entry is the one acknowledged (and deleted), the copy names `stream` and `entry_id`.

    The copy holds `fields` and, over any of the same name, `feed`, `reason`, `stream`,
    `entry_id`, `group`, `consumer`, `deliveries` and `detail` (when given). Returns whether
    this call copied it (not when it was no longer pending, nor when the script failed).
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
    pending, pending_id = replayed or (stream, entry_id)
    args: list[str | bytes] = [group, pending_id, "1" if replayed else "0"]
    for name, value in payload.items():
        args.extend((name, value))
    try:
        acked = await script(keys=[pending, ref.dead], args=args)
    except ResponseError as exc:
        # Left pending: it is taken over and tried again after claim_idle_ms.
        log.error("consumer_dead_letter_failed", stream=stream, entry_id=entry_id, error=str(exc))
        return False
    log.warning(
        "consumer_dead_lettered",
        stream=stream,
        entry_id=entry_id,
        group=group,
        reason=reason,
        deliveries=deliveries,
        **({"replay_id": pending_id} if replayed else {}),
    )
    return bool(acked)
