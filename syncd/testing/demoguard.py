"""A watchdog that removes `syncd demo`'s children when the demo dies without cleaning up.

The demo starts it first, with a pipe on its stdin, and tells it each child process and
temporary directory as it makes them ("pid N", "dir PATH"). When the demo exits normally it
cleans up itself and writes "done". When the pipe closes without "done" (the demo was killed,
even by SIGKILL, which no handler sees), the guard terminates the processes, removes the
directories and exits. Processes are checked to still be the ones named (same start time), so a
recycled pid is never killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time


def start_time(pid: int) -> str | None:
    """The process' start time in clock ticks (field 22 of /proc/PID/stat), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, started: str | None) -> bool:
    return started is not None and start_time(pid) == started


def cleanup(pids: dict[int, str | None], dirs: list[str], grace: float = 5.0) -> None:
    for pid, started in pids.items():
        if _alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(_alive(p, s) for p, s in pids.items()) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid, started in pids.items():
        if _alive(pid, started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


def main() -> int:
    # The demo's Ctrl-C reaches its whole process group; the guard must outlive that moment.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pids: dict[int, str | None] = {}
    dirs: list[str] = []
    for line in sys.stdin:
        word, _, arg = line.strip().partition(" ")
        if word == "done":
            return 0
        if word == "pid" and arg.isdigit():
            pids[int(arg)] = start_time(int(arg))
        elif word == "dir" and arg:
            dirs.append(arg)
    cleanup(pids, dirs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
