"""`harness sweep RECIPE --grid 'KEY=[...]' ...`: one experiment per grid point, shared stages run once.

The points go to `<results-dir>/<name>-sweep-<hash>/` with the sweep record (sweep.json): that folder is what
`harness report` and `harness status` take to see this sweep alone. Finished stages anywhere under
`--results-dir` (another sweep, a plain run) are linked, not trained again.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "sweep a recipe over a grid of gin bindings (cartesian product); on SLURM each level is one job array"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a gin recipe file, or the name of one under recipes/")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=[V1,V2,...]", required=True,
                        help="a gin macro or binding and its values, repeatable (the sweep is the product), "
                             "e.g. --grid 'MASK_RATIO=[0.1,0.5,0.9]' "
                             "--grid \"MASK=['@PatchMask()','@BlockMask()']\"")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding applied to every point, repeatable")
    parser.add_argument("--results-dir", default="results",
                        help="the results root; the sweep gets its own folder in it, <name>-sweep-<hash>/ "
                             "(default: results/)")
    parser.add_argument("--launcher", default=None,
                        help="inline | local | slurm (default: the recipe's launch/*.gin choice, else inline)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the points and the jobs that would be submitted; submit nothing")
    parser.add_argument("--no-wait", action="store_true", help="with --launcher slurm: submit and return")


def main(args: argparse.Namespace) -> int:
    from harness.errors import HarnessError
    from harness.launch import launch_variants, raise_for_failures
    from harness.launch.jobs import build_jobs
    from harness.launch.run import check_wait
    from harness.sweep import build_sweep, parse_grid, sweep_folder_name

    grids = [parse_grid(text) for text in args.grid]
    sweep = build_sweep(args.recipe, args.gin, grids)
    launcher = _launcher(args.launcher, args.dry_run)
    check_wait(launcher, not args.no_wait)  # before the sweep record is written
    root = Path(args.results_dir)
    folder = root / sweep_folder_name(sweep)
    variants = [p.variant for p in sweep]
    jobs = build_jobs(variants, folder, search_root=root)
    todo = {job.stage_id for job in jobs if not job.done}  # a stage finished elsewhere needs no data here
    problems: list[str] = []
    for v in sweep:
        problems += [p for p in v.plan.data_problems(folder, [sid for sid in v.plan.stages if sid in todo])
                     if p not in problems]
    if args.dry_run:
        print_dry_run(sweep, jobs, launcher, folder)
        for problem in problems:
            print(f"note: {problem}", file=sys.stderr)
        return 0
    if problems:
        raise HarnessError(" | ".join(problems))
    _write_record(folder / "sweep.json", args, sweep)
    results = launch_variants(variants, folder, launcher, wait=not args.no_wait, arrays=True, search_root=root,
                              built_jobs=jobs)
    counts: dict[str, int] = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(f"sweep: {len(sweep)} points, {len(results)} distinct stages: "
          + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
          + f"\nsweep folder: {folder} (`harness status {folder}`, `harness report {folder}`)", file=sys.stderr)
    raise_for_failures(results)
    return 0


def _launcher(name: str | None, dry_run: bool):
    from harness.launch import launcher_from_name

    return launcher_from_name(name, require_slurm=not dry_run)  # previewing the arrays needs no SLURM here


def _write_record(path: Path, args: argparse.Namespace, sweep) -> None:
    from harness.fileio import atomic_write_text

    info = {"recipe": str(args.recipe), "grid": args.grid, "gin": args.gin,
            "points": [{"label": v.point.label, "bindings": v.point.gin_lines(), "experiment": v.experiment}
                       for v in sweep]}
    atomic_write_text(path, json.dumps(info, indent=2) + "\n")


def print_dry_run(sweep, jobs, launcher, folder: Path) -> None:
    """The points, the distinct stages level by level, and with the slurm launcher every submission's sbatch options
    (`print_sbatch`)."""
    from rich.console import Console
    from rich.table import Table

    from harness.launch.slurm import preview_levels

    console = Console()
    if not console.is_terminal:
        console.width = 200
    points = Table(title=f"{len(sweep)} sweep points -> {folder}")
    for column in ("#", "point", "experiment", "stages"):
        points.add_column(column)
    for i, v in enumerate(sweep):
        points.add_row(str(i), v.point.label, v.experiment, str(len(v.plan.stages)))
    console.print(points)

    done = [job for job in jobs if job.done]
    title = (f"{len(jobs)} distinct stages: {len(jobs) - len(done)} to run, {len(done)} already done "
             f"(launcher: {launcher.name})")
    table = Table(title=title)
    for column in ("level", "job", "stage", "id", "experiments", "dependency", "status"):
        table.add_column(column)
    shared = {job.stage_id: 1 + len(job.links) for job in jobs}
    for depth, level, dependency in preview_levels(jobs, arrays=launcher.name == "slurm"):
        kind = f"array[{len(level)}]" if len(level) > 1 else "job"
        for i, job in enumerate(level):
            table.add_row(str(depth), f"{kind} #{i}" if len(level) > 1 else kind, job.name, job.stage_id[:8],
                          f"{job.experiment}" + (f" (+{shared[job.stage_id] - 1} more)" if shared[job.stage_id] > 1
                                                 else ""), dependency or "-", "would submit")
    for job in done:
        table.add_row(str(job.depth), "-", job.name, job.stage_id[:8], job.experiment, "-", "done")
    console.print(table)
    if launcher.name == "slurm":
        print_sbatch(launcher, jobs, folder)


def print_sbatch(launcher, jobs, folder: Path) -> None:
    """Each submission's sbatch options as the sweep submits them (one job array per level, a level of one stage as
    a job), as `harness run --dry-run` prints a run's: options every submission shares first, then each one's own.
    From `harness.launch.slurm.preview_submissions`: the parameters the submission uses, rendered by submitit."""
    from harness.launch.slurm import preview_lines, preview_submissions

    per_job = preview_submissions(launcher, jobs, folder, arrays=True)
    arrays = sum(len(level) > 1 for _, level, _ in per_job)
    print(f"launcher: slurm: {len(per_job)} submission(s) ({arrays} job array(s), {len(per_job) - arrays} single "
          f"job(s)), each stage {launcher.nodes} node(s) x {launcher.ntasks} task(s) = "
          f"{launcher.nodes * launcher.ntasks} DDP rank(s); at most {launcher.max_requeues} requeues (SlurmLauncher "
          "bindings over the cluster profile gin/launch/slurm.gin)")
    for line in preview_lines(per_job, arrays=True):
        print(line)
