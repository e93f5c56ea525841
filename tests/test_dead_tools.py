"""`syncd dead list|show|replay|purge` and the replay streams behind `replay`, against a real
Redis: the daemon's page script writes record dead letters, consumer groups dead-letter the
events they give up on, and the commands run as processes on a configuration file."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bench.common import to_toml
from syncd import catalogue, redact
from syncd.cli.dead import parse_since
from syncd.cli.dead_output import as_json, clean, excerpt, render_show, render_table
from syncd.consumer import Consumer, Event, deadstream
from syncd.consumer.deadstream import DeadLetter, Selection
from syncd.consumer.replay import MOVE_LUA
from syncd.engine.publisher import Publisher
from syncd.keys import Keys
from syncd.servicetitan.page import decode_page
from syncd.testing.redis_server import RedisServer
from tests.engine_helpers import config_dict
from tests.test_redis_acl import USER, acl_url, readme_acl_line

TENANT = 5151
KEYS = Keys("st", TENANT)
CUSTOMERS = KEYS.stream("crm.customers")
APP_KEY = "ak-Dead7Letters9Key"
# The tenant's client secret: the configuration's, so every `syncd dead` process knows it.
SECRET = f"secret-{TENANT}-Zq8Xw2Lp"


# -- helpers ----------------------------------------------------------------------------------


async def publish(redis: aioredis.Redis, records: list[dict[str, Any]], cursor: str) -> None:
    """Apply one page of crm.customers with the daemon's page script."""
    stored = await redis.hget(KEYS.cursors, "crm.customers")
    body = json.dumps({"hasMore": False, "continueFrom": cursor, "data": records}).encode()
    page = decode_page(body, catalogue.feed("crm.customers"))
    applied = await Publisher(redis, "st").apply(
        TENANT, "crm.customers", stored.decode() if stored else None, page
    )
    assert applied.applied


def customer(key: int, **extra: Any) -> dict[str, Any]:
    return {"id": key, "name": f"Customer {key}", "modifiedOn": "2024-05-01T12:00:00Z", **extra}


def write_config(path: Path, url: str) -> Path:
    data = config_dict(url, "http://127.0.0.1:9", APP_KEY, [TENANT], ["crm.customers"])
    data["tenants"][0]["client_secret"] = SECRET
    path.write_text(to_toml(data))
    return path


@pytest.fixture
def config(tmp_path: Path, redis_server: RedisServer) -> Path:
    return write_config(tmp_path / "syncd.toml", redis_server.url)


