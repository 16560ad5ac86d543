"""The `harness` command line: a thin dispatcher over `harness/commands/<verb>.py`.

Each command module defines `HELP` (one line), `add_arguments(parser)` and `main(args) -> int`. Command modules
import heavy libraries (torch, pandas, ...) inside `main`, so `harness --help` and `--dry-run` stay fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from harness import __version__
from harness.errors import HarnessError

# verb -> module under harness.commands; the order is the order of `harness --help`.
COMMANDS = {
    "run": "run",
    "sweep": "sweep",
    "status": "status",
    "report": "report",
    "bench": "bench",
    "fid": "fid",
    "fid-stats": "fid_stats",
    "prepare": "prepare",
    "convert": "convert",
}


def _available_commands() -> dict[str, object]:
    """Import the command modules that exist (a verb whose module is missing is simply not offered)."""
    found = {}
    for verb, module in COMMANDS.items():
        try:
            found[verb] = importlib.import_module(f"harness.commands.{module}")
        except ModuleNotFoundError as err:
            if err.name != f"harness.commands.{module}":
                raise
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="harness",
        description="Train, evaluate and compare masked-diffusion (MaskDM) recipes written in gin.",
    )
    parser.add_argument("--version", action="version", version=f"maskdm-harness {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for harness errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb, module in _available_commands().items():
        p = sub.add_parser(verb, help=module.HELP, description=module.HELP)
        # default=SUPPRESS: a subcommand's absent --debug must not overwrite `harness --debug COMMAND`
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args._main(args) or 0)
    except HarnessError as err:
        if args.debug:
            raise
        # One line: gin appends "In call to configurable ..." context lines to exceptions raised inside
        # configurables (--debug shows them); the rest of a multi-line message is joined.
        lines = [line.strip() for line in str(err).splitlines()
                 if line.strip() and not line.strip().startswith("In call to configurable")]
        message = " ".join(lines) or type(err).__name__
        print(f"harness {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"harness {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
