"""Run the simulator from tests and benchmarks: in-process on a free port, or as a subprocess."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode
from urllib.request import Request, urlopen

from syncd.simulator.app import start_server
from syncd.simulator.data import MutationKind
from syncd.simulator.options import DEFAULT_APP_KEY, SimOptions
from syncd.simulator.quirks import Quirks
from syncd.simulator.state import SimState

_LISTENING = "simulator listening on "


def credentials(tenant: int) -> tuple[str, str]:
    """The (client_id, client_secret) the simulator accepts for `tenant`."""
    return f"client-{tenant}", f"secret-{tenant}"


@dataclass(frozen=True, slots=True)
class RunningSimulator:
    """A simulator serving in this process."""

    url: str
    port: int
    app_key: str
    state: SimState

    @property
    def auth_url(self) -> str:
        """The token endpoint."""
        return self.url + "/connect/token"

    @property
    def options(self) -> SimOptions:
        """The options it runs with."""
        return self.state.options

    def feed_url(self, tenant: int, feed: str) -> str:
        """Absolute URL of one export feed of one tenant."""
        return self.url + self.state.feeds[feed].url_path(tenant)

    def sim_url(self, tenant: int, feed: str, action: str) -> str:
        """URL of a `/_sim/tenants/<T>/feeds/<feed>/<action>` endpoint."""
        return f"{self.url}/_sim/tenants/{tenant}/feeds/{feed}/{action}"

    def set_quirks(self, tenant: int, **changes: Any) -> Quirks:
        """Turn quirks of one tenant on or off now, e.g. `set_quirks(1002, hang=1.0)`.

        Changes apply on top of what the tenant started with; no arguments restore that.
        Same as `POST /_sim/tenants/<T>/quirks`.
        """
        return self.state.set_quirks(tenant, changes)

    def quirks(self, tenant: int) -> Quirks:
        """The quirks in force for `tenant`."""
        return self.state.quirks(tenant)

    def mutate(
        self, tenant: int, feed: str, kind: MutationKind = "update", count: int = 1
    ) -> list[str]:
        """Change, create or delete `count` records now; their keys (none for keyless records).

        Same as `POST /_sim/tenants/<T>/feeds/<feed>/mutate?kind=...&count=...`.
        """
        return self.state.mutate(tenant, feed, kind, count)

    def truth(self, tenant: int, feed: str) -> dict[str, Any]:
        """Deleted keys and keyless records of one feed, as `GET .../truth` answers."""
        return self.state.truth(tenant, feed)


def make_options(base: SimOptions | None = None, **changes: Any) -> SimOptions:
    """SimOptions from keyword arguments named like the CLI flags (lists become tuples).

    `quirks` may be a dict of quirk settings for every tenant, `tenant_quirks` a dict
    {tenant: {quirk: value}} applied on top of those for some tenants.
    """
    for name in ("tenants", "feeds"):
        if isinstance(changes.get(name), list):
            changes[name] = tuple(changes[name])
    start = base or SimOptions()
    quirks = changes.get("quirks", start.quirks)
    if isinstance(quirks, dict):
        quirks = changes["quirks"] = start.quirks.apply(quirks)
    per_tenant = changes.get("tenant_quirks")
    if isinstance(per_tenant, dict):
        resolved: list[tuple[int, Quirks]] = []
        for tenant, wanted in per_tenant.items():
            try:
                made = wanted if isinstance(wanted, Quirks) else quirks.apply(wanted)
            except ValueError as exc:
                where = f"simulator option tenant_quirks, tenant {tenant}"
                raise ValueError(f"{where}: {exc}") from None
            resolved.append((int(tenant), made))
        changes["tenant_quirks"] = tuple(resolved)
    return start.replace(**changes).validate()


@asynccontextmanager
async def run_simulator(
    options: SimOptions | None = None, **changes: Any
) -> AsyncIterator[RunningSimulator]:
    """Serve a simulator on a free port of 127.0.0.1 for the duration of the block.

    Keyword arguments are SimOptions fields (records=, page_size=, tenants=[...], seed=,
    rate_limit=, token_ttl=, recent_delay=, overlap=, feeds=[...], mutation_rate=, fault_5xx=,
    fault_latency=, fault_truncate=, fault_invalid_json=, fault_drop=, fault_token=, ...), and
    quirks={...} for every tenant, tenant_quirks={tenant: {...}} for some (see `make_options`).
    """
    changes.setdefault("host", "127.0.0.1")
    changes["port"] = 0
    opts = make_options(options, **changes)
    state = SimState(opts)
    server = await start_server(state)
    try:
        yield RunningSimulator(server.url, server.port, opts.app_key, state)
    finally:
        await server.close()


class SimulatorProcess:
    """`python -m syncd simulate --port 0 <args>` in a child process.

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 120.0) -> None:
        self.args = list(args)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.port = 0
        self._drain: threading.Thread | None = None

    @property
    def auth_url(self) -> str:
        """The token endpoint."""
        return self.url + "/connect/token"

    @property
    def app_key(self) -> str:
        """The app key the process accepts."""
        if "--app-key" in self.args:
            return self.args[self.args.index("--app-key") + 1]
        return DEFAULT_APP_KEY

    def set_quirks(self, tenant: int, **changes: Any) -> dict[str, Any]:
        """`POST /_sim/tenants/<T>/quirks` with `changes`; the quirks now in force, as JSON."""
        url = f"{self.url}/_sim/tenants/{tenant}/quirks"
        request = Request(url, data=json.dumps(changes).encode(), method="POST")
        request.add_header("Content-Type", "application/json")
        with urlopen(request, timeout=30) as response:
            quirks: dict[str, Any] = json.loads(response.read())["quirks"]
        return quirks

    def mutate(
        self, tenant: int, feed: str, kind: MutationKind = "update", count: int = 1
    ) -> list[str]:
        """`POST /_sim/tenants/<T>/feeds/<feed>/mutate`; the keys changed, created or deleted."""
        query = urlencode({"kind": kind, "count": count})
        url = f"{self.url}/_sim/tenants/{tenant}/feeds/{quote(feed)}/mutate?{query}"
        with urlopen(Request(url, data=b"", method="POST"), timeout=30) as response:
            keys: list[str] = json.loads(response.read())["keys"]
        return keys

    def truth(self, tenant: int, feed: str) -> dict[str, Any]:
        """`GET /_sim/tenants/<T>/feeds/<feed>/truth`: deleted keys, keyless records."""
        url = f"{self.url}/_sim/tenants/{tenant}/feeds/{quote(feed)}/truth"
        with urlopen(url, timeout=30) as response:
            truth: dict[str, Any] = json.loads(response.read())
        return truth

    def start(self) -> SimulatorProcess:
        """Start the process and wait until it listens; RuntimeError if it does not."""
        command = [sys.executable, "-m", "syncd", "simulate", "--port", "0", *self.args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
        try:
            line = self._first_line(self.process)
        except BaseException:
            self.stop()
            raise
        self.url = line.removeprefix(_LISTENING).strip()
        self.port = int(self.url.rsplit(":", 1)[1])
        stdout = self.process.stdout
        assert stdout is not None
        # Keep reading so that anything printed later never fills the pipe and blocks the child.
        self._drain = threading.Thread(target=stdout.read, daemon=True)
        self._drain.start()
        return self

    def _first_line(self, process: subprocess.Popen[bytes]) -> str:
        stdout = process.stdout
        assert stdout is not None
        deadline = time.monotonic() + self.startup_timeout
        buffered = b""
        with selectors.DefaultSelector() as selector:
            selector.register(stdout, selectors.EVENT_READ)
            while b"\n" not in buffered:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"simulator did not start within {self.startup_timeout}s")
                if selector.select(min(remaining, 0.5)):
                    chunk = os.read(stdout.fileno(), 4096)
                    if not chunk:
                        code = process.wait()
                        raise RuntimeError(f"simulator exited with status {code} before listening")
                    buffered += chunk
        line = buffered.split(b"\n", 1)[0].decode()
        if not line.startswith(_LISTENING):
            raise RuntimeError(f"unexpected simulator output: {line!r}")
        return line

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate the process (SIGTERM, then SIGKILL); its exit status."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._drain is not None:
            self._drain.join(timeout)
        if process.stdout is not None:
            process.stdout.close()
        return process.returncode

    def __enter__(self) -> SimulatorProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
