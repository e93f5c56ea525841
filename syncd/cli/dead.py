"""`syncd dead`: a tenant's dead letters for an operator to act on. `list` says what was
dead-lettered and why, `show` prints one entry whole, `replay` hands events back to the group
that failed them (once, and to that group only: `syncd.consumer.replay`), `purge` deletes
entries.

What is printed is built in `syncd.cli.dead_output`: redacted, control characters escaped.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
import time
from typing import Any, TextIO

from redis.exceptions import RedisError

from syncd import catalogue, log, redact
from syncd.cli.dead_output import as_json, json_line, render_show, render_table, shown
from syncd.config import ConfigError, Settings, load_settings
from syncd.consumer import deadstream
from syncd.consumer.deadstream import DeadLetter, Selection
from syncd.consumer.events import text as _text
from syncd.consumer.replay import ENTRY_ID, MOVE_LUA
from syncd.keys import Keys
from syncd.lines import clean
from syncd.redis.conn import RedisClient, connect

# What `list` shows when not told.
LIST_LIMIT = 100

_DURATION = re.compile(r"(?:\s*[0-9]+(?:\.[0-9]+)?\s*[smhdw])+\s*")
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*([smhdw])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


_REPLAY = (
    "Hand events a consumer group gave up on back to that group, and to it alone: each goes "
    "from the dead stream to the group's replay stream of its feed "
    "(<prefix>:{<tenant>}:replay:<feed>:<group>) in one script, so that a replay repeated or "
    "racing another hands each back once. The group's consumers (syncd.consumer 0.3.0 or "
    "later) read that stream beside the feed's and get the event as it was: its own stream, "
    "entry id and version. Records the daemon dead-lettered are not events: naming or "
    "selecting one refuses the whole replay (exit 2)."
)
_PURGE = (
    "Delete dead letters: asks first, unless --yes (needed where there is no terminal to ask "
    "on). A record purged is not dead-lettered again while ServiceTitan sends it unchanged."
)


class Failed(Exception):
    """The action could not be done: an unknown tenant, an id the dead stream does not hold
    (exit code 1)."""


class Refused(Exception):
    """Not done, and asking again will not help: a usage error, or a dead letter that cannot
    be replayed (exit code 2)."""


def parse_since(text: str, now: float) -> int:
    """`--since`: a duration back from `now` (`90s`, `15m`, `2h`, `1h30m`, `7d`, `1w`) or an
    ISO 8601 date or time (`2024-05-01`, `2024-05-01T12:00`, with `Z` or an offset; none is
    UTC), as ms since the epoch."""
    if _DURATION.fullmatch(text):
        seconds = sum(float(n) * _UNIT_S[u] for n, u in _DURATION_PART.findall(text))
        return int((now - seconds) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(
            f"expected a duration such as 2h, 30m or 7d, or an ISO time such as "
            f"2024-05-01T12:00Z, not {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


# -- arguments ------------------------------------------------------------------------------


def _entry_id(text: str) -> str:
    if not ENTRY_ID.fullmatch(text):
        raise argparse.ArgumentTypeError(
            f"expected an entry id such as 1714564800123-0, not {text!r}"
        )
    return text


def _since(text: str) -> int:
    try:
        return parse_since(text, time.time())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return int(text)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`syncd dead` and its four actions, on the command line's subparsers."""
    dead = sub.add_parser(
        "dead",
        help="a tenant's dead letters: list, show, replay (events back to their group), purge",
        description="A tenant's dead letters: records the daemon could not turn into events, "
        "and events a consumer group gave up on. Exit 0 when done, 1 when it failed (an "
        "unknown tenant, an id the dead stream does not hold, Redis), 2 for a usage error or "
        "a dead letter that cannot be replayed.",
    )
    actions = dead.add_subparsers(dest="dead_command", required=True, metavar="ACTION")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--config", "-c", required=True, help="configuration file (TOML)")
        parser.add_argument("--tenant", type=int, required=True)

    def filters(parser: argparse.ArgumentParser, limit: int | None) -> None:
        parser.add_argument("--feed", help="dead letters of this feed")
        parser.add_argument("--group", help="events this consumer group gave up on")
        parser.add_argument("--reason", help="this reason, or its first words")
        parser.add_argument(
            "--since", type=_since, metavar="WHEN", help="dead-lettered since: 2h, 30m, 7d, "
            "or an ISO time (2024-05-01T12:00Z; UTC when it names no zone)"
        )  # fmt: skip
        parser.add_argument(
            "--limit", type=_count, default=limit, metavar="N",
            help=f"at most N, the oldest first (default: {limit or 'all'})",
        )  # fmt: skip

    ls = actions.add_parser("list", help="what was dead-lettered and why, the oldest first")
    common(ls)
    filters(ls, LIST_LIMIT)
    ls.add_argument("--json", action="store_true", help="one JSON object per line")

    show = actions.add_parser("show", help="one dead letter whole")
    common(show)
    show.add_argument("id", type=_entry_id, metavar="ID")
    show.add_argument("--json", action="store_true", help="JSON (the record as a JSON value)")

    for name, text, description in (
        ("replay", "hand events back to the consumer group that failed them, once", _REPLAY),
        ("purge", "delete dead letters", _PURGE),
    ):
        action = actions.add_parser(name, help=text, description=description)
        common(action)
        action.add_argument(
            "--id", dest="ids", type=_entry_id, nargs="+", action="extend", metavar="ID",
            help="these dead letters",
        )  # fmt: skip
        action.add_argument("--all", action="store_true", help="every dead letter of the tenant")
        filters(action, None)
        if name == "purge":
            action.add_argument("--yes", action="store_true", help="do not ask")
        action.add_argument("--json", action="store_true", help="what was done as one JSON object")


