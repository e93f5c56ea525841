"""`[redis] wait_replicas` and a reconciliation pass's sweep: each sweep step counts as done
once enough replicas have its deletes, as a page does."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from syncd import catalogue
from syncd.engine.publisher import Publisher
from syncd.engine.reconcile import Progress, Reconciler, paced_at
from syncd.errors import ReplicasBehind
from syncd.keys import Keys
from syncd.servicetitan.page import decode_page
from syncd.testing.redis_server import RedisServer
from tests.test_wait_replicas import client, frozen, replicated

__all__ = ["client", "replicated"]  # fixtures, used by name

FEED = catalogue.feed("crm.customers")
TENANT = 77
KEYS = Keys("st", TENANT)


def body(ids: list[int], cursor: str, *, more: bool = False) -> bytes:
    data = [{"id": i, "modifiedOn": "2024-01-01T00:00:00Z"} for i in ids]
    return json.dumps({"hasMore": more, "continueFrom": cursor, "data": data}).encode()


async def test_a_sweep_step_is_done_once_the_replica_has_its_deletes(
    client: aioredis.Redis, replicated: tuple[RedisServer, RedisServer]
) -> None:
    _, replica = replicated
    pub = Publisher(client, "st", precheck_min=0, wait_replicas=1, wait_timeout=10.0)
    assert (
        await pub.apply(TENANT, FEED.name, None, decode_page(body([1, 2, 3], "c1"), FEED))
    ).applied
    # The sweep calls no API: no client, and tokens that only name the tenant.
    tokens = cast(Any, SimpleNamespace(tenant=TENANT))
    reconciler = Reconciler(pub, cast(Any, None), tokens, pace=paced_at(100.0))
    # A pass that saw only key 2: its sweep deletes 1 and 3.
    began, _ = await reconciler._start(
        keys=[KEYS.index(FEED.name), KEYS.seen(FEED.name)], args=["1.000"]
    )
    assert int(began) == 1
    page = decode_page(body([2], "p1"), FEED)
    assert (await pub.apply(TENANT, FEED.name, None, page, reconcile=True)).applied
    pub.wait_timeout = 0.5
    with frozen(replica), pytest.raises(ReplicasBehind, match="the sweep"):
        await reconciler._step(FEED, Progress())
    pub.wait_timeout = 10.0
    # Applied on the primary, not counted done: the next step (the replica back) finds the
    # sweep where the first left it, and ends the pass once the replica has everything.
    assert await reconciler._step(FEED, Progress()) == "done"
    deleted = [f[b"key"] for _, f in await client.xrange(KEYS.stream(FEED.name))
               if f[b"op"] == b"deleted"]  # fmt: skip
    assert sorted(deleted) == [b"1", b"3"]
    on_replica = aioredis.Redis.from_url(replica.url)
    try:
        assert await on_replica.xlen(KEYS.stream(FEED.name)) == 5
    finally:
        await on_replica.aclose()


async def test_without_waiting_a_sweep_step_writes_through_the_pool(client: aioredis.Redis) -> None:
    pub = Publisher(client, "st", precheck_min=0)
    assert await pub.replicated(lambda c: c.ping(), "a ping") is True
