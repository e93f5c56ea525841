"""syncd: keeps downstream systems in sync with ServiceTitan through Redis streams.

exit codes:
  0  success (run: stopped by a signal; --once: every feed drained)
  1  --once: at least one feed could not be synced; doctor: a check failed; other command
     failures
  2  invalid configuration or usage; run: Redis settings that break the promises
     (maxmemory-policy allkeys-*, see [redis] allow_eviction) or a Redis user missing a
     permission syncd needs (NOPERM); dead replay: a dead letter that is not an event;
     mirror: no [mirror] section, the postgres extra not installed, or tables a newer syncd
     migrated

A reader of the output that goes away (`syncd feeds | head`) ends the command quietly, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import select
import stat
import sys

from syncd import catalogue
from syncd.config import ConfigError, load, load_settings


def build_parser() -> argparse.ArgumentParser:
    import syncd.simulator.cli as sim_cli

    parser = argparse.ArgumentParser(
        prog="syncd",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the sync daemon")
    run.add_argument("--config", "-c", required=True, help="configuration file (TOML)")
    run.add_argument(
        "--once", action="store_true", help="drain every feed once, then exit (1 if any failed)"
    )
    run.add_argument(
        "--instance",
        help="this instance's name in a fleet ([fleet] enabled), unique among them"
        " (default: the host name plus the pid)",
    )

    mirror = sub.add_parser(
        "mirror",
        help="keep the events as tables in PostgreSQL ([mirror] section), until SIGTERM",
        description="Read the configured streams as a member of [mirror] group and keep one "
        "table per feed in PostgreSQL, each batch in one transaction, acknowledged after COMMIT.",
    )
    mirror.add_argument("--config", "-c", required=True, help="configuration file (TOML)")
    mirror.add_argument(
        "--name",
        help="this mirror's consumer name in the group, unique among them (default: the host name)",
    )

    check = sub.add_parser("check-config", help="validate a configuration file and exit")
    check.add_argument("config", help="configuration file (TOML)")

    doc = sub.add_parser(
        "doctor",
        help="check an installation: configuration, secret files, Redis, credentials, API, clock",
        description="Check an installation before trusting it; each line ok, warn or fail with "
        "what to do. Spends one token grant and one small export request per tenant; writes "
        "nothing. Exit 0 when nothing fails (warnings allowed), 1 when a check fails, 2 when the "
        "configuration cannot be read or is invalid.",
    )
    doc.add_argument("--config", "-c", required=True, help="configuration file (TOML)")
    doc.add_argument("--json", action="store_true", help="JSON instead of a table")

    sub.add_parser("feeds", help="list the export feeds syncd knows")

    st = sub.add_parser("status", help="per tenant and feed: cursor, last poll, events, errors")
    st.add_argument("--config", "-c", required=True)
    st.add_argument("--json", action="store_true", help="JSON instead of a table")
    st.add_argument(
        "--fleet", action="store_true", help="only the fleet: instances, tenants each, renewals"
    )

    bf = sub.add_parser(
        "backfill", help="re-export a tenant's feeds from the beginning or a date, then exit"
    )
    bf.add_argument("--config", "-c", required=True)
    bf.add_argument("--tenant", type=int, required=True)
    bf.add_argument("--feed", help="one feed (default: every feed of the tenant)")
    bf.add_argument("--from", dest="start", help="start date, e.g. 2024-01-01")

    rp = sub.add_parser(
        "reconcile",
        help="re-export a tenant's feeds beside their cursors, publish drift and deletes, exit",
    )
    rp.add_argument("--config", "-c", required=True)
    rp.add_argument("--tenant", type=int, required=True)
    rp.add_argument("--feed", help="one feed (default: every feed of the tenant)")
    rp.add_argument(
        "--share",
        type=float,
        default=0.25,
        help="share of the tenant's requests_per_second the pass may spend (default 0.25)",
    )
    rp.add_argument("--json", action="store_true", help="each feed's figures as a JSON line")

    rc = sub.add_parser("reset-cursor", help="forget a feed's cursor (next poll starts over)")
    rc.add_argument("--config", "-c", required=True)
    rc.add_argument("--tenant", type=int, required=True)
    rc.add_argument("--feed", required=True)

    tl = sub.add_parser("tail", help="print a tenant's events as they arrive")
    tl.add_argument("--config", "-c", required=True)
    tl.add_argument("--tenant", type=int, required=True)
    tl.add_argument("--feed", help="one feed (default: every feed of the tenant)")
    tl.add_argument("--group", help="read as this consumer group and acknowledge what is printed")
    tl.add_argument("--from-start", action="store_true", help="from the streams' beginning")
    tl.add_argument(
        "--format",
        choices=("text", "json"),
        help="text: readable lines cut to the terminal's width; json: one JSON object per "
        "line (default: text on a terminal, else json)",
    )
    tl.add_argument(
        "--count",
        type=_positive,
        metavar="N",
        help="take N events, print them and exit. With --group, an event is acknowledged once "
        "its line was written and flushed; lines a pipe's buffer held but its reader never read "
        "(e.g. `| head -n 3`) cannot be known, so to acknowledge exactly N use --count N",
    )

    from syncd.cli import dead

    dead.add_parser(sub)

    sim = sub.add_parser("simulate", help="run the ServiceTitan simulator")
    sim_cli.add_arguments(sim)

    demo = sub.add_parser(
        "demo", help="syncd on the built-in simulator and a local Redis, showing the events"
    )
    demo.add_argument("--redis-url", default=None, help="Redis to use (default: local or own)")
    demo.add_argument(
        "--private-redis",
        action="store_true",
        help="start a private Redis even when one answers on 127.0.0.1:6379",
    )
    demo.add_argument(
        "--postgres-url",
        default=None,
        help="PostgreSQL database the demo's mirror fills (default: syncdemo on 127.0.0.1:5432"
        " when one answers)",
    )
    demo.add_argument(
        "--no-postgres", action="store_true", help="no tables, even when PostgreSQL answers"
    )
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {text!r}")
    return value


def _fail(message: str, code: int) -> int:
    print(f"syncd: {message}", file=sys.stderr)
    return code


def cmd_run(args: argparse.Namespace) -> int:
    from syncd import log
    from syncd.daemon import Daemon

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    log.configure(settings.config.log.level, settings.config.log.format)
    if args.instance is not None and not args.instance.strip():
        return _fail("--instance: empty name", 2)
    daemon = Daemon(settings, once=args.once, config_path=args.config, instance=args.instance)
    return asyncio.run(daemon.run())


def cmd_mirror(args: argparse.Namespace) -> int:
    from syncd import log

    try:
        # The mirror never calls ServiceTitan: its credentials are not read (nor needed).
        settings = load_settings(args.config, api_secrets=False)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    if settings.config.mirror is None:
        return _fail(f"{args.config}: mirror: missing: add a [mirror] section with its url", 2)
    if args.name is not None and not args.name.strip():
        return _fail("--name: empty name", 2)
    if args.name is not None and re.fullmatch(r".*\.[0-9]+", args.name):
        return _fail(f"--name {args.name}: ends in .<number>, as the mirror's workers are named", 2)
    try:
        from syncd.mirror import Mirror
    except ImportError as exc:
        return _fail(f"mirror: needs the postgres extra (pip install 'syncd[postgres]'): {exc}", 2)
    log.configure(settings.config.log.level, settings.config.log.format)
    return asyncio.run(Mirror(settings, name=args.name).run())


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    feeds = sum(len(t.feeds) for t in settings.tenants)
    print(f"{args.config}: ok ({len(settings.tenants)} tenants, {feeds} feeds)")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from syncd import log
    from syncd.cli import doctor

    # The checks' own lines say what went wrong; library logs would only repeat it.
    log.configure("error", "console" if sys.stderr.isatty() else "json")
    return doctor.run(args.config, as_json=args.json, out=sys.stdout)


def cmd_feeds(_: argparse.Namespace) -> int:
    for f in catalogue.feeds().values():
        line = f"{f.name:45} key={'+'.join(f.key_fields):22} {f.path}"
        if f.name in catalogue.LEGACY:
            line += f"  (legacy path of {catalogue.LEGACY[f.name]}: synced only when named)"
        print(line)
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    from syncd import log
    from syncd.cli import commands

    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    log.configure("warning", "console" if sys.stderr.isatty() else "json")
    if args.command == "status":
        return commands.run(
            commands.status(settings, as_json=args.json, out=sys.stdout, fleet_only=args.fleet)
        )
    if args.command == "reset-cursor":
        return commands.run(commands.reset_cursor(settings, args.tenant, args.feed, sys.stdout))
    if args.command == "reconcile":
        from syncd.cli.reconcile import reconcile

        return commands.run(
            reconcile(
                settings,
                args.tenant,
                args.feed,
                share=args.share,
                out=sys.stdout,
                progress=sys.stdout.isatty() and not args.json,
                as_json=args.json,
            )
        )
    if args.command == "backfill":
        return commands.run(
            commands.backfill(
                settings,
                args.tenant,
                args.feed,
                args.start,
                out=sys.stdout,
                progress=sys.stdout.isatty(),
            )
        )
    return commands.run(
        commands.tail_command(
            settings,
            args.tenant,
            args.feed,
            args.group,
            args.from_start,
            sys.stdout,
            args.count,
            args.format,
        )
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = _dispatch(args)
        if sys.stdout is not None:  # None: started without one (`>&-`)
            sys.stdout.flush()  # here, not at exit: a reader gone by now is handled below
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        # What was not written has no reader; send what is left in the buffers nowhere.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0
    return code


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader closed it (`| head`), rather than a
    broken pipe elsewhere (a connection), which stays an error."""
    if sys.stdout is None:
        return False
    try:
        fd = sys.stdout.fileno()
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("status", "reset-cursor", "backfill", "reconcile", "tail"):
        return cmd_operator(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "mirror":
        return cmd_mirror(args)
    if args.command == "check-config":
        return cmd_check_config(args)
    if args.command == "doctor":
        return cmd_doctor(args)
    if args.command == "feeds":
        return cmd_feeds(args)
    if args.command == "dead":
        from syncd.cli import dead

        return dead.main(args)
    if args.command == "simulate":
        import syncd.simulator.cli as sim_cli

        return sim_cli.run(args)
    if args.command == "demo":
        from syncd.cli.demo import main as demo_main

        return demo_main(args)
    return 2


__all__ = ["load", "main"]

if __name__ == "__main__":
    sys.exit(main())