class Run:
    """`syncd dead ...` as a process on the test's configuration."""

    def __init__(self, config: Path) -> None:
        self.config = config

    async def __call__(self, action: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "syncd", "dead", action, "--config", str(self.config)]
        return await asyncio.to_thread(
            subprocess.run,
            [*cmd, "--tenant", str(TENANT), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )


@pytest.fixture
def syncd(config: Path) -> Run:
    return Run(config)


def consumer(redis: aioredis.Redis, group: str, name: str = "c1", **options: Any) -> Consumer:
    options.setdefault("block_ms", 50)
    return Consumer(redis, group, name, streams=[CUSTOMERS], **options)


async def run_until(
    c: Consumer, handler: Callable[[list[Event]], Any], done: Callable[[], Any]
) -> None:
    """`c.run(handler)` until `done()` holds (at most 20 s)."""
    stop = asyncio.Event()
    task = asyncio.create_task(c.run(handler, stop=stop))
    try:
        async with asyncio.timeout(20):
            while not await done():
                await asyncio.sleep(0.02)
    finally:
        stop.set()
        await task


async def dead_ids(redis: aioredis.Redis) -> list[str]:
    return [entry_id.decode() for entry_id, _ in await redis.xrange(KEYS.dead)]


@pytest.fixture
async def buried(redis: aioredis.Redis) -> dict[str, str]:
    """Customer 1 handled by `billing` and `audit`; customer 666 failed by `billing` until it
    was dead-lettered (handled by `audit`); a record without a key dead-lettered by the page
    script. Returns the ids: `event` (in the dead stream), `original` (its entry id in the
    customers stream), `record`."""
    await publish(redis, [customer(1), customer(666), {"name": "no key"}], "c1")
    (record,) = await dead_ids(redis)
    audit = consumer(redis, "audit")
    async with audit:
        await run_until(audit, _ok, lambda: _groups_done(redis, "audit"))

    async def poison(batch: list[Event]) -> list[Event]:
        return [e for e in batch if e.key == "666"]

    billing = consumer(redis, "billing", claim_idle_ms=50, max_deliveries=2)
    async with billing:
        await run_until(billing, poison, lambda: _has_dead(redis, 2))
    event = (await dead_ids(redis))[1]
    ((_, fields),) = await redis.xrange(KEYS.dead, event, event)
    return {"event": event, "original": fields[b"entry_id"].decode(), "record": record}


async def _ok(batch: list[Event]) -> None:
    return None


async def _groups_done(redis: aioredis.Redis, group: str) -> bool:
    info = {g["name"].decode(): g for g in await redis.xinfo_groups(CUSTOMERS)}
    return group in info and info[group]["lag"] == 0 and info[group]["pending"] == 0


async def _has_dead(redis: aioredis.Redis, n: int) -> bool:
    return len(await dead_ids(redis)) >= n


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


# -- list, replay to the group that failed it, once ------------------------------------------


async def test_a_dead_event_is_listed_and_replayed_to_its_group_only_once(
    redis: aioredis.Redis, syncd: Run, buried: dict[str, str]
) -> None:
    listed = await syncd("list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["id"]: row for row in json_lines(listed.stdout)}
    assert rows[buried["event"]] | {"time": "", "consumer": ""} == {
        "id": buried["event"],
        "time": "",
        "kind": "event",
        "feed": "crm.customers",
        "reason": "max_deliveries",
        "group": "billing",
        "consumer": "",
        "stream": CUSTOMERS,
        "entry_id": buried["original"],
        "key": "666",
        "deliveries": 3,
        "replays": 0,
        "detail": None,
        "excerpt": '{"id":666,"name":"Customer 666","modifiedOn":"2024-05-01T12…',  # 60
    }
    record = rows[buried["record"]]
    assert (record["kind"], record["reason"], record["group"], record["key"]) == (
        "record",
        "record has no key (id)",
        None,
        None,
    )
    table = await syncd("list")
    header, *lines = table.stdout.splitlines()
    assert header.split()[:6] == ["ID", "TIME", "(UTC)", "FEED", "REASON", "KIND"]
    assert [line.split()[0] for line in lines] == [buried["record"], buried["event"]]
    assert lines[1].split()[3:9] == [
        "crm.customers",
        "max_deliveries",
        *("event", "of", "billing"),
        "666",
    ]

    replayed = await syncd("replay", "--id", buried["event"])
    assert replayed.returncode == 0, replayed.stderr
    assert f"replayed {buried['event']} (crm.customers key 666) to group billing" in (
        replayed.stdout
    )
    assert "no consumer of the group has read it yet" not in replayed.stdout
    assert await dead_ids(redis) == [buried["record"]]
    replay = KEYS.replay("crm.customers", "billing")
    assert await redis.xlen(replay) == 1

    # The group that failed it gets it back, as the event it was, and handles it once.
    handled: list[Event] = []

    async def handle(batch: list[Event]) -> None:
        handled.extend(batch)

    billing = consumer(redis, "billing", "c2")
    async with billing:
        await run_until(billing, handle, lambda: _replayed(redis, replay))
        assert await billing.read() == []
    (event,) = handled
    assert (event.stream, event.id, event.key, event.feed) == (
        CUSTOMERS,
        buried["original"],
        "666",
        "crm.customers",
    )
    assert event.replay_id is not None
    assert event.deliveries == 1
    assert event.json() == customer(666)
    assert await redis.xpending(replay, "billing") == {
        "pending": 0, "min": None, "max": None, "consumers": []
    }  # fmt: skip

    # Another group on the same stream does not see it again.
    audit = consumer(redis, "audit")
    async with audit:
        assert await audit.read() == []

    # A second replay finds nothing to move: the group does not get it twice.
    again = await syncd("replay", "--id", buried["event"])
    assert again.returncode == 1
    assert f"not in the dead stream of tenant {TENANT}" in again.stderr
    assert buried["event"] in again.stderr
    assert await redis.xlen(replay) == 0
    billing = consumer(redis, "billing", "c3")
    async with billing:
        assert await billing.read() == []


async def _replayed(redis: aioredis.Redis, replay: str) -> bool:
    return await redis.xlen(replay) == 0


async def test_a_replayed_event_failed_again_is_dead_lettered_under_its_own_names(
    redis: aioredis.Redis, syncd: Run, buried: dict[str, str]
) -> None:
    assert (await syncd("replay", "--group", "billing")).returncode == 0

    async def poison(batch: list[Event]) -> list[Event]:
        return batch

    billing = consumer(redis, "billing", claim_idle_ms=50, max_deliveries=2)
    async with billing:
        await run_until(billing, poison, lambda: _has_dead(redis, 2))
    replay = KEYS.replay("crm.customers", "billing")
    assert await redis.xlen(replay) == 0  # acknowledged with the copy, and deleted
    (again,) = [r for r in json_lines((await syncd("list", "--json")).stdout) if r["key"]]
    assert (again["stream"], again["entry_id"], again["group"], again["replays"]) == (
        CUSTOMERS,
        buried["original"],
        "billing",
        1,
    )
    assert again["reason"] == "max_deliveries"
    # Handed back a second time, it says so.
    assert (await syncd("replay", "--id", again["id"])).returncode == 0
    ((_, fields),) = await redis.xrange(replay)
    assert fields[b"replays"] == b"2"


async def test_a_daemon_record_is_refused_by_replay(
    redis: aioredis.Redis, syncd: Run, buried: dict[str, str]
) -> None:
    refused = await syncd("replay", "--id", buried["record"], buried["event"])
    assert refused.returncode == 2
    assert buried["record"] in refused.stderr
    assert "is a record the daemon could not turn into an event" in refused.stderr
    assert "nothing was replayed" in refused.stderr
    # Filters that take the record refuse the same way, before anything moves.
    assert (await syncd("replay", "--feed", "crm.customers")).returncode == 2
    assert await dead_ids(redis) == [buried["record"], buried["event"]]
    assert await redis.xlen(KEYS.replay("crm.customers", "billing")) == 0


async def test_replays_racing_move_each_entry_once(
    redis: aioredis.Redis, buried: dict[str, str]
) -> None:
    script = redis.register_script(MOVE_LUA)
    (letter,) = (await deadstream.read_ids(redis, KEYS.dead, [buried["event"]])).values()
    results = await asyncio.gather(
        *(deadstream.hand_back(script, KEYS.dead, letter, "st") for _ in range(5))
    )
    assert sorted(results) == [0, 0, 0, 0, 1]
    assert await redis.xlen(KEYS.replay("crm.customers", "billing")) == 1
    # An id that now names another entry (the stream deleted and written again) is left alone.
    await redis.xadd(KEYS.dead, {"feed": "crm.customers", "reason": "x", "data": "{}"})
    other = (await dead_ids(redis))[-1]
    fake = DeadLetter(other, letter.fields)
    assert await deadstream.hand_back(script, KEYS.dead, fake, "st") == -1
    assert other in await dead_ids(redis)


# -- show, purge, usage ----------------------------------------------------------------------


async def test_show_prints_one_entry_whole(syncd: Run, buried: dict[str, str]) -> None:
    shown = await syncd("show", buried["event"], "--json")
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert doc["data"] == customer(666)
    assert doc["fields"]["op"] == "created"
    assert doc["fields"]["modified_on"]
    assert "\n  " in shown.stdout  # pretty-printed
    text = await syncd("show", buried["event"])
    assert re.search(r"^group +billing$", text.stdout, re.M)
    assert re.search(r"^kind +event of billing$", text.stdout, re.M)
    assert '  "name": "Customer 666",' in text.stdout
    missing = await syncd("show", "1-0")
    assert missing.returncode == 1
    assert "1-0 is not in the dead stream" in missing.stderr


async def test_purge(redis: aioredis.Redis, syncd: Run, buried: dict[str, str]) -> None:
    unconfirmed = await syncd("purge", "--id", buried["record"])
    assert unconfirmed.returncode == 2
    assert "confirm with --yes" in unconfirmed.stderr
    assert len(await dead_ids(redis)) == 2

    purged = await syncd("purge", "--reason", "record has no key", "--yes")
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"deleted 1 dead letter(s) of tenant {TENANT}\n"
    assert await dead_ids(redis) == [buried["event"]]
    assert (await syncd("purge", "--id", buried["record"], "--yes")).returncode == 1
    assert (await syncd("purge", "--all", "--yes")).stdout.startswith("deleted 1 ")
    assert await dead_ids(redis) == []
    # The record purged is not dead-lettered again when its page comes again.
    await publish(redis, [customer(1), customer(666), {"name": "no key"}], "c2")
    assert await dead_ids(redis) == []


async def test_replay_and_purge_say_what_they_did_in_json(
    redis: aioredis.Redis, syncd: Run, buried: dict[str, str]
) -> None:
    replayed = await syncd("replay", "--id", buried["event"], "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {
        "tenant": TENANT,
        "replayed": [
            {
                "id": buried["event"],
                "feed": "crm.customers",
                "key": "666",
                "group": "billing",
                "to": KEYS.replay("crm.customers", "billing"),
            }
        ],
        "gone": [],
    }
    purged = await syncd("purge", "--reason", "record has no key", "--yes", "--json")
    assert purged.returncode == 0, purged.stderr
    assert json.loads(purged.stdout) == {
        "tenant": TENANT,
        "deleted": [buried["record"]],
        "gone": [],
    }
    nothing = await syncd("purge", "--all", "--yes", "--json")
    assert json.loads(nothing.stdout) == {"tenant": TENANT, "deleted": [], "gone": []}


async def test_under_the_readme_acl_user(
    redis: aioredis.Redis, redis_server: RedisServer, tmp_path: Path, buried: dict[str, str]
) -> None:
    await redis.execute_command(*readme_acl_line())
    restricted = aioredis.Redis.from_url(acl_url(redis_server))
    try:
        syncd = Run(write_config(tmp_path / "acl.toml", acl_url(redis_server)))
        assert (await syncd("list")).returncode == 0
        replayed = await syncd("replay", "--id", buried["event"])
        assert replayed.returncode == 0, replayed.stderr
        billing = consumer(restricted, "billing", "c2")
        async with billing:
            (event,) = await billing.read()
            assert await billing.ack(event) == 1
        assert await redis.xlen(KEYS.replay("crm.customers", "billing")) == 0
        purged = await syncd("purge", "--all", "--yes")
        assert purged.returncode == 0, purged.stderr
        assert await dead_ids(redis) == []
    finally:
        await restricted.aclose()
        await redis.execute_command("ACL", "DELUSER", USER)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["replay"], "say which: --id ID ..., --all, or filters"),
        (["purge", "--id", "1-0", "--all"], "--id takes the entries it names"),
        (["replay", "--id", "nope"], "expected an entry id such as 1714564800123-0"),
        (["list", "--since", "yesterday"], "expected a duration such as 2h"),
        (["list", "--feed", "crm.customer"], "unknown feed 'crm.customer'"),
    ],
)
async def test_usage_errors_exit_2(syncd: Run, args: list[str], expected: str) -> None:
    done = await syncd(*args)
    assert done.returncode == 2
    assert expected in done.stderr


