"""The Export API client: fetch one page of one feed, decode it, classify failures."""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import structlog

from syncd import redact
from syncd.auth import TokenProvider
from syncd.catalogue import Feed
from syncd.config import Secret
from syncd.errors import AuthFailed, BadRequest, FeedUnavailable, RateLimited, TransientError
from syncd.metrics import Metrics
from syncd.ratelimit import parse_retry_after
from syncd.upstream import (
    MAX_BODY_BYTES,
    MAX_ERROR_BODY_BYTES,
    REDIRECTS,
    BodyTooLarge,
    guarded_decode,
    problem_text,
    read_capped,
    redirect_error,
    wait_texts,
)

log = structlog.get_logger("syncd.client")


class _Envelope(msgspec.Struct):
    hasMore: bool
    data: list[msgspec.Raw]
    # Missing or null is read as "": no cursor to resume from, which the scheduler treats as a
    # page that makes no progress (syncd.policy.page_progress), not as a broken body.
    continueFrom: str | None = None


_ENVELOPE = msgspec.json.Decoder(_Envelope)


@dataclass(frozen=True, slots=True)
class Page:
    """One decoded page. Usable records are parallel lists (cheaper than an object each);
    `dead` holds (reason, raw bytes) of records that cannot become events."""

    has_more: bool
    continue_from: str
    keys: list[str]
    fingerprints: list[bytes]
    modified: list[str]
    data: list[bytes]
    dead: list[tuple[str, bytes]]
    fetch_s: float = 0.0

    @property
    def fetched(self) -> int:
        return len(self.keys) + len(self.dead)


@functools.cache
def _decoders(feed: Feed) -> tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]]:
    """Decoders reading only a record's key and timestamp fields (the rest is skipped): one
    for a single record, one for the `data` list of a whole page in a single pass."""
    fields: list[tuple[str, Any, Any]] = [(f, int | str | None, None) for f in feed.key_fields]
    if feed.timestamp_field and feed.timestamp_field not in feed.key_fields:
        fields.append((feed.timestamp_field, str | None, None))
    head = msgspec.defstruct(f"Head_{feed.name}", fields)
    heads = msgspec.defstruct(f"Heads_{feed.name}", [("data", list[head])])  # type: ignore[valid-type]
    return msgspec.json.Decoder(head), msgspec.json.Decoder(heads)


def decode_page(body: bytes, feed: Feed, fetch_s: float = 0.0) -> Page:
    """Decode an export envelope; each record stays its raw bytes. Raises TransientError on a
    body that is not a valid envelope (the page is fetched again)."""
    try:
        env = _ENVELOPE.decode(body)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise TransientError(f"invalid export page: {exc}") from None
    one, many = _decoders(feed)
    raws = [bytes(r) for r in env.data]
    try:
        heads = many.decode(body).data
    except msgspec.ValidationError:
        heads = None  # some record is odd: look at each on its own
    keys_f, ts_field = feed.key_fields, feed.timestamp_field
    single = keys_f[0] if len(keys_f) == 1 else None
    page = Page(env.hasMore, env.continueFrom or "", [], [], [], [], [], fetch_s)
    blake2b = hashlib.blake2b  # the loop runs per record: no attribute lookups in it
    for i, data in enumerate(raws):
        if heads is not None:
            head = heads[i]
        else:
            try:
                head = one.decode(data)
            except msgspec.ValidationError as exc:
                page.dead.append((f"record does not decode: {exc}", data))
                continue
        if single is not None:
            value = getattr(head, single)
            key = None if value is None else str(value)
        else:
            parts = [getattr(head, k) for k in keys_f]
            key = None if any(p is None for p in parts) else ":".join(map(str, parts))
        if not key:
            page.dead.append((f"record has no key ({'+'.join(keys_f)})", data))
            continue
        page.keys.append(key)
        # The fingerprint: a short digest of the record's exact bytes.
        page.fingerprints.append(blake2b(data, digest_size=8).digest())
        page.modified.append((getattr(head, ts_field) if ts_field else None) or "")
        page.data.append(data)
    return page


def _cursor_of(page: Page) -> str:
    return page.continue_from


def decode_checked(body: bytes, feed: Feed, fetch_s: float = 0.0) -> Page:
    """`decode_page` within the page caps (syncd.upstream): any body gives a Page (possibly
    with dead letters) or a TransientError, never another exception."""
    decode = functools.partial(decode_page, feed=feed, fetch_s=fetch_s)
    return guarded_decode(body, decode, _cursor_of)


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
        self._app_key_bytes = app_key.reveal().encode()
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
                sent = (self._app_key_bytes, token.encode(), *tokens.secrets_sent())
                if any(
                    len(secret) >= redact.MIN_SECRET_CHARS and secret in body for secret in sent
                ):
                    # A page echoing what it was sent would put a credential into Redis as a
                    # cursor or an event: it is not applied.
                    raise TransientError("page contains a credential it was sent; not applied")
                return decode_checked(body, feed, elapsed)
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
