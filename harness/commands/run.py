"""`harness run RECIPE`: plan the experiment, train its stages (skipping finished ones), then report."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "run a recipe: train every arm's stages (resuming, skipping finished ones), evaluate, report"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a gin recipe file, or the name of one under recipes/ (e.g. quickstart)")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding, repeatable, e.g. --gin 'MASK_RATIO = 0.5' "
                             "--gin 'pretrain/Stage.steps = 100'")
    parser.add_argument("--results-dir", default="results", help="where run folders go (default: results/)")
    parser.add_argument("--launcher", default=None,
                        help="inline (this process) | local (submitit subprocesses) | slurm (one job per stage), "
                             "set up by its profile gin/launch/NAME.gin (the cluster's settings for slurm) under the "
                             "recipe's and --gin's bindings; default: what the recipe binds (include "
                             "'launch/slurm.gin'), else inline")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan as a table (and what data is missing), and how the launcher would run "
                             "each stage (with slurm: every job's sbatch options), then exit: nothing is trained, "
                             "submitted or written")
    parser.add_argument("--stage", action="append", default=[], metavar="NAME_OR_ID",
                        help="run only these stages (by stage name, arm/name or id prefix); repeatable")
    parser.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    parser.add_argument("--tensorboard", action="store_true",
                        help="TensorBoard event files in every stage folder (Stage.tensorboard = True; needs the "
                             "tensorboard package); then `tensorboard --logdir results/`")
    parser.add_argument("--no-wait", action="store_true", help="with the slurm launcher: submit and return")


def select_stages(plan, wanted: list[str]) -> list[str]:
    """Stage ids matching --stage filters (all stages when none is given)."""
    from harness.errors import HarnessError

    if not wanted:
        return list(plan.stages)
    chosen = []
    for key in wanted:
        hits = [sid for sid, ps in plan.stages.items()
                if key in (ps.name, sid) or sid.startswith(key) or any(key == f"{a}/{ps.name}" for a in ps.arms)]
        if not hits:
            names = ", ".join(sorted({f"{a}/{ps.name}" for ps in plan.stages.values() for a in ps.arms}))
            raise HarnessError(f"no stage matches --stage {key!r} (stages: {names})")
        chosen += [h for h in hits if h not in chosen]
    return [sid for sid in plan.stages if sid in chosen]  # keep dependency order


def print_plan(plan, results_dir: Path, jobs: dict) -> None:
    """The plan as a table; `jobs` (stage id -> StageJob) say what is done, here or in another experiment."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"experiment [bold]{plan.experiment}[/] -> {results_dir / plan.experiment}")
    for column in ("arms", "stage", "id", "parent", "steps", "batch", "lr", "mask (actual)", "model", "data",
                   "status"):
        table.add_column(column)
    for sid, ps in plan.stages.items():
        s = ps.spec
        m = s.model
        kind = "DiT " if type(m).__name__ == "DiTConfig" else ""  # (the U-ViT, the default, goes unnamed)
        model = (f"{kind}{m.embed_dim}w {m.depth}L {m.num_heads}h p{m.patch_size} {m.img_size}px"
                 + (f" +dec{m.decoder_depth}" if getattr(m, "decoder_depth", 0) else "")
                 + f", {m.num_params() / 1e6:.1f}M")
        data = s.data.source if s.data.source != "folder" else f"folder {s.data.root}"
        job = jobs[sid]
        status = "pending" if not job.done else "done" if job.stage_dir == plan.stage_dir(results_dir, sid) \
            else f"done in {job.stage_dir.relative_to(results_dir)}"
        table.add_row(", ".join(ps.arms), s.name, sid[:8], (ps.parent or "-")[:8], str(s.steps),
                      str(s.batch_size), f"{s.lr:g}", f"{s.mask.name} ({s.mask.actual_ratio(m.grid):.1%})",
                      model, data, status)
    console = Console()
    if not console.is_terminal:
        console.width = 200  # a log file has no width limit; do not squash the columns
    console.print(table)


def print_launch(launcher, jobs: list, results_dir: Path) -> None:
    """How the launcher would run the stages still to run; for SLURM each job's sbatch options, rendered from the
    parameters the submission uses (`harness.launch.slurm.job_parameters`)."""
    todo = [job for job in jobs if not job.done]
    if launcher.name == "inline":
        print(f"launcher: inline: {len(todo)} stage(s) one after another in this process")
        return
    if launcher.name == "local":
        print(f"launcher: local: {len(todo)} stage(s) as subprocesses of this one, {launcher.tasks_per_node} "
              f"task(s) (DDP ranks) and {launcher.gpus_per_node} GPU(s) each, at most {launcher.max_parallel} at "
              f"once, time limit {launcher.timeout_min} min")
        return
    from harness.launch.slurm import preview_lines, preview_submissions

    per_job = preview_submissions(launcher, todo, results_dir, arrays=False)
    ranks = launcher.nodes * launcher.ntasks
    print(f"launcher: slurm: {len(per_job)} job(s), one per stage, each {launcher.nodes} node(s) x "
          f"{launcher.ntasks} task(s) = {ranks} DDP rank(s); at most {launcher.max_requeues} requeues (SlurmLauncher "
          "bindings over the cluster profile gin/launch/slurm.gin)")
    for line in preview_lines(per_job, arrays=False):
        print(line)


def main(args: argparse.Namespace) -> int:
    from harness.config import load_recipe
    from harness.errors import HarnessError
    from harness.experiment import plan_from_gin
    from harness.launch import Variant, launch_plan, launcher_from_name, raise_for_failures
    from harness.launch.jobs import build_jobs

    results_dir = Path(args.results_dir)
    gin_text = load_recipe(args.recipe, args.gin + (["Stage.tensorboard = True"] if args.tensorboard else []))
    plan = plan_from_gin()
    stage_ids = select_stages(plan, args.stage)
    # fails early on an unknown launcher or a missing SLURM (a dry run only previews, on any machine)
    launcher = launcher_from_name(args.launcher, require_slurm=not args.dry_run)
    # a stage finished in another experiment under results_dir is linked, not trained: it needs no data
    jobs = {job.stage_id: job for job in build_jobs([Variant(gin_text=gin_text, plan=plan)], results_dir)}
    problems = plan.data_problems(results_dir, [sid for sid in stage_ids if not jobs[sid].done])
    if args.dry_run:
        print_plan(plan, results_dir, jobs)
        print_launch(launcher, [jobs[sid] for sid in stage_ids], results_dir)
        for problem in problems:  # a plan can be previewed without the data; a run cannot start
            print(f"note: {problem}", file=sys.stderr)
        return 0
    if problems:
        raise HarnessError(" | ".join(problems))
    # launch_plan writes plan.json (the report's and `harness status`'s index) before it launches anything.
    results = launch_plan(plan, gin_text, results_dir, launcher, stage_ids=stage_ids, wait=not args.no_wait,
                          built_jobs=list(jobs.values()))
    if args.no_wait:  # slurm only (launch_plan refuses it otherwise): submitted; `harness status` follows them
        return 0
    if not args.no_report:  # partial results too: failed arms are marked
        from harness.report import write_report

        [html] = write_report(results_dir / plan.experiment)
        print(f"report: {html} (report.md, records.csv and figures/ beside it)", file=sys.stderr)
    raise_for_failures(results)
    return 0
