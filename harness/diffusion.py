"""Gaussian diffusion (DDPM, Ho et al. 2020) with the masked denoising score matching loss of MaskDM.

Discrete time steps t = 0 .. T-1; `alphas_cumprod[t]` is the signal fraction of x_t = sqrt(a) x0 + sqrt(1-a) eps.
Schedules are computed in float64 (cumulative products of 1000 factors lose digits in float32) and stored as
float32 buffers on the chosen device, so nothing in the training step runs in float64.

The loss: the model is asked for its prediction (eps, x0 or v) on the *visible* patches only; the target is
patchified the same way and the same visible indices are gathered, so masked patches neither cost compute nor
enter the loss. Errors are averaged over the visible elements of each image, then over the batch; every image
of a batch has the same number of visible patches, so that is one mean. With no mask it is the ordinary DDPM
loss over the whole image.

MaskDiT (Zheng et al. 2023, Anima-Lab/MaskDiT train_utils/loss.py): a model with its decoder
(`DiTConfig.decoder_depth > 0`) predicts every patch under a mask. The denoising loss above is then taken on its
visible rows, and `DiffusionConfig.mae_weight` times MaskDiT's reconstruction loss is added on its masked rows: the
squared error between the model's output and the *noisy input* x_t, each patch of x_t normalised to zero mean and
unit variance (MAE's norm_pix_loss), averaged over the patch's values, then over the masked patches of each image
and over the batch. The reconstruction term is always a squared error (as MaskDiT), whatever `loss` says.
"""
from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import gin
from harness.errors import HarnessError

if TYPE_CHECKING:  # torch is imported where schedules and losses are computed: a DiffusionConfig does not need it
    import torch

SCHEDULES = ("linear", "cosine")
PREDICTIONS = ("eps", "x0", "v")
LOSSES = ("mse", "l1")
WEIGHTINGS = ("none", "min_snr")


def linear_betas(timesteps: int, start: float = 1e-4, end: float = 0.02) -> torch.Tensor:
    """Ho et al.'s linear schedule, defined for T=1000 and rescaled to other T (as in improved DDPM)."""
    import torch

    scale = 1000 / timesteps
    return torch.linspace(scale * start, scale * end, timesteps, dtype=torch.float64)


def linear_beta_max(timesteps: int, end: float = 0.02) -> float:
    """The largest beta of `linear_betas(timesteps)` (its last), without torch: what DiffusionConfig checks."""
    return 1000 / timesteps * end


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal's cosine schedule: alpha-bar(t) = cos^2((t/T + s)/(1 + s) * pi/2), betas clipped."""
    import torch

    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
    """Which noise schedule, how many steps, what the model predicts and how errors are scored."""

    schedule: str = "cosine"
    timesteps: int = 1000
    prediction: str = "eps"
    loss: str = "mse"
    # MaskDiT's reconstruction loss on the masked patches, weighted (its mae_loss_coef: 0.1); 0 = none. Needs a
    # model that predicts the masked patches (DiTConfig.decoder_depth > 0) and a masked stage (Stage checks both).
    # (Added later: left out of stage descriptions at its default, so existing ids stay as they were.)
    mae_weight: float = dataclasses.field(default=0.0, metadata={"added_later": True})
    # How the denoising error of each image is weighted by its noise level. 'none': the plain loss of `prediction`
    # (MaskDM). 'min_snr' (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): the
    # error is weighted as if measured on x0 with weight min(SNR_t, min_snr_gamma), SNR_t = abar / (1 - abar),
    # whatever the model predicts: so for eps the factor is min(SNR, gamma) / SNR, for v min(SNR, gamma) /
    # (SNR + 1), for x0 min(SNR, gamma). (Added later: left out of stage descriptions at their defaults.)
    weighting: str = dataclasses.field(default="none", metadata={"added_later": True})
    min_snr_gamma: float = dataclasses.field(default=5.0, metadata={"added_later": True})

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("schedule", self.schedule, SCHEDULES),
            ("prediction", self.prediction, PREDICTIONS),
            ("loss", self.loss, LOSSES),
            ("weighting", self.weighting, WEIGHTINGS),
        ):
            if value not in allowed:
                raise HarnessError(f"DiffusionConfig.{field}={value!r} is not one of {list(allowed)}")
        if not isinstance(self.timesteps, int) or self.timesteps < 2:
            raise HarnessError(f"DiffusionConfig.timesteps must be an integer >= 2, got {self.timesteps!r}")
        if self.schedule == "linear" and linear_beta_max(self.timesteps) >= 1:  # its betas grow as 1000/T
            raise HarnessError(f"DiffusionConfig.timesteps={self.timesteps} is too few for the linear schedule "
                               "(its betas reach 1 at 20 steps or fewer); use more steps or schedule='cosine'")
        weight = self.mae_weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise HarnessError(f"DiffusionConfig.mae_weight must be a number, 0 (off) or more, got {weight!r}")
        object.__setattr__(self, "mae_weight", float(weight))  # `= 1` and `= 1.0` describe one stage
        gamma = self.min_snr_gamma
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma > 0:
            raise HarnessError(f"DiffusionConfig.min_snr_gamma must be a positive number, got {gamma!r}")
        object.__setattr__(self, "min_snr_gamma", float(gamma))
        if self.weighting == "min_snr" and self.loss != "mse":  # the unit conversion below holds for squares only
            raise HarnessError("DiffusionConfig.weighting = 'min_snr' weights squared errors; set loss = 'mse' "
                               "or weighting = 'none'")

    def check_backbone(self, model, masked: bool) -> None:
        """Refuse a reconstruction weight that could not act: on a model that predicts only the visible patches
        (`model` is the backbone's spec) or on a stage without a mask (`masked`)."""
        if self.mae_weight <= 0:
            return
        if not getattr(model, "predicts_all_patches", False):
            raise HarnessError(f"DiffusionConfig.mae_weight = {self.mae_weight} scores the model's predictions of "
                               f"the masked patches, but {type(model).__name__} predicts the visible ones only; use "
                               "MaskDiT's decoder (Stage.model = @DiTConfig() with DiTConfig.decoder_depth > 0) or "
                               "set mae_weight = 0")
        if not masked:
            raise HarnessError(f"DiffusionConfig.mae_weight = {self.mae_weight} scores masked patches, but the "
                               "stage has no mask; set it for the masked stage only (e.g. "
                               "pretrain/DiffusionConfig.mae_weight = 0.1)")

    def build(self, device=None) -> "GaussianDiffusion":
        return GaussianDiffusion(self, device=device)


