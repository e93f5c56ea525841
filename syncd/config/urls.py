"""Redis URLs: checked the way the client will parse them, and shown without credentials."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from typing import Any

from redis.asyncio.connection import ConnectionPool, parse_url
from redis.exceptions import RedisError

SCHEMES = ("redis://", "rediss://", "unix://")
# redis-py passes unknown query options to the connection: `?password=...` (and
# `ssl_password`) work as well as a password in the user info, so they are hidden as well.
_QUERY_SECRET = re.compile(r"(?i)((?:^|&)[^=&]*(?:passw|pwd|secret|token)[^=&]*=)[^&]*")


def _misplaced_at(url: str) -> int | None:
    """Where the last '@' of `url` is when URL parsing does not end the user info there (a
    `/`, `?` or `#` before it cut the authority short, or parsing failed), else None: all
    before it may be a user name and password."""
    at = url.rfind("@")
    if at < 0:
        return None
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    try:
        netloc = urllib.parse.urlsplit(url).netloc
    except ValueError:
        return at
    if start == 0 or at >= start + len(netloc) or url[start : start + len(netloc)] != netloc:
        return at
    return None


def _splits(url: str) -> bool:
    try:
        urllib.parse.urlsplit(url)
    except ValueError:
        return False
    return True


def redact_url(url: str) -> str:
    """The URL with any password (and a user name standing alone) replaced by ***, in the
    user info and in the query string. A URL whose user info parsing would misread (a `/`, `?`
    or `#` left unencoded in the password) loses all it has between `://` and its last `@`."""
    at = _misplaced_at(url)
    if at is not None:
        start = url.find("://")
        head = url[: start + 3] if start >= 0 else ""
        host, sep, query = url[at + 1 :].partition("?")
        return f"{head}***@{host}{sep}" + _QUERY_SECRET.sub(r"\1***", query)
    try:
        parts = urllib.parse.urlsplit(url)
        netloc = parts.netloc
    except ValueError:
        return "<unparsable URL>"
    query = _QUERY_SECRET.sub(r"\1***", parts.query)
    # A Redis URL has no fragment: what follows a '#' is the rest of a password cut short.
    fragment = "***" if parts.fragment else ""
    if "@" not in netloc and query == parts.query and fragment == parts.fragment:
        return url
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user if sep else ''}{':' if sep else ''}***@{hostport}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=query, fragment=fragment))


def _password_layout(url: str, also: str = "") -> str | None:
    """What in `url` would split a password the client reads, or None (`also`: more to say
    of the '@')."""
    # The client would take part of the password for the host, port or path. (A URL that does
    # not split at all gets the parser's own message.)
    if _misplaced_at(url) is not None and _splits(url):
        return (
            "has an '@' after its host: a '/', '?' or '#' in the user name or password must be "
            "percent-encoded (%2F, %3F, %23)" + also
        )
    # A URL here has no fragment: a '#' is part of a password (in the user info or the query)
    # that the client would cut short, and whatever follows it would be shown as is.
    if "#" in url:
        return "holds a '#': in a password it must be percent-encoded (%23)"
    return None


def check_url(url: str) -> str | None:
    """What makes `url` unusable for the Redis client, or None; never echoes credentials.

    Parses with redis-py's own parser and builds (without connecting) the connection the daemon
    would, so that whatever would fail at start fails here.
    """
    if not url.startswith(SCHEMES):
        return "expected a redis://, rediss:// or unix:// URL"
    problem = _password_layout(url, ", as must an '@' in the path or query (%40)")
    if problem is not None:
        return problem
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        options: dict[str, Any] = dict(parse_url(url))
        # Through a typed name: some redis-py versions type make_connection, others do not.
        make_connection: Callable[[], object] = ConnectionPool(**options).make_connection
        make_connection()
    except (ValueError, TypeError, RedisError) as exc:
        return _scrub(str(exc), url)
    if url.startswith("unix://"):
        if not options.get("path"):
            return "a unix:// URL needs a socket path, e.g. unix:///run/redis/redis.sock"
    elif port == 0:
        return "port must be 1..65535, got 0"
    elif not parts.hostname:
        return "no host name"
    elif parts.path.strip("/") and not parts.path.strip("/").isdigit():
        return f"database must be a number, got {parts.path.strip('/')!r}"
    return None


POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def check_postgres_url(url: str) -> str | None:
    """What makes `url` unusable as a PostgreSQL URL (libpq's form), or None; never echoes
    credentials. libpq itself reads it when the mirror connects."""
    if not url.startswith(POSTGRES_SCHEMES):
        return "expected a postgresql:// URL"
    problem = _password_layout(url)
    if problem is not None:
        return problem
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        return _scrub(str(exc), url)
    if port == 0:
        return "port must be 1..65535, got 0"
    return None


def _scrub(message: str, url: str) -> str:
    """A parser message, unless it contains a credential of `url` (then a generic one)."""
    try:
        parts = urllib.parse.urlsplit(url)
        # A user name of a letter or two would match any message; longer ones are checked.
        secrets = [s for s in (parts.password,) if s]
        secrets += [
            v for k, v in urllib.parse.parse_qsl(parts.query) if _QUERY_SECRET.match(k + "=")
        ]
        if parts.username and len(parts.username) > 2:
            secrets.append(parts.username)
    except ValueError:
        secrets = []
    secrets += [urllib.parse.unquote(s) for s in secrets]
    if url in message or any(s in message for s in secrets):
        return "cannot be parsed (check the host, port, database and query options)"
    return message.rstrip(".")