def test_an_unknown_tenant_fails(config: Path) -> None:
    cmd = [sys.executable, "-m", "syncd", "dead", "list", "--config", str(config)]
    done = subprocess.run([*cmd, "--tenant", "1"], capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert f"tenant 1 is not in {config}" in done.stderr


async def test_list_filters_and_limit(
    redis: aioredis.Redis, syncd: Run, buried: dict[str, str]
) -> None:
    def ids(done: subprocess.CompletedProcess[str]) -> list[str]:
        return [row["id"] for row in json_lines(done.stdout)]

    assert ids(await syncd("list", "--json", "--group", "billing")) == [buried["event"]]
    assert ids(await syncd("list", "--json", "--reason", "record")) == [buried["record"]]
    assert ids(await syncd("list", "--json", "--since", "1h")) == [
        buried["record"],
        buried["event"],
    ]
    assert ids(await syncd("list", "--json", "--since", "2999-01-01")) == []
    limited = await syncd("list", "--json", "--limit", "1")
    assert ids(limited) == [buried["record"]]
    assert "more match" in limited.stderr
    nothing = await syncd("list", "--group", "nobody")
    assert nothing.stdout == f"no dead letters match (tenant {TENANT})\n"


# -- what an operator sees: no secret, no control character ---------------------------------


async def test_no_secret_and_no_control_character_reaches_the_output(
    redis: aioredis.Redis, syncd: Run
) -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in SECRET)
    hostile = {"name": f"\x1b[2J\u202eevil {APP_KEY}", "note": f"token={SECRET}"}
    await publish(redis, [customer(7, **hostile), {"name": SECRET, "x": escaped}], "c1")
    c = consumer(redis, "billing", claim_idle_ms=50, max_deliveries=1)
    async with c:
        assert len(await c.read()) == 1
        await asyncio.sleep(0.06)
        assert await c.read() == []  # buried
    ids = await dead_ids(redis)
    assert len(ids) == 2
    outputs = [
        await syncd("list"),
        await syncd("list", "--json"),
        *[await syncd("show", entry_id) for entry_id in ids],
        *[await syncd("show", entry_id, "--json") for entry_id in ids],
        await syncd("replay", "--group", "billing"),
    ]
    for done in outputs:
        assert done.returncode == 0, done.stderr
        seen = done.stdout + done.stderr
        for secret in (SECRET, APP_KEY, escaped):
            assert secret not in seen, done.args
        assert "\x1b" not in seen
        assert "\u202e" not in seen
    assert "***" in outputs[0].stdout
    assert "\\u001b[2J\\u202eevil ***" in outputs[2].stdout + outputs[3].stdout


