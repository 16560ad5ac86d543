"""`harness report RESULTS_DIR`: tables and plots comparing the arms of an experiment at matched budgets."""
from __future__ import annotations

import argparse

HELP = "compare the arms of an experiment (or of every experiment in a sweep folder) at equal training cost"

_BUDGETS = ("steps", "images", "flops", "hours")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="results/<experiment>, or a folder of experiments (a sweep) to report each and pool seeds")
    parser.add_argument("--budget", action="append", choices=_BUDGETS, default=None,
                        help="budget to match arms at (repeatable; default: all of steps, images, flops, hours)")
    parser.add_argument("--metric", default="fid",
                        help="metric to compare (default fid; others as in records.csv: kid, precision, recall)")
    parser.add_argument("--quiet", action="store_true", help="write the files without printing the tables")


def main(args: argparse.Namespace) -> int:
    from rich.console import Console

    from harness.report import write_report

    console = Console()
    for path in write_report(args.results_dir, metric=args.metric, budgets=args.budget, console=console,
                             show=not args.quiet):
        console.print(f"wrote {path} (and report.md, records.csv, figures/ beside it)", highlight=False, soft_wrap=True)
    return 0
