"""The series syncd exports, read from what it serves: for the rules and dashboard tests."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncd import config
from syncd.daemon import Daemon
from syncd.ops.metrics import EngineStatus, Metrics, TenantStatus
from syncd.testing.redis_server import RedisServer, free_port
from syncd.testing.simulator import run_simulator
from tests.engine_helpers import config_dict, to_toml

# Exported only by an instance that is a member of a fleet.
FLEET_ONLY = {
    "syncd_fleet_members",
    "syncd_fleet_tenants_owned",
    "syncd_fleet_config_disagreements",
    "syncd_fleet_feeds_unpolled",
    "syncd_fleet_instance_name_clash",
}
_NAME = re.compile(r"\bsyncd_[a-zA-Z0-9_:]*")
_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


def sample_names(text: str) -> set[str]:
    """Every sample name in a Prometheus text exposition (histograms with their suffixes)."""
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def names_used(text: str) -> set[str]:
    """Every `syncd_...` name mentioned in a PromQL expression or any text."""
    return set(_NAME.findall(text))


def every_event_metrics() -> Metrics:
    """A `Metrics` after every kind of event its helpers record, fleet membership included."""
    m = Metrics()
    m.set_feeds(1, {"crm.customers": 300.0})
    for status in (200, 404, 429, 500, None):
        m.request(1, status)
    m.page(1, "crm.customers", 10, 5, 5, 0.2)
    m.dead_letter(1, "crm.customers")
    m.stale_records(1, "crm.customers", 1)
    m.rate_limited(1, 3.0)
    m.token_renewed(1)
    m.redis_error()
    m.lateness(0.1)
    m.set_feeds_paused(1, 1)
    m.set_fleet(2, 1)
    m.set_rate_limit(1, 20.0)
    m.passes.due(1, "crm.customers", 3600.0, None, 1_700_000_000.0)
    m.passes.completed(1, "crm.customers", 2, 3, 1_700_000_100.0)
    m.set_status_source(lambda: EngineStatus([TenantStatus(1, 10.0, 1, True, True)]))
    return m


async def scrape_daemon(redis_url: str, workdir: Path) -> str:
    """/metrics of a daemon at the default detail, polling the simulator, once it applied a page
    (before that, the per-page histograms have no series yet)."""
    async with run_simulator(tenants=[9701], records=30, page_size=10) as sim:
        data = config_dict(redis_url, sim.url, sim.app_key, [9701], ["crm.customers"])
        data["feeds"] = {"crm.customers": {"reconcile_interval": 3600.0}}
        port = free_port()
        data["ops"] = {"listen": f"127.0.0.1:{port}"}
        path = workdir / "syncd.toml"
        path.write_text(to_toml(data))
        daemon = Daemon(config.load_settings(path, environ={}), config_path=str(path), environ={})
        task = asyncio.create_task(daemon.run())
        try:
            async with aiohttp.ClientSession() as http:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while True:
                    assert not task.done(), "the daemon stopped"
                    text = ""
                    if daemon.ops is not None and daemon.ops.port:
                        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                            text = await resp.text()
                    if "syncd_page_fetch_seconds_count" in text:
                        return text
                    assert loop.time() < deadline, "no page applied within 60 s"
                    await asyncio.sleep(0.1)
        finally:
            if daemon.scheduler is not None:
                daemon.scheduler.stop()
            assert await asyncio.wait_for(task, 60) == 0


@pytest.fixture(scope="module")
async def daemon_names(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> set[str]:
    """The sample names a real daemon serves (the family names of histograms too)."""
    text = await scrape_daemon(redis_server.url, tmp_path_factory.mktemp("daemon"))
    names = sample_names(text)
    return names | {n.removesuffix(s) for n in names for s in _HISTOGRAM_SUFFIXES if n.endswith(s)}


def exported_by_metrics() -> set[str]:
    names = sample_names(every_event_metrics().render().decode())
    return names | {n.removesuffix(s) for n in names for s in _HISTOGRAM_SUFFIXES if n.endswith(s)}