def test_rendering_masks_a_registered_secret_before_cutting() -> None:
    secret = "rs-Qm4vR7tY9w"
    redact.register(("test", "dead-tools"), secret)
    try:
        data = json.dumps({"pad": "x" * 50, "token_like": secret, secret: 1}).encode()
        letter = DeadLetter(
            "1714564800123-0",
            {"feed": b"crm.customers", "reason": b"record has no key (id)", "data": data},
        )
        out = io.StringIO()
        render_table([letter], out)
        render_show(letter, out)
        out.write(json.dumps(as_json(letter, whole=True)))
        # Cut after masking: not even the secret's first characters are left at the cut.
        assert excerpt(json.dumps({"a": secret}).encode(), width=10) == '{"a":"***…'
    finally:
        redact.forget(("test", "dead-tools"))
    assert secret[:6] not in out.getvalue()


# -- pure parts -------------------------------------------------------------------------------

NOW = 1_714_564_800.0  # 2024-05-01T12:00:00Z


@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("2h", 1_714_557_600_000),
        ("90s", 1_714_564_710_000),
        ("1h30m", 1_714_559_400_000),
        ("7d", 1_713_960_000_000),
        ("1w", 1_713_960_000_000),
        ("2024-05-01", 1_714_521_600_000),
        ("2024-05-01T12:00Z", 1_714_564_800_000),
        ("2024-05-01T14:00:00+02:00", 1_714_564_800_000),
        ("2024-05-01 12:00:00.5", 1_714_564_800_500),
    ],
)
def test_since(text: str, ms: int) -> None:
    assert parse_since(text, NOW) == ms


