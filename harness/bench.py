"""`harness bench`: what a recipe's training step really costs, measured on the real step.

Each row times `Trainer.train_step` (the step a stage runs: draw the batch, noise and mask, forward, backward,
clipping, AdamW, EMA) after a warm-up, and reports its median time, throughput, the FLOPs that
`harness.cost.measure_step_flops` counts for it (forward + backward; the optimizer's elementwise work is not
counted but its time is in the step), the achieved FLOP/s, peak memory, and what the stage's training steps would
cost (steps x the median step time; evaluation and sample grids are not counted).

Two ratios are measured in the same run, so that the machine's speed and load cancel:
- **mask efficiency** (`compare_mask`): the stage's masked step against the same model and batch without a
  mask, timed interleaved (masked, unmasked, masked, ...); `time ratio / FLOPs ratio` is 1 when dropping
  tokens removes exactly its share of the time, and grows with the fixed per-step cost (optimizer, EMA).
- **step efficiency**: achieved FLOP/s against a plain `torch.matmul` of the model's MLP shape,
  (batch x tokens, width) x (width, mlp hidden), timed between the rounds of steps.

Beside them: the data loader's images/s (`dataset.get_batch` alone) and the evaluation sampler's images/s
(a few DDIM steps timed, scaled to the sampler's step count). With `profile_steps`, a few more steps run under
`torch.profiler` (after the timed ones, so the profiler's overhead never reaches the figures) and the report
keeps each row's table of operators by self time.
"""
from __future__ import annotations

import dataclasses
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from harness.errors import HarnessError
from harness.experiment import PlannedStage, Stage

MASK_TARGET = 1.25  # issue 7, target 1: masked time ratio <= 1.25 x the FLOPs ratio
MATMUL_TARGET = 0.75  # issue 7, target 2 (CPU float32): step FLOP/s >= 75% of the matmul's
PEAK_TARGET = 0.40  # issue 7, target 2 (GPU bf16): step FLOP/s >= 40% of the device's peak bf16 FLOP/s

# Dense (no sparsity) bf16 tensor-core peaks from the vendors' data sheets, matched against the CUDA device name
# in this order (the first substring found wins, so a more specific name comes before the name it contains).
BF16_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    ("GH200", 989e12),  # Grace Hopper: the H100 SXM's Hopper GPU ("NVIDIA GH200 480GB")
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM ("NVIDIA H200")
    ("A100", 312e12),
    ("L40S", 362e12),
)


@dataclass
class BenchOptions:
    batch_size: int | None = None  # None: each stage's own batch size
    steps: int = 10  # timed steps per row
    warmup: int = 2  # untimed steps first (allocator, kernels and caches warm up)
    device: str = "cpu"
    compare_mask: bool = False
    sample_steps: int = 2  # DDIM steps timed for the sampling figure, scaled to the sampler's steps
    sample_batch: int | None = None  # images sampled at once; None: the evaluation's batch on a GPU (the bench
    # batch on CPU, where a 250-image batch at 256 px would take many minutes and images/s hardly depend on it)
    profile_steps: int = 0  # > 0: also run this many steps under torch.profiler and keep its table per row
    # Override every benched stage's setting (scoped recipe bindings included); None: the stage's own
    precision: str | None = None
    compile: str | None = None
    attention: str | None = None


@dataclass
class StepBench:
    """One timed row: a stage (or its unmasked twin) at one batch size."""

    stage: str
    variant: str  # "stage" | "no mask"
    mask: str
    mask_ratio: float
    batch_size: int
    tokens_per_image: int  # tokens entering the transformer blocks
    steps_timed: int
    step_seconds: list[float]
    median_step_seconds: float
    images_per_second: float
    tokens_per_second: float
    flops_per_step: int
    achieved_flops_per_second: float
    matmul_shape: tuple[int, int, int]  # (M, K, N) of the reference matmul
    matmul_flops_per_second: float
    matmul_fraction: float  # achieved / matmul
    peak_fraction: float | None  # achieved / the device's peak bf16 FLOP/s (GPU, 16-bit precision only)
    precision: str  # the step's autocast dtype, or float32
    compiled: str  # Stage.compile: the torch.compile mode, or "off"
    attention: str  # Stage.attention: the attention kernel asked for, or "auto" (torch's choice)
    peak_memory_bytes: int
    peak_memory_kind: str  # what peak_memory_bytes measures on this device
    loader_images_per_second: float
    sampler: str | None  # the sampler whose speed is reported (None for the unmasked twin)
    sampling_images_per_second: float | None
    sample_batch: int | None  # images per sampling batch behind that figure
    stage_steps: int
    stage_batch_size: int
    estimated_hours: float  # wall-clock hours of the stage's training steps on this device (no evaluation)
    estimated_device_hours: float
    device_hours_unit: str  # GPU-hours | core-hours
    scaled_from_batch: bool  # True when the stage's batch differs from the timed one (time scaled linearly)


