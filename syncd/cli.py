"""Command line: `syncd run|check-config|simulate|demo|...`."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="syncd", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from syncd.simulator import cli as sim_cli

    sim = sub.add_parser("simulate", help="run the ServiceTitan simulator")
    sim_cli.add_arguments(sim)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "simulate":
        from syncd.simulator import cli as sim_cli

        return sim_cli.run(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
