"""Redis Cluster: each tenant's keys share a slot, so pages apply atomically on any node."""

from __future__ import annotations

import json

from redis.asyncio.cluster import RedisCluster

from syncd import catalogue
from syncd.daemon import Daemon
from syncd.engine.publisher import Publisher
from syncd.servicetitan.page import Page, decode_page
from syncd.testing.redis_server import RedisClusterServers
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import assert_exactly_once, config_dict, latest_by_key, settings, truth

TENANTS = [11, 12, 13, 14, 15, 16]
FEEDS = ["crm.customers", "jpm.jobs"]


async def test_backfill_on_a_cluster_is_exactly_once(cluster: RedisClusterServers) -> None:
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()
        slots = {client.keyslot(f"st:{{{t}}}:cursors") for t in TENANTS}
        nodes = {client.get_node_from_key(f"st:{{{t}}}:cursors").port for t in TENANTS}
        assert len(nodes) > 1, "the tenants should spread over several nodes"
        assert len(slots) == len(TENANTS)
        async with run_simulator(tenants=TENANTS, records=120, page_size=25) as sim:
            data = config_dict(cluster.url, sim.url, sim.app_key, TENANTS, FEEDS)
            data["redis"]["cluster"] = True
            data["streams"] = {"groups": ["g"], "max_len": 1000}
            for _ in range(2):  # the second pass finds everything unchanged
                assert await Daemon(settings(data), once=True).run() == 0
            for t in TENANTS:
                for f in FEEDS:
                    entries = await client.xrange(f"st:{{{t}}}:{f}")
                    events = [{k.decode(): v for k, v in e.items()} for _, e in entries]
                    records = await truth(sim.url, t, f)
                    assert_exactly_once(events, records, where=f"{t}/{f}")
                    assert latest_by_key(events) == records
                assert await client.hlen(f"st:{{{t}}}:cursors") == len(FEEDS)
    finally:
        await client.aclose()


async def test_every_key_of_the_page_script_shares_the_tenant_slot(
    cluster: RedisClusterServers,
) -> None:
    """Dead letters, their digests and stale counts on a cluster: one slot per tenant, or the
    script is refused (CROSSSLOT) and the feed never moves."""
    client = RedisCluster.from_url(cluster.url)
    try:
        await client.initialize()
        pub = Publisher(client, "slots")  # a prefix of its own: the cluster is shared
        for t in TENANTS[:3]:
            k = pub.keys(t)
            feed = FEEDS[0]
            names = [k.cursors, k.seen(feed), k.stream(feed), k.dead, k.state, k.dead_seen(feed)]
            assert len({client.keyslot(n) for n in names}) == 1
            new = {"id": 1, "modifiedOn": "2024-02-01T00:00:00Z"}
            old = {"id": 1, "v": 0, "modifiedOn": "2024-01-01T00:00:00Z"}
            first = _page([new, {"id": None}], "C1")
            assert (await pub.apply(t, feed, None, first)).applied
            again = await pub.apply(t, feed, "C1", _page([old, {"id": None}], "C1"))
            assert (again.published, again.stale, again.dead) == (0, 1, 0)
            assert await client.xlen(k.stream(feed)) == 1
            assert await client.xlen(k.dead) == 1
    finally:
        await client.aclose()


def _page(records: list[dict[str, object]], cursor: str) -> Page:
    envelope = {"hasMore": False, "continueFrom": cursor, "data": records}
    return decode_page(json.dumps(envelope).encode(), catalogue.feed(FEEDS[0]))


async def test_a_reconciliation_pass_on_a_cluster(cluster: RedisClusterServers) -> None:
    """The pass's scripts and the index's buckets stay in the tenant's slot."""
    import io

    import aiohttp

    from syncd.cli.reconcile import reconcile

    client = RedisCluster.from_url(cluster.url)
    tenants = [21, 22]
    try:
        await client.initialize()
        async with run_simulator(tenants=tenants, records=300, page_size=40) as sim:
            data = config_dict(cluster.url, sim.url, sim.app_key, tenants, ["crm.customers"])
            data["redis"]["cluster"] = True
            data["redis"]["key_prefix"] = "passes"
            assert await Daemon(settings(data), once=True).run() == 0
            for t in tenants:
                async with (
                    aiohttp.ClientSession() as s,
                    s.post(
                        f"{sim.url}/_sim/tenants/{t}/feeds/crm.customers/mutate",
                        params={"count": "5", "kind": "delete"},
                    ) as resp,
                ):
                    gone = sorted(str(k) for k in (await resp.json())["keys"])
                out = io.StringIO()
                code = await reconcile(
                    settings(data), t, None, share=1.0, out=out, progress=False, as_json=True
                )
                assert code == 0, out.getvalue()
                assert json.loads(out.getvalue())["deleted"] == 5
                entries = await client.xrange(f"passes:{{{t}}}:crm.customers")
                deleted = sorted(e[b"key"].decode() for _, e in entries if e[b"op"] == b"deleted")
                assert deleted == gone
    finally:
        await client.aclose()