@dataclass
class MaskComparison:
    stage: str
    mask: str
    time_ratio: float  # masked median step time / unmasked
    flops_ratio: float  # masked FLOPs per step / unmasked
    quotient: float  # time_ratio / flops_ratio; target <= MASK_TARGET
    target: float = MASK_TARGET

    @property
    def meets_target(self) -> bool:
        return self.quotient <= self.target


@dataclass
class BenchReport:
    recipe: str
    device: str
    device_name: str
    threads: int
    torch_version: str
    load_average: tuple[float, float, float] | None
    # GPU only: the device's peak bf16 FLOP/s (data sheet where the name is known, else the measured one) and a
    # large bf16 matmul (8192^3) timed in the same run, for scale
    peak_flops: float | None = None
    peak_flops_source: str | None = None
    large_matmul_flops: float | None = None
    rows: list[StepBench] = field(default_factory=list)
    comparisons: list[MaskComparison] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, str] = field(default_factory=dict)  # "stage (variant)" -> torch.profiler's top operators

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for comparison, plain in zip(self.comparisons, out["comparisons"]):
            plain["meets_target"] = comparison.meets_target
        out["targets"] = {"mask_quotient_max": MASK_TARGET, "matmul_fraction_min_cpu_fp32": MATMUL_TARGET,
                          "peak_fraction_min_gpu_bf16": PEAK_TARGET}
        return out


# ---------------------------------------------------------------------------------------------------------------
# Preparing the stages

def bench_spec(spec: Stage, options: BenchOptions, notes: list[str]) -> Stage:
    """The stage as benchmarked: the chosen batch size, and embedded data when the data folder is missing or
    unusable (the note quotes why, so a broken folder is not reported as a missing one)."""
    changes: dict[str, Any] = {key: getattr(options, key) for key in ("precision", "compile", "attention")
                               if getattr(options, key) is not None and getattr(options, key) != getattr(spec, key)}
    if options.batch_size is not None and options.batch_size != spec.batch_size:
        changes["batch_size"] = options.batch_size
        if spec.micro_batch_size and options.batch_size % spec.micro_batch_size:
            changes["micro_batch_size"] = None
            notes.append(f"{spec.name}: micro_batch_size {spec.micro_batch_size} does not divide --batch-size "
                         f"{options.batch_size}; timed without gradient accumulation")
    if spec.data.source == "folder":
        try:
            spec.data.check()
        except HarnessError as err:
            from harness.data import DataConfig

            changes["data"] = DataConfig(source="shapes", resolution=spec.model.img_size, hflip=spec.data.hflip,
                                         num_images=max(64, options.batch_size or spec.batch_size))
            notes.append(f"{spec.name}: data folder {spec.data.root!r} cannot be used ({err}); timing on the "
                         f"embedded 'shapes' generator at {spec.model.img_size} px instead (loader images/s are "
                         "those of the in-memory array, not of decoding files). Fix the data, or choose it with "
                         "--gin \"DataConfig.source = 'shapes'\" --gin 'DataConfig.resolution = N'")
    return dataclasses.replace(spec, **changes) if changes else spec


def unmasked_twin(spec: Stage) -> Stage:
    from harness.masks import NoMask

    return dataclasses.replace(spec, mask=NoMask(), mask_schedule=None)  # (a schedule needs a mask)


# ---------------------------------------------------------------------------------------------------------------
# Measuring

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _synchronize(device)
    start = time.perf_counter()
    fn()
    _synchronize(device)
    return time.perf_counter() - start


