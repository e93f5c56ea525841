"""The ops HTTP server: Prometheus metrics, liveness and readiness for orchestrators and humans."""

from __future__ import annotations

import asyncio
import ipaddress
import json
from typing import Protocol

import structlog
from aiohttp import web

from syncd.metrics import CONTENT_TYPE, Metrics

log = structlog.get_logger(__name__)

# A readiness probe that hangs is worse than one that fails: the prober times out without
# learning why. Kept below the usual 10 s probe timeouts.
READINESS_TIMEOUT_S = 5.0


class HealthSource(Protocol):
    """What the daemon reports about its own health."""

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Whether the scheduler made progress recently, with details for the response body."""
        ...

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether Redis answers and tenants authenticate, with details for the response body."""
        ...


def parse_listen(text: str) -> tuple[str, int]:
    """Split "HOST:PORT" into host and port; "[::1]:9108" for IPv6, ":9108" for every interface.

    An empty host binds all interfaces of both address families. Port 0 picks a free port.
    """
    value = text.strip()
    hint = "expected HOST:PORT, e.g. 127.0.0.1:9108, [::1]:9108 or :9108"
    if value.startswith("["):
        host, sep, port_text = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"listen address {text!r}: IPv6 needs ]:PORT after it; {hint}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(
                f"listen address {text!r}: {host!r} is not an IPv6 address; {hint}"
            ) from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise ValueError(f"listen address {text!r}: no port; {hint}")
        if ":" in host:
            raise ValueError(f"listen address {text!r}: put an IPv6 address in brackets; {hint}")
    if not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"listen address {text!r}: port must be 0..65535; {hint}")
    return host, int(port_text)


def _json(body: dict[str, object], status: int) -> web.Response:
    # default=str: details come from the engine and may hold datetimes or paths.
    return web.Response(
        text=json.dumps(body, default=str, sort_keys=True),
        status=status,
        content_type="application/json",
    )


class OpsServer:
    """Serves `GET /metrics`, `/healthz` and `/readyz` on one listen address."""

    def __init__(self, listen: str, metrics: Metrics, health: HealthSource) -> None:
        self.host, self._requested_port = parse_listen(listen)
        self.metrics = metrics
        self.health = health
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        """Bind and serve; `port` is the bound port afterwards."""
        if self._runner is not None:
            raise RuntimeError("OpsServer already started")
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        # No access log: a scrape every few seconds would drown the daemon's own events. A short
        # shutdown timeout: a scrape cut off at exit costs nothing, while waiting for it would eat
        # into the daemon's shutdown grace.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host or None, self._requested_port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        # With a host name that resolves to several addresses and port 0, each socket gets a
        # port of its own; the first one is reported.
        self.port = int(runner.addresses[0][1])
        log.info("ops_server_started", host=self.host or "*", port=self.port)

    async def stop(self) -> None:
        """Close the listening sockets and finish open requests; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        body = await self.metrics.render_async()
        response = web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
        # Thousands of tenants make tens of megabytes of text that compresses over tenfold; aiohttp
        # compresses large bodies off the event loop.
        response.enable_compression()
        return response

    async def _healthz(self, request: web.Request) -> web.Response:
        # Answering at all proves the event loop runs; liveness adds that the scheduler does.
        try:
            ok, details = self.health.liveness()
        except Exception as exc:
            log.exception("liveness_check_failed")
            return _json({"status": "error", "error": type(exc).__name__}, 503)
        return _json({**details, "status": "ok" if ok else "fail"}, 200 if ok else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_S):
                ok, details = await self.health.readiness()
        except TimeoutError:
            log.warning("readiness_check_timeout", timeout_s=READINESS_TIMEOUT_S)
            return _json({"status": "fail", "error": "readiness check timed out"}, 503)
        except Exception as exc:
            log.exception("readiness_check_failed")
            return _json({"status": "error", "error": type(exc).__name__}, 503)
        return _json({**details, "status": "ok" if ok else "fail"}, 200 if ok else 503)
