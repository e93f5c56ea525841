"""The documentation (README.md and docs/*.md) says what the code does: its `syncd` commands
parse, the configuration keys and metric names it names exist, its links resolve, the
troubleshooting guide covers every warning and error the code logs and every shipped alert, and
the examples and settings it quotes match their sources."""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from syncd import config
from syncd.cli.demo import demo_config
from syncd.cli.main import build_parser
from syncd.consumer import Consumer, ConsumerMetrics
from syncd.mirror import ops as mirror_ops
from syncd.ops.metrics import EngineStatus, Metrics, TenantStatus
from syncd.simulator.options import DEFAULT_APP_KEY, DEFAULT_TENANTS, SimOptions
from tests.docs_helpers import (
    DOCS,
    README,
    ROOT,
    TROUBLESHOOTING,
    alert_names,
    anchors,
    blocks,
    code_spans,
    headings,
    links,
    literal,
    logged_events,
    prose,
    section,
    shell_lines,
    syncd_argvs,
    table_rows,
)

IDS = [str(p.relative_to(ROOT)) for p in DOCS]


def test_the_docs_are_found() -> None:
    names = {p.name for p in DOCS}
    assert {"README.md", "troubleshooting.md", "compatibility.md", "operations.md"} <= names


# -- commands --------------------------------------------------------------------------------


def commands() -> list[tuple[str, str, list[str]]]:
    """(file, line, argv) of every `syncd` run in a fenced `sh` block of the docs."""
    found = []
    for path in DOCS:
        for block in blocks(path.read_text(), "sh"):
            for line in shell_lines(block):
                found += [(path.name, line, argv) for argv in syncd_argvs(line)]
    return found


def test_every_syncd_command_shown_parses() -> None:
    found = commands()
    assert len(found) >= 25, "the docs' syncd commands were not found"
    assert {argv[0] for _, _, argv in found} >= {"run", "status", "doctor", "dead", "simulate"}
    parser = build_parser()
    refused = []
    for name, line, argv in found:
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                parser.parse_args(argv)
        except SystemExit as exc:
            if exc.code != 0:
                refused.append(f"{name}: {line}\n  {argv}: {err.getvalue().strip()}")
    assert not refused, "\n".join(refused)


@pytest.mark.parametrize(
    ("line", "argvs"),
    [
        ("syncd feeds | head", [["feeds"]]),
        (
            "syncd status --config FILE [--json]  # a comment",
            [["status", "--config", "x", "--json"]],
        ),
        (
            "syncd dead purge --tenant T (--id ID ... | --all) [--yes]",
            [
                ["dead", "purge", "--tenant", "1001", "--id", "1714564800123-0", "--yes"],
                ["dead", "purge", "--tenant", "1001", "--all", "--yes"],
            ],
        ),
        (
            "sudo /opt/syncd/.venv/bin/syncd doctor --config /etc/syncd/syncd.toml",
            [["doctor", "--config", "/etc/syncd/syncd.toml"]],
        ),
        ("sudo install -d -m 0755 /etc/syncd", []),
    ],
)
def test_command_lines_are_read_as_a_reader_would(line: str, argvs: list[list[str]]) -> None:
    assert [a for ln in shell_lines(line) for a in syncd_argvs(ln)] == argvs


def test_an_unknown_option_is_caught() -> None:
    (argv,) = syncd_argvs("syncd status --config FILE --verbose")
    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        build_parser().parse_args(argv)


# -- configuration keys ----------------------------------------------------------------------

SECTIONS: dict[str, type[msgspec.Struct]] = {
    f.name: f.type
    for f in msgspec.structs.fields(config.Config)
    if isinstance(f.type, type) and issubclass(f.type, msgspec.Struct)
}
SECTIONS["mirror"] = config.model.MirrorConfig
SECTIONS["tenants"] = config.TenantConfig
SECTIONS["feeds"] = config.FeedOptions


def keys_of(section: str) -> set[str]:
    return {f.encode_name for f in msgspec.structs.fields(SECTIONS[section])}


# `ops.json`, `redis.conf`: files, not keys.
FILE_SUFFIXES = {"json", "conf", "toml", "yml", "md", "py", "service", "sock"}

BASE: dict[str, Any] = {
    "servicetitan": {"app_key": "k"},
    "tenants": [{"id": 123456789, "client_id": "c", "client_secret": "s"}],
}


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_every_toml_block_holds_only_known_keys(path: Path) -> None:
    """Each block, on top of a minimal valid configuration, passes the configuration's own
    validation: an unknown key, a misspelt section or a wrong type fails."""
    for block in blocks(path.read_text(), "toml"):
        data = {**BASE, **tomllib.loads(block)}
        try:
            config.parse(data, path.name)
        except config.ConfigError as exc:
            pytest.fail(f"{path.name}: {exc}\n{block}")


