"""The ops HTTP server: Prometheus metrics, liveness and readiness for orchestrators and humans.

`/readyz` answers from the result of a background check (every `readiness_interval` seconds), so
a flood of probes costs no Redis call. With a token, `/metrics` and `/readyz` require
`Authorization: Bearer <token>`; `/healthz` stays open: it says nothing beyond "alive", and
systemd or Kubernetes probes must reach it without credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from typing import Protocol

import structlog

from syncd.config import OpsConfig, Secret
from syncd.config.addresses import parse_listen, unix_path
from syncd.ops.http import HttpServer, Request, Response
from syncd.ops.metric_types import CONTENT_TYPE
from syncd.ops.metrics import Metrics

log = structlog.get_logger("syncd.ops")

# A readiness probe that hangs is worse than one that fails: the prober times out without
# learning why. Kept below the usual 10 s probe timeouts.
READINESS_TIMEOUT_S = 5.0
# Below this size compressing /metrics costs more than it saves.
COMPRESS_MIN_BYTES = 1024


class HealthSource(Protocol):
    """What the daemon reports about its own health."""

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """Whether the scheduler made progress recently, with details for the response body."""
        ...

    async def readiness(self) -> tuple[bool, dict[str, object]]:
        """Whether Redis answers and tenants authenticate, with details for the response body."""
        ...


def _json(body: dict[str, object], status: int, headers: dict[str, str] | None = None) -> Response:
    # default=str: details come from the engine and may hold datetimes or paths.
    text = json.dumps(body, default=str, sort_keys=True)
    return Response(status, text.encode(), headers=headers or {})


class OpsServer:
    """Serves `GET /metrics`, `/healthz` and `/readyz` on one TCP address or unix socket."""

    def __init__(
        self,
        listen: str,
        metrics: Metrics,
        health: HealthSource,
        options: OpsConfig | None = None,
        token: Secret | None = None,
    ) -> None:
        self.unix_path = unix_path(listen)
        self.host, self._requested_port = ("", 0) if self.unix_path else parse_listen(listen)
        self.metrics = metrics
        self.health = health
        self.options = options or OpsConfig(listen=listen)
        self._token = token.reveal().encode() if token is not None else None
        self.http = HttpServer(
            self._route,
            header_timeout=self.options.header_timeout,
            idle_timeout=self.options.idle_timeout,
            max_connections=self.options.max_connections,
        )
        self._started = False
        self._refresher: asyncio.Task[None] | None = None
        self._ready: tuple[bool, dict[str, object]] = (False, {"reasons": ["starting"]})
        self.readiness_checks = 0
        self._renders: dict[bool, asyncio.Future[tuple[bytes, bool]]] = {}
        self.port = 0

    async def start(self) -> None:
        """Bind and serve; `port` is the bound TCP port afterwards."""
        if self._started:
            raise RuntimeError("OpsServer already started")
        self._started = True
        if self.unix_path is not None:
            await self.http.start_unix(self.unix_path)
        else:
            self.port = await self.http.start_tcp(self.host or None, self._requested_port)
        self._refresher = asyncio.create_task(self._refresh_readiness())
        where = self.unix_path or f"{self.host or '*'}:{self.port}"
        log.info("ops_server_started", listen=where, token=self._token is not None)

    async def stop(self) -> None:
        """Close the listening socket and every open connection; safe to call twice."""
        refresher, self._refresher = self._refresher, None
        if refresher is not None:
            refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await refresher
        await self.http.stop()

    async def refresh_readiness(self) -> None:
        """Check readiness now (e.g. when startup is done) rather than at the next interval."""
        self._ready = await self._check_readiness()
        self.readiness_checks += 1

    async def _refresh_readiness(self) -> None:
        while True:
            await self.refresh_readiness()
            await asyncio.sleep(self.options.readiness_interval)

    async def _check_readiness(self) -> tuple[bool, dict[str, object]]:
        try:
            async with asyncio.timeout(READINESS_TIMEOUT_S):
                return await self.health.readiness()
        except TimeoutError:
            log.warning("readiness_check_timeout", timeout_s=READINESS_TIMEOUT_S)
            return False, {"error": "readiness check timed out"}
        except Exception as exc:
            log.exception("readiness_check_failed")
            return False, {"error": type(exc).__name__}

    def _authorized(self, request: Request) -> bool:
        if self._token is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1")
        return hmac.compare_digest(given, b"Bearer " + self._token)

    async def _route(self, request: Request) -> Response:
        if request.path == "/healthz":
            return self._healthz()
        if request.path not in ("/metrics", "/readyz"):
            return _json({"error": "not found"}, 404)
        if not self._authorized(request):
            return _json({"error": "unauthorized"}, 401, {"WWW-Authenticate": "Bearer"})
        if request.path == "/readyz":
            ok, details = self._ready
            return _json({**details, "status": "ok" if ok else "fail"}, 200 if ok else 503)
        return await self._metrics(request)

    async def _metrics(self, request: Request) -> Response:
        # Scrapes arriving while a render runs share its output: a flood of them costs one
        # render at a time per encoding, not one each, and holds one body, not one each.
        # Thousands of tenants make megabytes of text that compresses over tenfold; it is
        # compressed in the thread that renders it.
        accepts = "gzip" in request.headers.get("accept-encoding", "").lower()
        render = self._renders.get(accepts)
        if render is None or render.done():
            render = self._renders[accepts] = asyncio.ensure_future(
                self.metrics.render_http(COMPRESS_MIN_BYTES if accepts else None)
            )
        body, compressed = await asyncio.shield(render)
        headers = {"Content-Encoding": "gzip"} if compressed else {}
        return Response(200, body, CONTENT_TYPE, headers)

    def _healthz(self) -> Response:
        # Answering at all proves the event loop runs; liveness adds that the scheduler does.
        try:
            ok, details = self.health.liveness()
        except Exception as exc:
            log.exception("liveness_check_failed")
            return _json({"status": "error", "error": type(exc).__name__}, 503)
        return _json({**details, "status": "ok" if ok else "fail"}, 200 if ok else 503)
