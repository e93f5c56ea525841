"""The ops server against greedy and hostile clients: timeouts, the connection cap, the token,
readiness from background state, the unix socket, and the daemon's /readyz costing no Redis call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from syncd import config
from syncd.config import OpsConfig, Secret
from syncd.config.addresses import check_listen
from syncd.ops.http import MAX_WRITING_BYTES
from syncd.ops.metrics import Metrics
from syncd.ops.server import OpsServer
from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import DaemonProcess, config_dict
from tests.test_ops import FakeHealth

DEADLINE_S = 30.0


class CountingHealth(FakeHealth):
    def __init__(self) -> None:
        super().__init__()
        self.readiness_calls = 0

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        self.readiness_calls += 1
        return await super().readiness()


async def started(options: OpsConfig, health: FakeHealth, token: str | None = None) -> OpsServer:
    assert options.listen is not None
    srv = OpsServer(
        options.listen, Metrics(), health, options, Secret(token) if token is not None else None
    )
    await srv.start()
    return srv


# Concurrent requests stay below the server's connection cap (64), as a probe's would.
CLIENT_CONNECTIONS = 16


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS)
    async with aiohttp.ClientSession(connector=connector) as session:
        yield session


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)


async def closed_by_server(sock: socket.socket) -> bool:
    """Wait (in a thread) until the server closes `sock`: EOF or reset, without a response."""

    def read() -> bytes:
        try:
            return sock.recv(4096)
        except ConnectionResetError:
            return b""

    return await asyncio.to_thread(read) == b""


async def get_status(http: aiohttp.ClientSession, url: str, **kw: object) -> int:
    async with http.get(url, **kw) as resp:  # type: ignore[arg-type]
        await resp.read()
        return resp.status


async def test_silent_connection_is_closed_after_the_header_timeout() -> None:
    srv = await started(OpsConfig(listen="127.0.0.1:0", header_timeout=0.3), FakeHealth())
    try:
        with connect(srv.port) as sock:
            assert await closed_by_server(sock)
        assert srv.http.timed_out == 1
        assert srv.http.open == 0
    finally:
        await srv.stop()


async def test_byte_at_a_time_is_closed_after_the_header_timeout() -> None:
    srv = await started(OpsConfig(listen="127.0.0.1:0", header_timeout=0.5), FakeHealth())
    try:
        with connect(srv.port) as sock:
            request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 4000
            sent = 0
            loop = asyncio.get_running_loop()
            deadline = loop.time() + DEADLINE_S
            # Each byte arrives well within any per-read timeout; only a deadline for the whole
            # head stops this client.
            while srv.http.timed_out == 0:
                assert loop.time() < deadline, "the slow client was never disconnected"
                assert sent < len(request), "the whole trickle was accepted"
                try:
                    sock.send(request[sent : sent + 1])
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
                await asyncio.sleep(0.01)
            assert await closed_by_server(sock)
    finally:
        await srv.stop()


async def test_idle_keep_alive_connection_is_closed(http: aiohttp.ClientSession) -> None:
    options = OpsConfig(listen="127.0.0.1:0", idle_timeout=0.2, header_timeout=0.2)
    srv = await started(options, FakeHealth())
    try:
        with connect(srv.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            first = await asyncio.to_thread(sock.recv, 4096)
            assert first.startswith(b"HTTP/1.1 200 OK")
            assert b"Connection: keep-alive" in first
            # Then nothing more: the server hangs up after the idle (+ header) timeout.
            assert await closed_by_server(sock)
    finally:
        await srv.stop()


async def wait_open(srv: OpsServer, count: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while srv.http.open < count:
        assert loop.time() < deadline, f"{srv.http.open} connections open, expected {count}"
        await asyncio.sleep(0.01)


async def test_connections_beyond_the_cap_get_a_short_deadline_then_are_refused(
    http: aiohttp.ClientSession,
) -> None:
    cap = 5
    # Header timeout far beyond the test: only the cap's rules can close these connections.
    options = OpsConfig(listen="127.0.0.1:0", max_connections=cap, header_timeout=600)
    srv = await started(options, FakeHealth())
    hard = srv.http.hard_cap
    assert hard > cap
    socks: list[socket.socket] = []
    try:
        socks += [connect(srv.port) for _ in range(cap)]
        await wait_open(srv, cap)
        # Beyond the cap: a silent connection is closed after the short overflow deadline...
        with connect(srv.port) as late:
            assert await closed_by_server(late)
        assert srv.http.timed_out == 1
        # ...while a probe that sends its request with the connection is served.
        for _ in range(3):
            assert await get_status(http, f"http://127.0.0.1:{srv.port}/healthz") == 200
        # The silent ones within the cap are still held (until the header timeout).
        assert srv.http.open >= cap
        # Beyond the hard cap a connection is closed at once.
        socks += [connect(srv.port) for _ in range(hard - cap)]
        refused_before = srv.http.refused
        with connect(srv.port) as over:
            over.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                answer = await asyncio.to_thread(over.recv, 4096)
        # Refused at once, or served if the overflow ones timed out meanwhile: never held.
        assert answer == b"" or answer.startswith(b"HTTP/1.1 200")
        if answer == b"":
            assert srv.http.refused > refused_before
    finally:
        for s in socks:
            s.close()
        await srv.stop()


async def test_hard_cap_stays_within_the_file_descriptor_limit() -> None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    srv = await started(OpsConfig(listen="127.0.0.1:0", max_connections=100_000), FakeHealth())
    try:
        assert srv.http.hard_cap == 100_000  # never below the configured cap
    finally:
        await srv.stop()
    cap = OpsConfig().max_connections
    srv = await started(OpsConfig(listen="127.0.0.1:0"), FakeHealth())
    try:
        assert cap <= srv.http.hard_cap <= max(cap, soft // 2)
    finally:
        await srv.stop()


async def test_two_thousand_slow_connections_leave_healthz_answering(
    http: aiohttp.ClientSession,
) -> None:
    srv = await started(OpsConfig(listen="127.0.0.1:0"), FakeHealth())
    socks: list[socket.socket] = []
    try:
        for i in range(2000):
            sock = socket.socket()
            sock.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                sock.connect(("127.0.0.1", srv.port))
            socks.append(sock)
            if i % 100 == 0:
                await asyncio.sleep(0)  # let the server accept
        for _ in range(10):
            url = f"http://127.0.0.1:{srv.port}/healthz"
            assert await get_status(http, url) == 200
            await asyncio.sleep(0.01)
        assert srv.http.open <= srv.http.hard_cap
        assert srv.http.refused + srv.http.timed_out > 0
    finally:
        for s in socks:
            s.close()
        await srv.stop()


def rss() -> int:
    """This process' resident memory in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class CountingMetrics(Metrics):
    def __init__(self) -> None:
        # The full tenant x feed detail: the largest bodies /metrics can serve.
        super().__init__(detail="tenant_feed")
        self.renders = 0

    async def render_http(self, gzip_from: int | None) -> tuple[bytes, bool]:
        self.renders += 1
        return await super().render_http(gzip_from)


