"""Pure decisions of the HTTP edge, by tables: waits after a 429, error text, redaction, caps."""

from __future__ import annotations

import json
import math

import pytest
import structlog

from syncd import catalogue, redact
from syncd.errors import TransientError
from syncd.servicetitan.client import Page, decode_page
from syncd.servicetitan.retry_after import MAX_RETRY_AFTER_S, parse_retry_after
from syncd.servicetitan.upstream import (
    EXCERPT_CHARS,
    MAX_CURSOR_CHARS,
    MAX_JSON_DEPTH,
    excerpt,
    guarded_decode,
    json_depth,
    problem_text,
    redirect_error,
    wait_texts,
)

APIM = b'{"statusCode": 429, "message": "Rate limit is exceeded. Try again in 3 seconds."}'


@pytest.mark.parametrize(
    ("header", "body", "expected"),
    [
        ("3", b"", 3.0),
        ("0.5", b"", 0.5),
        (" 2.25 ", b"", 2.25),
        ("0", b"", 0.0),
        ("Thu, 01 Jan 1970 00:00:30 GMT", b"", 20.0),
        ("Thu, 01 Jan 1970 00:00:05 GMT", b"", 0.0),  # in the past: now
        # The body when the header says nothing usable.
        (None, APIM, 3.0),
        (None, b'{"title": "Too many requests. Try again in 7 seconds."}', 7.0),
        (None, b'{"title": "Too many requests", "detail": "Retry in 4 seconds"}', 4.0),
        (None, b'{"title": "Rate limited", "detail": "wait 1.5 secs please"}', 1.5),
        (None, b"Too busy. Try again in 12 seconds, thanks.", 12.0),
        (None, b"<html><body>retry after 2 minutes</body></html>", 120.0),
        ("", b'{"title": "Too many requests. Try again in 1 second."}', 1.0),
        ("2", b'{"title": "Try again in 9 seconds."}', 2.0),
        # Non-finite and negative values are ignored, whatever says them.
        ("inf", b"", None),
        ("Infinity", b"", None),
        ("nan", b"", None),
        ("-5", b"", None),
        ("inf", APIM, 3.0),
        ("-1", b'{"title": "Try again in 4 seconds."}', 4.0),
        (None, b'{"message": "Try again in -3 seconds."}', None),
        (None, b'{"title": "Rate limit is exceeded."}', None),
        ("soon", b"", None),
        ("Thu, 99 Foo 1970", b"", None),
        (None, b"", None),
        (None, b'{"title": ["not", "a", "string"]}', None),
        (None, b"[1, 2]", None),
        # Absurd waits are capped.
        ("86400", b"", MAX_RETRY_AFTER_S),
        ("1e308", b"", MAX_RETRY_AFTER_S),
        ("Fri, 31 Dec 9999 23:59:59 GMT", b"", MAX_RETRY_AFTER_S),
        (None, b'{"message": "Try again in 99999 seconds."}', MAX_RETRY_AFTER_S),
    ],
)
def test_wait_after_429(header: str | None, body: bytes, expected: float | None) -> None:
    assert parse_retry_after(header, wait_texts(body), now_unix=10.0) == expected


def test_wait_is_always_finite_and_bounded() -> None:
    for header in ("1e400", "-0", "1" * 400, "NaN", "-inf", "+inf"):
        wait = parse_retry_after(header, None, now_unix=0.0)
        assert wait is None or (math.isfinite(wait) and 0 <= wait <= MAX_RETRY_AFTER_S)


def test_a_capped_wait_is_logged() -> None:
    with structlog.testing.capture_logs() as logs:
        assert parse_retry_after("3600", None, now_unix=0.0, tenant=42) == MAX_RETRY_AFTER_S
    assert logs == [
        {
            "event": "retry_after_capped",
            "log_level": "warning",
            "tenant": 42,
            "asked_s": 3600.0,
            "cap_s": MAX_RETRY_AFTER_S,
        }
    ]


def test_the_title_table_of_before_still_holds() -> None:
    assert parse_retry_after(None, "Rate limit is exceeded. Try again in 7 seconds.", 0) == 7.0


