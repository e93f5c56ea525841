"""`syncd simulate`: run the ServiceTitan Export API simulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from syncd.simulator.app import start_server
from syncd.simulator.options import DEFAULT_APP_KEY, SimOptions
from syncd.simulator.quirks import Quirks, parse_assignments
from syncd.simulator.state import SimState


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        message = f"expected comma-separated integers, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one tenant id")
    return values


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the simulator's flags to `parser`."""
    d = SimOptions()
    add = parser.add_argument
    add("--host", default=d.host, help="interface to listen on (default %(default)s)")
    add("--port", type=int, default=d.port, help="port; 0 picks a free one (default %(default)s)")
    add("--tenants", type=_int_list, default=d.tenants, help="tenant ids, e.g. 1001,1002")
    add("--records", type=int, default=d.records, help="records per feed per tenant")
    add("--page-size", type=int, default=d.page_size, help="records per export page")
    add("--seed", type=int, default=d.seed, help="seed of all generated data and faults")
    add("--rate-limit", type=float, default=d.rate_limit, help="requests/s per app and tenant")
    add("--token-ttl", type=float, default=d.token_ttl, help="access token lifetime, seconds")
    add("--app-key", default=DEFAULT_APP_KEY, help="the accepted ST-App-Key")
    add(
        "--recent-delay",
        type=float,
        default=d.recent_delay,
        help="seconds a change stays invisible without includeRecentChanges",
    )
    add(
        "--overlap",
        type=int,
        default=None,
        help="records of the previous page repeated with includeRecentChanges "
        "(default min(page_size // 10, 50), at least 1)",
    )
    add("--mutation-rate", type=float, default=0.0, help="random changes/s per tenant")
    add("--feeds", type=_name_list, default=None, help="serve only these feeds (a,b,...)")
    add("--fault-5xx", type=_probability, default=0.0, help="share of requests answered 5xx")
    add("--fault-latency", type=float, default=0.0, help="added latency, ms (with jitter)")
    add("--fault-truncate", type=_probability, default=0.0, help="share of truncated bodies")
    add("--fault-invalid-json", type=_probability, default=0.0, help="share of invalid JSON")
    add("--fault-drop", type=_probability, default=0.0, help="share of dropped connections")
    add("--fault-token", type=_probability, default=0.0, help="share of token endpoint 5xx")
    add("--token-throttle", type=int, default=d.token_throttle, help="grants/client/minute")
    add("--cache-mb", type=int, default=d.cache_mb, help="memory budget for rendered pages")
    add(
        "--record-cache-mb", type=int, default=d.record_cache_mb,
        help="memory budget for rendered records, which pages rendered again reuse",
    )  # fmt: skip
    add("--prerender", action="store_true", help="render every first-pass page at startup")
    add("--log-requests", action="store_true", help="log every request to stderr")
    _add_quirk_arguments(parser)


# Flags of the quirks (for every tenant): (field, flag, metavar or choices, help).
_QUIRK_FLAGS: tuple[tuple[str, str, str | tuple[str, ...], str], ...] = (
    ("stale_repeats", "--stale-repeats", "P", "share of a repeated tail sent in older versions"),
    ("duplicate_keys", "--duplicate-keys", "P", "share of changed records sent twice in a page"),
    ("out_of_order", "--out-of-order", "P", "share of pages with their records shuffled"),
    (
        "shared_timestamps",
        "--shared-timestamps",
        "P",
        "share of a change batch's records stamped like the one before",
    ),
    ("required_nulls", "--required-nulls", "P", "share of records with required fields null"),
    ("enum_integers", "--enum-integers", "P", "share of records with string enums as integers"),
    (
        "numeric_modified_on",
        "--numeric-modified-on",
        "P",
        "share of records with modifiedOn as Unix milliseconds",
    ),
    (
        "naive_timestamps",
        "--naive-timestamps",
        "P",
        "share of records with date-times without a zone",
    ),
    ("keyless", "--keyless", "P", "share of created records without a usable key"),
    ("deletions", "--deletions", "P", "share of --mutation-rate changes that delete a record"),
    ("no_progress", "--no-progress", "P", "share of pages with hasMore, no data, no way on"),
    (
        "no_progress_cursor",
        "--no-progress-cursor",
        ("same", "missing", "null", "empty", "alternate"),
        "continueFrom of no-progress pages (default same)",
    ),
    ("hang", "--hang", "P", "share of export requests never answered"),
    ("hang_token", "--hang-token", "P", "share of token requests never answered"),
    (
        "rate_limit_body",
        "--rate-limit-body",
        ("problem", "apim", "apim-retry-after", "text", "html"),
        "429 style: ProblemDetails+Retry-After, API Management's body, text/plain or an HTML "
        "page (default problem)",
    ),
    (
        "error_body",
        "--error-body",
        ("problem", "text", "html"),
        "body of injected 5xx: ProblemDetails, text/plain or a gateway's HTML (default problem)",
    ),
    (
        "echo_credential",
        "--echo-credential",
        ("none", "token", "app_key", "other_token", "other_secret"),
        "a credential written into every export page, \\u-escaped (default none)",
    ),
    (
        "echo_in",
        "--echo-in",
        ("record", "key", "timestamp", "cursor"),
        "where --echo-credential goes: the first record's own field, key or timestamp, or "
        "continueFrom (default record)",
    ),
)


