"""Redaction: secrets never leave the process in a log line, a stored error or an HTTP body.

Two passes over any text that may have come from outside:

- the secrets syncd actually knows (the app key, each tenant's client secret, each tenant's
  live bearer token) are registered here when they are loaded or obtained, and every occurrence
  is replaced, whatever surrounds it;
- anything that merely looks like a credential is replaced too: `Bearer ...`, `key=value` pairs
  whose name says token/secret/password/key, credentials in a URL, JWTs and long opaque strings.

A known secret is also found when the text spells it in a way no encoder would but a reader
undoes: every character percent-encoded (`%61%62...`), `\\u`-escaped or written as an HTML
character reference; the text is then decoded (percent-decoding, JSON escapes, HTML references,
a few rounds for nested encodings) and masked in its decoded form.

`known_in` answers, in one pass over a page's bytes whatever the number of secrets, whether
any known secret (in any of the forms above) is in it: a page holding one is not applied.

An upstream server that echoes the request headers into an error page must not be able to
route the app key or a token into Redis, `syncd status` or `/readyz` through our error text.
"""

from __future__ import annotations

import bisect
import html
import json
import re
import sys
import threading
import urllib.parse
from collections.abc import Container, Hashable, Iterator, MutableMapping
from typing import Any

MASK = "***"
# Secrets shorter than this are not registered: replacing every occurrence of a short string
# would mangle ordinary words, and a credential that short protects nothing anyway.
MIN_SECRET_CHARS = 6

_lock = threading.Lock()
# Each slot's secret, as the forms it may be echoed in (see `encodings`).
_known: dict[Hashable, tuple[str, ...]] = {}
# How many slots hold each form: tenants may share a client secret.
_uses: dict[str, int] = {}
# The known forms indexed by their first MIN_SECRET_CHARS characters: a text is scanned once
# whatever the number of secrets (thousands of tenants mean thousands of secrets and tokens).
# Updated one bucket at a time: a renewed token costs the same with ten tenants or ten thousand.
_by_prefix: dict[str, tuple[str, ...]] = {}
# The known forms as UTF-8, for `known_in`, indexed by blocks of their bytes: a form of at least
# 2 * BLOCK - 1 bytes holds, wherever it lies in a text, one of the text's BLOCK-aligned blocks,
# and that block is one of its own first BLOCK blocks (at offsets 0 .. BLOCK - 1). So the
# text's aligned blocks, read as integers by a memoryview, are looked up in one C-level pass.
# Forms of 7 to 14 bytes take 4-byte blocks, shorter ones (6 bytes) are searched one by one.
_by_block: dict[int, dict[bytes, None]] = {}  # 8-byte blocks of forms of 15+ bytes
_by_short_block: dict[int, dict[bytes, None]] = {}  # 4-byte blocks of forms of 7-14 bytes
_tiny: dict[bytes, None] = {}  # forms of 6 bytes

# Every repetition is bounded or anchored so that no input makes a pattern backtrack over it
# quadratically: the texts come from outside.
_URL_CREDENTIALS = re.compile(r"(?i)\b([a-z][a-z0-9+.-]{0,30}://)[^/\s@]{0,256}@")
_AUTH_SCHEME = re.compile(r"(?i)\b(bearer|basic)(\s+|%20|\+)[A-Za-z0-9._~+/=-]+")
# A name at the start of a word (`client_secret`, `X-Api-Key`, `access_token`), then `:` or
# `=`, then the value.
_NAMED = re.compile(
    r"(?i)((?<![\w-])[\w-]{0,40}?(?:token|secret|passw(?:or)?d|pwd|api[_-]?key|app[_-]?key|"
    r"authorization|credential|signature)[\w-]{0,40})"
    r"(\"?'?\s{0,8}[:=]\s{0,8}(?:\"|')?)([^\s\"'&,;<>]+)"
)
_NAMES = ("token", "secret", "passw", "pwd", "key", "authorization", "credential", "signature")
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,4096}\.[A-Za-z0-9_-]{4,8192}\.[A-Za-z0-9_-]*")
_OPAQUE = re.compile(r"[A-Za-z0-9+/_=-]{40,}")


def _opaque(m: re.Match[str]) -> str:
    # Long runs mixing upper case, lower case and digits are what keys and tokens look like;
    # hex trace ids, paths and ordinary words are left alone.
    run = m.group(0)
    mixed = (
        any(c.isupper() for c in run)
        and any(c.islower() for c in run)
        and any(c.isdigit() for c in run)
    )
    return MASK if mixed else run


