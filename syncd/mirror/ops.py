"""The mirror's ops endpoint (`[mirror] listen`): `GET /metrics` (the consumer's series and the
mirror's own), `/healthz` (the event loop turns) and `/readyz` (PostgreSQL in use, the tables
migrated), on the hardened HTTP server of `syncd.ops.http`."""

from __future__ import annotations

from typing import Protocol

import structlog

from syncd.config.addresses import parse_listen, unix_path
from syncd.consumer.metrics import CONTENT_TYPE, ConsumerMetrics
from syncd.ops.http import HttpServer, Request, Response

log = structlog.get_logger("syncd.mirror")


class MirrorState(Protocol):
    applied: int
    refused: int
    batches: int
    newest_ms: int  # the newest stream entry applied (its id's milliseconds; 0: none yet)
    ready: bool  # PostgreSQL in use and the tables migrated


_SERIES = (
    ("syncd_mirror_events_applied_total", "counter", "Events written to the tables (committed)."),
    ("syncd_mirror_events_refused_total", "counter", "Deliveries PostgreSQL refused a record of."),
    ("syncd_mirror_batches_total", "counter", "Batches applied, one transaction each."),
    (
        "syncd_mirror_newest_applied_timestamp_seconds",
        "gauge",
        "When the newest event applied was published (its entry id): time() minus this is the"
        " tables' lag behind the streams while events flow.",
    ),
    ("syncd_mirror_ready", "gauge", "1 while PostgreSQL is in use and the tables are migrated."),
)


def render(state: MirrorState, consumer: ConsumerMetrics) -> bytes:
    values = (
        state.applied,
        state.refused,
        state.batches,
        state.newest_ms / 1000,
        int(state.ready),
    )
    lines = []
    for (name, kind, help_text), value in zip(_SERIES, values, strict=True):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value:.17g}"]
    return ("\n".join(lines) + "\n" + consumer.render()).encode()


class MirrorOps:
    """Serves the endpoint until `stop`."""

    def __init__(self, listen: str, state: MirrorState, consumer: ConsumerMetrics) -> None:
        self.listen = listen
        self.state = state
        self.consumer = consumer
        self.http = HttpServer(
            self._route, header_timeout=5.0, idle_timeout=60.0, max_connections=16
        )
        self.port = 0

    async def start(self) -> None:
        path = unix_path(self.listen)
        if path is not None:
            await self.http.start_unix(path)
        else:
            host, port = parse_listen(self.listen)
            self.port = await self.http.start_tcp(host or None, port)
        log.info(
            "mirror_ops_started", listen=path or f"{self.listen.rpartition(':')[0]}:{self.port}"
        )

    async def stop(self) -> None:
        await self.http.stop()

    async def _route(self, request: Request) -> Response:
        if request.path == "/metrics":
            return Response(200, render(self.state, self.consumer), CONTENT_TYPE)
        if request.path == "/healthz":
            return Response(200, b'{"status": "ok"}')
        if request.path == "/readyz":
            if self.state.ready:
                return Response(200, b'{"ready": true}')
            return Response(503, b'{"ready": false, "reasons": ["PostgreSQL not in use"]}')
        return Response(404, b'{"error": "not found"}')
