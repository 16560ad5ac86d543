"""DDPM and DDIM samplers, seeded per image so that the result does not depend on the batch size.

Every image i draws all its noise (the starting x_T and the noise of each stochastic step) from its own
generator seeded from (seed, i). Sampling n images in batches of 2 or of 64 therefore gives the same images (up
to the float rounding of the model's batched matmuls), and image i of a 10k evaluation is reproducible alone.

- DDPM (Ho et al. 2020): ancestral sampling through all T steps with the posterior variance beta-tilde.
- DDIM (Song et al. 2021): any number of steps S on the grid t_i = floor(i*T/S) - 1, i = S..1, and eta
  (eta=0 deterministic, eta=1 with the same variance as DDPM; with S = T and eta = 1 it *is* DDPM).
  MaskDM evaluates with DDIM, 250 steps, eta = 1.
The predicted x0 is clipped to [-1, 1] when `clip_x0` is set. What DDIM then uses as eps is
`eps_from_clipped_x0`: True (the default) recomputes eps from the clipped x0, so that (x0, eps) stay consistent
with x_t; False keeps the eps the model predicted, as MaskDM's `ddim_sample` does (gaussian_ddpm.py,
`model_predictions`, the pred_noise branch). The two differ only where x0 was clipped, and only for eps-predicting
models (x0 and v predictions always derive eps from the clipped x0, as MaskDM does too); DDPM's update does not
use eps at all. See docs/fidelity.md.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import gin
from harness.errors import HarnessError

if TYPE_CHECKING:  # torch is imported where images are sampled: a SamplerConfig in a plan does not need it
    import torch

KINDS = ("ddim", "ddpm")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    kind: str = "ddim"
    steps: int = 250
    eta: float = 1.0
    clip_x0: bool = True
    # When x0 is clipped: recompute eps from the clipped x0 (True), or keep the model's eps (False: MaskDM).
    # (Added later: left out of stage descriptions at its default, so existing stage ids do not move.)
    eps_from_clipped_x0: bool = dataclasses.field(default=True, metadata={"added_later": True})

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HarnessError(f"SamplerConfig.kind={self.kind!r} is not one of {list(KINDS)}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise HarnessError(f"SamplerConfig.steps must be a positive integer, got {self.steps!r}")
        # DDIM's eta interpolates deterministic (0) and DDPM's variance (1); above 1 the noise would exceed the
        # step's variance budget and the eps coefficient would be clamped to 0 (`_step_coefficients`).
        if not 0 <= self.eta <= 1:
            raise HarnessError(f"SamplerConfig.eta must be between 0 and 1 (DDIM), got {self.eta!r}")
        if not isinstance(self.eps_from_clipped_x0, bool):
            raise HarnessError(f"SamplerConfig.eps_from_clipped_x0 must be True or False, got "
                               f"{self.eps_from_clipped_x0!r}")

    @property
    def name(self) -> str:
        return "ddpm" if self.kind == "ddpm" else f"ddim{self.steps}_eta{self.eta:g}"

    def time_pairs(self, timesteps: int) -> list[tuple[int, int]]:
        """[(t, t_prev), ...] from t = T-1 down to t_prev = -1 (-1 stands for the clean image, abar = 1)."""
        if self.kind == "ddpm" and self.steps != timesteps:
            raise HarnessError(
                f"DDPM runs all {timesteps} diffusion steps but SamplerConfig.steps={self.steps}; "
                f"set SamplerConfig.steps = {timesteps}, or use kind='ddim' for fewer steps"
            )
        if self.steps > timesteps:
            raise HarnessError(f"SamplerConfig.steps={self.steps} exceeds the diffusion's {timesteps} time steps")
        grid = [(i * timesteps) // self.steps - 1 for i in range(self.steps + 1)]
        return [(grid[i], grid[i - 1]) for i in range(self.steps, 0, -1)]


def image_seed(seed: int, index: int) -> int:
    """The generator seed of image `index` under `seed`.

    CPU generators (mt19937) keep only 32 bits of a seed, so (seed, index) cannot simply be packed into 64 bits.
    Instead each seed picks a pseudo-random 32-bit offset and images count up from it: all images of one seed get
    distinct generators, and two seeds share one only if their offsets fall within n images of each other.
    """
    if index < 0 or seed < 0:
        raise HarnessError(f"seed and image index must be non-negative, got seed={seed}, index={index}")
    offset = int.from_bytes(hashlib.sha256(f"maskdm-harness:{seed}".encode()).digest()[:4], "little")
    return (offset + index) % 2**32


def _noise(generators: list[torch.Generator], shape: tuple[int, ...], device) -> torch.Tensor:
    import torch

    return torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])


def _step_coefficients(
    abar: list[float], t: int, t_prev: int, kind: str, eta: float
) -> tuple[float, float, float, float]:
    """(coefficient of x0, coefficient of x_t, coefficient of eps, noise std) for one step t -> t_prev."""
    a_t = abar[t]
    a_prev = abar[t_prev] if t_prev >= 0 else 1.0
    if kind == "ddpm":
        beta = 1 - a_t / a_prev
        c_x0 = math.sqrt(a_prev) * beta / (1 - a_t)
        c_xt = math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        return c_x0, c_xt, 0.0, math.sqrt(beta * (1 - a_prev) / (1 - a_t))
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    return math.sqrt(a_prev), 0.0, math.sqrt(max(1 - a_prev - sigma**2, 0.0)), sigma


def sample_batch(
    model,
    diffusion,
    sampler: SamplerConfig,
    indices: range,
    shape: tuple[int, int, int],
    seed: int,
    device,
    y: torch.Tensor | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Images number `indices` of the seeded sequence, [len(indices), C, H, W] on `device`, in [-1, 1].

    `decode` (latent space, harness/latent.py) turns the samples, then latents of `shape`, into images: x0 is
    then not clipped (latents are not bounded to [-1, 1], whatever `sampler.clip_x0` says) and the decoded images
    are clamped instead.
    """
    import torch

    with torch.inference_mode():
        device = torch.device(device)
        gens = [torch.Generator(device=device).manual_seed(image_seed(seed, i)) for i in indices]
        # one host copy of the schedule: the per-step coefficients are Python floats, no device syncs in the loop
        abar = diffusion.alphas_cumprod.double().cpu().tolist()
        x = _noise(gens, shape, device)
        y = None if y is None else y.to(device)
        for t, t_prev in sampler.time_pairs(diffusion.timesteps):
            t_batch = torch.full((len(gens),), t, device=device, dtype=torch.long)
            eps, x0 = diffusion.predict_eps_x0(model(x, t_batch, y=y).float(), x, t_batch)
            if sampler.clip_x0 and decode is None:
                x0 = x0.clamp(-1, 1)
                if sampler.eps_from_clipped_x0 or diffusion.cfg.prediction != "eps":
                    eps = diffusion.eps_from_x0(x, t_batch, x0)
            c_x0, c_xt, c_eps, std = _step_coefficients(abar, t, t_prev, sampler.kind, sampler.eta)
            x = c_x0 * x0 + c_xt * x + c_eps * eps
            if std > 0:
                x = x + std * _noise(gens, shape, device)
        return x.clamp(-1, 1) if decode is None else decode(x).clamp(-1, 1)