# The characters a secret may hold that .NET's default JSON encoder writes as a \u escape
# (four hex digits) instead of as themselves.
_JSON_ESCAPED = frozenset("+<>&'`\"")
# Characters that no encoding here changes.
_UNRESERVED = re.compile(r"[A-Za-z0-9_.~-]*")


def encodings(secret: str) -> tuple[str, ...]:
    """`secret` as it is sent and as an echo of it may be written: as is; percent-encoded (a
    form body, a URL); JSON-escaped the ways serialisers do it (`\\/`, `\\u002B` for `+` and
    the HTML-sensitive characters, as .NET does, in upper or lower case hex); HTML-escaped."""
    if _UNRESERVED.fullmatch(secret):
        return (secret,)  # JWTs and most keys: every form is the secret itself
    forms = [
        secret,
        urllib.parse.quote(secret, safe=""),
        urllib.parse.quote_plus(secret),
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1].replace("/", "\\/"),
        html.escape(secret),
    ]
    if not _JSON_ESCAPED.isdisjoint(secret):
        for digits in ("X", "x"):
            forms.append(
                "".join(f"\\u{ord(c):04{digits}}" if c in _JSON_ESCAPED else c for c in secret)
            )
    return tuple(dict.fromkeys(forms))


def _longest_first(form: str) -> int:
    return -len(form)


def _blocks(data: bytes) -> tuple[dict[int, dict[bytes, None]], list[int]] | None:
    """The block index a form's bytes belong in and their blocks there; None: too short."""
    for size, index in ((8, _by_block), (4, _by_short_block)):
        if len(data) >= 2 * size - 1:
            blocks = [int.from_bytes(data[o : o + size], sys.byteorder) for o in range(size)]
            return index, blocks
    return None


def _index_bytes(data: bytes) -> None:
    found = _blocks(data)
    if found is None:
        _tiny[data] = None
        return
    index, blocks = found
    for block in blocks:
        index.setdefault(block, {})[data] = None


def _unindex_bytes(data: bytes) -> None:
    found = _blocks(data)
    if found is None:
        _tiny.pop(data, None)
        return
    index, blocks = found
    for block in blocks:
        forms = index.get(block)
        if forms is not None:
            forms.pop(data, None)
            if not forms:
                del index[block]


def _add(form: str) -> None:
    count = _uses.get(form, 0)
    _uses[form] = count + 1
    if count == 0:
        key = form[:MIN_SECRET_CHARS]
        # Tokens (JWTs) all start alike: their bucket holds one per tenant.
        bucket = _by_prefix.get(key, ())
        # Longest first, so that a secret containing another is masked whole.
        i = bisect.bisect_right(bucket, -len(form), key=_longest_first)
        _by_prefix[key] = (*bucket[:i], form, *bucket[i:])
        _index_bytes(_as_bytes(form))


def _remove(form: str) -> None:
    count = _uses.pop(form) - 1
    if count:
        _uses[form] = count
        return
    key = form[:MIN_SECRET_CHARS]
    bucket = _by_prefix[key]
    i = bucket.index(form)
    bucket = bucket[:i] + bucket[i + 1 :]
    if bucket:
        _by_prefix[key] = bucket
    else:
        del _by_prefix[key]
    _unindex_bytes(_as_bytes(form))


def register(slot: Hashable, secret: str | None) -> None:
    """Know `secret` under `slot` (e.g. ("token", tenant)), replacing what the slot held: a
    renewed token takes its predecessor's place, so the set stays one entry per credential."""
    forms = () if secret is None or len(secret) < MIN_SECRET_CHARS else encodings(secret)
    with _lock:
        for form in _known.pop(slot, ()):
            _remove(form)
        if forms:
            _known[slot] = forms
            for form in forms:
                _add(form)


def forget(slot: Hashable) -> None:
    register(slot, None)


def _mask_known(text: str) -> str:
    index = _by_prefix
    if not index or len(text) < MIN_SECRET_CHARS:
        return text
    out: list[str] = []
    i = last = 0
    end = len(text) - MIN_SECRET_CHARS
    while i <= end:
        candidates = index.get(text[i : i + MIN_SECRET_CHARS])
        if candidates is not None:
            for value in candidates:
                if text.startswith(value, i):
                    out.append(text[last:i])
                    out.append(MASK)
                    i = last = i + len(value)
                    break
            else:
                i += 1
        else:
            i += 1
    if not out:
        return text
    out.append(text[last:])
    return "".join(out)


