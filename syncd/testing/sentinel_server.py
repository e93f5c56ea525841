"""A throwaway Redis Sentinel setup on free ports: a primary, a replica and three sentinels.

For tests and benchmarks. The sentinels are the same `redis-server` (or `valkey-server`) binary in
sentinel mode (`--sentinel`), so no package beyond the server is needed.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from syncd.testing.redis_server import (
    RedisServer,
    RedisServerError,
    _command,
    _pings,
    find_binary,
    free_port,
)

SERVICE = "mymaster"
# How long a revived primary is left to the sentinels before it is told to replicate.
SENTINEL_CONVERTS_WITHIN_S = 15.0


class SentinelServers:
    """One primary, one replica, `sentinels` sentinels watching them (quorum 2)."""

    def __init__(self, sentinels: int = 3, down_after_ms: int = 1000) -> None:
        base = ["--appendonly", "no", "--repl-diskless-sync", "yes"]
        self.primary = RedisServer(extra_args=[*base, "--repl-diskless-sync-delay", "0"])
        self.replica = RedisServer(extra_args=base)
        self.sentinel_ports = [free_port() for _ in range(sentinels)]
        self.down_after_ms = down_after_ms
        self._procs: list[subprocess.Popen[bytes]] = []
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.sentinel_ports]

    @property
    def url(self) -> str:
        """The URL a client of the primary uses with the sentinels (host and port unused)."""
        return "redis://127.0.0.1/0"

    def start(self, timeout: float = 30.0) -> None:
        self.primary.start()
        self.replica.extra_args += ["--replicaof", "127.0.0.1", str(self.primary.port)]
        self.replica.start()
        self._dir = tempfile.TemporaryDirectory(prefix="syncd-sentinel-")
        for port in self.sentinel_ports:
            conf = Path(self._dir.name) / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\n"
                "bind 127.0.0.1\n"
                f"dir {self._dir.name}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            log = (Path(self._dir.name) / f"sentinel-{port}.log").open("ab")
            self._procs.append(
                subprocess.Popen(
                    [find_binary(), str(conf), "--sentinel"],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._ready():
                return
            time.sleep(0.1)
        self.stop()
        raise RedisServerError("the sentinels did not see the primary, the replica and each other")

    def _ready(self) -> bool:
        if b"master_link_status:up" not in _command(self.replica.port, "INFO", "replication"):
            return False
        for port in self.sentinel_ports:
            if not _pings(port):
                return False
            replicas = _command(port, "SENTINEL", "REPLICAS", SERVICE)
            others = _command(port, "SENTINEL", "SENTINELS", SERVICE)
            if replicas.startswith(b"*0") or others.count(b"runid") < len(self.sentinel_ports) - 1:
                return False
        return True

    def primary_port(self) -> int:
        """The primary's port according to the first sentinel that answers."""
        for port in self.sentinel_ports:
            try:
                reply = _command(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
            except OSError:
                continue
            return int(reply.split(b"\r\n")[4])
        raise RedisServerError("no sentinel answers")

    def kill_primary(self) -> int:
        """SIGKILL the primary (no shutdown, no last writes); its former port."""
        proc = self.primary.proc
        assert proc is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return self.primary.port

    def wait_failover(self, old_port: int, timeout: float = 60.0) -> int:
        """Wait until the sentinels promoted another server and it accepts writes; its port."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                port = self.primary_port()
                if port != old_port and b"role:master" in _command(port, "INFO", "replication"):
                    return port
            except (OSError, RedisServerError, IndexError, ValueError):
                pass
            time.sleep(0.1)
        raise RedisServerError(f"no failover within {timeout}s")

    def revive_old_primary(self, new_port: int, timeout: float = 60.0) -> None:
        """Start the killed primary again (empty): the sentinels make it a replica of the new
        primary, so that a `WAIT 1` can succeed again. Returns once the new primary has it."""
        self.primary.start()
        started = time.monotonic()
        deadline = started + timeout
        told = False
        while time.monotonic() < deadline:
            info = _command(new_port, "INFO", "replication")
            if b"connected_slaves:1" in info and b"state=online" in info:
                return
            if not told and time.monotonic() - started > SENTINEL_CONVERTS_WITHIN_S:
                # The sentinels convert a returning primary on their own schedule, which a loaded
                # machine can stretch; do what an operator would and point it at the new one.
                with contextlib.suppress(OSError, RedisServerError):
                    if b"role:master" in _command(self.primary.port, "INFO", "replication"):
                        _command(self.primary.port, "REPLICAOF", "127.0.0.1", str(new_port))
                told = True
            time.sleep(0.1)
        raise RedisServerError(f"the old primary did not become a replica within {timeout}s")

    def stop(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        self.replica.stop()
        self.primary.stop()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