HTML_500 = b"""<!DOCTYPE html>
<html><head><title>500 - Internal   Server Error</title>
<style>body { color: red }</style><script>var x = "<b>";</script></head>
<body>
  <h1>Server&nbsp;Error</h1>
  <!-- debug: nothing to see -->
  <p>The request   could not be
  processed &amp; was logged.</p>
</body></html>"""


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        (
            HTML_500,
            "text/html",
            "500 - Internal Server Error - Server Error The request could "
            "not be processed & was logged.",
        ),
        (b"<html><body><h1>Bad Gateway</h1></body></html>", "", "Bad Gateway"),
        (
            b"  upstream\tconnect error\r\nor disconnect  ",
            "text/plain",
            "upstream connect error or disconnect",
        ),
        (b"", "text/plain", "empty body"),
        (b"\x00\x01bad\x7f\xff bytes", "application/octet-stream", "bad \ufffd bytes"),
    ],
)
def test_non_json_error_bodies_give_a_short_clean_excerpt(
    body: bytes, content_type: str, expected: str
) -> None:
    assert problem_text(body, content_type) == expected


def test_an_excerpt_is_bounded_and_has_no_markup() -> None:
    body = b"<html><body>" + b"<div class='x'>word</div> " * 10_000 + b"</body></html>"
    text = excerpt(body, "text/html")
    assert len(text) <= EXCERPT_CHARS
    assert "<" not in text
    assert ">" not in text
    assert text.startswith("word word")


def test_a_cut_body_drops_its_last_partial_word() -> None:
    # The body was cut in the middle of something: what is left of it never shows.
    assert problem_text(b"error near sk-abcdefghij", "text/plain", cut=True) == "error near"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            b'{"type": "x", "title": "One or more validation errors occurred.", "status": 400,'
            b' "errors": {"from": ["The value is invalid."]}, "traceId": "00-abc-01"}',
            "One or more validation errors occurred. | from: The value is invalid. | "
            "traceId 00-abc-01",
        ),
        (APIM, "Rate limit is exceeded. Try again in 3 seconds."),
        (
            b'{"error": "invalid_client", "error_description": "Unknown client"}',
            "invalid_client | Unknown client",
        ),
        (
            b'{"title": "Forbidden", "detail": "no access\\nto  feed"}',
            "Forbidden | no access to feed",
        ),
        (b'{"something": "else"}', "unexpected JSON body"),
        (b'{"errors": ["not", "a", "dict"]}', "unexpected JSON body"),
        (b'{"title": 5}', "unexpected JSON body"),
    ],
)
def test_json_errors_keep_their_known_fields(body: bytes, expected: str) -> None:
    assert problem_text(body, "application/json") == expected


def test_long_json_fields_are_shortened() -> None:
    body = json.dumps({"title": "x" * 5000, "detail": "y " * 5000}).encode()
    assert len(problem_text(body)) <= 2 * EXCERPT_CHARS


KNOWN = "Zq8-known-app-key-77"


@pytest.fixture
def known_secret() -> object:
    redact.register("test-secret", KNOWN)
    yield KNOWN
    redact.forget("test-secret")


