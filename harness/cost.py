"""What a training stage cost: FLOPs, images and tokens seen, wall time, device-hours, peak memory, throughput.

The paper's claim is about cost ("equal FID for less training"), so every stage records its cost in the same
units whatever it ran on. Two choices worth knowing:

- FLOPs are *measured* once per stage with `torch.utils.flop_counter.FlopCounterMode` on one real training step
  (forward + backward of `diffusion.training_loss`), then multiplied by the number of steps. Masking changes
  the number of tokens per step but not from step to step (every mask row drops the same number of patches),
  so one measurement holds for the whole stage. The optimizer update (elementwise) is not counted.
  Under a mask-ratio schedule (`Stage.mask_schedule`) the count changes from step to step: the trainer measures
  once per distinct visible count (FLOPs depend on shapes alone) and hands each step its own FLOPs, tokens and
  actual ratio (`meter.step(batch, tokens_per_image=..., flops=..., mask_ratio=...)`), so the sums stay exact.
- Device-hours are `train_seconds x device_count / 3600`. On GPUs `device_count` is the number of GPUs (the
  DDP world size); they are GPU-hours. On CPU it is processes x `torch.get_num_threads()`, the cores the
  step used; they are core-hours. Evaluation time is kept apart (`eval_seconds`, `eval_device_hours`): it is
  not training cost.

The training loop drives a `CostMeter`:

    meter = CostMeter.for_device(device, world_size, flops_per_step=measure_step_flops(model, diffusion, x0, mask),
                                 tokens_per_image=model.tokens_entering_blocks(mask), mask=..., mask_ratio=...)
    with meter.training():              # wrap a stretch of steps, not each step (it synchronises CUDA on exit)
        for ...: train_step(); meter.step(batch_size)
        with meter.evaluating(): ...    # pauses the training clock
    eval_row.update(meter.snapshot()); meter.write(run_dir / "cost.json")

and stores `meter.state_dict()` in its checkpoints so a resumed stage keeps counting where it stopped.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.fileio import atomic_write_text

# eval.jsonl carries these stage-local cost keys at each evaluation (docs/internals.md, "Run folder files").
SNAPSHOT_KEYS = ("images_seen", "tokens_seen", "train_flops", "train_seconds", "device_hours")


def _without_recompute(formula: Callable[..., int]) -> Callable[..., int]:
    """A fused attention backward's FLOP formula, less the attention scores it recomputes.

    torch counts five products of equal size for the backward of the fused kernels (the scores Q K^T once more,
    then dP, dV, dQ, dK); the model's backward needs four, which is what the math path counts on CPU. Counting
    model FLOPs keeps a stage's FLOPs the same on every device (the recompute added 7.5% to the CelebA-HQ 256
    step on an H100). Exact when queries and values share the head size, as in every model here."""
    def count(*args, **kwargs) -> int:
        return formula(*args, **kwargs) * 4 // 5

    count._get_raw = True  # type: ignore[attr-defined]  # FlopCounterMode hands it the raw arguments
    return count


def model_flop_formulas() -> dict:
    """FlopCounterMode's custom_mapping that counts model FLOPs for the fused attention backwards."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    names = ("_scaled_dot_product_flash_attention_backward", "_scaled_dot_product_efficient_attention_backward",
             "_scaled_dot_product_cudnn_attention_backward", "_flash_attention_backward",
             "_efficient_attention_backward")
    ops = [getattr(aten, name) for name in names if hasattr(aten, name)]
    return {op: _without_recompute(flop_registry[op]) for op in ops if op in flop_registry}


