"""`harness bench RECIPE`: time real training steps of a recipe's stages; print figures and cost estimates."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "time a recipe's training steps: step time, images/s, FLOP/s, memory, training cost, mask efficiency"

EPILOG = """\
Data: a recipe whose data folder is missing or unusable on this machine is timed on the embedded 'shapes'
generator at the model's resolution (the output says why). To choose the data yourself, override it with --gin, e.g.
  --gin "DataConfig.source = 'shapes'" --gin 'DataConfig.resolution = 64'

Examples:
  harness bench recipes/celeba64_mask_ablation.gin --stage pretrain --batch-size 8 --threads 2 \\
      --gin 'MASK_RATIO = 0.9' --compare-mask
  harness bench recipes/celebahq_mask90.gin --stage pretrain --device cuda --batch-size 16 --compare-mask \\
      --compile
  harness bench recipes/celebahq_mask90.gin --device cuda --json > bench.json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from harness.experiment import ATTENTION_BACKENDS, COMPILE_MODES, PRECISIONS  # light: gin and the standard library

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("recipe", help="a gin recipe file, or the name of one under recipes/")
    parser.add_argument("--stage", action="append", default=[], metavar="NAME_OR_ID",
                        help="bench only these stages (name, arm/name or id prefix); repeatable; default: all")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size to time (default: each stage's own); stage estimates are scaled to the "
                             "stage's batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (default 10; median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available, else cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (torch.set_num_threads); default: torch's own choice")
    parser.add_argument("--compare-mask", action="store_true",
                        help="also time each masked stage without its mask (interleaved) and print the time "
                             "ratio, the FLOPs ratio and their quotient (target <= 1.25)")
    parser.add_argument("--sample-steps", type=int, default=2,
                        help="DDIM steps timed for the sampling figure, scaled to the sampler's steps (default 2)")
    parser.add_argument("--sample-batch", type=int, default=None, metavar="N",
                        help="images per sampling batch for that figure (default: EvalConfig.batch_size on a GPU, "
                             "the timed batch on CPU)")
    parser.add_argument("--compile", nargs="?", const="default", default=None, choices=COMPILE_MODES,
                        metavar="MODE",
                        help="torch.compile the model in this mode (as Stage.compile = 'MODE' would; MODE "
                             "default: 'default'; 'reduce-overhead' adds CUDA graphs); the warm-up steps compile. "
                             "Put it after the recipe (or write --compile=MODE)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None,
                        help="override the stages' precision (default: theirs; auto = bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--attention", choices=ATTENTION_BACKENDS, default=None,
                        help="attention kernel (as Stage.attention would; default: the stages' own, 'auto' = "
                             "torch's choice); on CPU only auto, flash and math run")
    parser.add_argument("--profile", nargs="?", type=int, const=3, default=0, metavar="STEPS",
                        help="after timing, run STEPS more steps (default 3) under torch.profiler and print the "
                             "top operators by self time for each row (where the step's time goes)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object instead")
    parser.add_argument("--json-out", default=None, metavar="PATH",
                        help="also write the figures as JSON to PATH (the table is printed as usual)")
    parser.add_argument("--gin", action="append", default=[], metavar="BINDING",
                        help="extra gin binding, repeatable, e.g. --gin \"DataConfig.source = 'shapes'\"")


