"""ServiceTitan-style error responses (RFC 7807 ProblemDetails, as in the catalogue's schema)."""

from __future__ import annotations

import random
from collections.abc import Mapping

import msgspec
from aiohttp import web

JSON_TYPE = "application/json; charset=utf-8"

_TITLES = {
    400: "One or more validation errors occurred.",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Rate limit is exceeded.",
    500: "Internal Server Error",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
_trace_rng = random.Random()


def trace_id() -> str:
    """A W3C-style trace id, as ServiceTitan puts in its errors."""
    return f"00-{_trace_rng.getrandbits(128):032x}-{_trace_rng.getrandbits(64):016x}-00"


def problem(
    status: int,
    title: str | None = None,
    *,
    errors: Mapping[str, list[str]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """A ProblemDetails response."""
    body = {
        "type": f"https://httpstatuses.io/{status}",
        "title": title or _TITLES.get(status, "Error"),
        "status": status,
        "traceId": trace_id(),
        "errors": dict(errors or {}),
        "data": {},
    }
    return web.Response(
        status=status,
        body=msgspec.json.encode(body),
        headers={"Content-Type": JSON_TYPE, **(headers or {})},
    )


def json_response(value: object, status: int = 200) -> web.Response:
    """A plain JSON response."""
    return web.Response(
        status=status, body=msgspec.json.encode(value), headers={"Content-Type": JSON_TYPE}
    )


def rate_limited(seconds: int, style: str) -> web.Response:
    """A 429 in `style`: "problem" (ProblemDetails and Retry-After), "apim" (Azure API
    Management's body, no header) or "apim-retry-after" (that body and the header)."""
    message = f"Rate limit is exceeded. Try again in {seconds} seconds."
    if style == "problem":
        return problem(429, message, headers={"Retry-After": str(seconds)})
    headers = {"Content-Type": JSON_TYPE}
    if style == "apim-retry-after":
        headers["Retry-After"] = str(seconds)
    body = msgspec.json.encode({"statusCode": 429, "message": message})
    return web.Response(status=429, body=body, headers=headers)
