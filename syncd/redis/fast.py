"""Connections that pack commands with hiredis' C packer.

A page script carries tens of thousands of arguments (a 5,000-record page is 20,000 of them);
redis-py's asyncio connections pack commands in Python, which costs more than everything else
syncd does per record.
"""

from __future__ import annotations

from typing import Any

from hiredis import pack_command as _hiredis_pack
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection


def pack(args: tuple[Any, ...]) -> list[bytes] | None:
    """The command in RESP, packed by hiredis; None when it cannot (the caller falls back)."""
    first = args[0]
    # redis-py sends "CONFIG GET"-style names as separate words; so must we.
    if (isinstance(first, str) and " " in first) or (isinstance(first, bytes) and b" " in first):
        args = (*first.split(), *args[1:])
    try:
        return [_hiredis_pack(args)]
    except TypeError:
        return None


class FastConnection(Connection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return pack(args) or super().pack_command(*args)


class FastSSLConnection(SSLConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return pack(args) or super().pack_command(*args)


class FastUnixConnection(UnixDomainSocketConnection):
    def pack_command(self, *args: Any) -> list[bytes]:
        return pack(args) or super().pack_command(*args)
