"""A minimal HTTP/1.1 server for the ops port, built to survive hostile or careless clients.

aiohttp's server has no deadline for reading a request's headers, so a client that connects and
sends nothing (or a byte at a time) holds a file descriptor forever; a few hundred of them
exhaust the daemon's fds and stop its polling. This server serves GET only, with:

- a deadline for each request's headers (`header_timeout`), and for the next request on a
  kept-alive connection (`idle_timeout`); a client that misses it is disconnected;
- a cap on open connections (`max_connections`); beyond it, up to a hard cap kept well inside
  the process' file descriptor limit, a connection must send its request head within
  `OVERFLOW_HEAD_TIMEOUT_S` (a probe sends it with the connection, a slow client cannot) and is
  not kept alive; beyond the hard cap it is closed at once. So silent clients hold at most
  `max_connections` descriptors for long, cannot lock out a probe, and never exhaust the
  descriptors the daemon needs for polling;
- a cap on the header size (8 KiB) and no request bodies;
- a deadline for writing the response, so a client that does not read cannot hold it either,
  and a cap on the bytes of responses being written at once (`MAX_WRITING_BYTES`), so that
  clients asking for a large /metrics and not reading it cannot take the daemon's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import structlog

log = structlog.get_logger("syncd.opshttp")

MAX_HEAD_BYTES = 8192
# Beyond max_connections: the time a connection has to deliver its request head. Counted from
# when its handler first runs, so a busy event loop does not eat into it.
OVERFLOW_HEAD_TIMEOUT_S = 0.1
# The hard cap: this many times max_connections, but at most this share of RLIMIT_NOFILE.
OVERFLOW_FACTOR = 4
NOFILE_SHARE = 0.5
# asyncio accepts up to `backlog` connections per wake-up before any handler runs (and so before
# the cap is applied): a small batch bounds the descriptors a burst takes beyond the hard cap.
# The kernel's queue of connections waiting to be accepted is then made deeper again.
ACCEPT_BATCH = 32
LISTEN_QUEUE = 1024


def _deepen_backlog(server: asyncio.Server) -> None:
    for transport_socket in server.sockets:
        # A duplicate descriptor of the same socket: listen() on it sets the socket's queue.
        with socket.socket(fileno=os.dup(transport_socket.fileno())) as sock:
            sock.listen(LISTEN_QUEUE)


REFUSED_LOG_EVERY_S = 60.0
# Response bytes being written at once, across connections: beyond it a response (unless it is
# the only one) becomes a 503. /metrics of thousands of tenants is megabytes; clients that ask
# for it and do not read would otherwise each hold a copy, and a hundred of them the daemon's
# whole MemoryMax.
MAX_WRITING_BYTES = 32 * 1024 * 1024
WRITE_CHUNK_BYTES = 256 * 1024
SMALL_RESPONSE_BYTES = 64 * 1024
BUSY_BODY = b'{"error":"busy: too many large responses being written, retry"}'

REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased


@dataclass(slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]


class BadRequest(Exception):
    """The request head cannot be served; args[0] is the HTTP status."""


def parse_head(head: bytes) -> tuple[Request, bool]:
    """The request in a head (up to the blank line), and whether to keep the connection open."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise BadRequest(400) from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(400)
    method, target, version = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest(400)
        headers[name.lower()] = value.strip()
    if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
        raise BadRequest(400)  # GET only: a body would be left unread in the stream
    connection = headers.get("connection", "").lower()
    keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
    path = target.split("?", 1)[0]
    return Request(method, path, headers), keep


