"""The few exceptions the engine acts on, each carrying what the scheduler needs to decide."""

from __future__ import annotations


class SyncError(Exception):
    """Base of the engine's own errors."""


class RateLimited(SyncError):
    """ServiceTitan answered 429: the tenant pauses for `retry_after` seconds (None: back off)."""

    def __init__(self, retry_after: float | None, where: str = "api") -> None:
        if retry_after is None:
            wait = "no usable Retry-After, backing off"
        else:
            wait = f"retry after {retry_after}s"
        super().__init__(f"rate limited ({where}), {wait}")
        self.retry_after = retry_after
        self.where = where


class TransientError(SyncError):
    """A failure worth retrying with backoff: 5xx, timeout, reset, bad JSON, Redis down."""


class RedisFull(TransientError):
    """Redis refused a write for lack of memory (OOM): polling pauses until it has room."""


class ReplicasBehind(TransientError):
    """Fewer than `wanted` replicas acknowledged the primary's writes within the wait timeout
    (`[redis] wait_replicas`): what a feed stored there is not yet safe from a failover, so
    the feed is held where the replicas are known to be."""

    def __init__(self, acked: int, wanted: int, timeout: float, what: str) -> None:
        super().__init__(
            f"only {acked} of {wanted} replicas acknowledged {what} within {timeout:g}s"
        )
        self.acked = acked
        self.wanted = wanted


class FeedUnavailable(SyncError):
    """403 or 404 for a feed: retrying soon will not help, the feed is parked."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class BadRequest(SyncError):
    """400 from ServiceTitan, with the body's field errors."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class AuthFailed(SyncError):
    """The token endpoint refused the tenant's credentials (or the app key was refused)."""


class CursorMoved(SyncError):
    """The stored cursor is not the one the page was fetched from: someone else applied it."""