def _add_quirk_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "quirks", "what the real API does; for every tenant unless --tenant-quirks says otherwise"
    )
    group.add_argument(
        "--no-repeat-tail",
        dest="repeat_tail",
        action="store_false",
        default=None,
        help="with includeRecentChanges, do not repeat the previous page's tail",
    )
    group.add_argument(
        "--gzip",
        action="store_true",
        default=None,
        help="gzip export responses for clients that accept it",
    )
    group.add_argument(
        "--echo-plain",
        dest="echo_escaped",
        action="store_false",
        default=None,
        help="write --echo-credential as it is, not \\u-escaped",
    )
    group.add_argument(
        "--date-offset",
        type=float,
        default=None,
        metavar="SECONDS",
        help="add SECONDS to the Date header of export answers (an API clock that is off)",
    )
    for field, flag, kind, text in _QUIRK_FLAGS:
        if isinstance(kind, tuple):
            group.add_argument(flag, dest=field, choices=kind, default=None, help=text)
        else:
            group.add_argument(flag, dest=field, type=_probability, metavar=kind, help=text)
    group.add_argument(
        "--tenant-quirks",
        action="append",
        default=[],
        metavar="T:NAME=VALUE,...",
        help="quirks of tenant T on top of the flags above, e.g. 1002:hang=1,no_progress=0.5 "
        "(repeatable)",
    )


def quirks_from_args(args: argparse.Namespace) -> tuple[Quirks, tuple[tuple[int, Quirks], ...]]:
    """The quirks for every tenant and the per-tenant ones; ValueError naming a bad flag."""
    fields: tuple[str, ...] = ("repeat_tail", "gzip", "date_offset", "echo_escaped")
    fields += tuple(field for field, *_ in _QUIRK_FLAGS)
    given = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    quirks = Quirks().apply(given)
    per_tenant: dict[int, Quirks] = {}
    for spec in args.tenant_quirks:
        where = f"--tenant-quirks {spec!r}"
        tenant_text, sep, assignments = spec.partition(":")
        if not sep or not tenant_text.strip().isdigit():
            raise ValueError(f"{where}: expected TENANT:NAME=VALUE[,NAME=VALUE...]")
        tenant = int(tenant_text)
        changes = parse_assignments(assignments, where)
        try:
            per_tenant[tenant] = per_tenant.get(tenant, quirks).apply(changes)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return quirks, tuple(per_tenant.items())


def options_from_args(args: argparse.Namespace) -> SimOptions:
    """The SimOptions the parsed flags describe; ValueError for bad quirk flags."""
    quirks, tenant_quirks = quirks_from_args(args)
    return SimOptions(
        host=args.host,
        port=args.port,
        tenants=tuple(args.tenants),
        records=args.records,
        page_size=args.page_size,
        seed=args.seed,
        rate_limit=args.rate_limit,
        token_ttl=args.token_ttl,
        app_key=args.app_key,
        recent_delay=args.recent_delay,
        overlap=args.overlap,
        mutation_rate=args.mutation_rate,
        feeds=tuple(args.feeds) if args.feeds is not None else None,
        fault_5xx=args.fault_5xx,
        fault_latency=args.fault_latency,
        fault_truncate=args.fault_truncate,
        fault_invalid_json=args.fault_invalid_json,
        fault_drop=args.fault_drop,
        fault_token=args.fault_token,
        token_throttle=args.token_throttle,
        log_requests=args.log_requests,
        prerender=args.prerender,
        cache_mb=args.cache_mb,
        record_cache_mb=args.record_cache_mb,
        quirks=quirks,
        tenant_quirks=tenant_quirks,
    )


async def serve(options: SimOptions) -> None:
    """Run the simulator until SIGINT or SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    server = await start_server(SimState(options))
    print(f"simulator listening on {server.url}", flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()


def run(args: argparse.Namespace) -> int:
    """Entry point of `syncd simulate`; the process exit status."""
    try:
        options = options_from_args(args).validate()
    except ValueError as exc:
        print(f"syncd simulate: {exc}", file=sys.stderr)
        return 2
    if options.log_requests:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        asyncio.run(serve(options))
    except ValueError as exc:
        print(f"syncd simulate: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f"{options.host}:{options.port}"
        print(f"syncd simulate: cannot listen on {where}: {exc}", file=sys.stderr)
        return 1
    return 0