def matmul_reference(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype,
                     min_seconds: float = 2e-3) -> Callable[[], float]:
    """A timer of a plain (m, k) x (k, n) matmul; returns the seconds of one call. Calls are repeated between two
    synchronisations until they take `min_seconds`: a small GPU matmul timed alone measures mostly the launch
    and the sync, which would make the step look faster than its own matmuls."""
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (library initialisation, kernel choice)
    once = _timed(lambda: torch.matmul(a, b), device)
    repeats = max(1, min(1000, math.ceil(min_seconds / max(once, 1e-9))))

    def calls() -> None:
        for _ in range(repeats):
            torch.matmul(a, b)

    return lambda: _timed(calls, device) / repeats


def data_sheet_peak(device_name: str) -> tuple[str, float] | None:
    """(matched name, dense bf16 peak FLOP/s) of a CUDA device name from BF16_PEAK_FLOPS, or None."""
    for key, peak in BF16_PEAK_FLOPS:
        if key in device_name:
            return key, peak
    return None


def gpu_peak_flops(device: torch.device) -> tuple[float, str, float]:
    """(peak bf16 FLOP/s, where it comes from, FLOP/s of a large bf16 matmul timed now) of a CUDA device."""
    name = torch.cuda.get_device_name(device)
    n = 8192
    timer = matmul_reference(n, n, n, device, torch.bfloat16)
    for _ in range(3):
        timer()  # the clocks ramp up
    measured = 2 * n**3 / statistics.median(timer() for _ in range(10))
    sheet = data_sheet_peak(name)
    if sheet is not None:
        return sheet[1], f"data sheet ({sheet[0]}, dense bf16)", measured
    return measured, f"measured ({n}^3 bf16 matmul; {name} not in the data-sheet table)", measured


def loader_images_per_second(trainer, repeats: int = 20) -> float:
    """Images/s of `dataset.get_batch` alone, onto the training device (median over the first steps' batches)."""
    times, n, device = [], trainer.local_batch, trainer.ctx.device
    for step in range(repeats):
        idx = trainer.order.indices(step)[:n]
        times.append(_timed(lambda: trainer.dataset.get_batch(idx, device=device), device))
    return n / max(statistics.median(times), 1e-12)


def sampling_images_per_second(trainer, options: BenchOptions) -> tuple[str, float, int]:
    """(sampler name, images/s, batch) of the stage's evaluation sampler (the sample grids' DDIM when it has no
    evaluation), from a few timed DDIM steps on the EMA model scaled to the sampler's number of steps."""
    from harness.sampling import SamplerConfig, sample_batch

    spec, device = trainer.spec, trainer.ctx.device
    sampler = spec.eval.sampler if spec.eval is not None else SamplerConfig("ddim", spec.sample_steps, eta=1.0)
    steps = max(1, min(options.sample_steps, sampler.steps))
    # a DDIM step with the sampler's eta does the work of any step of the sampler (DDPM is DDIM with eta 1)
    probe = SamplerConfig("ddim", steps, eta=sampler.eta if sampler.kind == "ddim" else 1.0,
                          clip_x0=sampler.clip_x0)
    n = options.sample_batch or (spec.eval.batch_size if spec.eval is not None and device.type == "cuda"
                                 else trainer.local_batch)
    shape = (spec.model.in_chans, spec.model.img_size, spec.model.img_size)
    # the sampler as evaluation runs it: the EMA model in the stage's precision (compiled when the stage is)
    run = lambda s: sample_batch(trainer.sampling_net, trainer.diffusion, s, range(n), shape, 0, device)  # noqa: E731
    for _ in range(2):  # warm-up: compilation, and CUDA graphs record on their second call
        run(SamplerConfig("ddim", 1, eta=probe.eta))
    seconds = _timed(lambda: run(probe), device)
    return sampler.name, n / (seconds / steps * sampler.steps), n


def profile_table(trainer, first_step: int, steps: int, rows: int = 15) -> str:
    """torch.profiler's operators of `steps` training steps, by self time (on CUDA: self GPU time), as text."""
    from torch.profiler import ProfilerActivity, profile

    device = trainer.ctx.device
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for step in range(first_step, first_step + steps):
            trainer.train_step(step, grad_norm_wanted=False)
        _synchronize(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=60)


