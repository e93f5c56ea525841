"""What an upstream HTTP answer may do to syncd, bounded: body size, cursor length, nesting,
encoding, and the short clean text an error keeps of it.

Pure functions (bytes in, decisions out) except `read_capped`, which streams a response body.
Error text is what syncd decided to keep: a status, a known field's short text, or a short
excerpt of an HTML or plain-text body, always after redaction; never the raw bytes.
"""

from __future__ import annotations

import contextlib
import html
import json
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import aiohttp
import msgspec
import yarl

from syncd.errors import TransientError
from syncd.redact import encodings, known_in, redact

# A page body larger than this fails the page (it is fetched again later, and keeps failing
# until the API sends smaller pages): an export page holds at most a few thousand records of a
# few kilobytes, so this is several times the largest real page, and `max_connections` pages
# in flight times this bounds the memory bodies can take.
MAX_BODY_BYTES = 32 * 1024 * 1024
# Of an error answer only a short excerpt is kept: reading more is wasted memory.
MAX_ERROR_BODY_BYTES = 64 * 1024
# A `continueFrom` longer than this fails the page and is never stored: it is sent back as a
# URL query parameter on every later request, and gateways refuse request lines of about 8 KiB.
# Real cursors are short opaque strings.
MAX_CURSOR_CHARS = 2048
# Deeper JSON fails the page: export records nest a few levels, and consumers of the events
# (and recursive JSON parsers in general) must not be handed arbitrarily deep documents.
MAX_JSON_DEPTH = 64
# An error keeps at most this many characters of a text it quotes.
EXCERPT_CHARS = 200

REDIRECTS = frozenset({301, 302, 303, 307, 308})


class BodyTooLarge(TransientError):
    """The answer's body exceeded its cap."""


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The (decompressed) body, read in chunks and never more than `limit` bytes of it kept;
    the flag says whether more was there. What was read is kept (an error body's excerpt
    comes from its beginning); the connection is dropped with the rest unread."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            chunks.append(chunk[: len(chunk) - (size - limit)])
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False


# -- error text ----------------------------------------------------------------------------

# Block openers whose content is not text. Closers are found with str.find: no pattern here
# may backtrack over a hostile body.
_BLOCK = re.compile(r"(?i)<(script|style|head|title)\b|<!--")
_TITLE_OPEN = re.compile(r"(?i)<title\b")
_TAG = re.compile(r"<[^>]{0,2000}>?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\ufeff]+")
_SPACE = re.compile(r"\s+")


def clean(text: str, limit: int = EXCERPT_CHARS, *, cut: bool = False) -> str:
    """One short line of `text`: control characters gone, whitespace collapsed, secrets
    masked, at most `limit` characters.

    Redaction needs a secret whole: where the text is cut (`cut`: before it came here; or here,
    to bound the work), the last, possibly partial word is dropped before redacting.
    """
    text = _SPACE.sub(" ", _CONTROL.sub(" ", text[: 16 * limit])).strip()
    if len(text) > 4 * limit:
        text, cut = text[: 4 * limit], True
    if cut:
        text = text.rsplit(" ", 1)[0] if " " in text else ""
    text = redact(text)
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def _looks_html(text: str, content_type: str) -> bool:
    return "html" in content_type or text.lstrip()[:200].lower().startswith(("<!doctype", "<html"))


