"""Masks on the patch grid for masked diffusion pretraining (MaskDM, Lei et al. 2023).

A mask is drawn per image over the `grid x grid` patches of the backbone, flattened row-major to `[batch, N]`
with `N = grid**2`; True means *masked* (the patch is dropped before the transformer and not scored by the loss).
Every row of one batch masks the same number of patches, so the model can gather the visible tokens into a
rectangular tensor.

The strategies of the paper:

- `PatchMask(ratio)`: `floor(ratio * N)` random patches.
- `BlockMask(ratio, block_size)`: whole `b x b` squares of patches, aligned to the `b`-grid;
  `floor(ratio * N) // b**2` of them, so the actual ratio rounds down (block 4 at 90% on 16x16 masks 87.5%).
- `CropMask(crop_size)`: one random `c x c` square of patches stays visible, the rest is masked.
- `NoMask()`: nothing is masked; `sample` returns None and the model runs on the whole image.

Each is a gin-configurable dataclass "spec": its fields are its parameters (`dataclasses.asdict`), it is cheap to
build and it draws masks with `sample`. Sampling is vectorised: choosing k of n items is an argsort of uniform
noise per row, never a Python loop over patches.

`RatioSchedule` makes the ratio of a `PatchMask` or `BlockMask` a function of the training step (`Stage.mask_schedule`:
constant, linear or cosine from `start` to `end`, or step-wise), so that a curriculum from 90% down to 0 can be
compared with the two-stage switch. Each step's mask is the stage's mask with that step's ratio (`mask_at`), rounded
to whole patches or blocks as above; every row of one step still masks the same count.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import gin
from harness.errors import HarnessError

if TYPE_CHECKING:  # torch is imported where masks are drawn: specs and plans do not need it
    import torch

# A ratio like 0.29 is 0.28999999999999998 in binary; without this slack floor(0.29 * 100) would give 28.
_FLOOR_SLACK = 1e-9


def _floor_count(ratio: float, n: int) -> int:
    return int(math.floor(ratio * n + _FLOOR_SLACK))


def _check_grid(grid: int) -> None:
    if not isinstance(grid, int) or grid < 1:
        raise HarnessError(f"the patch grid must be a positive integer, got {grid!r}")


def _check_ratio(kind: str, ratio: float) -> None:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise HarnessError(
            f"{kind}.ratio must be in [0, 1) (the fraction of patches to mask), got {ratio!r}; "
            "use NoMask() for no masking"
        )


def _choose(batch: int, n: int, k: int, generator: torch.Generator | None, device) -> torch.Tensor:
    """A bool [batch, n] tensor with exactly k True per row, uniformly at random."""
    import torch

    noise = torch.rand(batch, n, generator=generator, device=device)
    chosen = noise.argsort(dim=1)[:, :k]
    out = torch.zeros(batch, n, dtype=torch.bool, device=device)
    return out.scatter_(1, chosen, True)


def _draw_device(generator: torch.Generator | None, device):
    """Random numbers are drawn where the generator lives (a CPU generator cannot fill a CUDA tensor)."""
    return generator.device if generator is not None else device


class Mask:
    """Common interface; subclasses are dataclasses whose fields are the mask's parameters."""

    @property
    def name(self) -> str:
        raise NotImplementedError

    def validate(self, grid: int) -> None:
        """Raise HarnessError if the parameters do not fit a `grid x grid` patch grid."""
        _check_grid(grid)

    def num_masked(self, grid: int) -> int:
        raise NotImplementedError

    def actual_ratio(self, grid: int) -> float:
        """The fraction of patches really masked (after rounding to whole blocks / the crop)."""
        return self.num_masked(grid) / grid**2

    def num_visible(self, grid: int) -> int:
        return grid**2 - self.num_masked(grid)

    def sample(
        self, batch: int, grid: int, generator: torch.Generator | None = None, device=None
    ) -> torch.Tensor | None:
        """A bool [batch, grid*grid] mask, True = masked, `num_masked(grid)` True in every row."""
        raise NotImplementedError


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NoMask(Mask):
    """No masking: the model sees (and the loss scores) every patch."""

    @property
    def name(self) -> str:
        return "none"

    def num_masked(self, grid: int) -> int:
        self.validate(grid)
        return 0

    def sample(self, batch, grid, generator=None, device=None) -> None:
        self.validate(grid)
        return None


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PatchMask(Mask):
    """Mask `floor(ratio * N)` patches chosen uniformly at random (MAE-style)."""

    ratio: float = 0.5

    @property
    def name(self) -> str:
        return "patch"

    def validate(self, grid: int) -> None:
        _check_grid(grid)
        _check_ratio("PatchMask", self.ratio)

    def num_masked(self, grid: int) -> int:
        self.validate(grid)
        return _floor_count(self.ratio, grid**2)

    def sample(self, batch, grid, generator=None, device=None) -> torch.Tensor:
        k = self.num_masked(grid)
        mask = _choose(batch, grid**2, k, generator, _draw_device(generator, device))
        return mask.to(device) if device is not None else mask


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BlockMask(Mask):
    """Mask whole `block_size x block_size` squares of patches, aligned to the block grid."""

    ratio: float = 0.5
    block_size: int = 4

    @property
    def name(self) -> str:
        return f"block{self.block_size}"

    def validate(self, grid: int) -> None:
        _check_grid(grid)
        _check_ratio("BlockMask", self.ratio)
        b = self.block_size
        if not isinstance(b, int) or b < 1 or grid % b != 0:
            divisors = [d for d in range(1, grid + 1) if grid % d == 0]
            raise HarnessError(
                f"BlockMask.block_size={b!r} does not divide the {grid}x{grid} patch grid; "
                f"choose one of {divisors}"
            )

    def num_blocks(self, grid: int) -> int:
        self.validate(grid)
        return _floor_count(self.ratio, grid**2) // self.block_size**2

    def num_masked(self, grid: int) -> int:
        return self.num_blocks(grid) * self.block_size**2

    def sample(self, batch, grid, generator=None, device=None) -> torch.Tensor:
        count = self.num_blocks(grid)  # validates first
        b = self.block_size
        side = grid // b  # blocks per side
        blocks = _choose(batch, side * side, count, generator, _draw_device(generator, device))
        # [batch, side, side] -> every block covers b x b patches of the [grid, grid] patch grid
        mask = blocks.view(batch, side, 1, side, 1).expand(batch, side, b, side, b).reshape(batch, grid * grid)
        return mask.to(device) if device is not None else mask


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CropMask(Mask):
    """Keep one random `crop_size x crop_size` square of patches visible; mask everything else."""

    crop_size: int = 8

    @property
    def name(self) -> str:
        return f"crop{self.crop_size}"

    def validate(self, grid: int) -> None:
        _check_grid(grid)
        c = self.crop_size
        if not isinstance(c, int) or not 1 <= c <= grid:
            raise HarnessError(
                f"CropMask.crop_size={c!r} does not fit the {grid}x{grid} patch grid; use 1..{grid} "
                "(the side of the visible square, in patches)"
            )

    def num_masked(self, grid: int) -> int:
        self.validate(grid)
        return grid**2 - self.crop_size**2

    def sample(self, batch, grid, generator=None, device=None) -> torch.Tensor:
        import torch

        self.validate(grid)
        c = self.crop_size
        draw_on = _draw_device(generator, device)
        corner = torch.randint(0, grid - c + 1, (batch, 2), generator=generator, device=draw_on)
        pos = torch.arange(grid, device=draw_on)
        inside = (pos >= corner[:, :, None]) & (pos < corner[:, :, None] + c)  # [batch, (row, col), grid]
        visible = inside[:, 0, :, None] & inside[:, 1, None, :]  # [batch, grid, grid]
        mask = ~visible.reshape(batch, grid * grid)
        return mask.to(device) if device is not None else mask