def main(args: argparse.Namespace) -> int:
    import torch

    from harness.bench import BenchOptions, run_bench
    from harness.commands.run import select_stages
    from harness.config import load_recipe
    from harness.errors import HarnessError
    from harness.experiment import plan_from_gin

    if args.threads is not None:
        if args.threads < 1:
            raise HarnessError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise HarnessError(f"--device {device!r} is not known; use cpu or cuda")
    load_recipe(args.recipe, list(args.gin))
    plan = plan_from_gin()
    stages = [plan.stages[sid] for sid in select_stages(plan, args.stage)]
    options = BenchOptions(batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=device,
                           compare_mask=args.compare_mask, sample_steps=args.sample_steps,
                           sample_batch=args.sample_batch, profile_steps=args.profile,
                           # set on each benched stage itself, so that a scoped recipe binding cannot win
                           precision=args.precision, compile=args.compile, attention=args.attention)
    say = (lambda message: None) if args.json else (lambda message: print(f"bench: {message}", file=sys.stderr))
    report = run_bench(str(args.recipe), stages, options, progress=say)
    if args.json_out:
        from harness.fileio import atomic_write_text

        atomic_write_text(Path(args.json_out), json.dumps(report.to_json(), indent=2) + "\n")
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print_report(report)
    return 0


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    from harness.bench import MATMUL_TARGET, PEAK_TARGET

    console = Console()
    if not console.is_terminal:
        console.width = 220  # a log file has no width limit; do not squash the columns
    load = "" if report.load_average is None else f", load {report.load_average[0]:.2f}"
    gpu = report.peak_flops is not None
    table = Table(title=f"harness bench [bold]{report.recipe}[/] on {report.device} ({report.device_name}, "
                        f"{report.threads} threads{load}, torch {report.torch_version})")
    columns = ["stage", "mask", "batch", "tokens", "precision", "step s", "img/s", "tok/s", "FLOP/step", "FLOP/s",
               "matmul FLOP/s", "of matmul"] + (["of peak"] if gpu else []) + \
        ["peak mem", "loader img/s", "sampling img/s", "stage est."]
    for column in columns:
        table.add_column(column, justify="left" if column in ("stage", "mask", "precision") else "right")
    for r in report.rows:
        estimate = f"{r.estimated_hours:.3g} h = {r.estimated_device_hours:.3g} {r.device_hours_unit}"
        estimate += " (scaled)" if r.scaled_from_batch else ""
        sampling = "-" if r.sampling_images_per_second is None else \
            f"{r.sampling_images_per_second:.3g} ({r.sampler}, x{r.sample_batch})"
        cells = [f"{r.stage}" + (f" [dim]({r.variant})[/]" if r.variant != "stage" else ""),
                 f"{r.mask} ({r.mask_ratio:.1%})", str(r.batch_size), str(r.tokens_per_image),
                 r.precision + ("" if r.compiled == "off" else f" compiled ({r.compiled})")
                 + ("" if r.attention == "auto" else f", {r.attention} attention"),
                 f"{r.median_step_seconds:.3f}", f"{r.images_per_second:.3g}", _si(r.tokens_per_second),
                 _si(r.flops_per_step), _si(r.achieved_flops_per_second),
                 _si(r.matmul_flops_per_second), f"{r.matmul_fraction:.0%}"]
        cells += ["-" if r.peak_fraction is None else f"{r.peak_fraction:.0%}"] if gpu else []
        cells += [_si(r.peak_memory_bytes, "B"), f"{r.loader_images_per_second:.3g}", sampling, estimate]
        table.add_row(*cells)
    console.print(table)
    if report.comparisons:
        comparisons = Table(title="token-dropping efficiency: masked step vs the same step without a mask")
        for column in ("stage", "mask", "time ratio", "FLOPs ratio", "time / FLOPs", "target"):
            comparisons.add_column(column, justify="left" if column in ("stage", "mask") else "right")
        for c in report.comparisons:
            verdict = "[green]met[/]" if c.meets_target else "[red]missed[/]"
            comparisons.add_row(c.stage, c.mask, f"{c.time_ratio:.3f}", f"{c.flops_ratio:.3f}",
                                f"{c.quotient:.2f}", f"<= {c.target:.2f} {verdict}")
        console.print(comparisons)
    console.print(f"[dim]'of matmul': achieved FLOP/s (forward + backward FLOPs over the whole step time) as a "
                  f"share of a plain matmul of the MLP shape in the same run (target >= {MATMUL_TARGET:.0%} "
                  "for the unmasked step on CPU float32).[/]")
    if gpu:
        console.print(f"[dim]'of peak': achieved FLOP/s as a share of the device's peak bf16 FLOP/s, "
                      f"{_si(report.peak_flops, 'FLOP/s')} ({report.peak_flops_source}; a large bf16 matmul "
                      f"reached {_si(report.large_matmul_flops, 'FLOP/s')} in this run; target >= "
                      f"{PEAK_TARGET:.0%} for the CelebA-HQ 256 model).[/]")
    console.print("[dim]'stage est.': the stage's training steps only (steps x the median step time, wall hours "
                  "and device-hours); evaluation (FID sampling) and sample grids are not counted.[/]")
    for label, text in report.profiles.items():
        console.print(f"[bold]torch.profiler: {label}[/]", highlight=False)
        console.print(text, markup=False, highlight=False, soft_wrap=True)
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}")
