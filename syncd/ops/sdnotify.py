"""The sd_notify protocol: readiness, status, reload, stop and watchdog messages to systemd.

Spoken directly (one datagram per message on `$NOTIFY_SOCKET`), so syncd needs no libsystemd
binding. Parsing the environment is kept in pure functions; only `Notifier` touches a socket.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("syncd.sdnotify")


def notify_address(environ: Mapping[str, str]) -> str | None:
    """The socket address named by `$NOTIFY_SOCKET`, in the form `socket.sendto` takes.

    A leading `@` names the abstract namespace (the kernel spells it with a NUL byte). Anything
    other than an absolute path or `@name` (for instance systemd's newer `vsock:` addresses) is
    not supported and gives None, as does an unset or empty variable.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between watchdog pings: half of `$WATCHDOG_USEC`, or None when not asked for.

    systemd sets `WATCHDOG_PID` to the process it expects pings from; a child that inherited
    the variables must not ping on its parent's behalf. Half the timeout is what
    sd_watchdog_enabled(3) recommends, leaving a whole interval of slack for a late ping.
    """
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = env.get("WATCHDOG_PID")
    if owner is not None:
        try:
            owner_pid = int(owner)
        except ValueError:
            return None
        if owner_pid != (os.getpid() if pid is None else pid):
            return None
    return usec / 2_000_000


def format_message(fields: Mapping[str, object]) -> str:
    """Render `KEY=value` assignments one per line, the notify datagram's format.

    A newline inside a value would start a bogus assignment, so it is replaced by a space.
    """
    lines = []
    for key, value in fields.items():
        if not key or "=" in key or "\n" in key:
            raise ValueError(f"invalid sd_notify field name {key!r}")
        lines.append(f"{key}={str(value).replace(chr(10), ' ')}")
    return "\n".join(lines)


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares `MONOTONIC_USEC` against."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to the service manager; does nothing when not run by one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._address = notify_address(os.environ if environ is None else environ)
        self._sock: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        """Whether a notify socket was named in the environment."""
        return self._address is not None

    def send(self, text: str) -> bool:
        """Send one raw datagram; return whether it left, never raise on a send failure."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                # Non-blocking: a stalled service manager must not stall the event loop; the
                # message is dropped instead, and the next status or ping supersedes it.
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            self._sock.sendto(text.encode(), self._address)
        except OSError as exc:
            log.debug("sd_notify_failed", error=str(exc))
            return False
        return True

    def notify(self, **fields: object) -> bool:
        """Send `KEY=value` fields in one datagram, e.g. `notify(READY=1, STATUS="up")`."""
        return self.send(format_message(fields))

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd start-up is complete (Type=notify), optionally with a status line."""
        if status is None:
            return self.notify(READY=1)
        return self.notify(READY=1, STATUS=status)

    def status(self, text: str) -> bool:
        """Set the free-form status shown by `systemctl status`."""
        return self.notify(STATUS=text)

    def reloading(self) -> bool:
        """Announce a configuration reload; send `ready()` when it is done.

        Type=notify-reload only accepts RELOADING=1 together with a current MONOTONIC_USEC,
        which lets it tell this reload apart from an earlier one.
        """
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec())

    def stopping(self) -> bool:
        """Announce that shutdown has begun."""
        return self.notify(STOPPING=1)

    def watchdog(self) -> bool:
        """Ping the service watchdog (WatchdogSec=)."""
        return self.notify(WATCHDOG=1)

    def close(self) -> None:
        """Release the socket; later messages open a new one."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
