"""The soak's checker (bench/soak_verdict.py): events and a table against the ground truth."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bench.soak_consumer import apply_sql
from bench.soak_verdict import (
    Row,
    StreamEvent,
    Verdict,
    canonical,
    instant,
    judge_stream,
    judge_table,
)
from syncd.consumer import Event
from syncd.testing.tcpproxy import port_rewriter, split_replies


def rec(key: str, stamp: str, **more: Any) -> dict[str, Any]:
    return {"id": int(key), "modifiedOn": stamp, **more}


def ev(n: int, key: str, stamp: str, op: str = "updated", **more: Any) -> StreamEvent:
    data = b"" if op == "deleted" else json.dumps(rec(key, stamp, **more)).encode()
    return StreamEvent(f"{n}-0", op, key, stamp, data)


T1, T2, T3 = "2025-01-01T00:00:01Z", "2025-01-01T00:00:02Z", "2025-01-01T00:00:03Z"


@pytest.mark.parametrize(
    ("events", "live", "deleted", "counts"),
    [
        pytest.param([], {}, [], {}, id="nothing"),
        pytest.param(
            [ev(1, "1", T1, "created"), ev(2, "1", T2)], {"1": rec("1", T2)}, [], {}, id="exact"
        ),
        pytest.param([ev(1, "1", T1, "created")], {"1": rec("1", T2)}, [], {"lost": 1}, id="lost"),
        pytest.param([], {"1": rec("1", T1), "2": rec("2", T1)}, [], {"lost": 2}, id="none"),
        pytest.param(
            [ev(1, "1", T1, "created"), ev(2, "1", T1)],
            {"1": rec("1", T1)},
            [],
            {"duplicated": 1},
            id="same version twice",
        ),
        pytest.param(
            [ev(1, "1", T1), ev(2, "1", T2), ev(3, "1", T1)],
            {"1": rec("1", T2)},
            [],
            {"duplicated": 1, "back_in_time": 1, "not_last": 1},
            id="an old version again at the end",
        ),
        pytest.param(
            [ev(1, "1", T2), ev(2, "1", T1, note="x"), ev(3, "1", T3)],
            {"1": rec("1", T3)},
            [],
            {"back_in_time": 1},
            id="back in time in the middle",
        ),
        pytest.param(
            [ev(1, "1", T2, note="a"), ev(2, "1", T2, note="b")],
            {"1": rec("1", T2, note="a")},
            [],
            {"not_last": 1},
            id="equal stamps, the truth not last",
        ),
        pytest.param(
            [ev(1, "1", "2025-01-01T01:00:00+01:00"), ev(2, "1", "2025-01-01T00:00:00.5")],
            {"1": rec("1", "2025-01-01T00:00:00.5")},
            [],
            {},
            id="instants, not text",
        ),
        pytest.param(
            [ev(1, "1", "2025-01-01T00:00:00.5Z"), ev(2, "1", "2025-01-01T00:00:00.45Z")],
            {"1": rec("1", "2025-01-01T00:00:00.45Z")},
            [],
            {"back_in_time": 1},
            id="fractions",
        ),
        pytest.param(
            [ev(1, "1", T2), ev(2, "1", "", note="n"), ev(3, "1", T3)],
            {"1": rec("1", T3)},
            [],
            {},
            id="no timestamp is never out of order",
        ),
        pytest.param(
            [ev(1, "1", T1, "created"), ev(2, "1", T2, "deleted")],
            {},
            ["1"],
            {},
            id="deletion published",
        ),
        pytest.param(
            [ev(1, "1", T1, "created"), ev(2, "2", T1, "created")],
            {"2": rec("2", T1)},
            ["1"],
            {"deletions_unpublished": 1},
            id="deletion not published",
        ),
        pytest.param(
            [ev(1, "1", T1, "created"), ev(2, "1", T2, "deleted"), ev(3, "1", T3, "deleted")],
            {},
            ["1"],
            {"duplicated": 1},
            id="deleted twice",
        ),
        pytest.param([], {}, ["1"], {}, id="deleted before it was seen"),
        pytest.param([ev(1, "9", T1)], {}, [], {"unknown": 1}, id="a key the truth lacks"),
    ],
)
def test_stream(
    events: list[StreamEvent], live: dict[str, Any], deleted: list[str], counts: dict[str, int]
) -> None:
    verdict = judge_stream(events, live, deleted, where="t/f")
    got = {name: n for name, n in verdict.counts.items() if n}
    assert got == counts
    assert verdict.ok == (not counts)
    assert verdict.events == len(events)


def test_versions_compare_as_json_not_bytes() -> None:
    live = {"1": {"modifiedOn": T1, "id": 1}}
    event = StreamEvent(
        "1-0", "created", "1", T1, b'{"id": 1, "modifiedOn": "' + T1.encode() + b'"}'
    )
    assert judge_stream([event], live, []).ok
    assert canonical(b'{"b":1,"a":[1,2]}') == canonical({"a": [1, 2], "b": 1})
    assert canonical(b'{"a":1}') != canonical(b'{"a":1.5}')


@pytest.mark.parametrize(
    ("rows", "live", "deleted", "counts"),
    [
        pytest.param({"1": Row(b'{"id":1}')}, {"1": {"id": 1}}, [], {}, id="equal"),
        pytest.param({}, {"1": {"id": 1}}, [], {"table_missing": 1}, id="missing"),
        pytest.param(
            {"1": Row(b'{"id":1}', deleted=True)},
            {"1": {"id": 1}},
            [],
            {"table_missing": 1},
            id="live but marked deleted",
        ),
        pytest.param(
            {"1": Row(b'{"id":1,"v":1}')},
            {"1": {"id": 1, "v": 2}},
            [],
            {"table_stale": 1},
            id="old",
        ),
        pytest.param({"1": Row(b"{}")}, {}, ["1"], {"table_deleted": 1}, id="deleted, still there"),
        pytest.param({"1": Row(b"", deleted=True)}, {}, ["1"], {}, id="deleted, marked"),
        pytest.param({}, {}, ["1"], {}, id="deleted, absent"),
        pytest.param({"7": Row(b"{}")}, {}, [], {"table_extra": 1}, id="unknown key"),
    ],
)
def test_table(
    rows: dict[str, Row], live: dict[str, Any], deleted: list[str], counts: dict[str, int]
) -> None:
    verdict = judge_table(rows, live, deleted, where="t/f")
    assert {name: n for name, n in verdict.counts.items() if n} == counts


def test_merge_adds_counts_and_keeps_a_few_examples() -> None:
    total = Verdict()
    for n in range(4):
        total.merge(judge_stream([], {str(k): rec(str(k), T1) for k in range(3)}, [], where=f"{n}"))
    assert total.count("lost") == 12
    assert total.live_keys == 12
    assert len(total.to_json()["examples"]["lost"]) == 5
    assert not total.ok


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-01-01T00:00:00Z", (1735689600, "")),
        ("2025-01-01T00:00:00", (1735689600, "")),
        ("2025-01-01T01:00:00+01:00", (1735689600, "")),
        ("2024-12-31T24:00:00Z", (1735689600, "")),
        ("2025-01-01T00:00:00.1234567Z", (1735689600, "1234567")),
        ("2025-01-01T00:00:00.500Z", (1735689600, "5")),
        ("2025-02-30T00:00:00Z", None),
        ("1735689600000", None),
        ("", None),
        (None, None),
    ],
)
def test_instant(text: str | None, expected: tuple[int, str] | None) -> None:
    assert instant(text) == expected


def test_apply_sql_quotes_what_it_writes() -> None:
    event = Event(
        stream="st:{1}:crm.customers",
        id="1-0",
        tenant=1,
        feed="crm.customers",
        op="updated",
        key="it's",
        data=b'{"name": "\\u0000\'; DROP TABLE x; --"}',
        modified_on=T1,
        deliveries=1,
    )
    sql = apply_sql([event])
    assert "'it''s'" in sql
    assert event.data.hex() in sql
    assert "DROP" not in sql


def test_sentinel_replies_name_the_proxies() -> None:
    rewrite = port_rewriter({6380: 40001})
    masters = (
        b"*1\r\n*6\r\n$4\r\nname\r\n$8\r\nmymaster\r\n$2\r\nip\r\n$9\r\n127.0.0.1\r\n"
        b"$4\r\nport\r\n$4\r\n6380\r\n"
    )
    assert rewrite(masters).endswith(b"$4\r\nport\r\n$5\r\n40001\r\n")
    address = b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6380\r\n"
    assert rewrite(address) == b"*2\r\n$9\r\n127.0.0.1\r\n$5\r\n40001\r\n"
    other = b"*2\r\n$9\r\n127.0.0.1\r\n$4\r\n6381\r\n"
    assert rewrite(other) == other
    done, rest = split_replies(b"+PONG\r\n" + masters + address[:7])
    assert done == [b"+PONG\r\n", masters]
    assert rest == address[:7]