def _html_text(text: str) -> str:
    """The readable text of an HTML page, its <title> first; linear in the page's length."""
    lower = text.lower()
    title = ""
    if (t := _TITLE_OPEN.search(text)) is not None:
        opened = text.find(">", t.end())
        closed = lower.find("</title", t.end())
        if 0 <= opened < closed:
            title = text[opened + 1 : closed]
    out: list[str] = []
    pos = 0
    while (m := _BLOCK.search(text, pos)) is not None:
        out.append(text[pos : m.start()])
        name = (m.group(1) or "").lower()
        closer = f"</{name}" if name else "-->"
        end = lower.find(closer, m.end())
        if end < 0:
            pos = len(text)  # unclosed: the rest is inside it
            break
        close = lower.find(">", end) if name else end + 2
        pos = len(text) if close < 0 else close + 1
    out.append(text[pos:])
    title = html.unescape(_TAG.sub(" ", title)).strip()
    rest = html.unescape(_TAG.sub(" ", " ".join(out))).strip()
    # Pages often repeat their title as the first heading.
    rest = _SPACE.sub(" ", rest).removeprefix(_SPACE.sub(" ", title)).strip() if title else rest
    # The title (when there is one) leads: it usually says it all ("502 Bad Gateway").
    return f"{title} - {rest}" if title and rest else title or rest


def excerpt(body: bytes, content_type: str = "", *, cut: bool = False) -> str:
    """A short clean excerpt of a non-JSON body: HTML loses its markup (its <title> first)."""
    text = body.decode("utf-8", "replace")
    if _looks_html(text, content_type.lower()):
        text = _html_text(text)
    return clean(text, cut=cut) or "empty body"


def _short(value: object, limit: int = 120) -> str | None:
    if isinstance(value, str) and value.strip():
        return clean(value, limit)
    return None


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = msgspec.json.decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def wait_texts(body: bytes) -> list[str]:
    """The texts of a 429 body that may say how long to wait: ProblemDetails `title` and
    `detail`, Azure API Management's `message`, or the plain text of a non-JSON body."""
    data = _json_object(body)
    if data is None:
        return [body[:2000].decode("utf-8", "replace")]
    return [v for k in ("title", "detail", "message") if isinstance(v := data.get(k), str)]


def problem_text(body: bytes, content_type: str = "", *, cut: bool = False) -> str:
    """What an error answer says, in one short line: the known fields of a JSON error
    (ProblemDetails `title`, `detail`, `errors`, `traceId`; APIM `message`; OAuth `error`,
    `error_description`) each shortened and redacted, else an excerpt of the body."""
    data = _json_object(body)
    if data is None:
        return excerpt(body, content_type, cut=cut)
    parts: list[str] = []
    for name in ("title", "error", "message", "detail", "error_description"):
        if (text := _short(data.get(name))) is not None:
            parts.append(text)
    errors = data.get("errors")
    if isinstance(errors, dict):
        for field, msgs in list(errors.items())[:5]:
            texts = msgs if isinstance(msgs, list) else [msgs]
            joined = "; ".join(t for t in texts[:3] if isinstance(t, str))
            parts.append(clean(f"{field}: {joined}", 120))
    if (trace := _short(data.get("traceId"), 64)) is not None:
        parts.append(f"traceId {trace}")
    return clean(" | ".join(parts), 2 * EXCERPT_CHARS) if parts else "unexpected JSON body"


def redirect_error(status: int, location: str | None, request_url: str, what: str) -> str:
    """The error a redirect becomes: its status and the host it points at (never the path or
    query, which may carry anything)."""
    host = "an unknown location"
    if location:
        try:
            target = yarl.URL(request_url).join(yarl.URL(location.strip()))
            if target.host:
                host = (
                    target.host
                    if target.explicit_port is None
                    else (f"{target.host}:{target.explicit_port}")
                )
        except (ValueError, TypeError):
            pass
    return clean(f"{what} answered HTTP {status}, a redirect to {host}; redirects are not followed")


# -- page checks around the decoder ---------------------------------------------------------

_NOT_JSON_SYNTAX = bytes(range(256)).translate(None, b'[]{}"')
_BRACKETS = bytes.maketrans(b"[{]}", b"(())")


_RUNS = re.compile(rb"\(+|\)+")
# Rounds of dropping innermost pairs before counting runs: most documents are done by then.
_SHALLOW_ROUNDS = 8


