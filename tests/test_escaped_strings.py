"""What the escaped strings of a page decode to (`upstream.unescaped_strings`, which the check
for `\\u`-escaped credentials reads), against a plain reference: the page cut into its strings
a character at a time, each decoded by `json.loads`. On the shapes that trip a scan up (runs
of backslashes and of escaped quotes, escapes at either end of a string, strings side by side)
and on random documents whose strings are spelt every way JSON allows.
"""

from __future__ import annotations

import json
import re
from unittest import mock

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd import redact
from syncd.servicetitan import upstream
from syncd.servicetitan.upstream import escaped_credential, page_credential, unescaped_strings

_HIDING = re.compile(r"\\[u/]")


def string_tokens(text: str) -> list[str]:
    """The strings of a JSON document (keys too) as written, in order."""
    out = []
    i = 0
    while i < len(text):
        if text[i] != '"':
            i += 1
            continue
        j = i + 1
        while text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        out.append(text[i : j + 1])
        i = j + 1
    return out


def reference(body: bytes, scanned: int = upstream.MAX_SCANNED_STRINGS) -> bytes:
    """`unescaped_strings` the slow, obvious way. A string counts when its text holds a
    backslash before a `u` or a `/` (an escaped backslash before one too: a string more,
    never one fewer); past `scanned` of them, every string with an escape from there on."""
    tokens = string_tokens(body.decode())
    hiding = [k for k, raw in enumerate(tokens) if _HIDING.search(raw)]
    chosen = hiding[:scanned]
    if len(hiding) > scanned:
        chosen += [k for k in range(hiding[scanned], len(tokens)) if "\\" in tokens[k]]
    values = [json.loads(tokens[k], strict=False) for k in chosen]
    return "\x00".join(values).encode("utf-8", "surrogatepass")


def found(body: bytes, scanned: int = upstream.MAX_SCANNED_STRINGS) -> bytes:
    json.loads(body)  # well-formed, as every page this is called on
    with mock.patch.object(upstream, "MAX_SCANNED_STRINGS", scanned):
        return unescaped_strings(body)


def u(text: str) -> str:
    return "".join(f"\\u{ord(c):04x}" for c in text)


RUN = 5000  # long runs: a scan that steps back per character or per quote shows here first


@pytest.mark.parametrize(
    ("body", "strings"),
    [
        pytest.param('"\\u0041"', ["A"], id="the document is one string"),
        pytest.param('["\\/"]', ["/"], id="an escape alone"),
        pytest.param('["\\u0041bc", "ab\\/"]', ["Abc", "ab/"], id="escapes at either end"),
        pytest.param('{"k\\u0041": "v\\/"}', ["kA", "v/"], id="a key and its value"),
        pytest.param('["", "\\u0041", ""]', ["A"], id="between empty strings"),
        pytest.param('["\\\\", "\\u0041"]', ["A"], id="after a string ending in a backslash"),
        pytest.param('["\\"", "\\/"]', ["/"], id="after a string ending in a quote"),
        pytest.param('["\\\\\\"", "\\/"]', ["/"], id="after a string ending in both"),
        pytest.param('["\\\\u0041"]', ["\\u0041"], id="an escaped backslash before a u"),
        pytest.param('["\\\\\\u0041"]', ["\\A"], id="an escaped backslash, then an escape"),
        pytest.param(
            '["' + '\\"' * RUN + '\\u0041"]', ['"' * RUN + "A"], id='after a run of \\" escapes'
        ),
        pytest.param(
            '["' + "\\\\" * RUN + '\\u0041"]', ["\\" * RUN + "A"], id="after a run of \\\\ escapes"
        ),
        pytest.param(
            '["' + "\\\\" * RUN + '", "\\u0041"]',
            ["A"],
            id="a string of escaped backslashes, then one with an escape",
        ),
        pytest.param(
            '["' + '\\"' * RUN + '", "' + "\\\\" * RUN + '", "x\\/"]',
            ["x/"],
            id="strings of escaped quotes and backslashes, then one with an escape",
        ),
        pytest.param(
            '["' + '\\\\\\"' * RUN + '\\u0041"]',
            ['\\"' * RUN + "A"],
            id="after a run of escaped backslash-quote pairs",
        ),
        pytest.param(
            "[" + ", ".join(['"\\u0041"'] * 5) + "]", ["A"] * 5, id="several strings, one each"
        ),
        pytest.param('["\\ud83d\\ude00\\/"]', ["\U0001f600/"], id="a surrogate pair"),
    ],
)
@pytest.mark.parametrize("scanned", [0, 1, upstream.MAX_SCANNED_STRINGS])
def test_tricky_shapes_decode_as_the_json_module_decodes_them(
    body: str, strings: list[str], scanned: int
) -> None:
    data = body.encode()
    assert found(data, scanned) == reference(data, scanned)
    if scanned == upstream.MAX_SCANNED_STRINGS:
        assert found(data).decode("utf-8", "surrogatepass").split("\x00") == strings


# -- random documents -------------------------------------------------------------------------