def describe(mask: Mask, grid: int) -> dict:
    """Plain-data description for run folders and cost records: name, parameters and the actual ratio."""
    return {
        "name": mask.name,
        "params": dataclasses.asdict(mask),
        "num_masked": mask.num_masked(grid),
        "actual_ratio": mask.actual_ratio(grid),
    }


SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")


def _is_ratio(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RatioSchedule:
    """The mask ratio as a function of the training step (`Stage.mask_schedule`); steps count from 0.

    - 'constant': `start` at every step.
    - 'linear', 'cosine': from `start` at step 0 to `end` at `end_step` (None: the stage's last step, steps - 1),
      and `end` after it; 'cosine' follows half a cosine wave (slow, fast, slow).
    - 'step': `start` before the first milestone, then `values[i]` from step `milestones[i]` on.

    `end` and `end_step` belong to linear and cosine, `milestones` and `values` to step. The ratio of a step is
    nominal: the mask rounds it down to whole patches or blocks (`mask_at(...).actual_ratio(grid)` is what a
    step masks), and 0 masks nothing (every patch visible, through the masked code path).
    """

    start: float = 0.9
    end: float = 0.0
    kind: str = "linear"
    end_step: int | None = None
    milestones: tuple[int, ...] = ()
    values: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        from harness.config import check_field_types

        check_field_types(self, "RatioSchedule")
        if not isinstance(self.milestones, (list, tuple)) or not isinstance(self.values, (list, tuple)):
            raise HarnessError("RatioSchedule.milestones and .values must be sequences, e.g. milestones = (1000, "
                               f"2000), values = (0.5, 0.0); got {self.milestones!r} and {self.values!r}")
        # one spelling per schedule: gin lists become tuples, integer ratios floats (so equal schedules hash alike)
        object.__setattr__(self, "milestones", tuple(self.milestones))
        object.__setattr__(self, "values", tuple(float(v) if _is_ratio(v) else v for v in self.values))
        if self.kind not in SCHEDULE_KINDS:
            raise HarnessError(f"RatioSchedule.kind = {self.kind!r}; use one of {SCHEDULE_KINDS}")
        for key in ("start", "end"):
            if not _is_ratio(getattr(self, key)):
                raise HarnessError(f"RatioSchedule.{key} = {getattr(self, key)!r} must be a ratio in [0, 1) (the "
                                   "fraction of patches to mask)")
        if self.kind == "step":
            ms, vs = self.milestones, self.values
            if not ms or len(ms) != len(vs):
                raise HarnessError(f"RatioSchedule(kind='step') needs as many values as milestones, at least one; "
                                   f"got milestones = {ms} and values = {vs}")
            if not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in ms) or \
                    any(a >= b for a, b in zip(ms, ms[1:])):
                raise HarnessError(f"RatioSchedule.milestones = {ms} must be increasing steps of at least 1 "
                                   "(step 0 has the ratio `start`)")
            if not all(_is_ratio(v) for v in vs):
                raise HarnessError(f"RatioSchedule.values = {vs} must be ratios in [0, 1)")
        elif self.milestones or self.values:
            raise HarnessError(f"RatioSchedule(kind={self.kind!r}) takes no milestones or values (kind='step' "
                               "does)")
        if self.end_step is not None and (self.kind not in ("linear", "cosine") or self.end_step < 1):
            raise HarnessError(f"RatioSchedule.end_step = {self.end_step!r}: only a linear or cosine schedule "
                               "has one, a step of at least 1 (None: the stage's last step)")

    def last_step(self, stage_steps: int) -> int:
        """The step at which a linear or cosine schedule reaches `end`."""
        return self.end_step if self.end_step is not None else stage_steps - 1

    def ratio_at(self, step: int, stage_steps: int) -> float:
        """The nominal ratio of step `step` (0-based) of a stage of `stage_steps` steps."""
        if self.kind == "constant":
            return self.start
        if self.kind == "step":
            ratio = self.start
            for milestone, value in zip(self.milestones, self.values):
                if step >= milestone:
                    ratio = value
            return ratio
        last = self.last_step(stage_steps)
        progress = 1.0 if last <= 0 else min(max(step / last, 0.0), 1.0)
        weight = 1.0 - progress if self.kind == "linear" else (1.0 + math.cos(math.pi * progress)) / 2.0
        ratio = self.start * weight + self.end * (1.0 - weight)  # exactly start at weight 1, end at weight 0
        return min(max(ratio, min(self.start, self.end)), max(self.start, self.end))

    def mask_at(self, mask: Mask, step: int, stage_steps: int) -> Mask:
        """`mask` with the ratio of step `step`: what that step samples."""
        return dataclasses.replace(mask, ratio=self.ratio_at(step, stage_steps))

    def check(self, mask: Mask, grid: int, stage_steps: int) -> None:
        """Raise HarnessError unless the schedule can set `mask`'s ratio at every step of the stage: the mask has a
        ratio, every ratio it takes fits the grid (the extremes and each value are checked: a linear or cosine
        ratio lies between its ends), and the schedule's steps lie within the stage."""
        if "ratio" not in {f.name for f in dataclasses.fields(mask)}:
            what = "no mask (NoMask)" if isinstance(mask, NoMask) else f"{type(mask).__name__}, which has no ratio"
            raise HarnessError(f"a mask_schedule sets the ratio of the stage's mask, but the stage has {what}; "
                               "bind Stage.mask = @BlockMask() or @PatchMask(), or drop the schedule")
        ratios = {"constant": (self.start,), "step": (self.start, *self.values)}.get(self.kind, (self.start, self.end))
        for ratio in ratios:
            dataclasses.replace(mask, ratio=ratio).validate(grid)
        if self.kind in ("linear", "cosine") and self.end_step is not None and self.end_step > stage_steps - 1:
            raise HarnessError(f"RatioSchedule.end_step = {self.end_step} is past the stage's last step "
                               f"({stage_steps - 1}): the ratio would never reach `end`; lower it or leave it None")
        if self.kind == "step" and self.milestones[-1] > stage_steps - 1:
            raise HarnessError(f"RatioSchedule.milestones = {self.milestones} go past the stage's last step "
                               f"({stage_steps - 1}): a milestone there changes nothing; drop it")

    def mean_actual_ratio(self, mask: Mask, grid: int, stage_steps: int, points: int = 20_000) -> float:
        """The mean of the ratio the stage's steps actually mask (after rounding), over every step, or over
        `points` evenly spaced steps of a longer stage: what the plan and the report call the stage's ratio."""
        steps = range(stage_steps) if stage_steps <= points else (
            round(i * (stage_steps - 1) / (points - 1)) for i in range(points))
        ratios = [self.mask_at(mask, s, stage_steps).actual_ratio(grid) for s in steps]
        return sum(ratios) / len(ratios)

    def describe(self, stage_steps: int) -> dict:
        """Plain data for cost.json: the parameters, `end_step` resolved for linear and cosine."""
        out = dataclasses.asdict(self)
        out.update(milestones=list(self.milestones), values=list(self.values))
        if self.kind in ("linear", "cosine"):
            out["end_step"] = self.last_step(stage_steps)
        return out
