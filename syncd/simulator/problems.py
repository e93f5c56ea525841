"""Error responses: ServiceTitan's RFC 7807 ProblemDetails (as in the catalogue's schema), and
what gateways in front of it answer instead (API Management JSON, HTML pages, plain text)."""

from __future__ import annotations

import http
import random
from collections.abc import Mapping

import msgspec
from aiohttp import web

JSON_TYPE = "application/json; charset=utf-8"
TEXT_TYPE = "text/plain; charset=utf-8"
HTML_TYPE = "text/html"

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
    Management's body, no header), "apim-retry-after" (that body and the header), "text" (its
    message as text/plain, no header) or "html" (nginx's page: no header, no wait)."""
    message = f"Rate limit is exceeded. Try again in {seconds} seconds."
    if style == "problem":
        return problem(429, message, headers={"Retry-After": str(seconds)})
    if style == "text":
        return web.Response(status=429, body=message.encode(), headers={"Content-Type": TEXT_TYPE})
    if style == "html":
        return _page(429, _NGINX)
    headers = {"Content-Type": JSON_TYPE}
    if style == "apim-retry-after":
        headers["Retry-After"] = str(seconds)
    body = msgspec.json.encode({"statusCode": 429, "message": message})
    return web.Response(status=429, body=body, headers=headers)


def error_response(status: int, style: str) -> web.Response:
    """An error answer in `style` ("problem", "text" or "html"); 4xx are always ProblemDetails."""
    if style == "problem" or status < 500:
        return problem(status)
    if style == "text":
        body = _phrase(status).encode()
        return web.Response(status=status, body=body, headers={"Content-Type": TEXT_TYPE})
    return _page(status, _HTML_BY_STATUS.get(status, _NGINX))


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _page(status: int, template: tuple[str, str]) -> web.Response:
    content_type, text = template
    body = text.format(status=status, phrase=_phrase(status)).replace("\n", "\r\n").encode()
    return web.Response(status=status, body=body, headers={"Content-Type": content_type})


# What nginx, IIS and HTTP.sys put in front of an application answer when it fails.
_NGINX = (
    HTML_TYPE,
    """<html>
<head><title>{status} {phrase}</title></head>
<body>
<center><h1>{status} {phrase}</h1></center>
<hr><center>nginx</center>
</body>
</html>
""",
)
_IIS_500 = (
    HTML_TYPE,
    """<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Strict//EN" \
"http://www.w3.org/TR/xhtml1/DTD/xhtml1-strict.dtd">
<html xmlns="http://www.w3.org/1999/xhtml">
<head>
<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-1"/>
<title>500 - Internal server error.</title>
<style type="text/css">
<!--
body{{margin:0;font-size:.7em;font-family:Verdana, Arial, sans-serif;background:#EEEEEE;}}
fieldset{{padding:0 15px 10px 15px;}}
h1{{font-size:2.4em;margin:0;color:#FFF;}}
h2{{font-size:1.7em;margin:0;color:#CC0000;}}
h3{{font-size:1.2em;margin:10px 0 0 0;color:#000000;}}
-->
</style>
</head>
<body>
<div id="header"><h1>Server Error</h1></div>
<div id="content">
 <div class="content-container"><fieldset>
  <h2>500 - Internal server error.</h2>
  <h3>There is a problem with the resource you are looking for, and it cannot be displayed.</h3>
 </fieldset></div>
</div>
</body>
</html>
""",
)
_HTTPSYS_503 = (
    "text/html; charset=us-ascii",
    """<!DOCTYPE HTML PUBLIC "-//W3C//DTD HTML 4.01//EN""http://www.w3.org/TR/html4/strict.dtd">
<HTML><HEAD><TITLE>Service Unavailable</TITLE>
<META HTTP-EQUIV="Content-Type" Content="text/html; charset=us-ascii"></HEAD>
<BODY><h2>Service Unavailable</h2>
<hr><p>HTTP Error 503. The service is unavailable.</p>
</BODY></HTML>
""",
)
_HTML_BY_STATUS = {500: _IIS_500, 503: _HTTPSYS_503}