# Up to this many known forms, `known_in` searches for each instead of reading the blocks.
# A search costs about 0.5 ms per form in a 3.6 MB page and reading the blocks about 15 ms
# (one Python int a block), on a 2-core machine: they cross near 30 forms (3 tenants hold 19:
# the app key, and each tenant's client secret in its forms and token).
FEW_FORMS = 24


def _as_bytes(form: str) -> bytes:
    return form.encode("utf-8", "surrogatepass")


def _candidates(
    index: dict[int, dict[bytes, None]], blocks: memoryview, into: dict[bytes, None]
) -> None:
    # The common case, no block of any known form: one C-level pass.
    if index.keys().isdisjoint(blocks):
        return
    for block in set(blocks).intersection(index):
        into.update(index.get(block, {}))


def _found(data: bytes) -> Iterator[bytes]:
    """The known forms (as bytes) that `data` contains."""
    if len(_uses) <= FEW_FORMS:
        # A few forms: a search for each (memchr-fast) costs less than reading every block.
        yield from (f for form in list(_uses) if (f := _as_bytes(form)) in data)
        return
    n = len(data)
    candidates: dict[bytes, None] = {}
    with memoryview(data) as view:
        if _by_block and n >= 8:
            with view[: n - n % 8].cast("Q") as blocks:
                _candidates(_by_block, blocks, candidates)
        if _by_short_block and n >= 4:
            with view[: n - n % 4].cast("I") as blocks:
                _candidates(_by_short_block, blocks, candidates)
    yield from (form for form in (*candidates, *_tiny) if form in data)


def known_in(data: bytes, ignore: Container[Hashable] = ()) -> Hashable | None:
    """The slot of a known secret that `data` holds in one of the forms it may be echoed in,
    or None; slots in `ignore` do not count. One pass over `data` whatever the number of
    secrets known (with only a few, a search for each, which costs less)."""
    for form in _found(data):
        text = form.decode("utf-8", "surrogatepass")
        for slot, forms in list(_known.items()):
            if text in forms and slot not in ignore:
                return slot
    return None  # none, or only ignored or forgotten meanwhile


# Spellings of a text that a reader decodes: a percent-encoded byte, a JSON (or JavaScript)
# escape, an HTML character reference (named ones too, through html.unescape).
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_JSON_ESCAPE = re.compile(r"\\(?:u([0-9A-Fa-f]{4})|([\"\\/bfnrt]))")
_JSON_SHORT = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
# Nested encodings (a percent-encoded JSON escape) are undone this many times at most.
DECODE_ROUNDS = 3


def _unescape(m: re.Match[str]) -> str:
    hex_digits, char = m.groups()
    if hex_digits is not None:
        return chr(int(hex_digits, 16))
    return _JSON_SHORT.get(char, char)


def _pair(m: re.Match[str]) -> str:
    return m.group(0).encode("utf-16-le", "surrogatepass").decode("utf-16-le")


def _decoded(text: str) -> str:
    """`text` with one round of percent-encoding, JSON escapes and HTML references undone."""
    if "%" in text and _PERCENT.search(text):
        text = urllib.parse.unquote(text, errors="replace")
    if "\\" in text:
        text = _JSON_ESCAPE.sub(_unescape, text)
        text = _SURROGATE_PAIR.sub(_pair, text)
    if "&" in text:
        text = html.unescape(text)
    return text


def _mask_decoded(text: str) -> str:
    """`text`, decoded and masked, when a known secret shows only once it is decoded; else
    `text` as it is (its known secrets already masked)."""
    current = text
    for _ in range(DECODE_ROUNDS):
        plain = _decoded(current)
        if plain == current:
            break
        current = _mask_known(plain)
        if current != plain:
            text = current
    return text


def redact(text: str) -> str:
    """`text` with every known secret and everything that looks like a credential masked."""
    text = _mask_known(text)
    if _by_prefix and ("%" in text or "\\" in text or "&" in text):
        text = _mask_decoded(text)
    if len(text) < 8:
        return text
    if "@" in text and "://" in text:
        text = _URL_CREDENTIALS.sub(r"\1" + MASK + "@", text)
    lower = text.lower()
    if "bearer" in lower or "basic" in lower:
        text = _AUTH_SCHEME.sub(r"\1\2" + MASK, text)
    if ("=" in text or ":" in text) and any(n in lower for n in _NAMES):
        text = _NAMED.sub(r"\1\2" + MASK, text)
    if "eyJ" in text:
        text = _JWT.sub(MASK, text)
    if len(text) >= 40:
        text = _OPAQUE.sub(_opaque, text)
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
