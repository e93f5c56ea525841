"""The demo's PostgreSQL: `syncd demo` fills tables too (`syncd mirror`, in the same process)
when a PostgreSQL answers on 127.0.0.1:5432 as `postgres` (or at `--postgres-url`), in a
database of its own, `syncdemo`, schema `demo`, emptied at start. Nothing of it is used when
psycopg (the `postgres` extra) is missing or nothing answers: the demo says so and goes on."""

from __future__ import annotations

import contextlib
import socket

import msgspec

from syncd import config
from syncd.config.model import MirrorConfig

LOCAL = "postgresql://postgres@127.0.0.1:5432"
DATABASE = "syncdemo"
SCHEMA = "demo"
GROUP = "demo-mirror"


def find(url: str | None) -> tuple[str | None, str]:
    """The database URL to fill (None: none), and a line saying what the demo does with it."""
    try:
        import psycopg
    except ImportError:
        return None, "no tables: psycopg is not installed (pip install 'syncd[postgres]')"
    if url is None:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", 5432), 1.0):
            url = _own_database()
        if url is None:
            return None, "no tables: no PostgreSQL answers on 127.0.0.1:5432 (--postgres-url)"
    try:
        with psycopg.connect(url, connect_timeout=5, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    except psycopg.Error as exc:
        return None, f"no tables: PostgreSQL refused ({type(exc).__name__}: {str(exc).strip()})"
    return url, f"tables in schema {SCHEMA} (e.g. {SCHEMA}.crm_customers)"


def _own_database() -> str | None:
    """`syncdemo` on the local server, created when missing; None if that is refused."""
    import psycopg

    try:
        with psycopg.connect(f"{LOCAL}/postgres", connect_timeout=5, autocommit=True) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE])
            if found.fetchone() is None:
                conn.execute(f"CREATE DATABASE {DATABASE}")
    except psycopg.Error:
        return None
    return f"{LOCAL}/{DATABASE}"


def with_mirror(cfg: config.Config, url: str) -> config.Config:
    """The demo's configuration with its mirror: the group listed, so the daemon creates it."""
    mirror = MirrorConfig(url=url, schema=SCHEMA, group=GROUP, claim_idle=5.0, batch=500)
    streams = msgspec.structs.replace(cfg.streams, groups=[*cfg.streams.groups, GROUP])
    return msgspec.structs.replace(cfg, mirror=mirror, streams=streams)