async def test_clients_not_reading_a_large_metrics_cannot_take_the_memory(
    http: aiohttp.ClientSession,
) -> None:
    """Thousands of tenants make megabytes of /metrics: clients asking for it and not reading
    held a rendered copy each (100 of them took 528 MB, past the unit's MemoryMax)."""
    metrics = CountingMetrics()
    for tenant in range(2000):
        for feed in range(10):
            metrics.page(tenant, f"feed.f{feed}", 10, 5, 5, 0.1)
    size = len(metrics.render())
    assert size > 4_000_000
    options = OpsConfig(listen="127.0.0.1:0", idle_timeout=120)
    srv = OpsServer("127.0.0.1:0", metrics, FakeHealth(), options)
    await srv.start()
    before = rss()
    clients = 60
    socks: list[socket.socket] = []
    try:
        for _ in range(clients):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", srv.port))
            sock.setblocking(False)
            sock.send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            socks.append(sock)
        writing = peak = 0
        in_flight = MAX_WRITING_BYTES // size + 1
        async with asyncio.timeout(DEADLINE_S * 4):
            while srv.http.busy < clients - in_flight:
                writing = max(writing, srv.http.writing)
                peak = max(peak, rss())
                await asyncio.sleep(0.05)
        # The rest is refused, probes still answer, and the renders were shared.
        assert writing <= MAX_WRITING_BYTES + size
        assert await get_status(http, f"http://127.0.0.1:{srv.port}/healthz") == 200
        assert metrics.renders < clients / 4
        assert (max(peak, rss()) - before) < 100_000_000
    finally:
        for s in socks:
            s.close()
        await srv.stop()


async def test_oversized_headers_get_431() -> None:
    srv = await started(OpsConfig(listen="127.0.0.1:0"), FakeHealth())
    try:
        with connect(srv.port) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n")
            answer = await asyncio.to_thread(sock.recv, 4096)
            assert answer.startswith(b"HTTP/1.1 431")
    finally:
        await srv.stop()