# ---------------------------------------------------------------------------------------------------------------
# One stage

def bench_stage(planned: PlannedStage, options: BenchOptions, notes: list[str],
                progress: Callable[[str], None] = lambda message: None,
                peak_flops: float | None = None,
                profiles: dict[str, str] | None = None) -> tuple[list[StepBench], MaskComparison | None]:
    """Time one stage (and with `compare_mask` its unmasked twin, interleaved); returns its rows and the
    comparison. With `options.profile_steps`, each row's profiler table goes into `profiles`."""
    from harness.cost import PeakMemory, describe_device
    from harness.train import TrainContext, Trainer

    device = torch.device(options.device)
    spec = bench_spec(planned.spec, options, notes)
    variants = [("stage", spec)]
    if options.compare_mask:
        if spec.mask.name == "none":
            notes.append(f"{spec.name}: the stage has no mask; --compare-mask has nothing to compare")
        else:
            variants.append(("no mask", unmasked_twin(spec)))

    memory = PeakMemory(device)
    trainers, peaks = [], []
    with tempfile.TemporaryDirectory(prefix="harness-bench-") as run_dir:
        before = memory.current()
        for _, variant in variants:
            progress(f"{spec.name}: building {variant.mask.name}-mask trainer")
            # what the trainers built before this one hold (weights, EMA, optimizer state, gradients): not this
            # row's, so its peak is reported without it, as if benched alone
            held_by_others = memory.current() - before
            trainer = Trainer(TrainContext(spec=variant, stage_id=planned.id, run_dir=Path(run_dir),
                                           device=device))
            for step in range(options.warmup):
                trainer.train_step(step)
            memory.reset()  # the peak of one step
            trainer.train_step(options.warmup)
            peaks.append(memory.peak() - max(held_by_others, 0))
            trainers.append(trainer)

        d, hidden = spec.model.embed_dim, spec.model.mlp_hidden
        tokens = [t.model.tokens_entering_blocks(t.draw(0)[3]) for t in trainers]
        dtype = trainers[0].autocast_dtype or torch.float32
        # the rows the step's own matmuls have: one micro-batch's tokens (the whole local batch without accumulation)
        matmuls = [matmul_reference(t.micro_batch * n, d, hidden, device, dtype) for t, n in zip(trainers, tokens)]

        progress(f"{spec.name}: timing {options.steps} steps x {len(trainers)}")
        times: list[list[float]] = [[] for _ in trainers]
        matmul_times: list[list[float]] = [[] for _ in trainers]
        first = options.warmup + 1
        for i in range(options.steps):  # interleaved, so that drift in the machine's speed hits every row alike
            for k, trainer in enumerate(trainers):
                # as the training loop runs its steps between log steps (no gradient norm unless clipping)
                times[k].append(_timed(lambda: trainer.train_step(first + i, grad_norm_wanted=False), device))
                matmul_times[k].append(matmuls[k]())

        if options.profile_steps > 0 and profiles is not None:
            progress(f"{spec.name}: profiling {options.profile_steps} steps x {len(trainers)}")
            for (name, _), trainer in zip(variants, trainers):
                label = spec.name + ("" if name == "stage" else f" ({name})")
                profiles[label] = profile_table(trainer, first + options.steps, options.profile_steps)

        progress(f"{spec.name}: FLOPs, loader and sampler")
        info = describe_device(device)
        rows = []
        for k, (name, variant) in enumerate(variants):
            trainer, median = trainers[k], statistics.median(times[k])
            flops = trainer.step_flops()
            m = trainer.micro_batch * tokens[k]
            matmul_flops = 2 * m * d * hidden / statistics.median(matmul_times[k])
            sampler, sampling, sample_batch = (sampling_images_per_second(trainer, options) if k == 0
                                               else (None, None, None))
            scale = planned.spec.batch_size / variant.batch_size
            hours = planned.spec.steps * median * scale / 3600
            rows.append(StepBench(
                stage=spec.name, variant=name, mask=variant.mask.name,
                mask_ratio=variant.mask.actual_ratio(spec.model.grid), batch_size=variant.batch_size,
                tokens_per_image=tokens[k], steps_timed=len(times[k]), step_seconds=times[k],
                median_step_seconds=median, images_per_second=variant.batch_size / median,
                tokens_per_second=variant.batch_size * tokens[k] / median, flops_per_step=flops,
                achieved_flops_per_second=flops / median, matmul_shape=(m, d, hidden),
                matmul_flops_per_second=matmul_flops, matmul_fraction=flops / median / matmul_flops,
                # the peak is a 16-bit tensor-core figure: a float32 step has no share of it
                peak_fraction=None if peak_flops is None or trainer.autocast_dtype is None
                else flops / median / peak_flops,
                precision=trainer.precision_name,
                compiled=variant.compile, attention=variant.attention,
                peak_memory_bytes=peaks[k], peak_memory_kind=memory.kind,
                loader_images_per_second=loader_images_per_second(trainer), sampler=sampler,
                sampling_images_per_second=sampling, sample_batch=sample_batch, stage_steps=planned.spec.steps,
                stage_batch_size=planned.spec.batch_size, estimated_hours=hours,
                estimated_device_hours=hours * info.count, device_hours_unit=info.hours_unit,
                scaled_from_batch=scale != 1.0))
        del trainers
    comparison = None
    if len(rows) == 2:
        masked, unmasked = rows
        time_ratio = masked.median_step_seconds / unmasked.median_step_seconds
        flops_ratio = masked.flops_per_step / unmasked.flops_per_step
        comparison = MaskComparison(stage=spec.name, mask=masked.mask, time_ratio=time_ratio,
                                    flops_ratio=flops_ratio, quotient=time_ratio / flops_ratio)
    return rows, comparison