def rank_batches(n: int, batch_size: int, rank: int = 0, world_size: int = 1) -> list[range]:
    """The image index ranges (batches) that rank `rank` of `world_size` samples of n images.

    One process samples the batches [0, b), [b, 2b), ...; with several ranks, rank r takes batches r, r + W,
    r + 2W, ... of that same list. Every image keeps its index, hence its seed, and every batch its members, so
    the ranks together make the very images one process makes (on like devices, bit for bit: the batched matmuls
    round alike); a rank may get one batch more than another, or none when there are fewer batches than ranks.
    """
    if n < 0 or batch_size < 1:
        raise HarnessError(f"need n >= 0 and batch_size >= 1, got n={n}, batch_size={batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise HarnessError(f"rank {rank} is not one of {world_size} ranks")
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)][rank::world_size]


def sample_batches(
    model,
    diffusion,
    sampler: SamplerConfig,
    n: int,
    shape: tuple[int, int, int],
    seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    y: torch.Tensor | None = None,
    rank: int = 0,
    world_size: int = 1,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the n images in batches (on `device`), for callers that write them out instead of keeping them.

    With `world_size` > 1, only this rank's share: the batches `rank_batches(n, batch_size, rank, world_size)`.
    """
    batches = rank_batches(n, batch_size, rank, world_size)
    if y is not None and len(y) != n:
        raise HarnessError(f"got {len(y)} class labels for {n} images; give one label per image")
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            labels = None if y is None else y[idx.start : idx.stop]
            yield sample_batch(model, diffusion, sampler, idx, shape, seed, device, y=labels, decode=decode)
    finally:
        model.train(was_training)


def sample_images(
    model,
    diffusion,
    sampler: SamplerConfig,
    n: int,
    shape: tuple[int, int, int],
    seed: int = 0,
    batch_size: int = 64,
    device="cpu",
    y: torch.Tensor | None = None,
    progress: Callable[[int], None] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """n images [n, C, H, W] in [-1, 1] (on the CPU); `progress(images_done)` is called after every batch.
    With `decode` (latent space), `shape` is the latents' and the images are the decoded ones."""
    import torch

    out, done = [], 0
    for batch in sample_batches(model, diffusion, sampler, n, shape, seed, batch_size, device, y, decode=decode):
        out.append(batch.float().cpu())
        done += len(batch)
        if progress is not None:
            progress(done)
    return torch.cat(out) if out else torch.empty(0, *shape)