def _selection(args: argparse.Namespace) -> Selection:
    return Selection(feed=args.feed, group=args.group, reason=args.reason, since_ms=args.since)


def _check_choice(args: argparse.Namespace) -> None:
    """A replay or purge takes the entries --id names, or those --all or filters select:
    one of them, not a mix."""
    filtered = _selection(args) != Selection() or args.limit is not None
    if args.ids and (filtered or args.all):
        raise Refused("--id takes the entries it names: give it without --all and filters")
    if not args.ids and not filtered and not args.all:
        raise Refused("say which: --id ID ..., --all, or filters (--feed, --group, ...)")


# -- the commands -----------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Run `syncd dead ACTION`; returns the exit code."""
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    log.configure("warning", "console" if sys.stderr.isatty() else "json")
    try:
        return asyncio.run(run(settings, args, sys.stdout, sys.stderr))
    except Refused as exc:
        return _fail(str(exc), 2)
    except Failed as exc:
        return _fail(str(exc), 1)
    except RedisError as exc:
        return _fail(f"Redis: {type(exc).__name__}: {exc}", 1)


def _fail(message: str, code: int) -> int:
    print(f"syncd: {clean(redact.redact(message), keep_newlines=True)}", file=sys.stderr)
    return code


async def run(settings: Settings, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    """One action on the tenant's dead stream (see `main`)."""
    if args.tenant not in {t.id for t in settings.tenants}:
        known = ", ".join(str(t.id) for t in settings.tenants)
        raise Failed(f"tenant {args.tenant} is not in {settings.config.path} (configured: {known})")
    if getattr(args, "feed", None) is not None and args.feed not in catalogue.feeds():
        raise Refused(f"--feed: unknown feed {args.feed!r} (`syncd feeds` lists them)")
    if args.dead_command in ("replay", "purge"):
        _check_choice(args)
    prefix = settings.config.redis.key_prefix
    dead = Keys(prefix, args.tenant).dead
    sentinel_password = settings.sentinel_password
    r = connect(settings.config.redis, sentinel_password.reveal() if sentinel_password else None)
    try:
        if args.dead_command == "list":
            return await _list(r, dead, args, out, err)
        if args.dead_command == "show":
            return await _show(r, dead, args, out)
        letters = await _chosen(r, dead, args)
        if args.dead_command == "replay":
            return await _replay(r, dead, prefix, args, letters, out)
        return await _purge(r, dead, args, letters, out)
    finally:
        await r.aclose()


async def _list(
    r: RedisClient, dead: str, args: argparse.Namespace, out: TextIO, err: TextIO
) -> int:
    letters = [
        letter async for letter in deadstream.read(r, dead, _selection(args), args.limit + 1)
    ]
    more = len(letters) > args.limit
    letters = letters[: args.limit]
    if args.json:
        for letter in letters:
            out.write(json_line(as_json(letter)) + "\n")
    elif letters:
        render_table(letters, out)
    else:
        filtered = _selection(args) != Selection()
        out.write(f"no dead letters{' match' if filtered else ''} (tenant {args.tenant})\n")
    if more:
        err.write(
            f"syncd: the first {args.limit} shown, more match: raise --limit, or narrow with "
            "--since, --feed, --group or --reason\n"
        )
    return 0


async def _show(r: RedisClient, dead: str, args: argparse.Namespace, out: TextIO) -> int:
    found = await deadstream.read_ids(r, dead, [args.id])
    if args.id not in found:
        raise Failed(f"{args.id} is not in the dead stream of tenant {args.tenant}")
    letter = found[args.id]
    if args.json:
        out.write(json_line(as_json(letter, whole=True), indent=2) + "\n")
    else:
        render_show(letter, out)
    return 0


async def _chosen(r: RedisClient, dead: str, args: argparse.Namespace) -> list[DeadLetter]:
    """The entries a replay or purge acts on: those named (each must be there), or those
    the filters select."""
    if not args.ids:
        selection = Selection() if args.all else _selection(args)
        return [letter async for letter in deadstream.read(r, dead, selection, args.limit)]
    found = await deadstream.read_ids(r, dead, args.ids)
    missing = [entry_id for entry_id in dict.fromkeys(args.ids) if entry_id not in found]
    if missing:
        raise Failed(
            f"not in the dead stream of tenant {args.tenant} (replayed or purged already?): "
            f"{', '.join(missing)}; nothing was done"
        )
    return list(found.values())


async def _replay(
    r: RedisClient,
    dead: str,
    prefix: str,
    args: argparse.Namespace,
    letters: list[DeadLetter],
    out: TextIO,
) -> int:
    tenant = args.tenant
    refused = [
        why for letter in letters if (why := deadstream.unreplayable(letter, prefix, tenant))
    ]
    if refused:
        shown_here = "\n  ".join(refused[:10])
        more = f"\n  ... and {len(refused) - 10} more" if len(refused) > 10 else ""
        raise Refused(
            f"cannot replay {len(refused)} of the {len(letters)} dead letter(s); nothing was "
            f"replayed:\n  {shown_here}{more}"
        )
    script = r.register_script(MOVE_LUA)
    moved: dict[tuple[str, str], int] = {}  # (replay stream, group) -> events moved there
    gone: list[str] = []
    done: list[dict[str, Any]] = []
    for letter in letters:
        if await deadstream.hand_back(script, dead, letter, prefix) == 1:
            where = (deadstream.replay_stream(letter, prefix), letter.group or "")
            moved[where] = moved.get(where, 0) + 1
            row = as_json(letter)
            done.append({k: row[k] for k in ("id", "feed", "key", "group")} | {"to": where[0]})
            if args.json:
                continue
            out.write(
                f"replayed {letter.id} ({shown(letter.feed)} key "
                f"{shown(letter.get('key') or '')}) to group {shown(letter.group or '')}\n"
            )
        else:
            gone.append(letter.id)
    if args.json:
        out.write(json_line({"tenant": tenant, "replayed": done, "gone": gone}) + "\n")
        return 0
    for (stream, group), count in moved.items():
        waiting = await _group_reads(r, stream, group)
        note = "" if waiting else (
            "; no consumer of the group has read it yet: they wait there for one "
            "(syncd.consumer 0.3.0 or later reads it)"
        )  # fmt: skip
        out.write(f"{count} event(s) now in {shown(stream)}{note}\n")
    if gone:
        out.write(f"{len(gone)} left the dead stream meanwhile: {', '.join(gone)}\n")
    if not letters:
        out.write("no dead letters match: nothing replayed\n")
    return 0


async def _group_reads(r: RedisClient, stream: str, group: str) -> bool:
    """Whether `group` reads replay stream `stream` already (a consumer created it there)."""
    try:
        groups = await r.xinfo_groups(stream)
    except RedisError:
        return False
    return any(_text(g.get("name", b"")) == group for g in groups)


async def _purge(
    r: RedisClient, dead: str, args: argparse.Namespace, letters: list[DeadLetter], out: TextIO
) -> int:
    if not letters:
        if args.json:
            out.write(json_line({"tenant": args.tenant, "deleted": [], "gone": []}) + "\n")
        else:
            out.write("no dead letters match: nothing deleted\n")
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise Refused(
                f"would delete {len(letters)} dead letter(s) of tenant {args.tenant}: "
                "confirm with --yes (standard input is not a terminal to ask on)"
            )
        question = f"delete {len(letters)} dead letter(s) of tenant {args.tenant}? [y/N] "
        sys.stderr.write(question)  # not on standard output, which --json keeps JSON
        sys.stderr.flush()
        answer = await asyncio.to_thread(sys.stdin.readline)
        if answer.strip().lower() not in ("y", "yes"):
            if args.json:
                out.write(json_line({"tenant": args.tenant, "deleted": [], "gone": []}) + "\n")
            else:
                out.write("nothing deleted\n")
            return 0
    ids = [letter.id for letter in letters]
    if args.json:  # each id on its own, to say which were there
        deleted_ids = await deadstream.delete_each(r, dead, ids)
        held = set(deleted_ids)
        gone_ids = [i for i in dict.fromkeys(ids) if i not in held]
        out.write(
            json_line({"tenant": args.tenant, "deleted": deleted_ids, "gone": gone_ids}) + "\n"
        )
        return 0
    deleted = await deadstream.delete(r, dead, ids)
    gone = len(letters) - deleted
    out.write(
        f"deleted {deleted} dead letter(s) of tenant {args.tenant}"
        + (f" ({gone} had left the dead stream meanwhile)" if gone else "")
        + "\n"
    )
    return 0
