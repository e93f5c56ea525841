"""TCP proxies in front of real servers, whose line a test or the soak can cut: a network
partition for one client while the others still reach the server.

A cut proxy forwards nothing. By default established connections stay open but silent and new
ones are accepted and never answered (a black hole, as a dead link looks); `cut(close=True)`
closes the established ones instead (a reset). Restoring closes the connections the cut left
hanging (whatever was in flight is lost, as it would be), and new ones are forwarded again.

The sentinels name the primary by its real address, which a client would then reach directly;
a proxy in front of a sentinel therefore rewrites the `port` fields of its replies (`SENTINEL
MASTERS`, `SENTINEL REPLICAS`) and the address `GET-MASTER-ADDR-BY-NAME` returns, replacing
each Redis server's port by the port of its proxy (`port_rewriter`).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable

Rewrite = Callable[[bytes], bytes]


class _Link:
    """One client connection and, while not cut, its upstream connection."""

    def __init__(self, writer: asyncio.StreamWriter, cut: bool) -> None:
        self.writers = [writer]
        self.cut = cut

    def close(self) -> None:
        for w in self.writers:
            w.close()


class Proxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:target_port until cut()."""

    def __init__(self, target_port: int, rewrite: Rewrite | None = None) -> None:
        self.target_port = target_port
        self.rewrite = rewrite
        self.port = 0
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def cut(self, *, close: bool = False) -> None:
        """Forward nothing from now on; `close`: also close the established connections."""
        self.cut_off = True
        for link in list(self._links):
            link.cut = True
            if close:
                link.close()

    def restore(self) -> None:
        self.cut_off = False
        for link in [x for x in self._links if x.cut]:
            link.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self._links):
            link.close()
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = _Link(writer, self.cut_off)
        self._links.add(link)
        try:
            if link.cut:
                while await reader.read(65536):
                    pass  # hold the connection, answer nothing
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            link.writers.append(up_writer)
            await asyncio.gather(
                _pipe(reader, up_writer, link, None),
                _pipe(up_reader, writer, link, self.rewrite),
            )
        except (ConnectionError, OSError):
            pass
        finally:
            link.close()
            self._links.discard(link)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Link, rewrite: Rewrite | None
) -> None:
    buffer = b""
    try:
        while data := await reader.read(65536):
            if link.cut:
                continue  # a dead link drops everything
            if rewrite is None:
                writer.write(data)
            else:
                buffer += data
                done, buffer = split_replies(buffer)
                writer.write(b"".join(rewrite(r) for r in done))
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _value_end(buf: bytes, pos: int) -> int | None:
    """Where the RESP value starting at `pos` ends (exclusive); None while incomplete."""
    line_end = buf.find(b"\r\n", pos)
    if line_end < 0:
        return None
    kind = buf[pos : pos + 1]
    after = line_end + 2
    if kind in (b"$", b"=", b"!"):
        size = int(buf[pos + 1 : line_end])
        if size < 0:
            return after
        end = after + size + 2
        return end if len(buf) >= end else None
    if kind in (b"*", b"~", b">", b"%", b"|"):
        count = int(buf[pos + 1 : line_end])
        count *= 2 if kind in (b"%", b"|") else 1
        for _ in range(max(count, 0)):
            next_pos = _value_end(buf, after)
            if next_pos is None:
                return None
            after = next_pos
        return after
    return after  # simple string, error, integer and the other one-line types


def split_replies(buf: bytes) -> tuple[list[bytes], bytes]:
    """The complete top-level RESP values at the start of `buf`, and the rest."""
    out = []
    pos = 0
    while pos < len(buf):
        end = _value_end(buf, pos)
        if end is None:
            break
        out.append(buf[pos:end])
        pos = end
    return out, buf[pos:]


def port_rewriter(ports: dict[int, int]) -> Rewrite:
    """A reply rewrite replacing the Redis servers' ports (`ports`: real -> proxy) where a
    sentinel names them: after a `port` field, and in an [ip, port] address reply."""
    field = re.compile(rb"(\$4\r\nport\r\n)\$(\d+)\r\n(\d+)\r\n")
    address = re.compile(rb"\A(\*2\r\n\$\d+\r\n[^\r]*\r\n)\$(\d+)\r\n(\d+)\r\n\Z")

    def swap(m: re.Match[bytes]) -> bytes:
        port = ports.get(int(m.group(3)))
        if port is None:
            return m.group(0)
        text = str(port).encode()
        return m.group(1) + b"$%d\r\n%s\r\n" % (len(text), text)

    def rewrite(reply: bytes) -> bytes:
        return address.sub(swap, field.sub(swap, reply))

    return rewrite


@contextlib.asynccontextmanager
async def proxy(target_port: int, rewrite: Rewrite | None = None) -> AsyncIterator[Proxy]:
    """A started Proxy to 127.0.0.1:`target_port`, stopped on exit."""
    p = Proxy(target_port, rewrite)
    await p.start()
    try:
        yield p
    finally:
        await p.stop()
