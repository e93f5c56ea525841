"""Throwaway PostgreSQL for tests and benchmarks: a private server on a free port, or a database
of its own on the machine's server.

Where the machine has PostgreSQL's server programs (`initdb` on PATH or under
/usr/lib/postgresql/*/bin), `PostgresServer` initialises a cluster in a temporary directory and
runs `postgres` on a free port of 127.0.0.1, as the `postgres` OS user when started by root
(initdb refuses root). Elsewhere `LocalPostgres` stands in for it: the server on 127.0.0.1:5432
(user postgres, trust authentication), where only databases created here are touched.

Either way `create_database()` makes a database with a unique name and `drop_database()`
removes it; nothing else of the server is changed.
"""

from __future__ import annotations

import abc
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from syncd.testing.redis_server import free_port, stop_child


class PostgresServerError(RuntimeError):
    """No usable PostgreSQL: no server programs and no server on 127.0.0.1:5432, or it did not
    come up."""


class Postgres(Protocol):
    """A PostgreSQL to make throwaway databases on."""

    def url(self, database: str = "postgres") -> str: ...

    def create_database(self, prefix: str = "syncd_test") -> str: ...

    def drop_database(self, name: str) -> None: ...

    def stop(self) -> None: ...


def find_bindir() -> str | None:
    """The directory of `initdb`, `postgres` and `pg_ctl`; None when the machine has none."""
    found = shutil.which("initdb")
    if found:
        return str(Path(found).resolve().parent)
    candidates = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: int(Path(p).parent.parent.name or 0))
    return str(Path(newest).parent)


class _Databases(abc.ABC):
    """Creating and dropping databases with unique names, through the `postgres` database."""

    @abc.abstractmethod
    def url(self, database: str = "postgres") -> str:
        """The URL of `database` on this server."""

    def admin(self, sql: str) -> None:
        """Run one statement in the `postgres` database, outside a transaction."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.encode())

    def create_database(self, prefix: str = "syncd_test") -> str:
        """A new, empty database; its name."""
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:10]}"
        self.admin(f"CREATE DATABASE \"{name}\" TEMPLATE template0 ENCODING 'UTF8'")
        return name

    def drop_database(self, name: str) -> None:
        """Drop a database created here, closing the sessions still on it."""
        self.admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class PostgresServer(_Databases):
    """A private `postgres` process on 127.0.0.1:port with a cluster in a temporary directory.

    `durable=False` (for tests) turns off fsync, synchronous commit and full-page writes:
    a crash of the machine loses the cluster, which is thrown away anyway.
    """

    bindir: str
    durable: bool = False
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _dir: tempfile.TemporaryDirectory[str] | None = None
    _user: str | None = field(default=None, repr=False)

    @property
    def data_dir(self) -> str:
        assert self._dir is not None
        return str(Path(self._dir.name) / "data")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 60.0) -> None:
        """Initialise the cluster (the first time) and start the server."""
        if os.geteuid() == 0:
            self._user = "postgres"
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="syncd-postgres-")
            if self._user:
                entry = pwd.getpwnam(self._user)
                os.chown(self._dir.name, entry.pw_uid, entry.pw_gid)
            subprocess.run(
                [
                    f"{self.bindir}/initdb",
                    "-D",
                    self.data_dir,
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=self._user,
                cwd=self._dir.name,  # a directory the postgres user may enter
            )
        if not self.port:
            self.port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": self._dir.name,
            "max_connections": "50",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        args = [f"{self.bindir}/postgres", "-D", self.data_dir, "-p", str(self.port)]
        for name, value in settings.items():
            args += ["-c", f"{name}={value}"]
        log_path = Path(self._dir.name) / "server.log"
        with log_path.open("ab") as log:
            if self._user:
                entry = pwd.getpwnam(self._user)
                os.chown(log_path, entry.pw_uid, entry.pw_gid)
            self.proc = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=self._user,
                cwd=self._dir.name,
            )
        self._wait_ready(timeout, log_path)

    def _wait_ready(self, timeout: float, log_path: Path) -> None:
        import psycopg

        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
                raise PostgresServerError(
                    f"postgres exited with {self.proc.returncode}: {' / '.join(tail)}"
                )
            try:
                with psycopg.connect(self.url(), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                time.sleep(0.05)
        self.stop()
        raise PostgresServerError(f"postgres on port {self.port} did not answer in {timeout}s")

    def stop(self, *, keep_data: bool = False) -> None:
        """Stop the server (a fast shutdown); its directory goes too unless `keep_data`."""
        stop_child(self.proc, signal.SIGINT, 20)
        self.proc = None
        if self._dir is not None and not keep_data:
            self._dir.cleanup()
            self._dir = None

    def restart(self) -> None:
        """Stop and start again on the same port and data."""
        self.stop(keep_data=True)
        self.start()


@dataclass
class LocalPostgres(_Databases):
    """The machine's server on 127.0.0.1:5432 (user postgres): databases of its own only."""

    host: str = "127.0.0.1"
    port: int = 5432

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{database}"

    def stop(self) -> None:
        """Nothing to stop: the server is not this process's."""


def start(*, durable: bool = False) -> Postgres:
    """A private server where the machine has the programs (and it starts), else the local
    server."""
    bindir = find_bindir()
    why = "no initdb (PostgreSQL's server programs)"
    if bindir is not None:
        server = PostgresServer(bindir, durable=durable)
        try:
            server.start()
            return server
        except (OSError, subprocess.SubprocessError, PostgresServerError, KeyError) as exc:
            server.stop()
            why = f"a private server did not start ({type(exc).__name__}: {exc})"
    local = LocalPostgres()
    try:
        local.admin("SELECT 1")
    except Exception as exc:
        raise PostgresServerError(
            f"{why}, and no server on 127.0.0.1:5432 answering as user postgres: {exc}"
        ) from None
    return local
