"""`syncd mirror`: the shell around `apply`. Its workers (`[mirror] workers`) read the
configured streams as members of one consumer group, each applies its batch in one PostgreSQL
transaction on its own connection and lets the consumer library acknowledge it only after
COMMIT; lifecycle, signals and systemd notifications as the daemon's.

A record PostgreSQL refuses is returned to the library as `Failed(event, reason)`: it comes
back, and after `max_deliveries` goes to the tenant's dead stream with the reason, while the
rest of its batch is applied. A PostgreSQL that is down, refuses writes (read-only, disk full)
or fails otherwise holds the batch: the connection is dropped and the whole batch tried again
on a new one with backoff, nothing acknowledged meanwhile and the batch kept from the group's
other consumers (the library keeps a batch while its handler runs), until it succeeds or the
mirror is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import socket
import time
from typing import Any

import psycopg
import structlog

from syncd.config import Settings
from syncd.config.urls import redact_url
from syncd.consumer import Consumer, ConsumerMetrics, Event, Failed, Subscription
from syncd.consumer.delivery import Backoff
from syncd.mirror.apply import Refused, apply_rows, prepare
from syncd.mirror.ops import MirrorOps
from syncd.mirror.rows import Row, rows_of
from syncd.mirror.schema import Connection, SchemaTooNew, migrate
from syncd.ops.sdnotify import Notifier, watchdog_interval
from syncd.redis.conn import connect

__all__ = ["EXIT_OK", "EXIT_SCHEMA", "Mirror", "subscriptions"]

log = structlog.get_logger("syncd.mirror")

EXIT_OK = 0
EXIT_SCHEMA = 2  # the tables were migrated by a newer syncd: a restart cannot help

_BACKOFF_MIN_S = 0.5
_BACKOFF_MAX_S = 30.0
# A transaction that takes longer is taken for a link gone silent: dropped and tried again.
_APPLY_TIMEOUT_S = 300.0
_PROGRESS_EVERY_S = 60.0
_BLOCK_MS = 5_000
_WORK_MEM = "64MB"


def subscriptions(settings: Settings) -> list[Subscription]:
    """The streams the mirror reads: the configured tenants (or `[mirror] tenants`), each with
    its configured feeds (those in `[mirror] feeds`, when given)."""
    m = settings.config.mirror
    assert m is not None
    out = []
    for t in settings.tenants:
        if m.tenants is not None and t.id not in m.tenants:
            continue
        feeds = [f for f in t.feeds if m.feeds is None or f in m.feeds]
        if feeds:
            out.append(Subscription(t.id, feeds))
    return out


class Mirror:
    """One mirror process: a consumer named `name` (default: the host name) in `[mirror] group`."""

    def __init__(self, settings: Settings, *, name: str | None = None) -> None:
        m = settings.config.mirror
        if m is None:
            raise ValueError(f"{settings.config.path}: no [mirror] section")
        self.settings = settings
        self.config = m
        self.name = name or socket.gethostname()
        self.subscriptions = subscriptions(settings)
        self.feeds = list(dict.fromkeys(f for s in self.subscriptions for f in s.feed_names()))
        self.stop = asyncio.Event()
        self.notifier = Notifier()
        self.tables: dict[str, str] = {}
        self.applied = 0  # events applied (committed), refused ones not included
        self.refused = 0  # refusals returned to the library (one event may count each delivery)
        self.batches = 0
        self.newest_ms = 0  # the newest entry applied (its id's milliseconds)
        self.ready = False  # PostgreSQL in use and the tables migrated
        self.metrics = ConsumerMetrics()
        self.ops: MirrorOps | None = None
        self._conns: dict[int, Connection] = {}  # each worker's connection
        self._signals = 0

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (a second one cancels at once); the exit status."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig, task)
        try:
            return await self.serve()
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals, task: asyncio.Task[Any] | None) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("shutdown_requested", signal=sig.name)
            self.notifier.stopping()
            self.stop.set()
        else:
            log.warning("shutdown_forced", signal=sig.name)
            if task is not None:
                task.cancel()

    async def serve(self) -> int:
        """Connect, migrate, then apply batches until `stop`; no signal handling (see `run`)."""
        cfg = self.settings.config
        pw = self.settings.sentinel_password
        redis = connect(cfg.redis, pw.reveal() if pw else None)
        claim_idle_ms = max(1, int(self.config.claim_idle * 1000))
        consumers = [
            Consumer(
                redis,
                self.config.group,
                self.worker_name(worker),
                streams=self.subscriptions,
                prefix=cfg.redis.key_prefix,
                claim_idle_ms=claim_idle_ms,
                max_deliveries=self.config.max_deliveries,
                batch=self.config.batch,
                # Waiting for new events no longer than events take to go stale: refused ones
                # come back on time on a quiet stream too.
                block_ms=min(_BLOCK_MS, claim_idle_ms),
                # Redis' and the client's share of a batch overlaps PostgreSQL's.
                read_ahead=True,
                metrics=self.metrics,
            )
            for worker in range(self.config.workers)
        ]
        if self.config.listen is not None:
            self.ops = MirrorOps(self.config.listen, self, self.metrics)
            await self.ops.start()
        helpers = [asyncio.create_task(self._watchdog()), asyncio.create_task(self._progress())]
        # Ready at once: a PostgreSQL that is down at start is waited for, not a failed start.
        self.notifier.ready("connecting to PostgreSQL")
        try:
            try:
                if not await self._start():
                    return EXIT_OK
            except SchemaTooNew as exc:
                log.error("mirror_schema_too_new", error=str(exc))
                return EXIT_SCHEMA
            self.notifier.status(f"mirroring {len(self.feeds)} feeds into {self.config.schema}")
            log.info(
                "mirror_started",
                consumer=self.name,
                group=self.config.group,
                schema=self.config.schema,
                tenants=len(self.subscriptions),
                feeds=len(self.feeds),
            )
            async with contextlib.AsyncExitStack() as stack:
                for consumer in consumers:
                    await stack.enter_async_context(consumer)
                # One batch a worker at a time, each in its own transaction on its own
                # connection: one worker's COPY and commit overlap the other's upserts.
                async with asyncio.TaskGroup() as workers:
                    for worker, consumer in enumerate(consumers):
                        handler = functools.partial(self.handle, worker=worker)
                        workers.create_task(consumer.run(handler, stop=self.stop))
            return EXIT_OK
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if self.ops is not None:
                await self.ops.stop()
            await self._close()
            await redis.aclose()
            self.notifier.close()
            log.info("mirror_stopped", applied=self.applied, refused=self.refused)

    async def _start(self) -> bool:
        """Reach PostgreSQL and migrate the tables, retrying with backoff; False when stopped
        first."""
        backoff = Backoff(_BACKOFF_MIN_S, _BACKOFF_MAX_S)
        while not self.stop.is_set():
            try:
                conn = await self._connection()
                self.tables = await migrate(conn, self.config.schema, self.feeds)
                self.ready = True
                return True
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._unavailable(exc, backoff, phase="start")
        return False

    def worker_name(self, worker: int) -> str:
        """The consumer name of a worker: the mirror's name, then `<name>.2`, `<name>.3`..."""
        return self.name if worker == 0 else f"{self.name}.{worker + 1}"

    async def _connection(self, worker: int = 0) -> Connection:
        conn = self._conns.get(worker)
        if conn is None or conn.closed:
            m, secret = self.config, self.settings.mirror_password
            options: dict[str, Any] = {
                "application_name": "syncd-mirror",
                # Each feed's upsert sorts its staged rows, records included: in memory, not
                # spilled to disk, up to this size (a batch of 10,000 records of 6 kB).
                "options": f"-c work_mem={_WORK_MEM}",
                "connect_timeout": max(2, round(m.connect_timeout)),
                # A peer gone silent is noticed within about 25 s of no answer.
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            }
            if secret is not None:
                options["password"] = secret.reveal()
            async with asyncio.timeout(m.connect_timeout + 5):
                conn = await psycopg.AsyncConnection.connect(m.url, **options)
            try:
                await prepare(conn)
            except BaseException:
                await conn.close()
                raise
            self._conns[worker] = conn
        return conn

    async def _close(self, worker: int | None = None) -> None:
        """Close a worker's connection (None: every worker's)."""
        workers = list(self._conns) if worker is None else [worker]
        for w in workers:
            conn = self._conns.pop(w, None)
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _unavailable(
        self, exc: BaseException, backoff: Backoff, worker: int = 0, **fields: Any
    ) -> None:
        """Log why PostgreSQL cannot be used, drop the worker's connection and wait before
        retrying."""
        self.ready = False
        await self._close(worker)
        delay = backoff.next()
        self.notifier.status("waiting for PostgreSQL (see the log: mirror_postgres_unavailable)")
        log.warning(
            "mirror_postgres_unavailable",
            url=redact_url(self.config.url),
            error=f"{type(exc).__name__}: {str(exc).strip()}",
            retry_in_s=delay,
            **fields,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self.stop.wait()

    async def handle(self, batch: list[Event], worker: int = 0) -> list[Event | Failed] | None:
        """A worker's handler: apply `batch` in one transaction (committed on return) on the
        worker's connection; the events PostgreSQL refused, with why. While PostgreSQL cannot
        be used it waits (with backoff) instead; stopped meanwhile, it fails the whole batch,
        acknowledging nothing."""
        rows, failed = rows_of(batch)
        backoff = Backoff(_BACKOFF_MIN_S, _BACKOFF_MAX_S)
        # Meanwhile the consumer library keeps the batch from the group's other consumers,
        # this mirror's other workers among them, however long PostgreSQL takes.
        refused = await self._apply(rows, backoff, worker)
        if refused is None:  # stopped while PostgreSQL could not be used
            return list(batch)
        self.ready = True
        if batch:
            self.newest_ms = max(self.newest_ms, max(int(e.id.partition("-")[0]) for e in batch))
        if backoff.delay > _BACKOFF_MIN_S:  # it had to wait: say it is back
            self.notifier.status(f"mirroring {len(self.feeds)} feeds into {self.config.schema}")
            log.info("mirror_postgres_available", events=len(batch))
        failed.extend(Failed(rows[i][0], reason) for i, reason in refused)
        for f in failed:
            e = f.event if isinstance(f, Failed) else f
            reason = f.reason if isinstance(f, Failed) else ""
            log.warning(
                "mirror_record_refused",
                tenant=e.tenant,
                feed=e.feed,
                key=e.key,
                entry_id=e.id,
                deliveries=e.deliveries,
                reason=reason,
            )
        self.batches += 1
        self.applied += len(rows) - len(refused)
        self.refused += len(failed)
        return failed or None

    async def _apply(
        self, rows: list[tuple[Event, Row]], backoff: Backoff, worker: int
    ) -> Refused | None:
        """Apply `rows` on the worker's connection, waiting (with backoff) while PostgreSQL
        cannot be used; the refused rows, or None when stopped meanwhile."""
        while True:
            try:
                conn = await self._connection(worker)
                async with asyncio.timeout(_APPLY_TIMEOUT_S):
                    schema = self.config.schema
                    return await apply_rows(conn, schema, self.tables, [r for _, r in rows])
            except (psycopg.Error, OSError, TimeoutError) as exc:
                await self._unavailable(exc, backoff, worker, events=len(rows))
                if self.stop.is_set():
                    return None

    async def _watchdog(self) -> None:
        """WATCHDOG=1 while the event loop turns (a mirror waiting for PostgreSQL is alive)."""
        interval = watchdog_interval()
        if interval is None:
            return
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _progress(self) -> None:
        """A `mirror_progress` line every minute while events are applied."""
        last, started = 0, time.monotonic()
        while True:
            await asyncio.sleep(_PROGRESS_EVERY_S)
            if self.applied != last:
                elapsed = time.monotonic() - started
                log.info(
                    "mirror_progress",
                    applied=self.applied,
                    refused=self.refused,
                    batches=self.batches,
                    events_per_s=round((self.applied - last) / elapsed),
                )
                last, started = self.applied, time.monotonic()
