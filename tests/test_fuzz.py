"""Fuzzing the two parsers that read outside input: the page decoder (with its caps) and the
configuration loader. Any bytes give a page, a clear error or a dead letter, never another
exception or a hang.

`make test` runs a small deterministic budget; SYNCD_FUZZ_EXAMPLES=N runs N random examples
per target (e.g. `SYNCD_FUZZ_EXAMPLES=20000 .venv/bin/pytest tests/test_fuzz.py --timeout 0`).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from syncd import catalogue, config
from syncd.errors import TransientError
from syncd.servicetitan.client import Page, decode_checked
from syncd.servicetitan.upstream import MAX_CURSOR_CHARS, MAX_JSON_DEPTH, json_depth

_LONG = os.environ.get("SYNCD_FUZZ_EXAMPLES")
BUDGET = settings(
    max_examples=int(_LONG) if _LONG else 150,
    derandomize=not _LONG,  # the suite's budget is the same every run
    database=None,
    # Generous: a hang is what it is there to catch, a loaded machine is not.
    deadline=timedelta(seconds=20),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

FEEDS = [
    catalogue.feed(n)
    for n in ("crm.customers", "customer-interactions.technician-ratings", "settings.employees")
]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
key_values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.text(max_size=12),
    st.none(),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(), max_size=2),
)


@st.composite
def records(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)  # not even an object
    rec = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    for field in ("id", "technicianId", "jobId", "employeeId"):
        if draw(st.booleans()):
            rec[field] = draw(key_values)
    if draw(st.booleans()):
        rec["modifiedOn"] = draw(st.one_of(st.text(max_size=30), json_values))
    return rec


@st.composite
def pages(draw: st.DrawFn) -> bytes:
    env: dict[str, Any] = {}
    if draw(st.integers(0, 9)):
        env["hasMore"] = draw(st.one_of(st.booleans(), json_values))
    if draw(st.integers(0, 9)):
        env["continueFrom"] = draw(
            st.one_of(
                st.text(max_size=40),
                st.just("c" * MAX_CURSOR_CHARS),
                st.just("c" * (MAX_CURSOR_CHARS + 1)),
                json_values,
            )
        )
    if draw(st.integers(0, 9)):
        env["data"] = draw(st.one_of(st.lists(records(), max_size=6), json_values))
    body = json.dumps(env).encode()
    # Then damage it: cut it, splice bytes in, nest it deeply, break its encoding.
    how = draw(st.integers(0, 6))
    if how == 1 and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == 2:
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(max_size=8)) + body[at:]
    elif how == 3:
        depth = draw(st.sampled_from([MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 1, 3000]))
        nested = b"[" * depth + b"1" + b"]" * depth
        body = body.replace(b'"data": [', b'"data": [' + nested + b", ", 1)
    elif how == 4:
        body = body.replace(b'"', b'"\xff', 1) if b'"' in body else body + b"\xc3"
    elif how == 5:
        body = draw(st.sampled_from([b"\xef\xbb\xbf", b" \n\t", b""])) + body
    return body


def check_page(body: bytes, feed: catalogue.Feed) -> None:
    try:
        page = decode_checked(body, feed)
    except TransientError as exc:
        error = str(exc)
    else:
        error = None
    if error is not None:
        assert error  # a clear error says something
        return
    assert isinstance(page, Page)
    assert isinstance(page.has_more, bool)
    assert len(page.continue_from) <= MAX_CURSOR_CHARS
    n = len(page.keys)
    assert len(page.fingerprints) == len(page.modified) == len(page.data) == n
    assert all(isinstance(k, str) and k for k in page.keys)
    for data in page.data:
        data.decode("utf-8")  # everything published is valid UTF-8
    for reason, raw in page.dead:
        assert reason
        assert isinstance(raw, bytes)


@BUDGET
@given(body=pages(), feed=st.sampled_from(FEEDS))
def test_page_decoder_on_damaged_pages(body: bytes, feed: catalogue.Feed) -> None:
    check_page(body, feed)


@BUDGET
@given(body=st.binary(max_size=2000), feed=st.sampled_from(FEEDS))
def test_page_decoder_on_any_bytes(body: bytes, feed: catalogue.Feed) -> None:
    check_page(body, feed)


# -- the configuration loader --------------------------------------------------------------

EXAMPLE = (Path(__file__).parent.parent / "config" / "example.toml").read_text()


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + " }"


_toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.text(max_size=20),
    st.sampled_from(["redis://u:p@h:0/0", "http://[::1", "${CREDENTIALS_DIRECTORY}/x", ""]),
)
_toml_shallow = st.one_of(
    _toml_scalars,
    st.lists(_toml_scalars, max_size=3),
    st.dictionaries(st.text(max_size=6), _toml_scalars, max_size=3),
)
toml_values = st.one_of(
    _toml_shallow,
    st.lists(_toml_shallow, max_size=3),
    st.dictionaries(st.text(max_size=6), _toml_shallow, max_size=3),
)


@st.composite
def configs(draw: st.DrawFn) -> bytes:
    """The example configuration with lines dropped, duplicated or given other values."""
    lines = EXAMPLE.splitlines()
    out: list[str] = []
    for line in lines:
        how = draw(st.integers(0, 19))
        if how == 0:
            continue
        if how == 1:
            out.append(line)
        if how in (2, 3) and "=" in line and not line.lstrip().startswith("#"):
            key = line.split("=", 1)[0]
            line = f"{key}= {toml_value(draw(toml_values))}"
        out.append(line)
    if draw(st.booleans()):
        out.append("[[tenants]]")
        out.append(f"id = {toml_value(draw(st.one_of(st.integers(), toml_values)))}")
        out.append('client_id = "c"')
        out.append(f"client_secret = {toml_value(draw(toml_values))}")
    body = "\n".join(out).encode()
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(body)))
        body = body[:at] + draw(st.binary(max_size=6)) + body[at:]
    return body


def check_config(body: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "syncd.toml"
        path.write_bytes(body)
        try:
            cfg: config.Config | None = config.load(path)
            error = ""
        except config.ConfigError as exc:
            cfg, error = None, str(exc)
    if cfg is None:
        assert error.startswith(f"{path}:"), error  # names the file
    else:
        assert isinstance(cfg, config.Config)


@BUDGET
@given(body=configs())
def test_config_loader_on_mutated_configurations(body: bytes) -> None:
    check_config(body)


@BUDGET
@given(body=st.binary(max_size=500))
def test_config_loader_on_any_bytes(body: bytes) -> None:
    check_config(body)


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


tricky_text = st.text(alphabet='[]{}"\\/ab\n\u00e9', max_size=12)
nested = st.recursive(
    st.one_of(st.none(), st.integers(), tricky_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(tricky_text, inner, max_size=3),
    max_leaves=30,
)


@BUDGET
@given(value=nested, ascii_only=st.booleans())
def test_json_depth_agrees_with_the_structure(value: Any, ascii_only: bool) -> None:
    """The byte-level depth scan against a plain recursive count, on strings full of brackets,
    quotes and backslashes."""
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(body) == _depth(value)


def _wrapped(value: Any, levels: list[bool]) -> Any:
    for as_list in levels:
        value = [value, 1] if as_list else {"k[": value, "v": "}"}
    return value


@BUDGET
@given(
    parts=st.lists(st.tuples(nested, st.lists(st.booleans(), max_size=80)), min_size=1, max_size=4),
    ascii_only=st.booleans(),
)
def test_json_depth_agrees_on_deep_and_shallow_parts_side_by_side(
    parts: list[tuple[Any, list[bool]]], ascii_only: bool
) -> None:
    """Deep documents (past the rounds that drop innermost pairs, measured by runs instead)
    beside shallow ones, up to past MAX_JSON_DEPTH: the count agrees, capped at the limit + 1."""
    value = [_wrapped(inner, levels) for inner, levels in parts]
    body = json.dumps(value, ensure_ascii=ascii_only).encode()
    assert json_depth(body) == min(_depth(value), MAX_JSON_DEPTH + 1)
