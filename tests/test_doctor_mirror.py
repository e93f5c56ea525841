"""`syncd doctor` on the mirror's PostgreSQL: the verdicts by table, the facts from a real
server (a private one, or a throwaway database)."""

from __future__ import annotations

import psycopg
import pytest

from syncd.cli.doctor import judge_postgres
from syncd.mirror.check import PostgresFacts, gather_postgres
from syncd.mirror.schema import VERSION
from tests.engine_helpers import settings
from tests.mirror_helpers import mirror_config

W = "postgresql://syncd@db:5432/syncd"


@pytest.mark.parametrize(
    ("facts", "status", "says"),
    [
        (PostgresFacts(W, server_version=160002, can_create=True), "ok", "no schema yet"),
        (
            PostgresFacts(
                W, server_version=150001, schema_exists=True, newest_table_version=VERSION
            ),
            "ok",
            f"tables at version {VERSION}",
        ),
        (
            PostgresFacts(W, error="OperationalError: password authentication failed"),
            "fail",
            "password",
        ),
        (PostgresFacts(W, server_version=140009, can_create=True), "fail", "PostgreSQL 14"),
        (
            PostgresFacts(W, server_version=160002, read_only=True, can_create=True),
            "fail",
            "no writes",
        ),
        (PostgresFacts(W, server_version=160002), "fail", "may not create"),
        (
            PostgresFacts(
                W, server_version=160002, schema_exists=True, newest_table_version=VERSION + 1
            ),
            "fail",
            f"version {VERSION + 1}",
        ),
        ("[mirror] is configured, but psycopg is not installed", "fail", "psycopg"),
    ],
)
def test_postgres_verdicts(facts: PostgresFacts | str, status: str, says: str) -> None:
    line = judge_postgres(facts)
    assert (line.check, line.status) == ("mirror postgres", status)
    assert says in line.detail
    assert (line.action == "") == (status == "ok")


async def test_a_real_server_is_writable_and_then_read_only(pg_url: str) -> None:
    data = mirror_config("redis://127.0.0.1:1", pg_url, [1], ["crm.customers"])
    facts = await gather_postgres(settings(data))
    assert facts.error is None
    assert facts.server_version >= 150000
    assert (facts.read_only, facts.can_create, facts.schema_exists) == (False, True, False)
    assert judge_postgres(facts).status == "ok"
    db = pg_url.rsplit("/", 1)[1].split("?")[0]
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as c:
        await c.execute(f'ALTER DATABASE "{db}" SET default_transaction_read_only = on')
    facts = await gather_postgres(settings(data))
    assert facts.read_only
    assert judge_postgres(facts).status == "fail"


async def test_a_server_that_does_not_answer_is_named_without_its_password(pg_url: str) -> None:
    url = "postgresql://syncd:hunter2@127.0.0.1:1/nothing"
    data = mirror_config("redis://127.0.0.1:1", url, [1], ["crm.customers"], connect_timeout=2.0)
    facts = await gather_postgres(settings(data), timeout=5.0)
    line = judge_postgres(facts)
    assert line.status == "fail"
    assert "hunter2" not in line.detail + line.action
    assert "127.0.0.1:1" in line.detail
