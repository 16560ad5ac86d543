"""The training loop of one stage, readable top to bottom.

Reproducibility by construction: the images, flips, time steps, noise and masks of step `s` are drawn from
generators seeded by (stage seed, s), never from a running random state. A resumed stage therefore needs only
the weights, EMA, optimizer, scaler, cost counters and the step to continue exactly where it stopped, and a
data-parallel run sees the same global batch as a single process (each rank takes its slice).
"""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from harness.checkpoint import load_checkpoint, load_weights_strictly, newest_valid_checkpoint, save_checkpoint
from harness.compute import (
    InPrecision,
    WithAttentionKernel,
    autocast_dtype,
    autocast_to,
    check_attention_kernel,
    dtype_name,
)
from harness.cost import CostMeter, measure_step_flops
from harness.datasets import to_device
from harness.errors import HarnessError
from harness.experiment import Stage
from harness.fileio import append_jsonl, read_jsonl, rewrite_jsonl
from harness.patches import visible_indices
from harness.ranks import from_rank0
from harness.run_folder import CHECKPOINTS_DIR, EVAL_FILE, METRICS_FILE, SAMPLES_DIR, step_name
from harness.tensorboard_events import TensorBoardEvents
from harness.update import NonFiniteLoss, UpdateRule

log = logging.getLogger(__name__)

# evaluate(ema_model, diffusion, step, cost_snapshot) -> the eval.jsonl row written (or None); called on every rank
# at the same steps (each samples its share, rank 0 scores and writes: harness/evaluate.py)
EvaluateFn = Callable[[nn.Module, Any, int, dict], "dict | None"]


@dataclass
class TrainContext:
    """What the stage worker hands the loop."""

    spec: Stage
    stage_id: str
    run_dir: Path
    device: torch.device
    init_weights: dict[str, torch.Tensor] | None = None  # parent / external weights, loaded strictly
    init_source: str = ""  # where init_weights came from, for the log
    stop_event: Any = None  # threading.Event-like: when set, checkpoint at the next step and stop
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _step_seed(seed: int, step: int, salt: int = 0) -> int:
    return (seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1)