def json_depth(body: bytes, limit: int = MAX_JSON_DEPTH) -> int:
    """The nesting depth of a JSON document (assumed well-formed), counted up to `limit` + 1.

    Byte-level operations only (no per-character Python loop, no call per match): escaped
    quotes go first, then every byte but brackets and quotes, then string contents. What is
    left, brackets only, loses its innermost pairs one level a round while that shortens it well
    (enough for most documents); a deeper rest is measured in one pass over its runs of opening
    and closing brackets.
    """
    if b"\\" in body and b'\\"' in body:
        # Escaped quotes would end strings early. A run of backslashes starts an escape (outside
        # strings there are none), so dropping backslashes two by two from its left drops the
        # escaped backslashes; a backslash left before a quote escapes it. (One byte is found
        # at memchr speed; two, with a quote so common, are not.)
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    s = body.translate(None, _NOT_JSON_SYNTAX)
    # Adjacent quotes are an empty string or a string's end and the next one's start: dropping
    # them keeps every bracket on its side of the string boundaries.
    s = s.replace(b'""', b"")
    if b'"' in s:
        s = b"".join(s.split(b'"')[::2])
    s = s.translate(_BRACKETS)
    depth = 0
    while s and depth < _SHALLOW_ROUNDS:
        shorter = s.replace(b"()", b"")
        if len(shorter) == len(s):
            return depth  # unbalanced: the decoder reports it
        took, s, depth = len(s) - len(shorter), shorter, depth + 1
        if took * 4 < len(s):
            break  # a round took off under a fifth: deep, count runs instead
    if not s:
        return depth
    level = deepest = 0
    for run in _RUNS.findall(s):
        level += len(run) if run[0] == 40 else -len(run)  # 40: "("
        if level < 0:
            break  # unbalanced: the decoder reports it
        deepest = max(deepest, level)
    return min(depth + deepest, limit + 1)


P = TypeVar("P")


def guarded_decode(body: bytes, decode: Callable[[bytes], P], cursor_of: Callable[[P], str]) -> P:
    """`decode(body)` with the page caps applied: invalid UTF-8, nesting deeper than
    MAX_JSON_DEPTH, a decoder hitting the recursion limit and a `continueFrom` longer than
    MAX_CURSOR_CHARS are TransientErrors like any other undecodable page."""
    if not body.isascii():  # ASCII is UTF-8, and checking it copies nothing
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise TransientError(f"invalid export page: not UTF-8 at byte {exc.start}") from None
    if json_depth(body) > MAX_JSON_DEPTH:
        raise TransientError(f"invalid export page: JSON nested deeper than {MAX_JSON_DEPTH}")
    try:
        page = decode(body)
    except RecursionError:
        raise TransientError("invalid export page: JSON nested too deeply") from None
    except ValueError as exc:  # msgspec's DecodeError and UnicodeDecodeError among them
        raise TransientError(f"invalid export page: {type(exc).__name__}") from None
    cursor = cursor_of(page)
    if len(cursor) > MAX_CURSOR_CHARS:
        raise TransientError(
            f"invalid export page: continueFrom is {len(cursor)} characters, "
            f"over the {MAX_CURSOR_CHARS} allowed; it is not stored"
        )
    return page


# -- credentials in a page --------------------------------------------------------------------

# Escapes that can hide a secret's characters: a \u escape can spell any character, \/ a
# slash written either way. (A secret with a quote or a backslash is found in the bytes in its
# JSON-escaped form: see `redact.encodings`.)
_HIDING = re.compile(r"\\[u/]")
# The opening quote of the string holding the end of the span matched: the last quote that
# follows anything but a backslash. Inside a string every quote is escaped, so it follows a
# backslash; outside strings JSON has no backslashes, so an opening quote never does. `.*` goes
# to the end of the span at once and steps back in C, so a string of a million escaped quotes
# costs a few milliseconds, once: each span starts where the previous string ended.
_OPENING = re.compile(r'.*[^\\]"', re.DOTALL)
# A JSON string holding at least one escape. Outside strings JSON has neither quotes nor
# backslashes, so in a document that decoded, a search starting outside a string finds whole
# strings; the scan is linear (possessive repetitions: nothing is tried twice).
_ESCAPED_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)++"', re.DOTALL)
# Strings with such escapes are found from their escapes and each decoded by the JSON module
# (about 2 us a string, plus its length); past this many, one regular expression pass over the
# rest of the page costs less (about 7 ms per MB, and 0.3 us a string).
MAX_SCANNED_STRINGS = 1000
_DECODE_AT = json.JSONDecoder(strict=False).raw_decode


