"""Retention: Redis network output of one retention check, by the length limit `max_len`.

A stream holds `max_len + 100` events (`--data-bytes` of JSON each, 900 by default: about what
the review measured per event), a consumer group has read and acknowledged all of them, and one
check trims the 100 oldest. Reported, per `max_len`, is Redis' `total_net_output_bytes` across
the check (`INFO stats` before and after, less the INFO reply itself):

- `previous`: the way retention used to find the length cut, `XREVRANGE COUNT max_len` (the
  whole retained stream sent to syncd), then XTRIM. Its reply is read and discarded from a raw
  socket, so that the benchmark itself does not need gigabytes to hold it.
- `current`: `stream_state` + `trim` of `syncd.engine.upkeep`, as the daemon runs them.

    .venv/bin/python -m bench.retention [--max-len 50000 1000000] [--data-bytes 900]

Target: the current check sends no more than a few kB, whatever `max_len`.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from typing import Any

import redis
import redis.asyncio as aioredis

from bench import common
from syncd.engine import upkeep
from syncd.keys import Keys

STREAM = Keys("st", 1).stream("crm.customers")
TRIMMED = 100

# Fill the stream inside Redis: a million XADDs from Python would take longer than the check.
_FILL_LUA = """
for i = 1, tonumber(ARGV[1]) do
  redis.call('XADD', KEYS[1], '*', 'op', 'created', 'key', tostring(i), 'data', ARGV[2],
             'modified_on', '2024-05-01T12:00:00Z')
end
return redis.call('XLEN', KEYS[1])
"""


def _output(client: redis.Redis) -> int:
    return int(client.info("stats")["total_net_output_bytes"])


def _info_reply_bytes(client: redis.Redis) -> int:
    """Bytes one `INFO stats` reply adds to the counter (measured, to subtract it)."""
    first = _output(client)
    second = _output(client)
    return second - first


def fill(client: redis.Redis, count: int, data_bytes: int) -> None:
    client.delete(STREAM)
    data = '{"id":1,"name":"' + "x" * max(0, data_bytes - 20) + '"}'
    script = client.register_script(_FILL_LUA)
    left = count
    while left:
        step = min(left, 20_000)
        script(keys=[STREAM], args=[step, data])
        left -= step
    last = client.xrevrange(STREAM, count=1)[0][0]
    client.xgroup_create(STREAM, "g", id=last)  # read and acknowledged everything


def _command(*args: str) -> bytes:
    out = f"*{len(args)}\r\n".encode()
    for a in args:
        out += f"${len(a.encode())}\r\n{a}\r\n".encode()
    return out


def previous_check(port: int, max_len: int, cut: bytes) -> int:
    """The former check: XREVRANGE COUNT max_len (reply discarded as it arrives), then XTRIM
    at the oldest id that reply held (`cut`, looked up beforehand). Returns entries removed."""
    with socket.create_connection(("127.0.0.1", port), timeout=300) as s:
        s.sendall(_command("XREVRANGE", STREAM, "+", "-", "COUNT", str(max_len)))
        s.sendall(_command("XTRIM", STREAM, "MINID", cut.decode()))
        s.sendall(_command("PING"))
        tail = b""
        while not tail.endswith(b"+PONG\r\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                raise RuntimeError("connection closed during XREVRANGE")
            tail = (tail + chunk)[-64:]
    return TRIMMED


async def current_check(url: str, max_len: int) -> int:
    r = aioredis.Redis.from_url(url)
    try:
        state = await upkeep.stream_state(r, STREAM, ["g"])
        result = await upkeep.trim(r, STREAM, state, configured=["g"], max_len=max_len, max_age=0)
        return result.removed
    finally:
        await r.aclose()


def measure(server: Any, client: redis.Redis, max_len: int, data_bytes: int) -> dict[str, Any]:
    figures: dict[str, Any] = {"max_len": max_len, "entries": max_len + TRIMMED}
    for method in ("previous", "current"):
        common.log(f"max_len={max_len:,}: filling {max_len + TRIMMED:,} entries")
        fill(client, max_len + TRIMMED, data_bytes)
        cut = client.xrange(STREAM, count=TRIMMED + 1)[-1][0]
        info = _info_reply_bytes(client)
        before = _output(client)
        started = time.perf_counter()
        if method == "previous":
            removed = previous_check(server.port, max_len, cut)
        else:
            removed = asyncio.run(current_check(server.url, max_len))
        seconds = time.perf_counter() - started
        sent = _output(client) - before - info
        figures[method] = {"bytes_sent": sent, "removed": removed, "seconds": round(seconds, 3)}
        common.log(f"  {method}: {sent:,} bytes sent, {removed} removed, {seconds:.2f}s")
        if method == "previous":
            removed = max_len + TRIMMED - int(client.xlen(STREAM))
            figures[method]["removed"] = removed
        client.delete(STREAM)
    return figures


def run(max_lens: list[int], data_bytes: int) -> dict[str, Any]:
    """Measure each `max_len`; writes and returns the figures."""
    with common.redis_server() as server:
        client = common.redis_client(server)
        version = common.redis_version(client)
        runs = [measure(server, client, n, data_bytes) for n in max_lens]
        client.close()
    figures = {"data_bytes": data_bytes, "trimmed_per_check": TRIMMED, "runs": runs}
    path = common.write_result("retention", figures, version)
    for one in runs:
        print(
            f"max_len {one['max_len']:>9,}: previous {one['previous']['bytes_sent']:>13,} B, "
            f"current {one['current']['bytes_sent']:>7,} B per check"
        )
    print(f"results: {path}")
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-len", type=int, nargs="+", default=[50_000, 1_000_000])
    parser.add_argument("--data-bytes", type=int, default=900)
    args = parser.parse_args(argv)
    run(args.max_len, args.data_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
