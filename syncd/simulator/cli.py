"""`syncd simulate`: run the ServiceTitan Export API simulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from syncd.simulator.app import start_server
from syncd.simulator.options import DEFAULT_APP_KEY, SimOptions
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
    add("--prerender", action="store_true", help="render every first-pass page at startup")
    add("--log-requests", action="store_true", help="log every request to stderr")


def options_from_args(args: argparse.Namespace) -> SimOptions:
    """The SimOptions the parsed flags describe."""
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
