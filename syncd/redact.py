"""Redaction: secrets never leave the process in a log line, a stored error or an HTTP body.

Two passes over any text that may have come from outside:

- the secrets syncd actually knows (the app key, each tenant's client secret, each tenant's
  live bearer token) are registered here when they are loaded or obtained, and every occurrence
  is replaced, whatever surrounds it;
- anything that merely looks like a credential is replaced too: `Bearer ...`, `key=value` pairs
  whose name says token/secret/password/key, credentials in a URL, JWTs and long opaque strings.

An upstream server that echoes the request headers into an error page must not be able to
route the app key or a token into Redis, `syncd status` or `/readyz` through our error text.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Hashable, MutableMapping
from typing import Any

MASK = "***"
# Secrets shorter than this are not registered: replacing every occurrence of a short string
# would mangle ordinary words, and a credential that short protects nothing anyway.
MIN_SECRET_CHARS = 6

_lock = threading.Lock()
_known: dict[Hashable, str] = {}
_values: tuple[str, ...] = ()  # longest first, so that a secret containing another goes whole

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host -> scheme://***@host
    (re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]*@"), r"\1" + MASK + "@"),
    # Authorization header values.
    (re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\+)[A-Za-z0-9._~+/=-]+"), r"\1\2" + MASK),
    # name=value / "name": "value" where the name says what it is.
    (
        re.compile(
            r"(?i)([\w-]*(?:token|secret|passw(?:or)?d|pwd|api[_-]?key|app[_-]?key|"
            r"authorization|credential|signature)[\w-]*)"
            r"(\"?'?\s*[:=]\s*(?:\"|')?)([^\s\"'&,;<>]+)"
        ),
        r"\1\2" + MASK,
    ),
    # JWTs.
    (re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*"), MASK),
    # Long opaque strings mixing upper case, lower case and digits: what keys and tokens look
    # like (hex trace ids and ordinary words are left alone).
    (
        re.compile(
            r"(?=[A-Za-z0-9+/_=-]*[a-z])(?=[A-Za-z0-9+/_=-]*[A-Z])"
            r"(?=[A-Za-z0-9+/_=-]*[0-9])[A-Za-z0-9+/_=-]{40,}"
        ),
        MASK,
    ),
)


def register(slot: Hashable, secret: str | None) -> None:
    """Know `secret` under `slot` (e.g. ("token", tenant)), replacing what the slot held: a
    renewed token takes its predecessor's place, so the set stays one entry per credential."""
    global _values
    with _lock:
        if secret is None or len(secret) < MIN_SECRET_CHARS:
            _known.pop(slot, None)
        else:
            _known[slot] = secret
        _values = tuple(sorted(set(_known.values()), key=len, reverse=True))


def forget(slot: Hashable) -> None:
    register(slot, None)


def redact(text: str) -> str:
    """`text` with every known secret and everything that looks like a credential masked."""
    for value in _values:
        if value in text:
            text = text.replace(value, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def _walk(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: _walk(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_walk(v) for v in value]
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


def processor(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> Any:
    """structlog processor: every string in the event (the formatted traceback included, when
    it runs after `format_exc_info`) goes through `redact`."""
    for key, value in event_dict.items():
        event_dict[key] = _walk(value)
    return event_dict
