"""What a running daemon reports at the default detail: failing auth, 429s and the rate they
leave, time since success against the poll interval, and never a tenant x feed series."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from syncd import config
from syncd.daemon import Daemon
from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, to_toml

GOOD, BAD = 9801, 9802
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def get(got: Samples, name: str, **labels: str) -> float | None:
    return got.get((name, frozenset(labels.items())))


async def test_daemon_reports_failing_tenants_rate_limits_and_staleness(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # The simulator allows 5 requests/s per tenant; syncd is told 60: 429s follow.
    async with run_simulator(tenants=[GOOD, BAD], records=400, page_size=10, rate_limit=5) as sim:
        data = config_dict(redis_server.url, sim.url, sim.app_key, [GOOD, BAD], ["crm.customers"])
        data["tenants"][1]["client_secret"] = "not-the-secret"
        port = free_port()
        data["ops"] = {"listen": f"127.0.0.1:{port}"}
        path = tmp_path / "syncd.toml"
        path.write_text(to_toml(data))
        daemon = Daemon(config.load_settings(path, environ={}), config_path=str(path), environ={})
        task = asyncio.create_task(daemon.run())
        seen: dict[str, Samples] = {}
        try:
            async with aiohttp.ClientSession() as http:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while len(seen) < 3:
                    assert not task.done(), "the daemon stopped"
                    assert loop.time() < deadline, f"seen only {sorted(seen)}"
                    await asyncio.sleep(0.05)
                    if daemon.ops is None or not daemon.ops.port:
                        continue
                    async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                        got = parse(await resp.text())
                    for (name, labels), _ in got.items():
                        assert not {"tenant", "feed"} <= {k for k, _ in labels}, name
                    if get(got, "syncd_tenant_auth_failing", tenant=str(BAD)) == 1:
                        seen["auth"] = got
                    allowed = get(got, "syncd_tenant_requests_per_second_allowed", tenant=str(GOOD))
                    if (get(got, "syncd_rate_limited_total", tenant=str(GOOD)) or 0) > 0 and (
                        allowed is not None and allowed < 60
                    ):
                        seen["throttled"] = got
                    if (get(got, "syncd_tenant_pages_total", tenant=str(GOOD)) or 0) > 0:
                        seen["pages"] = got
        finally:
            if daemon.scheduler is not None:
                daemon.scheduler.stop()
            assert await asyncio.wait_for(task, 60) == 0
    auth = seen["auth"]
    assert get(auth, "syncd_tenant_auth_failing", tenant=str(GOOD)) == 0
    throttled = seen["throttled"]
    assert get(throttled, "syncd_tenant_requests_per_second_limit", tenant=str(GOOD)) == 60
    assert (get(throttled, "syncd_requests_total", tenant=str(GOOD), status="429") or 0) > 0
    pages = seen["pages"]
    assert get(pages, "syncd_tenant_poll_interval_seconds", tenant=str(GOOD)) == 30
    assert get(pages, "syncd_feed_poll_interval_seconds", feed="crm.customers") == 30
    # The tenant that never authenticates has never succeeded: it ages from its start, and it
    # is the oldest copy of the feed.
    bad_age = get(pages, "syncd_tenant_seconds_since_success", tenant=str(BAD))
    assert bad_age is not None
    assert get(pages, "syncd_feed_oldest_seconds_since_success", feed="crm.customers") == bad_age
    assert get(pages, "syncd_polling_paused", reason="redis_unavailable") == 0
    for reason in ("consumer_lag", "rate_limit"):
        assert get(pages, "syncd_feeds_paused", tenant=str(GOOD), reason=reason) is not None
