"""The Export API client: fetch one page of one feed, decode it, classify failures."""

from __future__ import annotations

import functools
import time

import aiohttp
import anyio
import anyio.to_thread
import structlog

from syncd import redact
from syncd.catalogue import Feed
from syncd.config import Secret
from syncd.errors import AuthFailed, BadRequest, FeedUnavailable, RateLimited, TransientError
from syncd.ops.metrics import Metrics
from syncd.servicetitan.auth import TokenProvider
from syncd.servicetitan.page import Page as Page  # re-exported: callers used to import it from here
from syncd.servicetitan.page import decode_page as decode_page
from syncd.servicetitan.retry_after import parse_retry_after
from syncd.servicetitan.upstream import (
    MAX_BODY_BYTES,
    MAX_ERROR_BODY_BYTES,
    REDIRECTS,
    BodyTooLarge,
    escaped_credential,
    guarded_decode,
    page_credential,
    problem_text,
    read_capped,
    redirect_error,
    wait_texts,
)

log = structlog.get_logger("syncd.client")


def _cursor_of(page: Page) -> str:
    return page.continue_from


def decode_checked(body: bytes, feed: Feed, fetch_s: float = 0.0) -> Page:
    """`decode_page` within the page caps (`upstream`): any body gives a Page (possibly with
    dead letters) or a TransientError, never another exception."""
    decode = functools.partial(decode_page, feed=feed, fetch_s=fetch_s)
    return guarded_decode(body, decode, _cursor_of)


# A page body at least this large is checked and decoded in a worker thread: a 30 MiB page
# takes a good part of a second, and the event loop (every other tenant, /healthz) keeps
# running meanwhile. Smaller pages are not worth the hop.
THREAD_MIN_BYTES = 256 * 1024
# At most this many pages are checked and decoded at once: each holds its body and its records
# meanwhile, and the interpreter runs one thread at a time anyway.
DECODING_AT_ONCE = 2


def checked_page(body: bytes, feed: Feed, tenant: int, sent: list[str], fetch_s: float) -> Page:
    """A 200 answer's body as a Page, or a TransientError. A page holding a credential
    (echoed, or another tenant's) would put it into Redis as a cursor or an event: it is not
    applied. Its bytes are checked first; what its escapes spell once it is decoded, after."""
    problem = page_credential(body, tenant, sent)
    if problem is not None:
        raise TransientError(problem)
    page = decode_checked(body, feed, fetch_s)
    problem = escaped_credential(body, tenant, sent)
    if problem is not None:
        raise TransientError(problem)
    return page


def _problem_text(body: bytes, content_type: str = "", *, cut: bool = False) -> str:
    return problem_text(body, content_type, cut=cut)


class ExportClient:
    """Fetches export pages for every tenant over one shared HTTP session (no cookie jar).

    Every error it raises carries what syncd decided (a status, a known field's short text, a
    short excerpt) after redaction, never the upstream bytes themselves.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        api_url: str,
        app_key: Secret,
        metrics: Metrics | None = None,
    ) -> None:
        self._session = session
        self._api = api_url.rstrip("/")
        self._app_key = app_key
        self._metrics = metrics
        self._decoding: anyio.CapacityLimiter | None = None  # made in the event loop
        redact.register("app_key", app_key.reveal())

    async def fetch(
        self,
        tokens: TokenProvider,
        feed: Feed,
        cursor: str | None,
        *,
        include_recent_changes: bool,
    ) -> Page:
        """One page of `feed` after `cursor` (a continueFrom token or a date; None: the start).

        A 401 renews the token and tries once more; other failures raise the engine's errors.
        """
        url = self._api + feed.url_path(tokens.tenant)
        params = {"includeRecentChanges": "true" if include_recent_changes else "false"}
        if cursor is not None:
            params["from"] = cursor
        params.update(feed.params)
        for attempt in (1, 2):
            token = await tokens.token()
            headers = {"Authorization": f"Bearer {token}", "ST-App-Key": self._app_key.reveal()}
            started = time.monotonic()
            try:
                # Redirects are never followed: the request carries the app key and a token,
                # which must not go wherever a Location header points.
                async with self._session.get(
                    url, params=params, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                    limit = MAX_BODY_BYTES if status == 200 else MAX_ERROR_BODY_BYTES
                    body, over = await read_capped(resp, limit)
                    retry_after = resp.headers.get("Retry-After")
                    location = resp.headers.get("Location")
                    content_type = resp.headers.get("Content-Type", "")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self._count(tokens.tenant, None)
                kind = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
                raise TransientError(f"request failed: {kind}") from None
            elapsed = time.monotonic() - started
            self._count(tokens.tenant, status)
            if status == 200:
                if over:
                    raise BodyTooLarge(
                        f"page body over {MAX_BODY_BYTES} bytes (MAX_BODY_BYTES); not decoded"
                    )
                # The token sent is checked even if renewed since.
                sent = [token] if len(token) >= redact.MIN_SECRET_CHARS else []
                check = functools.partial(checked_page, body, feed, tokens.tenant, sent, elapsed)
                if len(body) < THREAD_MIN_BYTES:
                    return check()
                if self._decoding is None:
                    self._decoding = anyio.CapacityLimiter(DECODING_AT_ONCE)
                return await anyio.to_thread.run_sync(check, limiter=self._decoding)
            if status in REDIRECTS:
                raise TransientError(redirect_error(status, location, url, "the API"))
            text = _problem_text(body, content_type, cut=over)
            if status == 401:
                tokens.invalidate(token)
                if attempt == 1:
                    continue
                raise AuthFailed(f"HTTP 401 with a freshly issued token; the API says: {text}")
            if status == 429:
                hints = wait_texts(body)
                wait = parse_retry_after(retry_after, hints, time.time(), tenant=tokens.tenant)
                raise RateLimited(wait)
            if status in (403, 404):
                raise FeedUnavailable(status, text)
            if status == 400:
                raise BadRequest(text)
            raise TransientError(f"HTTP {status}: {text}")
        raise AssertionError("unreachable")

    def _count(self, tenant: int, status: int | None) -> None:
        if self._metrics is not None:
            self._metrics.request(tenant, status)
