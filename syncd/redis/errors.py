"""Redis' errors as the engine's: what a caller of a script or command may retry."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import redis.exceptions

from syncd.errors import RedisFull, TransientError

__all__ = ["redis_errors"]


@contextlib.contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Redis' errors as the engine's: out of memory (RedisFull), refused or failing
    (TransientError). A script is refused before its first write (its flags make OOM checked up
    front), so nothing was written; a page is fetched again later."""
    try:
        yield
    except redis.exceptions.ResponseError as exc:
        if isinstance(exc, redis.exceptions.OutOfMemoryError) or str(exc).startswith("OOM"):
            raise RedisFull(f"redis is out of memory: {exc}") from None
        raise TransientError(f"redis refused {what}: {exc}") from None
    except redis.exceptions.RedisError as exc:
        raise TransientError(f"redis: {type(exc).__name__}: {exc}") from None