@pytest.mark.parametrize(
    ("text", "leak"),
    [
        (f"echo: {KNOWN}", KNOWN),
        (f"prefix{KNOWN}suffix", KNOWN),
        ("Authorization: Bearer abc.def-ghi", "abc.def-ghi"),
        ("authorization=Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
        ("ST-App-Key: ak1.xyz-123", "ak1.xyz-123"),
        ('{"client_secret": "hunter2-s3cret"}', "hunter2-s3cret"),
        ("client_secret=hunter2-s3cret&grant_type=x", "hunter2-s3cret"),
        ("access_token=QWxhZGRpbjpvcGVu", "QWxhZGRpbjpvcGVu"),
        ("password: p@ssw0rd!", "p@ssw0rd!"),
        ("redis://default:rpass99@redis.local:6379/0", "rpass99"),
        ("https://user:pw-xyz@example.com/path", "pw-xyz"),
        ("token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig-part_x", "eyJhbGciOiJIUzI1NiJ9"),
        ("opaque 4fQ9xLmA0bZ7kP2sR8tV1wY3zC6dE5gH9jK0lN4pQ7rS", "4fQ9xLmA0bZ7kP2sR8tV1wY3zC6dE5"),
    ],
)
def test_redaction_masks_secrets_and_credential_shapes(
    known_secret: object, text: str, leak: str
) -> None:
    out = redact.redact(text)
    assert leak not in out
    assert redact.MASK in out


@pytest.mark.parametrize(
    "text",
    [
        "HTTP 503: upstream connect error",
        "traceId 0af7651916cd43dd8448eb211c80319c",
        "crm.customers: record has no key (id)",
        "token endpoint answered 400: invalid_client",
        "rate limited (api), retry after 3.0s",
    ],
)
def test_redaction_leaves_ordinary_text_alone(text: str) -> None:
    assert redact.redact(text) == text


def test_a_renewed_token_replaces_its_predecessor() -> None:
    redact.register(("token", 1), "first-token-aaaa")
    redact.register(("token", 1), "second-token-bbbb")
    try:
        assert redact.redact("second-token-bbbb") == redact.MASK
        assert redact.redact("first-token-aaaa") == "first-token-aaaa"
    finally:
        redact.forget(("token", 1))
    assert redact.redact("second-token-bbbb") == "second-token-bbbb"


# A secret with the characters encodings change (base64 keys and secrets have them).
SPECIAL = 'Zq8+kn/own=se"cret'


@pytest.mark.parametrize(
    ("name", "echoed"),
    [
        ("percent-encoded, as the token form sends it", "Zq8%2Bkn%2Fown%3Dse%22cret"),
        ("JSON-escaped", 'Zq8+kn/own=se\\"cret'),
        ("JSON with escaped slashes", 'Zq8+kn\\/own=se\\"cret'),
        (".NET JSON escapes", "Zq8\\u002Bkn/own=se\\u0022cret"),
        ("lower-case JSON escapes", "Zq8\\u002bkn/own=se\\u0022cret"),
        ("HTML-escaped", "Zq8+kn/own=se&quot;cret"),
    ],
)
def test_a_known_secret_is_masked_in_the_forms_it_is_echoed_in(name: str, echoed: str) -> None:
    redact.register("test-special", SPECIAL)
    try:
        for text in (f"bad value {echoed} here", f"x{echoed}y"):
            assert echoed not in redact.redact(text), name
            assert redact.MASK in redact.redact(text)
        # A plain-text error body keeps its escapes: the mask must find them there.
        body = f"rejected {echoed} (see log)".encode()
        assert echoed not in problem_text(body, "text/plain")
    finally:
        redact.forget("test-special")
    assert redact.redact(f"bad value {echoed} here") == f"bad value {echoed} here"


def test_a_shared_secret_stays_known_while_a_slot_holds_it() -> None:
    # Tenants of one network may share a client secret.
    redact.register(("client_secret", 1), "shared-secret-xyz")
    redact.register(("client_secret", 2), "shared-secret-xyz")
    redact.forget(("client_secret", 1))
    try:
        assert redact.redact("shared-secret-xyz") == redact.MASK
    finally:
        redact.forget(("client_secret", 2))
    assert redact.redact("shared-secret-xyz") == "shared-secret-xyz"


def test_registering_a_secret_leaves_the_index_of_the_others_alone() -> None:
    """A renewed token re-indexes its own bucket only: with thousands of tenants, rebuilding
    the whole index at every renewal made registration quadratic (seconds of blocked event
    loop at start)."""
    slots = [("test-many", i) for i in range(200)]
    # Values no other test registers (a tenant's "secret-7" left by another test would mask a
    # part of the text).
    for i, slot in enumerate(slots):
        redact.register(slot, f"{i:03d}-qzmany-{i}")
    try:
        before = dict(redact._by_prefix)
        redact.register(slots[7], "007-qzmany-renewed")
        after = redact._by_prefix
        changed = [k for k in before if after.get(k) is not before[k]]
        assert changed == ["007-qz"]
        assert redact.redact("007-qzmany-renewed 008-qzmany-8 007-qzmany-7") == (
            "*** *** 007-qzmany-7"
        )
    finally:
        for slot in slots:
            redact.forget(slot)


def test_the_log_processor_redacts_every_string(known_secret: object) -> None:
    event = {
        "event": "poll_failed",
        "error": f"HTTP 500: {KNOWN}",
        "nested": {"list": [f"a {KNOWN}", 3]},
        "exception": f"Traceback ...\nValueError: {KNOWN}",
        "tenant": 7,
    }
    out = redact.processor(None, "warning", event)
    assert KNOWN not in json.dumps(out)
    assert out["tenant"] == 7


@pytest.mark.parametrize(
    ("status", "location", "expected_host"),
    [
        (302, "http://evil.example:8080/steal?token=abc", "evil.example:8080"),
        (307, "https://other.example/connect/token", "other.example"),
        (301, "/relative/path?q=1", "api.example"),
        (308, None, "an unknown location"),
        (303, "http://[::1", "an unknown location"),
        (302, "http://u:pw@h.example/", "h.example"),
    ],
)
def test_a_redirect_error_names_status_and_host_only(
    status: int, location: str | None, expected_host: str
) -> None:
    text = redirect_error(status, location, "https://api.example/x", "the API")
    assert f"HTTP {status}" in text
    assert expected_host in text
    for part in ("steal", "token=abc", "relative", "q=1", "/connect", "pw"):
        assert part not in text


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"{}", 1),
        (b'{"a": [1, {"b": []}]}', 4),
        (b'{"a": "[[[[[[", "b": "]]]]"}', 1),
        (b'{"a": "x\\"[[[", "b": ["\\\\"]}', 2),
        (b'{"a": "\\\\\\"{{{{"}', 1),
        (b'["\\\\\\\\", "\\\\\\"]"]', 1),
        (b'{"a": "' + b'\\"' * 1000 + b'{{"}', 1),
        (b'["' + b"\\\\" * 999 + b'\\"[", []]', 2),
        (b'["' + b"\\\\" * 1000 + b'", [[]]]', 3),
        (b"[" * 40 + b"]" * 40, 40),
        (b'"plain"', 0),
    ],
)
def test_json_depth(body: bytes, depth: int) -> None:
    assert json_depth(body) == depth