@pytest.mark.parametrize("text", ["", "h", "2x", "yesterday", "2024-13-01", "-2h"])
def test_since_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_since(text, NOW)


EVENT = DeadLetter(
    "1714564800123-0",
    {
        "feed": b"crm.customers",
        "reason": b"max_deliveries",
        "stream": CUSTOMERS.encode(),
        "entry_id": b"1714564000000-0",
        "group": b"billing",
        "op": b"created",
        "key": b"1",
        "data": b"{}",
    },
)
RECORD = DeadLetter(
    "1714564800124-0",
    {"feed": b"crm.customers", "reason": b"record has no key (id)", "data": b"{}"},
)


@pytest.mark.parametrize(
    ("selection", "selected"),
    [
        (Selection(), [EVENT, RECORD]),
        (Selection(feed="crm.customers"), [EVENT, RECORD]),
        (Selection(feed="jpm.jobs"), []),
        (Selection(group="billing"), [EVENT]),
        (Selection(group="audit"), []),
        (Selection(reason="record has no key"), [RECORD]),
        (Selection(reason="record has"), [RECORD]),
        (Selection(reason="record has no"), [RECORD]),
        (Selection(reason="record has no key (id)"), [RECORD]),
        (Selection(reason="max"), []),
        (Selection(since_ms=1714564800124), [RECORD]),
    ],
)
def test_selection(selection: Selection, selected: list[DeadLetter]) -> None:
    assert [x for x in (EVENT, RECORD) if selection.matches(x)] == selected


@pytest.mark.parametrize(
    ("letter", "why"),
    [
        (EVENT, None),
        (RECORD, "is a record the daemon could not turn into an event"),
        (DeadLetter(EVENT.id, {**EVENT.fields, "stream": b"st:{1}:crm.customers"}), "tenant"),
        (DeadLetter(EVENT.id, {**EVENT.fields, "stream": b"st:{5151}:nope"}), "not an event"),
        (DeadLetter(EVENT.id, {**EVENT.fields, "entry_id": b"x"}), "no valid entry id"),
        (DeadLetter(EVENT.id, {k: v for k, v in EVENT.fields.items() if k != "op"}), "lacks op"),
    ],
)
def test_unreplayable(letter: DeadLetter, why: str | None) -> None:
    found = deadstream.unreplayable(letter, "st", TENANT)
    assert found is None if why is None else why in (found or "")


def test_clean_escapes_what_a_terminal_would_obey() -> None:
    assert clean("a\x1b[31mb\rc\u202ed\u200be\x7f\x85 é 😀") == (
        "a\\x1b[31mb\\x0dc\\u202ed\\u200be\\x7f\\x85 é 😀"
    )
    assert clean("a\nb", keep_newlines=True) == "a\nb"