@pytest.mark.parametrize("path", DOCS, ids=IDS)
def test_configuration_keys_named_in_the_prose_exist(path: Path) -> None:
    spans = code_spans(path.read_text())
    named: list[tuple[str, str | None]] = []
    for span in spans:
        m = re.fullmatch(r"\[([a-z]+)\](?: (\w+)(?: = .*)?)?", span)  # not systemd's [Service]
        if m:
            named.append((m.group(1), m.group(2)))
        m = re.fullmatch(rf"({'|'.join(SECTIONS)})\.(\w+)", span)
        if m and m.group(2) not in FILE_SUFFIXES:
            named.append((m.group(1), m.group(2)))
    unknown = [
        f"[{sect}] {key or ''}"
        for sect, key in named
        if sect not in SECTIONS or (key is not None and key not in keys_of(sect))
    ]
    assert not unknown, f"{path.name} names keys the configuration does not have: {unknown}"


def test_the_key_checks_see_the_keys() -> None:
    text = README.read_text()
    assert "wait_replicas" in keys_of("redis")
    assert "`[redis] allow_eviction = true`" in text
    assert "`engine.shutdown_grace`" in text


# -- metric names ----------------------------------------------------------------------------


def exported_metrics() -> set[str]:
    """Every family and sample name /metrics can hold, at the fullest detail, in a fleet."""
    m = Metrics(detail="tenant_feed")
    m.set_feeds(1, {"crm.customers": 60.0})
    for status in (200, 404, 429, 503, None):
        m.request(1, status)
    m.page(1, "crm.customers", 3, 2, 1, 0.3)
    m.dead_letter(1, "crm.customers")
    m.stale_records(1, "crm.customers", 1)
    m.rate_limited(1, 2.0)
    m.token_renewed(1)
    m.redis_error()
    m.lateness(0.1)
    m.set_fleet(2, 1, disagreements=1, unpolled=1, name_clash=True)
    m.set_rate_limit(1, 20.0)
    m.set_status_source(lambda: EngineStatus([TenantStatus(1, 10.0, 1, True, False)]))
    m.passes.due(1, "crm.customers", 60.0, None, 0.0)
    m.passes.completed(1, "crm.customers", 1, 1, 1.0)
    # The consumer library's (your consumers', the mirror's) and the mirror's own.
    consumer = ConsumerMetrics()
    consumer.observe("g", 0.1)
    state = SimpleNamespace(applied=1, refused=0, batches=1, newest_ms=0, ready=True)
    texts = [m.render().decode(), mirror_ops.render(state, consumer).decode()]
    names = set()
    for family in (f for text in texts for f in text_string_to_metric_families(text)):
        names.add(family.name)
        if family.type == "counter":  # the parser names a counter family without `_total`
            names.add(family.name + "_total")
        names.update(s.name for s in family.samples)
    return names