CUSTOMERS = catalogue.feed("crm.customers")


def guarded(body: bytes) -> Page:
    return guarded_decode(body, lambda b: decode_page(b, CUSTOMERS), lambda p: p.continue_from)


def envelope(data: str = "[]", cursor: str = "c") -> bytes:
    return b'{"hasMore": false, "continueFrom": "%s", "data": %s}' % (
        cursor.encode(),
        data.encode(),
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (envelope(cursor="x" * (MAX_CURSOR_CHARS + 1)), "continueFrom is"),
        (envelope("[" + "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH + "]"), "nested deeper"),
        (envelope("[" + "[" * 5000 + "]" * 5000 + "]"), "nested deeper"),
        (
            envelope(cursor="c\xff".encode("latin-1").decode("latin-1")).replace(
                b"c\xc3\xbf", b"c\xff"
            ),
            "not UTF-8",
        ),
        (envelope('[{"id": 1, "name": "\xff"}]').replace(b"\xc3\xbf", b"\xff"), "not UTF-8"),
        (b"<html>not json</html>", "invalid export page"),
    ],
)
def test_page_caps_are_decode_errors(body: bytes, message: str) -> None:
    with pytest.raises(TransientError, match=message):
        guarded(body)


def test_a_cursor_at_the_cap_and_a_moderately_nested_record_pass() -> None:
    record = {"id": 1, "modifiedOn": "2025-01-01T00:00:00Z", "x": [[[[{"y": [1]}]]]]}
    page = guarded(envelope(json.dumps([record]), cursor="c" * MAX_CURSOR_CHARS))
    assert page.keys == ["1"]
    assert len(page.continue_from) == MAX_CURSOR_CHARS


def test_recursion_in_the_decoder_is_a_decode_error() -> None:
    def deep(_: bytes) -> Page:
        raise RecursionError("maximum recursion depth exceeded")

    with pytest.raises(TransientError, match="nested too deeply"):
        guarded_decode(b"{}", deep, lambda p: p.continue_from)


@pytest.mark.parametrize(
    "body",
    [
        b"a" * 60_000 + b" token=x",
        b"a-" * 30_000 + b"token=x",
        b"a." * 30_000 + b"://x@",
        b"eyJ" * 20_000,
        b"<script" * 9_000,
        b"<!--" * 15_000,
        b"<title>" * 9_000,
        b"<html>" + b"<" * 60_000,
        b"1 " * 30_000 + b"seconds",
    ],
)
def test_hostile_bodies_are_handled_in_linear_time(body: bytes) -> None:
    """Shapes that make a backtracking pattern quadratic (minutes on 64 KiB): each must come
    back at once; the suite's per-test timeout is what fails otherwise."""
    for content_type in ("text/html", "text/plain", "application/json"):
        text = problem_text(body, content_type)
        assert len(text) <= 2 * EXCERPT_CHARS
    redact.redact(body.decode())
    parse_retry_after(None, wait_texts(body), now_unix=0.0)
