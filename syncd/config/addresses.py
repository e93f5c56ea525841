"""Addresses in the configuration: the ops server's listen address (HOST:PORT or unix:/PATH) and
the Redis sentinels' host:port entries, checked as the servers that use them will read them."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

UNIX_PREFIX = "unix:"
# sockaddr_un's sun_path is 108 bytes, with the terminating NUL.
UNIX_PATH_MAX = 107


def unix_path(text: str) -> str | None:
    """The socket path of "unix:/PATH", None for a TCP address; ValueError for a bad path."""
    value = text.strip()
    if not value.startswith(UNIX_PREFIX):
        return None
    path = value[len(UNIX_PREFIX) :]
    if not path.startswith("/"):
        raise ValueError(f"listen address {text!r}: a unix socket needs an absolute path")
    if len(path.encode()) > UNIX_PATH_MAX:
        raise ValueError(f"listen address {text!r}: socket path longer than {UNIX_PATH_MAX} bytes")
    return path


def check_listen(text: str) -> None:
    """ValueError when `text` is neither "HOST:PORT" nor "unix:/PATH"."""
    if unix_path(text) is None:
        parse_listen(text)


def parse_listen(text: str) -> tuple[str, int]:
    """Split "HOST:PORT" into host and port; "[::1]:9108" for IPv6, ":9108" for every interface.

    An empty host binds all interfaces of both address families. Port 0 picks a free port.
    """
    value = text.strip()
    hint = "expected HOST:PORT, e.g. 127.0.0.1:9108, [::1]:9108, :9108, or unix:/PATH"
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


def parse_sentinel(entry: str) -> tuple[str, int]:
    """ "host:port" -> (host, port); ValueError saying what is wrong."""
    host, sep, port = entry.strip().rpartition(":")
    host = host.strip("[]")  # [::1]:26379
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected 'host:port', got {entry!r}")
    return host, int(port)


def parse_sentinels(entries: Sequence[str]) -> list[tuple[str, int]]:
    """["host:port", ...] -> [(host, port), ...]; ValueError naming the entry that is wrong."""
    out = []
    for i, entry in enumerate(entries):
        try:
            out.append(parse_sentinel(entry))
        except ValueError as exc:
            raise ValueError(f"[{i}]: {exc}") from None
    return out