def _per_image(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped [B, 1, 1, ...] to broadcast over an ndim-dimensional batch."""
    return values[t].view(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """Schedule buffers, the forward process, the training loss and the conversions the samplers need."""

    def __init__(self, cfg: DiffusionConfig, device=None) -> None:
        import torch

        self.cfg = cfg
        self.timesteps = cfg.timesteps
        betas = linear_betas(cfg.timesteps) if cfg.schedule == "linear" else cosine_betas(cfg.timesteps)
        abar = torch.cumprod(1 - betas, dim=0)
        self.betas = betas.to(device=device, dtype=torch.float32)
        self.alphas_cumprod = abar.to(device=device, dtype=torch.float32)
        self.sqrt_abar = abar.sqrt().to(device=device, dtype=torch.float32)
        self.sqrt_one_minus_abar = (1 - abar).sqrt().to(device=device, dtype=torch.float32)
        # the weight of each time step's denoising error, [T]; None: the plain loss
        self.loss_weights = (None if cfg.weighting == "none"
                             else self._min_snr_weights(cfg, abar).to(device=device, dtype=torch.float32))

    @staticmethod
    def _min_snr_weights(cfg: DiffusionConfig, abar: torch.Tensor) -> torch.Tensor:
        """Min-SNR weights [T] in the units of `cfg.prediction` (float64 in, from the schedule)."""
        import torch

        snr = abar / (1 - abar)
        x0_weight = snr.clamp(max=cfg.min_snr_gamma)  # min-SNR, in x0 units
        # an error of the model's output in eps units is sqrt(SNR) times the x0 error, in v units sqrt(SNR + 1)
        per_unit = {"x0": torch.ones_like(snr), "eps": snr, "v": snr + 1}[cfg.prediction]
        return x0_weight / per_unit

    def to(self, device) -> "GaussianDiffusion":
        return GaussianDiffusion(self.cfg, device=device)

    # -- forward process -----------------------------------------------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        return _per_image(self.sqrt_abar, t, x0.ndim) * x0 + _per_image(self.sqrt_one_minus_abar, t, x0.ndim) * noise

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output at (x0, t, noise)."""
        if self.cfg.prediction == "eps":
            return noise
        if self.cfg.prediction == "x0":
            return x0
        # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
        return _per_image(self.sqrt_abar, t, x0.ndim) * noise - _per_image(self.sqrt_one_minus_abar, t, x0.ndim) * x0

    def predict_eps_x0(
        self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) implied by the model's output at x_t (whole images)."""
        a = _per_image(self.sqrt_abar, t, x_t.ndim)
        s = _per_image(self.sqrt_one_minus_abar, t, x_t.ndim)
        if self.cfg.prediction == "eps":
            eps = model_out
            x0 = (x_t - s * eps) / a
        elif self.cfg.prediction == "x0":
            x0 = model_out
            eps = (x_t - a * x0) / s
        else:
            x0 = a * x_t - s * model_out
            eps = s * x_t + a * model_out
        return eps, x0

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        return (x_t - _per_image(self.sqrt_abar, t, x_t.ndim) * x0) / _per_image(self.sqrt_one_minus_abar, t, x_t.ndim)

    # -- training ------------------------------------------------------------------------------------------------

    def training_loss(
        self,
        model,
        x0: torch.Tensor,
        mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Masked denoising score matching loss (scalar) of one batch x0 [B, C, H, W] in [-1, 1].

        t ~ U{0..T-1} and the noise are drawn from `generator` (on its device, then moved to x0's device).
        mask: bool [B, N], True = masked, or None for the ordinary DDPM loss. The LongTensor [B, N_visible] of
        `visible_indices(mask)` is accepted too: a trainer that draws masks on the CPU can compute the indices
        there and ship them to the GPU, avoiding the device sync of `nonzero`.
        """
        import torch

        b = x0.shape[0]
        draw_on = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.timesteps, (b,), generator=generator, device=draw_on).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=draw_on, dtype=x0.dtype).to(x0.device)
        return self.loss_at(model, x0, t, noise, mask=mask, y=y)

    def loss_at(
        self,
        model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss at given time steps and noise (what `training_loss` computes after drawing them)."""
        return self.loss_terms_at(model, x0, t, noise, mask=mask, y=y)["loss"]

    def loss_terms_at(
        self,
        model,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        mask: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The loss and its terms, scalars: `loss_denoise` (on the visible patches), with `mae_weight` > 0 and a
        mask also `loss_mae` (MaskDiT's reconstruction, on the masked patches), and `loss` = loss_denoise +
        mae_weight * loss_mae."""
        import torch.nn.functional as F

        from harness.patches import as_visible_indices, gather_patches, patchify

        x_t = self.q_sample(x0, t, noise)
        target = self.target(x0, t, noise)
        every_patch = None  # MaskDiT's decoder under a mask: the predictions of all N patches, [B, N, p*p*C]
        if mask is None:
            pred = model(x_t, t, y=y)
        else:
            if mask.ndim != 2 or mask.shape[0] != x0.shape[0]:
                raise HarnessError("the mask must be a bool tensor [batch, num_patches] (True = masked) "
                                   "or its visible indices [batch, num_visible]")
            # once per step, shared by the model's gather and the target's
            idx = as_visible_indices(mask)
            pred = model(x_t, t, y=y, mask=idx)
            # the patch size follows from the prediction's width, and whether the model predicted every patch
            # (MaskDiT's decoder) or the visible ones from its rows: both work through DDP / compile wrappers
            p = math.isqrt(pred.shape[-1] // x0.shape[1])
            num_patches = (x0.shape[-2] // p) * (x0.shape[-1] // p)
            if pred.ndim == 3 and pred.shape[1] == num_patches != idx.shape[1]:
                every_patch = pred
                pred = gather_patches(every_patch, idx)
            target = gather_patches(patchify(target, p), idx)
        if pred.shape != target.shape:
            raise HarnessError(
                f"the model's prediction {tuple(pred.shape)} does not match the target {tuple(target.shape)}; "
                "check that the model's img_size / in_chans match the data"
            )
        # Every image has the same number of visible elements, so the mean over all of them equals the mean
        # over each image's visible elements followed by the mean over the batch.
        score = F.mse_loss if self.cfg.loss == "mse" else F.l1_loss
        if self.loss_weights is None:
            denoise = score(pred.float(), target.float())
        else:  # each image's mean error times its time step's weight, then the batch mean
            per_image = score(pred.float(), target.float(), reduction="none").flatten(1).mean(1)
            denoise = (per_image * self.loss_weights[t]).mean()
        terms = {"loss": denoise, "loss_denoise": denoise}
        if self.cfg.mae_weight > 0 and mask is not None:
            if every_patch is None and idx.shape[1] < num_patches:
                raise HarnessError(f"DiffusionConfig.mae_weight = {self.cfg.mae_weight} needs the model's "
                                   "predictions of the masked patches, and this model predicts the visible ones "
                                   "only; use MaskDiT's decoder (DiTConfig.decoder_depth > 0)")
            mae = self._reconstruction_loss(every_patch, patchify(x_t, p), idx)
            terms.update(loss=denoise + self.cfg.mae_weight * mae, loss_mae=mae)
        return terms

    @staticmethod
    def _reconstruction_loss(pred: torch.Tensor | None, noisy: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """MaskDiT's MAE loss (train_utils/loss.py `mae_loss`, norm_pix_loss): the predictions of all patches
        [B, N, P] against the noisy input's patches [B, N, P], each normalised by its own mean and (unbiased)
        variance; squared errors averaged per patch, then over the masked patches (those not in idx [B, N_v])."""
        import torch

        b, n, values = noisy.shape
        if pred is None or idx.shape[1] == n:  # nothing masked (a mask-ratio schedule at 0): nothing to rebuild
            return noisy.new_zeros((), dtype=torch.float32)
        if values < 2:
            raise HarnessError("MaskDiT's reconstruction loss normalises each patch by its variance, which needs "
                               "at least 2 values per patch; use a patch size above 1")
        noisy = noisy.float()
        target = (noisy - noisy.mean(dim=-1, keepdim=True)) / (noisy.var(dim=-1, keepdim=True) + 1e-6).sqrt()
        per_patch = (pred.float() - target).square().mean(dim=-1)  # [B, N]
        masked = torch.ones_like(per_patch).scatter(1, idx, 0.0)  # 1 on the masked patches, without a device sync
        return (per_patch * masked).sum() / (b * (n - idx.shape[1]))
