"""The mirror's pure decisions: an event's staged row, what a PostgreSQL error means, the table
names, which streams it reads."""

from __future__ import annotations

import pytest

from syncd import catalogue
from syncd.consumer import Event, Subscription
from syncd.mirror import subscriptions
from syncd.mirror.rows import Row, error_kind, refusal, row_of
from syncd.mirror.schema import table_name
from tests.engine_helpers import settings

STREAM = "st:{7}:crm.customers"


def event(op: str = "updated", data: bytes = b'{"id":1}', **fields: object) -> Event:
    values: dict[str, object] = {
        "stream": STREAM,
        "id": "1714564800123-4",
        "tenant": 7,
        "feed": "crm.customers",
        "op": op,
        "key": "1",
        "data": data,
        "modified_on": "2024-05-01T12:00:00.45Z",
        "deliveries": 1,
        "modified_at": "2024-05-01T12:00:00.4500000Z",
        **fields,
    }
    return Event(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("e", "row"),
    [
        (
            event(),
            Row(
                "crm.customers",
                7,
                "1",
                False,
                "2024-05-01T12:00:00.45Z",
                "2024-05-01T12:00:00.4500000Z",
                1714564800123,
                4,
                '{"id":1}',
            ),
        ),
        # No timestamp: ordered by the entry id alone ("" sorts first).
        (
            event("created", modified_on=None, modified_at=None),
            Row("crm.customers", 7, "1", False, None, "", 1714564800123, 4, '{"id":1}'),
        ),
        # A deletion without a record stores none.
        (
            event("deleted", b""),
            Row(
                "crm.customers",
                7,
                "1",
                True,
                "2024-05-01T12:00:00.45Z",
                "2024-05-01T12:00:00.4500000Z",
                1714564800123,
                4,
                None,
            ),
        ),
        # An op this syncd does not know yet upserts, as consumers are told to.
        (event("merged"), row_of(event("updated"))),
    ],
)
def test_the_row_of_an_event(e: Event, row: Row) -> None:
    assert row_of(e) == row


def test_an_event_whose_data_is_not_text_is_refused_before_postgresql() -> None:
    assert row_of(event(data=b'{"a":"\xff"}')) == "data is not UTF-8 text (byte 6)"
    # Empty data of an upsert is staged, and PostgreSQL refuses it as JSON.
    assert isinstance(row_of(event(data=b"")), Row)


@pytest.mark.parametrize(
    ("sqlstate", "kind"),
    [
        ("22P05", "record"),  # \u0000 in jsonb
        ("22P02", "record"),  # invalid JSON
        ("22021", "record"),  # a NUL byte in text
        ("22003", "record"),  # a number past numeric's range
        ("54000", "record"),  # a value past a size limit
        ("25006", "unavailable"),  # read-only transaction (a standby, a read-only database)
        ("53100", "unavailable"),  # disk full
        ("57P01", "unavailable"),  # administrator shutdown
        ("08006", "unavailable"),  # connection failure
        ("40P01", "unavailable"),  # deadlock
        ("42501", "unavailable"),  # permission denied: the operator's to fix
        ("42P01", "unavailable"),  # a table dropped under the mirror
        (None, "unavailable"),  # no answer at all
    ],
)
def test_what_an_error_means(sqlstate: str | None, kind: str) -> None:
    assert error_kind(sqlstate) == kind


def test_the_reason_names_code_and_words() -> None:
    assert refusal("22P05", "unsupported Unicode escape sequence", "\\u0000 cannot be.") == (
        "PostgreSQL refused the record: 22P05 unsupported Unicode escape sequence "
        "(\\u0000 cannot be.)"
    )
    assert refusal(None, None, None) == "PostgreSQL refused the record: ? refused"


def test_every_feed_has_a_table_of_its_own() -> None:
    names = {table_name(feed) for feed in catalogue.feeds()}
    assert len(names) == len(catalogue.feeds())
    assert table_name("crm.customers/contacts") == "crm_customers_contacts"
    assert table_name("accounting.invoice-items") == "accounting_invoice_items"
    assert all(len(name) <= 63 and name.replace("_", "").isalnum() for name in names)


def test_the_streams_mirrored() -> None:
    data = {
        "redis": {"url": "redis://127.0.0.1:1/0"},
        "servicetitan": {"app_key": "k", "api_url": "http://127.0.0.1:1"},
        "tenants": [
            {"id": 1, "client_id": "a", "client_secret": "s", "feeds": ["crm.customers"]},
            {
                "id": 2,
                "client_id": "b",
                "client_secret": "s",
                "feeds": ["crm.customers", "jpm.jobs"],
            },
        ],
        "mirror": {"url": "postgresql://127.0.0.1/db"},
    }
    assert subscriptions(settings(data)) == [
        Subscription(1, ["crm.customers"]),
        Subscription(2, ["crm.customers", "jpm.jobs"]),
    ]
    data["mirror"] = {"url": "postgresql://127.0.0.1/db", "feeds": ["jpm.jobs"]}
    assert subscriptions(settings(data)) == [Subscription(2, ["jpm.jobs"])]
    data["mirror"] = {"url": "postgresql://127.0.0.1/db", "tenants": [1]}
    assert subscriptions(settings(data)) == [Subscription(1, ["crm.customers"])]