def render_head(response: Response, keep_alive: bool) -> bytes:
    head = [
        f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
        f"Content-Type: {response.content_type}",
        f"Content-Length: {len(response.body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        "Cache-Control: no-store",
    ]
    head += [f"{k}: {v}" for k, v in response.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def render(response: Response, keep_alive: bool) -> bytes:
    return render_head(response, keep_alive) + response.body


class HttpServer:
    """Serves `handler` on a TCP address or a unix socket path."""

    def __init__(
        self,
        handler: Handler,
        *,
        header_timeout: float,
        idle_timeout: float,
        max_connections: int,
    ) -> None:
        self.handler = handler
        self.header_timeout = header_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        budget = int(soft * NOFILE_SHARE) if soft != resource.RLIM_INFINITY else 1 << 20
        self.hard_cap = max(max_connections, min(OVERFLOW_FACTOR * max_connections, budget))
        self.open = 0
        self.refused = 0
        self.timed_out = 0
        self.writing = 0  # bytes of responses being written now
        self.busy = 0  # responses refused for MAX_WRITING_BYTES
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._refused_logged = 0.0
        self._refused_at_log = 0

    async def start_tcp(self, host: str | None, port: int) -> int:
        self._server = await asyncio.start_server(
            self._serve, host, port, limit=MAX_HEAD_BYTES, reuse_address=True, backlog=ACCEPT_BATCH
        )
        _deepen_backlog(self._server)
        return int(self._server.sockets[0].getsockname()[1])

    async def start_unix(self, path: str) -> None:
        # A socket file left by an earlier run would make bind fail; anything else is not ours.
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)
        self._server = await asyncio.start_unix_server(
            self._serve, path, limit=MAX_HEAD_BYTES, backlog=ACCEPT_BATCH
        )
        _deepen_backlog(self._server)
        # Owner and group: put the scraper in the service's group to let it in.
        os.chmod(path, 0o660)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                await server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= self.hard_cap:
            self.refused += 1
            self._log_refused()
            writer.transport.abort()
            return
        self.open += 1
        self._writers.add(writer)
        try:
            await self._requests(reader, writer, overflow=self.open > self.max_connections)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            self._writers.discard(writer)
            writer.transport.abort()

    async def _requests(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, overflow: bool
    ) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        deadline = OVERFLOW_HEAD_TIMEOUT_S if overflow else self.header_timeout
        while True:
            try:
                async with asyncio.timeout(deadline):
                    head = await reader.readuntil(b"\r\n\r\n")
            except TimeoutError:
                self.timed_out += 1
                return
            except asyncio.LimitOverrunError:
                await self._write(writer, Response(431, b'{"error":"headers too large"}'), False)
                return
            try:
                request, keep = parse_head(head[:-4])
            except BadRequest as exc:
                await self._write(writer, Response(exc.args[0], b'{"error":"bad request"}'), False)
                return
            keep = keep and not overflow
            if request.method != "GET":
                response = Response(405, b'{"error":"GET only"}', headers={"Allow": "GET"})
            else:
                response = await self.handler(request)
            if not await self._write(writer, response, keep) or not keep:
                return
            # The next request may wait for the idle timeout, then gets the header deadline.
            deadline = self.idle_timeout + self.header_timeout

    async def _write(self, writer: asyncio.StreamWriter, response: Response, keep: bool) -> bool:
        size = len(response.body)
        large = size > SMALL_RESPONSE_BYTES  # probes' answers always go out
        if large and self.writing and self.writing + size > MAX_WRITING_BYTES:
            self.busy += 1
            response = Response(503, BUSY_BODY, headers={"Retry-After": "1"})
            size, keep = len(response.body), False
        self.writing += size
        try:
            async with asyncio.timeout(self.idle_timeout):
                # The head with the start of the body (a small answer in one segment), the rest
                # in chunks, each once the previous one is on its way: the transport keeps a copy
                # of what it has not sent yet, so a whole body would be held twice.
                body = memoryview(response.body)
                writer.write(render_head(response, keep) + body[:WRITE_CHUNK_BYTES])
                await writer.drain()
                for start in range(WRITE_CHUNK_BYTES, size, WRITE_CHUNK_BYTES):
                    writer.write(body[start : start + WRITE_CHUNK_BYTES])
                    await writer.drain()
        except TimeoutError:
            self.timed_out += 1
            return False
        finally:
            self.writing -= size
        return True

    def _log_refused(self) -> None:
        now = time.monotonic()
        if now - self._refused_logged >= REFUSED_LOG_EVERY_S:
            log.warning(
                "ops_connections_refused",
                refused=self.refused - self._refused_at_log,
                max_connections=self.max_connections,
            )
            self._refused_logged, self._refused_at_log = now, self.refused