def run_bench(recipe: str, stages: list[PlannedStage], options: BenchOptions,
              progress: Callable[[str], None] = lambda message: None) -> BenchReport:
    """Benchmark the given stages of a planned recipe, one after another."""
    from harness.cost import describe_device

    if options.steps < 1 or options.warmup < 0 or options.profile_steps < 0:
        raise HarnessError(f"--steps must be >= 1, --warmup and --profile >= 0, got {options.steps}, "
                           f"{options.warmup} and {options.profile_steps}")
    for flag, value in (("--batch-size", options.batch_size), ("--sample-batch", options.sample_batch)):
        if value is not None and value < 1:
            raise HarnessError(f"{flag} must be at least 1, got {value}")
    device = torch.device(options.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise HarnessError("--device cuda but no CUDA device is available here; use --device cpu")
    report = BenchReport(recipe=recipe, device=str(device), device_name=describe_device(device).name,
                         threads=torch.get_num_threads(), torch_version=torch.__version__,
                         load_average=os.getloadavg() if hasattr(os, "getloadavg") else None)
    cores = os.cpu_count() or 1
    if device.type == "cpu" and report.load_average and report.load_average[0] >= cores - 0.5:
        # other processes on the cores stall every parallel region of a multi-threaded step (each waits for a
        # descheduled sibling thread), which hits small ops (the masked step, the loader) hardest
        report.notes.append(f"the machine was busy when the bench started (load {report.load_average[0]:.1f} on "
                            f"{cores} cores): multi-threaded timings suffer most; prefer figures from a quiet "
                            "machine, or --threads 1")
    if device.type == "cuda":
        progress("timing a large bf16 matmul for the device's peak")
        report.peak_flops, report.peak_flops_source, report.large_matmul_flops = gpu_peak_flops(device)
    for planned in stages:
        rows, comparison = bench_stage(planned, options, report.notes, progress, report.peak_flops,
                                       report.profiles)
        report.rows += rows
        if comparison is not None:
            report.comparisons.append(comparison)
    if any(row.scaled_from_batch for row in report.rows):
        report.notes.append("estimated hours: the median step time scaled linearly from the timed batch to the "
                            "stage's own batch size (time it at that size for a firmer figure)")
    if device.type == "cpu":
        report.notes.append("peak memory on CPU: the process's peak resident memory during one step (with "
                            "--compare-mask, less what the row before it holds); device-hours on CPU are "
                            "core-hours (wall hours x threads)")
    return report