def expand_braces(name: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", name)
    if m is None:
        return [name]
    return [
        n
        for part in m.group(1).split(",")
        for n in expand_braces(name[: m.start()] + part + name[m.end() :])
    ]


METRIC = re.compile(r"syncd_(?:[a-z0-9_]|\{[a-z_,]+\}(?=_))*[a-z0-9](?![<\w])")


@pytest.mark.parametrize("path", [*DOCS, ROOT / "contrib/prometheus/syncd-rules.yml"], ids=str)
def test_metric_names_exist(path: Path) -> None:
    text = prose(path.read_text()) if path.suffix == ".md" else path.read_text()
    named = {n for raw in METRIC.findall(text) for n in expand_braces(raw)}
    unknown = sorted(named - exported_metrics())
    assert not unknown, f"{path.name} names metrics syncd does not export: {unknown}"


def test_the_metric_check_sees_the_names() -> None:
    names = exported_metrics()
    assert {"syncd_polling_paused", "syncd_requests_total", "syncd_pages_total"} <= names
    assert "syncd_feed_records_fetched_total" in expand_braces(
        "syncd_{tenant,feed}_records_fetched_total"
    )
    assert METRIC.findall("`syncd_soak_<pid>` and `syncd_fleet_members`") == ["syncd_fleet_members"]


# -- links -----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [*DOCS, ROOT / "CHANGELOG.md"], ids=str)
def test_relative_links_and_anchors_resolve(path: Path) -> None:
    broken = []
    for target in links(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and (dest.suffix != ".md" or anchor not in anchors(dest)):
            broken.append(f"{target}: no such heading")
    assert not broken, f"{path.name}: {broken}"


# Words a draft leaves behind: a reader finds no answer where they stand.
PLACEHOLDER = re.compile(r"(?i)to be filled|\bTODO\b|\bTBD\b|\bFIXME\b|\bXXX\b")


@pytest.mark.parametrize("path", [*DOCS, ROOT / "CHANGELOG.md"], ids=str)
def test_no_placeholder_is_left(path: Path) -> None:
    left = [line for line in path.read_text().splitlines() if PLACEHOLDER.search(line)]
    assert not left, f"{path.name}: {left}"


def test_anchors_are_github_s() -> None:
    from tests.docs_helpers import slug

    assert slug("4. Check it as the service will run: `syncd doctor`") == (
        "4-check-it-as-the-service-will-run-syncd-doctor"
    )
    assert slug("What `Consumer.run` does about failures") == "what-consumerrun-does-about-failures"


def test_the_units_point_to_a_heading_that_exists() -> None:
    readme = set(headings(README.read_text()))
    for unit in sorted((ROOT / "systemd").glob("*.service")):
        for name in re.findall(r'"([^"]+)" in the README', unit.read_text()):
            assert name in readme, f"{unit.name} points to the README's missing {name!r}"
    assert "Sizing MemoryMax" in readme


# -- troubleshooting -------------------------------------------------------------------------


def test_troubleshooting_covers_every_warning_and_error_logged() -> None:
    doc = TROUBLESHOOTING.read_text()
    rows = table_rows(section(doc, "## Log events"))
    documented = {name: {lv.strip() for lv in cells[0].split(",")} for name, cells in rows.items()}
    logged = logged_events()
    assert len(logged) > 50, "the code's log events were not found"
    missing = sorted(set(logged) - set(documented))
    stale = sorted(set(documented) - set(logged))
    levels = {
        n: (documented[n], logged[n]) for n in logged if documented.get(n, logged[n]) != logged[n]
    }
    assert not missing, f"log events missing from docs/troubleshooting.md: {missing}"
    assert not stale, f"docs/troubleshooting.md lists events the code does not log: {stale}"
    assert not levels, f"levels differ (documented, logged): {levels}"
    for name, cells in rows.items():
        assert all(cells[1:3]), f"{name}: say what it means and what to do"


def test_troubleshooting_covers_every_shipped_alert() -> None:
    rows = table_rows(section(TROUBLESHOOTING.read_text(), "## Alerts"))
    alerts = alert_names()
    assert len(alerts) >= 10
    assert sorted(rows) == sorted(alerts)
    assert all(all(cells[:2]) for cells in rows.values())


# -- what the docs quote ---------------------------------------------------------------------


def test_doctor_as_the_service_carries_the_unit_s_user_and_credentials() -> None:
    unit = (ROOT / "systemd" / "syncd.service").read_text()
    wanted = {
        line
        for line in unit.splitlines()
        if re.match(r"(DynamicUser|User|Group|LoadCredential)=", line)
    }
    runs = [
        ln for b in blocks(README.read_text(), "sh") for ln in shell_lines(b) if "systemd-run" in ln
    ]
    assert runs, "the README shows no systemd-run"
    for line in runs:
        given = set(re.findall(r"-p (\S+)", line))
        assert wanted <= given, f"missing {sorted(wanted - given)} in: {line}"


def test_the_consumer_defaults_are_the_consumer_s() -> None:
    readme = README.read_text()
    table = readme[readme.index("| argument | default |") :].split("\n\n", 1)[0]
    documented = {name: literal(cells[0]) for name, cells in table_rows(table).items()}
    params = inspect.signature(Consumer.__init__).parameters
    defaults = {
        name: p.default
        for name, p in params.items()
        if p.kind is p.KEYWORD_ONLY and p.default is not p.empty
    }
    assert documented == defaults
    assert {"claim_idle_ms", "max_deliveries", "batch", "block_ms", "prefix"} <= set(documented)


def test_the_consumer_example_reads_what_the_demo_writes() -> None:
    (example,) = blocks(section(README.read_text(), "## Consuming events"), "python")
    prefix = re.search(r'^PREFIX = "(\w+)"', example, re.M)
    tenant = re.search(r"^TENANT = (\d+)", example, re.M)
    assert prefix is not None
    assert tenant is not None
    demo = demo_config()
    assert prefix.group(1) == demo.redis.key_prefix
    assert int(tenant.group(1)) in [t.id for t in demo.tenants]
    assert "crm.customers" in (demo.defaults.feeds or [])


def test_the_simulator_configuration_matches_syncd_simulate() -> None:
    path = ROOT / "config" / "simulator.toml"
    settings = config.load_settings(str(path), {})
    options = SimOptions()
    url = f"http://{options.host}:{options.port}"
    assert (settings.api_url, settings.auth_url) == (url, url + "/connect/token")
    assert settings.app_key.reveal() == DEFAULT_APP_KEY
    assert tuple(t.id for t in settings.tenants) == DEFAULT_TENANTS
    for t in settings.tenants:
        assert (t.client_id, t.client_secret.reveal()) == (f"client-{t.id}", f"secret-{t.id}")
    assert settings.config.redis.key_prefix != demo_config().redis.key_prefix
    # Every line of the README's by-hand quick start names this file.
    by_hand = section(README.read_text(), "### By hand")
    assert "config/simulator.toml" in by_hand


def test_the_feed_counts_stated_are_the_catalogue_s() -> None:
    from syncd import catalogue

    readme = README.read_text()
    assert f"{len(catalogue.default_feeds())} by\ndefault" in readme
    assert f"lists all {len(catalogue.feeds())}" in readme