def unescaped_strings(body: bytes) -> bytes:
    """What the JSON strings of `body` (a document that decoded) holding a `\\u` or `\\/`
    escape decode to, as UTF-8 separated by NUL; b"" when there are none: a credential written
    with escapes is not in the body's bytes, but it is in what a decoder stores.

    Linear in the length of `body`: each string is looked at from where the previous one ended.
    """
    if b"\\" not in body:
        return b""
    text = body.decode("utf-8", "replace")
    strings: list[str] = []
    outside = 0  # where the last string decoded ended: no string holds it
    escape = _HIDING.search(text)
    while escape is not None:
        opening = _OPENING.match(text, outside, escape.start())
        start = outside if opening is None else opening.end() - 1  # (a document that is a string)
        if len(strings) < MAX_SCANNED_STRINGS and text.startswith('"', start):
            try:
                value, outside = _DECODE_AT(text, start)
            except ValueError:
                pass  # not JSON after all (a page the decoder refused): the pass below
            else:
                strings.append(value)
                escape = _HIDING.search(text, outside)
                continue
        rest = _ESCAPED_STRING.findall(text, start)
        with contextlib.suppress(ValueError):
            strings += json.loads("[" + ",".join(rest) + "]", strict=False)
        break
    return "\x00".join(strings).encode("utf-8", "surrogatepass")


# Passwords the operator chose (Redis, the sentinels, the ops server's token, the mirror's
# database) are masked in every log line and error, but a page holding one is applied: they
# never go to the API, so a page cannot be echoing them, and customer data that happens to hold
# such a word would otherwise stop its feed for good.
OPERATOR_SLOTS = frozenset(
    {"ops_token", "sentinel_password", "redis_password", "mirror_password", "mirror_url_password"}
)


def _holds(text: bytes, sent: Sequence[str]) -> Hashable | None:
    slot = known_in(text, ignore=OPERATOR_SLOTS)
    if slot is not None:
        return slot
    if any(form.encode("utf-8", "surrogatepass") in text for s in sent for form in encodings(s)):
        return "sent"
    return None


def _why(slot: Hashable, tenant: int) -> str:
    if slot in ("sent", "app_key", ("token", tenant), ("client_secret", tenant)):
        return "page contains a credential it was sent; not applied"
    if isinstance(slot, tuple) and slot[:1] in (("token",), ("client_secret",)):
        return "page contains another tenant's credential; not applied"
    return "page contains a credential syncd holds; not applied"


def page_credential(body: bytes, tenant: int, sent: Sequence[str] = ()) -> str | None:
    """Why the page `body` of `tenant` must not be applied because it holds a credential in
    its bytes, or None.

    Every API credential syncd knows (the app key, each tenant's client secret and live token:
    see `redact.known_in`; not `OPERATOR_SLOTS`) and each of `sent` (what the request carried,
    in case it was replaced since) is looked for, in the forms it may be echoed in: a record, a
    key, a timestamp or a cursor holding one would put it into Redis, `status` or the next
    request's URL.
    """
    slot = _holds(body, sent)
    return None if slot is None else _why(slot, tenant)


def escaped_credential(body: bytes, tenant: int, sent: Sequence[str] = ()) -> str | None:
    """`page_credential` of what the escaped strings of `body` decode to (`unescaped_strings`;
    nothing to do for a body without a backslash). Only for a body that decoded."""
    plain = unescaped_strings(body)
    slot = _holds(plain, sent) if plain else None
    return None if slot is None else _why(slot, tenant)