_SHORT = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _spellings(c: str) -> tuple[list[str], list[str]]:
    """The ways JSON may write the character `c` inside a string: without a \\u escape, with."""
    if ord(c) > 0xFFFF:
        high, low = divmod(ord(c) - 0x10000, 0x400)
        return [c], [f"\\u{0xD800 + high:04x}\\u{0xDC00 + low:04X}"]
    escaped = [f"\\u{ord(c):04x}", f"\\u{ord(c):04X}"]
    if c in _SHORT:
        return [_SHORT[c]], escaped
    if c == "/":
        return ["/", "\\/"], escaped
    return ([c] if ord(c) >= 0x20 else []), escaped


# Mostly the characters escapes are made of, so that runs of them are common.
_CHARS = st.one_of(
    st.sampled_from('\\\\\\""/uA0 '),
    st.sampled_from("\n\x00\u00e9\u2028\U0001f600"),
    st.characters(codec="utf-8", exclude_categories=["Cs"]),
)


@st.composite
def spelt(draw: st.DrawFn) -> str:
    """A JSON string, each character written one of the ways JSON allows; in some strings
    most characters \\u-escaped, in others few or none."""
    value = draw(st.lists(_CHARS, max_size=24))  # (st.text would even out the weights)
    share = draw(st.sampled_from([0, 1, 3, 10]))  # tenths of the characters \u-escaped
    out = []
    for c in value:
        plain, escaped = _spellings(c)
        forms = escaped if not plain or draw(st.integers(0, 9)) < share else plain
        out.append(draw(st.sampled_from(forms)))
    return '"' + "".join(out) + '"'


@st.composite
def documents(draw: st.DrawFn) -> bytes:
    tokens = draw(st.lists(spelt(), min_size=1, max_size=10))
    sep = draw(st.sampled_from([",", ", ", " ,\n\t"]))
    shape = draw(st.sampled_from(["string", "array", "object"]))
    if shape == "string":
        text = tokens[0]
    elif shape == "array":
        text = "[" + sep.join([*tokens, "1", "null"]) + "]"
    else:
        keys, values = tokens[::2], [*tokens[1::2], "true"][: len(tokens[::2])]
        text = "{" + sep.join(f"{k}: [{v}]" for k, v in zip(keys, values, strict=True)) + "}"
    return text.encode()


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(body=documents(), scanned=st.sampled_from([0, 1, 2, upstream.MAX_SCANNED_STRINGS]))
def test_any_document_decodes_as_the_json_module_decodes_it(body: bytes, scanned: int) -> None:
    msgspec.json.decode(body)  # a page the decoder takes: the only kind this is called on
    assert found(body, scanned) == reference(body, scanned)


# -- credentials behind escapes ---------------------------------------------------------------

SECRET = "cs-escaped-strings-secret"


@pytest.fixture
def secret() -> object:
    redact.register(("client_secret", 71), SECRET)
    yield SECRET
    redact.forget(("client_secret", 71))


@pytest.mark.parametrize("run", [1, 2, 3, RUN])
@pytest.mark.usefixtures("secret")
def test_a_secret_escaped_after_a_run_of_backslashes_is_found(run: int) -> None:
    # The secret's characters \u-escaped right after `run` escaped backslashes, or after as
    # many escaped quotes: found in what a decoder stores.
    for prefix in ("\\\\" * run, '\\"' * run, "\\/" * run):
        body = b'{"data": [{"note": "%s%s"}]}' % (prefix.encode(), u(SECRET).encode())
        assert page_credential(body, 71) is None
        problem = escaped_credential(body, 71)
        assert problem is not None, prefix[:4]
        assert "a credential it was sent" in problem


@pytest.mark.parametrize("run", [0, 1, 2, RUN])
@pytest.mark.usefixtures("secret")
def test_an_escaped_backslash_does_not_make_the_next_letters_an_escape(run: int) -> None:
    # `\\u0063...`: an escaped backslash, then the letters u0063: decoded, the secret is not
    # there (its first character is not), and the page is applied.
    spelt = "\\\\" * run + "\\\\" + u(SECRET)[1:]
    assert SECRET not in json.loads(f'"{spelt}"')
    body = b'{"data": ["%s"]}' % spelt.encode()
    assert page_credential(body, 71) is None
    assert escaped_credential(body, 71) is None


@pytest.mark.usefixtures("secret")
def test_a_secret_is_found_only_whole_in_one_string() -> None:
    half = len(SECRET) // 2
    # In a key, a cursor, a value: found.
    for body in (
        b'{"%s": 1}' % u(SECRET).encode(),
        b'{"hasMore": false, "continueFrom": "%s", "data": []}' % u(SECRET).encode(),
        b'{"data": ["%s\\/"]}' % u(SECRET).encode(),
    ):
        assert escaped_credential(body, 71) is not None, body
    # Split between two strings, each escaped: no string a decoder stores holds it.
    body = b'{"a": "%s", "b": "%s"}' % (u(SECRET[:half]).encode(), u(SECRET[half:]).encode())
    assert escaped_credential(body, 71) is None