def measure_step_flops(model: torch.nn.Module, diffusion, x0: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """FLOPs of one training step on the batch `x0`: forward and backward of `diffusion.training_loss`.

    The model's `.grad` buffers and the global random state are left untouched (gradients are taken with
    `torch.autograd.grad`, timesteps and noise come from a private generator), so this can run right before
    training without changing it. FLOPs scale exactly with the batch size: measuring on a slice of the batch and
    multiplying is fine when a full batch would not fit twice in memory.

    These are model FLOPs, the same on every device: `FlopCounterMode` knows the CUDA attention kernels (flash,
    memory-efficient, cuDNN), whose backward it counts with the scores they recompute (taken out here, see
    `model_flop_formulas`), but not the fused CPU one, which it would count as zero; off CUDA the step is
    therefore measured with the math attention backend, whose matrix products are counted.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=x0.device).manual_seed(0)
    attention = contextlib.nullcontext()
    if x0.device.type != "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attention = sdpa_kernel(SDPBackend.MATH)
    counter = FlopCounterMode(display=False, custom_mapping=model_flop_formulas())
    with attention, counter:
        loss = diffusion.training_loss(model, x0, mask, generator=generator)
        if params:
            torch.autograd.grad(loss, params, allow_unused=True)
    return int(counter.get_total_flops())


@dataclass(frozen=True)
class DeviceInfo:
    """Where a stage trained: `kind` is 'cuda' or 'cpu'; `count` multiplies wall time into device-hours."""

    kind: str
    name: str
    count: int

    @property
    def hours_unit(self) -> str:
        return "GPU-hours" if self.kind == "cuda" else "core-hours"


def describe_device(device: torch.device | str, processes: int | None = None) -> DeviceInfo:
    """DeviceInfo for `device` used by `processes` ranks (the DDP world size, default 1): one GPU each on CUDA;
    on CPU each rank uses `torch.get_num_threads()` cores, and cores are what core-hours count."""
    device = torch.device(device)
    processes = processes or 1
    if device.type == "cuda":
        return DeviceInfo("cuda", torch.cuda.get_device_name(device), processes)
    name = platform.processor() or platform.machine() or "cpu"
    return DeviceInfo(device.type, name, processes * torch.get_num_threads())


def _peak_memory_bytes(device: DeviceInfo) -> int:
    if device.kind == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class PeakMemory:
    """Peak memory during a stretch of work: CUDA's allocator peak, or on Linux the process's peak resident set
    (VmHWM, reset through /proc/self/clear_refs); elsewhere the process's lifetime peak (ru_maxrss)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda allocated" if device.type == "cuda" else "process resident"

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            self.kind = "process resident (lifetime peak)"

    def current(self) -> int:
        """Memory in use now (CUDA allocated, or the resident set), e.g. to take another object's share out."""
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        return _proc_status_bytes("VmRSS") or 0

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        peak = _proc_status_bytes("VmHWM")
        return peak if peak is not None else _peak_memory_bytes(describe_device(self.device))


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of Linux's /proc/self/status (VmRSS, VmHWM) in bytes; None elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class CostMeter:
    """Accumulates one stage's cost: steps, images, tokens, FLOPs, train/eval seconds, peak memory."""

    def __init__(
        self,
        device: DeviceInfo,
        flops_per_step: int = 0,
        tokens_per_image: int = 0,
        mask: str = "none",
        mask_ratio: float = 0.0,
        clock: Callable[[], float] = time.perf_counter,
        mask_schedule: dict | None = None,
    ):
        self.device = device
        self._clock = clock  # injectable so tests can drive time
        self.flops_per_step = int(flops_per_step)
        self.tokens_per_image = int(tokens_per_image)
        self.mask = mask
        self.mask_ratio = float(mask_ratio)
        # a mask-ratio schedule's description (RatioSchedule.describe); with one, cost.json reports the mean actual
        # ratio and the mean FLOPs per step
        self.mask_schedule = mask_schedule
        self.mask_ratio_sum = 0.0  # the actual mask ratios of the steps counted, summed
        # under a schedule: visible patches per image -> (tokens per image, FLOPs of one global step), measured by
        # the trainer once per count and kept in checkpoints, so that a resumed stage does not measure them again
        self.measured: dict[int, tuple[int, int]] = {}
        self.steps = 0
        self.images_seen = 0
        self.tokens_seen = 0
        self.train_flops = 0
        self.train_seconds = 0.0
        self.eval_seconds = 0.0
        # seconds x device count, summed as time passes: a stage resumed on other hardware stays exact
        self.train_device_seconds = 0.0
        self.eval_device_seconds = 0.0
        self.peak_memory_bytes = 0
        # From here on: in one process stages run one after another, and a stage's peak is its own.
        self._memory = PeakMemory(torch.device("cuda" if device.kind == "cuda" else "cpu"))
        self._memory.reset()
        self._train_started: float | None = None  # clock() while the training clock runs

    @classmethod
    def for_device(cls, device: torch.device | str, processes: int | None = None, **kwargs) -> "CostMeter":
        return cls(describe_device(device, processes), **kwargs)

    # -- counting ---------------------------------------------------------------------------------------------
    def step(self, batch_size: int, steps: int = 1, tokens_per_image: int | None = None, flops: int | None = None,
             mask_ratio: float | None = None) -> None:
        """Count `steps` optimizer steps of `batch_size` images each (the global batch, over all devices).

        `tokens_per_image`, `flops` (of one global step) and `mask_ratio` (the actual one) default to the stage's
        fixed values; a mask-ratio schedule passes each step's own."""
        tokens = self.tokens_per_image if tokens_per_image is None else int(tokens_per_image)
        self.steps += steps
        self.images_seen += steps * batch_size
        self.tokens_seen += steps * batch_size * tokens
        self.train_flops += steps * (self.flops_per_step if flops is None else int(flops))
        self.mask_ratio_sum += steps * (self.mask_ratio if mask_ratio is None else float(mask_ratio))

    @contextlib.contextmanager
    def training(self, sync: bool = True) -> Iterator["CostMeter"]:
        """Time the enclosed block as training (nesting `evaluating()` inside pauses it).

        `sync=False` skips the CUDA synchronisations around the block: for a block that synchronises by itself
        (a training step reads its loss), timed back to back, so that the host can queue the next step while the
        GPU finishes the last one's update. The clock then moves a step's queued tail into the next block; sums
        over many blocks stay right.
        """
        if self._train_started is not None:
            raise RuntimeError("CostMeter.training() is already running; do not nest it")
        if sync:
            self._sync()
        self._train_started = self._clock()
        try:
            yield self
        finally:
            if sync:
                self._sync()
            self._add_train(self._clock() - self._train_started)
            self._train_started = None
            self.update_peak_memory()

    @contextlib.contextmanager
    def evaluating(self) -> Iterator["CostMeter"]:
        """Time the enclosed block as evaluation; the training clock, if running, stops meanwhile."""
        self._sync()
        paused = self._train_started is not None
        now = self._clock()
        if paused:
            self._add_train(now - self._train_started)
        try:
            yield self
        finally:
            self._sync()
            end = self._clock()
            self.eval_seconds += end - now
            self.eval_device_seconds += (end - now) * self.device.count
            if paused:
                self._train_started = end
            self.update_peak_memory()

    def update_peak_memory(self) -> None:
        self.peak_memory_bytes = max(self.peak_memory_bytes, self._memory.peak())

    def _sync(self) -> None:
        # CUDA kernels run asynchronously: without a sync the clock would stop before the work is done.
        if self.device.kind == "cuda" and torch.cuda.is_available():
            torch.cuda.synchronize()

    def _add_train(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.train_device_seconds += seconds * self.device.count

    def _train_seconds_now(self) -> tuple[float, float]:
        """(train seconds, train device-seconds) including the clock that is running now."""
        running = 0.0 if self._train_started is None else self._clock() - self._train_started
        return self.train_seconds + running, self.train_device_seconds + running * self.device.count

    # -- reporting --------------------------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """The stage-local cost so far, to merge into an eval.jsonl row."""
        seconds, device_seconds = self._train_seconds_now()
        return {
            "images_seen": self.images_seen,
            "tokens_seen": self.tokens_seen,
            "train_flops": self.train_flops,
            "train_seconds": seconds,
            "device_hours": device_seconds / 3600.0,
        }

    def to_json(self) -> dict:
        """The content of cost.json (keys of docs/internals.md, plus device_kind and device_hours_unit). Under a
        mask-ratio schedule `flops_per_step` is the mean over the steps counted (rounded; `train_flops` is the exact
        sum), `mask_ratio` the mean actual ratio, and `mask_schedule` describes the schedule."""
        self.update_peak_memory()
        seconds, device_seconds = self._train_seconds_now()
        scheduled = self.mask_schedule is not None and self.steps > 0
        out = {
            "device": self.device.name,
            "device_kind": self.device.kind,
            "device_count": self.device.count,
            "device_hours_unit": self.device.hours_unit,
            "train_seconds": seconds,
            "eval_seconds": self.eval_seconds,
            "device_hours": device_seconds / 3600.0,
            "eval_device_hours": self.eval_device_seconds / 3600.0,
            "steps": self.steps,
            "images_seen": self.images_seen,
            "tokens_seen": self.tokens_seen,
            "flops_per_step": (self.train_flops + self.steps // 2) // self.steps if scheduled else self.flops_per_step,
            "train_flops": self.train_flops,
            "peak_memory_bytes": self.peak_memory_bytes,
            "images_per_second": self.images_seen / seconds if seconds > 0 else 0.0,
            "tokens_per_second": self.tokens_seen / seconds if seconds > 0 else 0.0,
            "mask": self.mask,
            "mask_ratio": self.mask_ratio_sum / self.steps if scheduled else self.mask_ratio,
        }
        if self.mask_schedule is not None:
            out["mask_schedule"] = self.mask_schedule
        return out

    def write(self, path: str | os.PathLike) -> None:
        """Write cost.json atomically (temp file + rename), so a reader never sees half a file."""
        atomic_write_text(path, json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")

    # -- resume -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        seconds, device_seconds = self._train_seconds_now()
        return {
            "device": asdict(self.device),
            "steps": self.steps,
            "images_seen": self.images_seen,
            "tokens_seen": self.tokens_seen,
            "train_flops": self.train_flops,
            "train_seconds": seconds,
            "train_device_seconds": device_seconds,
            "eval_seconds": self.eval_seconds,
            "eval_device_seconds": self.eval_device_seconds,
            "peak_memory_bytes": self.peak_memory_bytes,
            "mask_ratio_sum": self.mask_ratio_sum,
            "measured": [[visible, tokens, flops] for visible, (tokens, flops) in sorted(self.measured.items())],
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint. The device stays the current one: a stage resumed on other
        hardware keeps its earlier device-hours, and later seconds count with the current device count."""
        for key in ("steps", "images_seen", "tokens_seen", "train_flops", "peak_memory_bytes"):
            setattr(self, key, int(state[key]))
        for key in ("train_seconds", "train_device_seconds", "eval_seconds", "eval_device_seconds"):
            setattr(self, key, float(state[key]))
        # (checkpoints made before mask-ratio schedules lack these two)
        self.mask_ratio_sum = float(state.get("mask_ratio_sum", 0.0))
        self.measured = {int(visible): (int(tokens), int(flops))
                         for visible, tokens, flops in state.get("measured", [])}
        if self._train_started is not None:
            self._train_started = self._clock()