@pytest.mark.parametrize(
    "request_bytes",
    [b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", b"nonsense\r\n\r\n"],
    ids=["post", "garbage"],
)
async def test_other_requests_are_refused(request_bytes: bytes) -> None:
    srv = await started(OpsConfig(listen="127.0.0.1:0"), FakeHealth())
    try:
        with connect(srv.port) as sock:
            sock.sendall(request_bytes)
            answer = await asyncio.to_thread(sock.recv, 4096)
            assert answer.split(b" ")[1] in (b"400", b"405")
    finally:
        await srv.stop()


async def test_readyz_flood_calls_readiness_in_the_background_only(
    http: aiohttp.ClientSession,
) -> None:
    health = CountingHealth()
    srv = await started(OpsConfig(listen="127.0.0.1:0", readiness_interval=600), health)
    try:
        url = f"http://127.0.0.1:{srv.port}/readyz"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while await get_status(http, url) != 200:
            assert loop.time() < deadline
            await asyncio.sleep(0.01)
        statuses = await asyncio.gather(*(get_status(http, url) for _ in range(300)))
        assert set(statuses) == {200}
        assert health.readiness_calls == 1
    finally:
        await srv.stop()


async def test_token_guards_metrics_and_readyz_not_healthz(http: aiohttp.ClientSession) -> None:
    token = "ops-token-\u00e9"[:10]
    options = OpsConfig(listen="127.0.0.1:0", readiness_interval=0.02)
    srv = await started(options, FakeHealth(), token=token)
    base = f"http://127.0.0.1:{srv.port}"
    good = {"Authorization": f"Bearer {token}"}
    try:
        for path in ("/metrics", "/readyz"):
            async with http.get(base + path) as resp:
                assert resp.status == 401
                assert resp.headers["WWW-Authenticate"] == "Bearer"
                assert token not in await resp.text()
            wrong = {"Authorization": "Bearer nope"}
            assert await get_status(http, base + path, headers=wrong) == 401
            assert await get_status(http, base + path, headers=good) in (200, 503)
        assert await get_status(http, base + "/healthz") == 200
    finally:
        await srv.stop()


async def test_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "ops.sock"
    path.touch()  # refuses to remove a file that is not a socket
    options = OpsConfig(listen=f"unix:{path}")
    with pytest.raises(OSError, match="already in use"):
        await started(options, FakeHealth())
    path.unlink()
    srv = await started(options, FakeHealth())
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        connector = aiohttp.UnixConnector(path=str(path))
        async with (
            aiohttp.ClientSession(connector=connector) as s,
            s.get("http://ops/healthz") as resp,
        ):
            assert resp.status == 200
    finally:
        await srv.stop()
    # A socket file left behind (a crash) does not stop the next start.
    srv = await started(options, FakeHealth())
    await srv.stop()


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("unix:relative.sock", "absolute path"),
        ("unix:/" + "a" * 200, "longer than"),
        ("nowhere", "no port"),
    ],
)
def test_bad_listen_addresses(listen: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_listen(listen)


def secret_file(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o600)
    return path


def test_token_file_is_read_as_a_secret(tmp_path: Path) -> None:
    data = {
        "servicetitan": {"app_key": "k"},
        "ops": {"listen": "127.0.0.1:0", "token_file": str(tmp_path / "token")},
        "tenants": [{"id": 1, "client_id": "c", "client_secret": "s"}],
    }
    secret_file(tmp_path / "token", "tok-123\n")
    settings = config.resolve(config.parse(data, "t.toml"), environ={})
    assert settings.ops_token is not None
    assert settings.ops_token.reveal() == "tok-123"
    assert "tok-123" not in repr(settings)
    (tmp_path / "token").chmod(0o644)
    with pytest.raises(config.ConfigError, match=r"t.toml: ops.token_file: .*group or others"):
        config.resolve(config.parse(data, "t.toml"), environ={})


async def test_daemon_readyz_flood_sends_no_redis_command_per_request(
    redis: aioredis.Redis, redis_server: RedisServer
) -> None:
    async with run_simulator(tenants=[9501], records=20, page_size=10) as sim:
        port = free_port()
        data = config_dict(redis_server.url, sim.url, sim.app_key, [9501], ["crm.customers"])
        data["ops"] = {"listen": f"127.0.0.1:{port}", "readiness_interval": 600.0}
        daemon = DaemonProcess(data)
        base = f"http://127.0.0.1:{port}"
        try:
            daemon.start()
            connector = aiohttp.TCPConnector(limit=CLIENT_CONNECTIONS)
            async with aiohttp.ClientSession(connector=connector) as s:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while True:
                    try:
                        if await get_status(s, base + "/readyz") == 200:
                            break
                    except aiohttp.ClientError:
                        pass
                    assert loop.time() < deadline, "the daemon never became ready"
                    await asyncio.sleep(0.1)
                before = (await redis.info("commandstats")).get("cmdstat_ping", {}).get("calls", 0)
                statuses = await asyncio.gather(
                    *(get_status(s, base + "/readyz") for _ in range(300))
                )
                after = (await redis.info("commandstats")).get("cmdstat_ping", {}).get("calls", 0)
            assert set(statuses) == {200}
            # Redis health checks of the pool may PING now and then; 300 probes must not.
            assert after - before < 10
        finally:
            daemon.close()