class BatchOrder:
    """Epoch-wise random permutations; the indices of a step are a pure function of (seed, step)."""

    def __init__(self, num_items: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = num_items, batch_size, seed
        self._cached: tuple[int, torch.Tensor] | None = None

    def _perm(self, epoch: int) -> torch.Tensor:
        if self._cached is None or self._cached[0] != epoch:
            gen = torch.Generator().manual_seed(_step_seed(self.seed, epoch, salt=17))
            self._cached = (epoch, torch.randperm(self.n, generator=gen))
        return self._cached[1]

    def indices(self, step: int) -> torch.Tensor:
        chunks, pos, need = [], step * self.batch_size, self.batch_size
        while need > 0:
            epoch, offset = divmod(pos, self.n)
            take = min(need, self.n - offset)
            chunks.append(self._perm(epoch)[offset:offset + take])
            pos, need = pos + take, need - take
        return torch.cat(chunks)


class Trainer:
    """Holds one stage's live objects; `run()` trains from the newest checkpoint to the last step."""

    def __init__(self, ctx: TrainContext, evaluate: EvaluateFn | None = None) -> None:
        self.ctx, self.spec, self.evaluate = ctx, ctx.spec, evaluate
        spec, device = ctx.spec, ctx.device
        if spec.batch_size % ctx.world_size:
            raise HarnessError(f"batch_size {spec.batch_size} is not divisible by the {ctx.world_size} ranks")
        self.local_batch = spec.batch_size // ctx.world_size
        self.micro_batch = min(spec.micro_batch_size or self.local_batch, self.local_batch)
        if self.local_batch % self.micro_batch:
            raise HarnessError(f"micro_batch_size {self.micro_batch} must divide the per-rank batch "
                               f"{self.local_batch}")

        torch.manual_seed(spec.seed)  # the initial weights depend on the seed alone
        self.model = spec.model.build().to(device)
        if ctx.init_weights is not None:
            report = load_weights_strictly(self.model, ctx.init_weights, ctx.init_source or "the parent stage")
            log.warning("stage %s: %s", spec.name, report)  # loudly, on purpose
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.autocast_dtype = autocast_dtype(spec.precision, device)
        for head_dim in sorted(spec.model.attention_head_dims()):  # the encoder's, and a decoder's
            check_attention_kernel(spec.attention, device, self.autocast_dtype, head_dim)
        self.ddp = ctx.world_size > 1  # (the compiled wrapper hides the DDP module's type, hence a flag)
        # What the step calls (the model, wrapped for DDP and/or compiled) and what evaluation and sample grids
        # call (the EMA model in the stage's precision, maybe compiled). The wrappers share the parameters of
        # `model` and `ema`: checkpoints, EMA updates and FLOP counts keep using the plain modules.
        self.net, ema_net = self.model, self.ema
        if spec.attention != "auto":
            self.net, ema_net = (WithAttentionKernel(m, spec.attention) for m in (self.net, ema_net))
        if self.ddp:
            # No buffer sync at each forward: the models' buffers (fixed sin-cos position embeddings: the U-ViT
            # decoder's, the DiT's) are computed alike on every rank and never change. torch >= 2.13 names that
            # `forward_sync_buffers` and warns (FutureWarning, on every rank) on the older `broadcast_buffers`.
            import inspect

            no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                       inspect.signature(nn.parallel.DistributedDataParallel).parameters else "broadcast_buffers")
            self.net = nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None, **{no_sync: False})
        if spec.compile != "off":  # a mask hides a fixed count of patches: static shapes, except under a ratio
            # schedule, where the second count makes torch.compile recompile with a dynamic token dimension
            log.info("stage %s: torch.compile (mode %s); the first steps and the first sampling batch compile",
                     spec.name, spec.compile)
            if spec.compile == "reduce-overhead" and spec.mask_schedule is not None:
                log.warning("stage %s: compile 'reduce-overhead' under a mask-ratio schedule records a CUDA graph "
                            "per count of visible patches (up to one per step of a linear schedule); 'default' "
                            "avoids that", spec.name)
            self.net = torch.compile(self.net, mode=spec.compile)
            ema_net = torch.compile(ema_net, mode=spec.compile)  # (with its attention-kernel wrapper)
        # Sampling (evaluation and sample grids) in the stage's autocast, or in float32 when the stage's
        # EvalConfig.sample_precision says so (MaskDM samples in float32).
        eval_precision = getattr(spec.eval, "sample_precision", "autocast")
        self.sample_dtype = None if eval_precision == "fp32" else self.autocast_dtype
        self.sampling_net: nn.Module = InPrecision(ema_net, device.type, self.sample_dtype)
        self.update = UpdateRule(spec, self.model, self.ema, device, self.autocast_dtype)
        self.diffusion = spec.diffusion.build(device)
        self.dataset = spec.data.build()
        if spec.data.latent is not None:  # the VAE's latents of those images, encoded once and cached (latent.py)
            from harness.latent import LatentImages

            self.dataset = LatentImages.encode(self.dataset, spec.data.latent, device)
        self.order = BatchOrder(len(self.dataset), spec.batch_size, spec.seed)
        self.grid = spec.model.grid
        schedule = None if spec.mask_schedule is None else spec.mask_schedule.describe(spec.steps)
        self.cost = CostMeter.for_device(device, ctx.world_size, mask=spec.mask.name,
                                         mask_ratio=spec.mask.actual_ratio(self.grid), mask_schedule=schedule)
        self.step = 0
        self.events = TensorBoardEvents(ctx.run_dir, enabled=False)  # run() opens the stage's own
        self.loss_terms: dict[str, float] = {}  # the loss's terms at the last log step (MaskDiT), for its row

    @property
    def precision_name(self) -> str:
        """The stage's compute dtype as text: bfloat16 / float16 (autocast), or float32."""
        return dtype_name(self.autocast_dtype)

    def step_flops(self, step: int = 0) -> int:
        """FLOPs of one step of this rank's batch (forward + backward), measured on one image of step `step`'s batch
        and scaled: FLOPs are exactly linear in the batch."""
        x0, _, _, mask = self.draw(step)
        flops_one = measure_step_flops(self.model, self.diffusion, x0[:1], None if mask is None else mask[:1])
        self.model.zero_grad(set_to_none=True)
        return flops_one * self.local_batch

    def step_cost(self, step: int) -> dict[str, Any]:
        """What `CostMeter.step` counts for step `step` besides its images: nothing more for a fixed mask (the
        stage's one measurement holds); under a mask-ratio schedule that step's tokens per image, FLOPs of one global
        step and actual mask ratio. FLOPs depend on shapes alone: they are measured once per distinct count of
        visible patches, on the first step with it, and kept in the meter (`CostMeter.measured`, checkpointed)."""
        if self.spec.mask_schedule is None:
            return {}
        mask = self.mask_at(step)
        visible = mask.num_visible(self.grid)
        if visible not in self.cost.measured:
            self.cost.measured[visible] = (self.model.tokens_entering_blocks(self.draw(step)[3]),
                                           self.step_flops(step) * self.ctx.world_size)
        tokens, flops = self.cost.measured[visible]
        return {"tokens_per_image": tokens, "flops": flops, "mask_ratio": mask.actual_ratio(self.grid)}

    # -- one step ---------------------------------------------------------------------------------------------
    def mask_at(self, step: int):
        """The mask spec step `step` samples from: the stage's mask, with its schedule's ratio of that step if any."""
        schedule = self.spec.mask_schedule
        return self.spec.mask if schedule is None else schedule.mask_at(self.spec.mask, step, self.spec.steps)

    def draw(self, step: int) -> tuple[torch.Tensor, ...]:
        """This rank's slice of step `step`'s global batch: images, time steps, noise, and the mask as the indices
        of each image's visible patches (LongTensor [B, N_visible]; None without a mask).

        Masks are drawn on the CPU wherever the step runs (on a CPU device from the step's generator, after the
        time steps, noise and flips; on a GPU from a CPU generator of their own), and their indices computed
        there: `nonzero` on a GPU tensor would make the host wait for the device at every step.
        """
        spec, device = self.spec, self.ctx.device
        idx = self.order.indices(step)
        gen = torch.Generator(device=device).manual_seed(_step_seed(spec.seed, step))
        b = spec.batch_size
        shape = (b, spec.model.in_chans, spec.model.img_size, spec.model.img_size)
        t = torch.randint(0, self.diffusion.timesteps, (b,), generator=gen, device=device)
        noise = torch.randn(shape, generator=gen, device=device)
        flip = torch.rand(b, generator=gen, device=device) < 0.5 if spec.data.hflip else None
        mask_gen = gen if device.type == "cpu" else torch.Generator().manual_seed(_step_seed(spec.seed, step, 29))
        mask = self.mask_at(step).sample(b, self.grid, generator=mask_gen, device="cpu")
        lo, hi = self.ctx.rank * self.local_batch, (self.ctx.rank + 1) * self.local_batch
        x0 = self.dataset.get_batch(idx[lo:hi], device=device)
        if flip is not None:
            x0 = torch.where(flip[lo:hi, None, None, None], x0.flip(-1), x0)
        visible = None if mask is None else to_device(visible_indices(mask[lo:hi]), device)
        return x0, t[lo:hi], noise[lo:hi], visible

    def train_step(self, step: int, grad_norm_wanted: bool = True) -> tuple[float, float]:
        """Forward and backward for one global batch, micro-batch by micro-batch, then the update rule
        (harness/update.py); returns (the batch's loss, grad norm: NaN when not computed, see UpdateRule.finish)."""
        device = self.ctx.device
        self.update.start(step)
        x0, t, noise, mask = self.draw(step)
        if self.spec.compile == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's graph outputs are free to reuse
        n_micro = self.local_batch // self.micro_batch
        total = torch.zeros((), device=device)
        # MaskDiT's two terms (denoising on visible patches, reconstruction on masked ones), logged at log steps
        terms = torch.zeros(2, device=device) if self.spec.diffusion.mae_weight > 0 and mask is not None else None
        for i in range(n_micro):
            sl = slice(i * self.micro_batch, (i + 1) * self.micro_batch)
            # DDP all-reduces the gradients of the last micro-batch only
            sync = i == n_micro - 1 or not self.ddp
            with (self.net.no_sync() if not sync else contextlib.nullcontext()):
                with autocast_to(device.type, self.autocast_dtype):
                    args = (self.net, x0[sl], t[sl], noise[sl], None if mask is None else mask[sl])
                    out = self.diffusion.loss_terms_at(*args) if terms is not None else None
                    loss = out["loss"] if out is not None else self.diffusion.loss_at(*args)
                self.update.backward(loss / n_micro)
            total += loss.detach() / n_micro
            if terms is not None:
                terms += torch.stack([out["loss_denoise"], out["loss_mae"]]).detach() / n_micro
        if self.ddp:  # the whole batch's loss: every rank then takes the same decision (and logs it)
            dist.all_reduce(total)
            total /= self.ctx.world_size
            if terms is not None and grad_norm_wanted:
                dist.all_reduce(terms)
                terms /= self.ctx.world_size
        result = self.update.finish(step, total, grad_norm_wanted)
        if grad_norm_wanted:  # a log step: the row takes the terms (one more sync, at log steps only)
            self.loss_terms = {} if terms is None else dict(zip(("loss_denoise", "loss_mae"), terms.tolist()))
        return result

    # -- state ------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"stage_id": self.ctx.stage_id, "step": self.step, "model": self.model.state_dict(),
                "ema": self.ema.state_dict(), "optimizer": self.update.optimizer.state_dict(),
                "scaler": self.update.scaler.state_dict(), "cost": self.cost.state_dict()}

    def save(self) -> None:
        # A non-finite gradient that came with a finite loss (unchecked under nan_policy 'stop', see train_step)
        # spoils the weights: never checkpoint those, so that the last checkpoint stays a good one.
        if not bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):
            raise NonFiniteLoss(f"stage '{self.spec.name}': the weights became non-finite by step {self.step} "
                                "(a non-finite gradient); not checkpointed, the last good checkpoint is kept (lower "
                                "the lr, or set Stage.nan_policy = 'skip', which checks every step's gradients)")
        if self.ctx.is_main:
            save_checkpoint(self.ctx.run_dir / CHECKPOINTS_DIR, self.step, self.state_dict(),
                            keep=self.spec.keep_checkpoints)

    def resume(self) -> bool:
        """Continue from the newest valid checkpoint, if any; rows logged after it are about to be redone."""
        path = newest_valid_checkpoint(self.ctx.run_dir / CHECKPOINTS_DIR)
        if path is not None:
            state = load_checkpoint(path, map_location=self.ctx.device)
            if state.get("stage_id") != self.ctx.stage_id:
                raise HarnessError(f"{path} belongs to stage {state.get('stage_id')}, not {self.ctx.stage_id}; "
                                   "move the folder away or delete it")
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.update.optimizer.load_state_dict(state["optimizer"])
            self.update.scaler.load_state_dict(state["scaler"])
            self.cost.load_state_dict(state["cost"])
            self.step = int(state["step"])
            log.info("resumed stage %s from %s (step %d)", self.spec.name, path, self.step)
        if self.ctx.is_main:
            # A crash before the first checkpoint starts over from step 0: its rows go too. Evaluations after
            # the checkpoint scored weights the rerun may not reproduce bit for bit (GPU kernels): redone too.
            # (Rewriting also drops a line torn by a kill mid-append.)
            for name in (METRICS_FILE, EVAL_FILE):
                if (self.ctx.run_dir / name).is_file():
                    rows = read_jsonl(self.ctx.run_dir / name)
                    rewrite_jsonl(self.ctx.run_dir / name, [r for r in rows if r.get("step", 0) <= self.step])
        return path is not None

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self) -> str:
        """Train to `spec.steps`; returns 'done', or 'preempted' when the stop event was set."""
        self.resume()
        self.events = TensorBoardEvents(self.ctx.run_dir, self.spec.tensorboard, self.step, write=self.ctx.is_main)
        try:
            return self._train_from_here()
        finally:
            self.events.close()

    def _train_from_here(self) -> str:
        spec, ctx = self.spec, self.ctx
        if self.cost.flops_per_step == 0:
            self._measure_cost_per_step()
        # Rank 0's view for every rank (it alone writes and trims eval.jsonl, and on several nodes the others may
        # not see the file): every rank must take part in the same evaluations.
        evaluated = from_rank0({int(r["step"]) for r in read_jsonl(ctx.run_dir / EVAL_FILE) if "step" in r}
                                     if ctx.is_main else None)
        eval_steps = set(getattr(spec.eval, "steps", ()) or ()) if spec.eval is not None else set()
        # A run stopped while sampling or scoring right after a checkpoint resumes at that step, past the loop's
        # checks for it: do the grid and the evaluation that step owes before going on.
        if 0 < self.step < spec.steps:
            grid = ctx.run_dir / SAMPLES_DIR / step_name(self.step, ".png")
            if spec.sample_every and self.step % spec.sample_every == 0 and not grid.is_file():
                self.write_sample_grid()
            if self.step in eval_steps and self.step not in evaluated:
                self._evaluate()
                evaluated.add(self.step)
        progress = _Progress(spec, self.step, enabled=ctx.is_main)
        # images/s over training time only: checkpoints, sample grids and evaluations do not dilute it
        last_time, last_step = self.cost.train_seconds, self.step
        try:
            while self.step < spec.steps:
                if ctx.stop_event is not None and ctx.stop_event.is_set():
                    self.save()
                    return "preempted"
                with self.cost.training(sync=False):  # the step syncs once itself (its loss); see training()
                    log_now = (self.step + 1) % spec.log_every == 0 or self.step + 1 == spec.steps
                    loss, grad_norm = self.train_step(self.step, grad_norm_wanted=log_now)
                    self.cost.step(spec.batch_size, **self.step_cost(self.step))  # (measured before the loop)
                    self.step += 1
                if self.step % spec.log_every == 0 or self.step == spec.steps:
                    now = self.cost.train_seconds
                    ips = (self.step - last_step) * spec.batch_size / max(now - last_time, 1e-9)
                    last_time, last_step = now, self.step
                    row = {"step": self.step, "loss": loss, "grad_norm": grad_norm, "images_per_second": ips,
                           "lr": self.update.lr, "time": time.time()}
                    if spec.mask.name != "none":  # the actual ratio of the step just taken (Stage.mask_schedule)
                        row["mask_ratio"] = self.mask_at(self.step - 1).actual_ratio(self.grid)
                    row.update(self.loss_terms)  # MaskDiT's loss_denoise and loss_mae
                    if ctx.is_main:
                        append_jsonl(ctx.run_dir / METRICS_FILE, row)
                        self.events.training(row)
                    progress.log(row)
                progress.advance(self.step, loss)
                if self.step % spec.checkpoint_every == 0 and self.step < spec.steps:
                    self.save()
                if spec.sample_every and self.step % spec.sample_every == 0 and self.step < spec.steps:
                    self.write_sample_grid()
                if self.step in eval_steps and self.step not in evaluated and self.step < spec.steps:
                    self._evaluate()
                    evaluated.add(self.step)
        finally:
            progress.close()
        self.save()
        self.write_sample_grid()
        if spec.eval is not None and self.step not in evaluated:
            self._evaluate()
        return "done"

    def _measure_cost_per_step(self) -> None:
        """FLOPs of one global training step (every rank's batch) and the tokens per image in the blocks; under a
        mask-ratio schedule also those of each visible count the remaining steps will have and the meter does not
        hold yet (`step_cost`), so that no measurement runs on the training clock."""
        self.cost.flops_per_step = self.step_flops() * self.ctx.world_size
        self.cost.tokens_per_image = self.model.tokens_entering_blocks(self.draw(0)[3])
        if self.spec.mask_schedule is not None:
            for step in range(self.step, self.spec.steps):
                self.step_cost(step)

    def _evaluate(self) -> None:
        """Every rank evaluates (each samples its share of the images; rank 0 scores and writes), so every rank must
        call this at the same steps. The cost meter times it as evaluation: wall time, and device-hours for all
        ranks' devices (as when rank 0 evaluated alone and the others waited)."""
        if self.evaluate is None:
            return
        # the row says in which precision its samples were drawn (bf16 on a GPU by default)
        extra = {**self.cost.snapshot(), "sample_precision": dtype_name(self.sample_dtype)}
        with self.cost.evaluating():
            row = self.evaluate(self.sampling_net, self.diffusion, self.step, extra)
        if isinstance(row, dict):
            self.events.evaluation(row)  # (written by the main rank only)

    @torch.no_grad()
    def write_sample_grid(self) -> None:
        if not self.ctx.is_main or self.spec.num_sample_images <= 0:
            return
        from torchvision.utils import make_grid, save_image

        from harness.fileio import atomic_write_bytes
        from harness.latent import decoder_for
        from harness.sampling import SamplerConfig, sample_images

        spec = self.spec
        with self.cost.evaluating():
            sampler = SamplerConfig(kind="ddim", steps=spec.sample_steps, eta=1.0)
            images = sample_images(self.sampling_net, self.diffusion, sampler,
                                   n=spec.num_sample_images,
                                   shape=(spec.model.in_chans, spec.model.img_size, spec.model.img_size),
                                   seed=spec.seed, batch_size=spec.num_sample_images, device=self.ctx.device,
                                   decode=decoder_for(spec.data, self.ctx.device))  # latents: to images
        grid = make_grid((images + 1) / 2, nrow=int(math.ceil(math.sqrt(len(images)))))
        self.events.image_grid(self.step, grid)
        buffer = io.BytesIO()
        save_image(grid, buffer, format="png")
        atomic_write_bytes(self.ctx.run_dir / SAMPLES_DIR / step_name(self.step, ".png"), buffer.getvalue())


class _Progress:
    """A rich progress bar on a terminal; plain log lines (at log steps) when output goes to a file."""

    def __init__(self, spec: Stage, start: int, enabled: bool) -> None:
        self.spec, self.bar, self.task = spec, None, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(TextColumn(f"[bold]{spec.name}[/]"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]:.4f}"),
                                TextColumn("{task.fields[ips]:.1f} img/s"), TimeElapsedColumn(),
                                TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task(spec.name, total=spec.steps, completed=start, loss=float("nan"), ips=0.0)
            self.bar.start()

    def advance(self, step: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=loss)

    def log(self, row: dict) -> None:
        if self.bar is not None:
            self.bar.update(self.task, ips=row["images_per_second"])
        elif self.enabled:
            print(f"[{self.spec.name}] step {row['step']}/{self.spec.steps} loss {row['loss']:.4f} "
                  f"lr {row['lr']:.2e} {row['images_per_second']:.1f} img/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
