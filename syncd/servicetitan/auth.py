"""OAuth 2.0 client credentials: one cached token per tenant, renewed before it expires."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable

import aiohttp
import msgspec
import structlog

from syncd import redact
from syncd.config import Secret
from syncd.errors import AuthFailed, RateLimited, TransientError
from syncd.servicetitan.retry_after import parse_retry_after
from syncd.servicetitan.upstream import (
    REDIRECTS,
    problem_text,
    read_capped,
    redirect_error,
    wait_texts,
)

log = structlog.get_logger("syncd.auth")

# Renew this long before expiry, so that a request never leaves with a token about to lapse.
RENEW_MARGIN_S = 60.0
# A token is kept at least this long, whatever `expires_in` says: a careless endpoint answering
# 0 or less would otherwise be asked again before every request. A token that really expired
# gets a 401, which renews it.
MIN_TOKEN_LIFE_S = 1.0
# Callers queued behind a failed renewal share its error for this long instead of retrying.
FAILURE_HOLD_S = 2.0
# A token answer is a small JSON object; more than this is not one.
MAX_TOKEN_BODY_BYTES = 64 * 1024
# A token request that has not been answered by then fails (and is retried with backoff).
DEFAULT_TIMEOUT_S = 10.0
# What a bearer token may hold to be sent in a header: visible ASCII, at least one character.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


class _TokenResponse(msgspec.Struct):
    access_token: str
    expires_in: float = 900.0
    token_type: str = "Bearer"


class TokenProvider:
    """The token of one tenant: cached, renewed by one caller at a time however many wait."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth_url: str,
        tenant: int,
        client_id: str,
        client_secret: Secret,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_renewal: Callable[[int], None] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self._session = session
        self._url = auth_url
        self.tenant = tenant
        self._client_id = client_id
        self._secret = client_secret
        self._clock = clock
        self._on_renewal = on_renewal
        # Its own bound, shorter than a page's: a token endpoint that hangs must not hold the
        # tenant's polls (and their workers) for the whole request timeout.
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.timeout_s = timeout
        self._token: str | None = None
        self._expires_at = 0.0
        self._lock = asyncio.Lock()
        self.renewals = 0
        self.last_error: str | None = None  # the last renewal's failure, None once one succeeds
        self._failure: tuple[float, Exception] | None = None
        self._generation = 0
        redact.register(("client_secret", tenant), client_secret.reveal())

    def _valid(self) -> bool:
        return self._token is not None and self._clock() < self._expires_at

    async def token(self) -> str:
        """A valid access token; fetches a new one when the cached one is near expiry."""
        if self._valid():
            assert self._token is not None
            return self._token
        async with self._lock:
            # Whoever waited on the lock finds the token a previous holder fetched ...
            if not self._valid():
                # ... or the error it got just now, instead of asking the endpoint again.
                failure = self._failure
                if failure is not None and self._clock() - failure[0] < FAILURE_HOLD_S:
                    raise failure[1]
                await self._renew()
            assert self._token is not None
            return self._token

    def set_credentials(self, client_id: str, client_secret: Secret) -> None:
        """New credentials (configuration reload): the next request fetches a new token."""
        self._client_id, self._secret = client_id, client_secret
        redact.register(("client_secret", self.tenant), client_secret.reveal())
        self._generation += 1
        self._token = None
        self._failure = None
        self.last_error = None

    def invalidate(self, token: str) -> None:
        """Drop `token` after a 401, unless a newer one already replaced it."""
        if self._token == token:
            self._token = None

    async def _renew(self) -> None:
        generation = self._generation
        try:
            await self._grant(generation)
        except (AuthFailed, TransientError, RateLimited) as exc:
            if generation == self._generation:
                self.last_error = redact.redact(str(exc))
                self._failure = (self._clock(), exc)
            raise
        self.last_error = None
        self._failure = None

    async def _grant(self, generation: int) -> None:
        form = {
            "grant_type": "client_credentials",
            "client_id": self._client_id,
            "client_secret": self._secret.reveal(),
        }
        try:
            # Never follow a redirect: it would send the client secret again, anywhere.
            async with self._session.post(
                self._url, data=form, allow_redirects=False, timeout=self._timeout
            ) as resp:
                status = resp.status
                body, over = await read_capped(resp, MAX_TOKEN_BODY_BYTES)
                retry_after = resp.headers.get("Retry-After")
                location = resp.headers.get("Location")
                content_type = resp.headers.get("Content-Type", "")
        except TimeoutError:
            raise TransientError(
                f"token endpoint did not answer within {self.timeout_s:g}s"
            ) from None
        except aiohttp.ClientError as exc:
            raise TransientError(f"token endpoint unreachable: {type(exc).__name__}") from None
        if status in REDIRECTS:
            raise TransientError(redirect_error(status, location, self._url, "the token endpoint"))
        if status == 429:
            wait = parse_retry_after(retry_after, wait_texts(body), time.time(), tenant=self.tenant)
            raise RateLimited(wait, where="token")
        if status >= 500:
            raise TransientError(
                f"token endpoint answered {status}: {problem_text(body, content_type, cut=over)}"
            )
        if status != 200:
            # OAuth's `error` (invalid_client, ...) and `error_description`, redacted: a hostile
            # or careless server may echo the form it was sent.
            raise AuthFailed(
                f"token endpoint answered {status}: {problem_text(body, content_type, cut=over)}"
            )
        if over:
            raise TransientError(f"token endpoint answer over {MAX_TOKEN_BODY_BYTES} bytes")
        try:
            parsed = msgspec.json.decode(body, type=_TokenResponse)
        except (ValueError, RecursionError):  # msgspec's DecodeError, invalid UTF-8
            raise TransientError("token endpoint answered unreadable JSON") from None
        if _HEADER_SAFE.fullmatch(parsed.access_token) is None:
            # It goes into the Authorization header of every request: control characters would
            # fail each of them (or split the header), an empty one would be a 401 loop.
            raise TransientError(
                "token endpoint answered an unusable access_token (empty, or not visible ASCII)"
            )
        if generation != self._generation:
            # The credentials changed while this grant was under way: its token is stale.
            raise TransientError("credentials changed during the token request")
        self._token = parsed.access_token
        redact.register(("token", self.tenant), parsed.access_token)
        # Short-lived tokens (tests, the simulator) renew at 90% of their life.
        life = max(parsed.expires_in, MIN_TOKEN_LIFE_S)
        margin = min(RENEW_MARGIN_S, life * 0.1)
        self._expires_at = self._clock() + life - margin
        self.renewals += 1
        if self._on_renewal is not None:
            self._on_renewal(self.tenant)
        log.info("token_renewed", tenant=self.tenant, expires_in_s=parsed.expires_in)
