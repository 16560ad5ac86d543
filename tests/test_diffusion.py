"""Diffusion: schedules, forward process, prediction conversions, the masked loss, and that a model learns."""
from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)
import math
from pathlib import Path

import pytest
import torch

import gin
from harness.diffusion import DiffusionConfig
from harness.errors import HarnessError
from harness.masks import BlockMask, PatchMask
from harness.models.config import UViTConfig
from harness.patches import gather_patches, patchify, unpatchify, visible_indices

GIN_SCHEDULES = Path(__file__).resolve().parent.parent / "gin" / "schedules"


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_endpoints(schedule):
    d = DiffusionConfig(schedule=schedule).build()
    abar = d.alphas_cumprod
    assert abar.dtype == torch.float32 and abar.shape == (1000,)
    assert abar[0] > 0.999  # almost clean at t = 0
    assert abar[-1] < 1e-4  # almost pure noise at t = T-1
    assert torch.all(abar[1:] < abar[:-1])


def test_schedule_values():
    lin = DiffusionConfig(schedule="linear").build()
    assert lin.betas[0].item() == pytest.approx(1e-4) and lin.betas[-1].item() == pytest.approx(0.02)
    assert lin.alphas_cumprod[-1].item() == pytest.approx(math.prod(1 - (1e-4 + i * (0.02 - 1e-4) / 999)
                                                                    for i in range(1000)), rel=1e-4)
    cos = DiffusionConfig(schedule="cosine").build()
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):  # alpha-bar(t) = f(t+1)/f(0) until the 0.999 clip bites near T
        assert cos.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert cos.betas.max().item() == pytest.approx(0.999)


def test_q_sample_and_prediction_conversions():
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    t = torch.tensor([0, 400, 999])
    for prediction in ("eps", "x0", "v"):
        d = DiffusionConfig(prediction=prediction).build()
        a = d.alphas_cumprod[t].view(3, 1, 1, 1)
        x_t = d.q_sample(x0, t, noise)
        # (the module takes the square roots in float64, hence a float32-level tolerance)
        assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-4)
        # a perfect prediction of the target converts back into the true (eps, x0)
        eps, x0_hat = d.predict_eps_x0(d.target(x0, t, noise), x_t, t)
        assert torch.allclose(eps[1:], noise[1:], atol=1e-3) and torch.allclose(x0_hat[:2], x0[:2], atol=1e-3)


class ScaledInput(torch.nn.Module):
    """A stand-in model that predicts 0.5 * x_t, in the same masked/unmasked output format as MaskedUViT."""

    def forward(self, x, t, y=None, mask=None):
        if mask is None:
            return 0.5 * x
        idx = visible_indices(mask) if mask.dtype == torch.bool else mask
        return gather_patches(patchify(0.5 * x, 4), idx)


def test_masked_loss_is_the_mean_over_visible_elements():
    d = DiffusionConfig(schedule="linear").build()
    torch.manual_seed(1)
    x0, noise, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16), torch.tensor([100, 700])
    mask = PatchMask(0.75).sample(2, 4, generator=torch.Generator().manual_seed(0))
    loss = d.loss_at(ScaledInput(), x0, t, noise, mask=mask)
    assert d.loss_at(ScaledInput(), x0, t, noise, mask=visible_indices(mask)).item() == loss.item()
    x_t = d.q_sample(x0, t, noise)
    per_image = []
    for i in range(2):  # written out per image on purpose, independently of the vectorised code
        err = (patchify(0.5 * x_t - noise, 4)[i][~mask[i]]) ** 2
        per_image.append(err.mean())
    assert loss.item() == pytest.approx(torch.stack(per_image).mean().item(), rel=1e-6)
    assert d.loss_at(ScaledInput(), x0, t, noise).item() == pytest.approx(((0.5 * x_t - noise) ** 2).mean().item(),
                                                                          rel=1e-6)
    l1 = DiffusionConfig(schedule="linear", loss="l1").build().loss_at(ScaledInput(), x0, t, noise)
    assert l1.item() == pytest.approx((0.5 * x_t - noise).abs().mean().item(), rel=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_only_visible_patches_enter_the_loss(prediction):
    torch.manual_seed(0)
    model = UViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4).build()
    d = DiffusionConfig(prediction=prediction).build()
    x0, noise, t = torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16), torch.tensor([50, 600])
    mask = PatchMask(0.5).sample(2, 4, generator=torch.Generator().manual_seed(3))
    on_masked = unpatchify(mask[:, :, None].expand(-1, -1, 48).float(), 4, 3).bool()
    base = d.loss_at(model, x0, t, noise, mask=mask)
    # change the data and the noise (so the target, whatever the prediction) on masked patches: same loss
    x0_m, noise_m = torch.where(on_masked, -x0, x0), torch.where(on_masked, 3 * noise, noise)
    assert d.loss_at(model, x0_m, t, noise_m, mask=mask).item() == pytest.approx(base.item(), rel=1e-5)
    # change them on visible patches: the loss moves
    x0_v, noise_v = torch.where(on_masked, x0, -x0), torch.where(on_masked, noise, 3 * noise)
    assert abs(d.loss_at(model, x0_v, t, noise_v, mask=mask).item() - base.item()) > 1e-3


class PredictsFromX0:
    """A stand-in model whose x0 estimate is a fixed function of x0 (x0 + delta), output in the
    parameterisation of `d`: the same estimate, so min-SNR weighting must give the same loss for all three."""

    def __init__(self, d, x0, t, delta):
        self.d, self.x0_hat, self.t = d, x0 + delta, t

    def __call__(self, x_t, t, y=None, mask=None):
        eps_hat = self.d.eps_from_x0(x_t, self.t, self.x0_hat)
        return self.d.target(self.x0_hat, self.t, eps_hat)  # eps, x0 or v of the estimate


def test_min_snr_weighting_is_the_x0_error_weighted_by_min_snr_whatever_the_prediction():
    torch.manual_seed(2)
    x0, noise = torch.rand(3, 3, 8, 8) * 2 - 1, torch.randn(3, 3, 8, 8)
    delta = 0.1 * torch.randn(3, 3, 8, 8)
    t = torch.tensor([150, 500, 900])  # SNR above, near and below gamma = 5 under the cosine schedule
    losses = {}
    for prediction in ("eps", "x0", "v"):
        d = DiffusionConfig(prediction=prediction, weighting="min_snr", min_snr_gamma=5).build()
        losses[prediction] = d.loss_at(PredictsFromX0(d, x0, t, delta), x0, t, noise).item()
    abar = DiffusionConfig().build().alphas_cumprod[t]
    snr = abar / (1 - abar)
    assert snr[0] > 5 > snr[2]
    written_out = (delta.pow(2).flatten(1).mean(1) * snr.clamp(max=5)).mean().item()
    for prediction, loss in losses.items():
        assert loss == pytest.approx(written_out, rel=1e-4), prediction
    # unweighted, the three parameterisations score the same estimate differently
    plain = {p: DiffusionConfig(prediction=p).build() for p in ("eps", "x0", "v")}
    unweighted = {p: d.loss_at(PredictsFromX0(d, x0, t, delta), x0, t, noise).item() for p, d in plain.items()}
    assert unweighted["x0"] == pytest.approx(delta.pow(2).mean().item(), rel=1e-5)
    assert unweighted["eps"] > 2 * unweighted["x0"]


def test_training_loss_is_seeded():
    torch.manual_seed(0)
    model = UViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4).build()
    d = DiffusionConfig().build()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    losses = [d.training_loss(model, x0, generator=torch.Generator().manual_seed(s)).item() for s in (7, 7, 8)]
    assert losses[0] == losses[1] and losses[0] != losses[2]


def structured_batch(n: int, generator: torch.Generator) -> torch.Tensor:
    """Images with real structure: a horizontal or vertical ramp with a random colour, plus a bright square."""
    ramp = torch.linspace(-1, 1, 16)
    horizontal = torch.rand(n, generator=generator) < 0.5
    img = torch.where(horizontal[:, None, None], ramp[None, None, :].expand(n, 16, 16),
                      ramp[None, :, None].expand(n, 16, 16))
    colour = torch.rand(n, 3, 1, 1, generator=generator) * 2 - 1
    x = img[:, None] * colour
    corner = torch.randint(0, 12, (n, 2), generator=generator)
    for i in range(n):  # test data only
        r, c = corner[i].tolist()
        x[i, :, r : r + 4, c : c + 4] = 1.0
    return x


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy shared CI machine OpenMP threads can slow a step
    down twentyfold; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("mask", [None, BlockMask(0.5, 2)])
def test_a_tiny_model_learns(mask, one_thread):
    torch.manual_seed(0)
    model = UViTConfig(img_size=16, patch_size=4, embed_dim=64, depth=3, num_heads=4).build()
    d = DiffusionConfig(schedule="linear").build()
    data_gen, step_gen = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    # a fixed evaluation batch: same images, time steps and noise before and after training
    x_eval = structured_batch(64, torch.Generator().manual_seed(99))
    t_eval = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(98))
    noise_eval = torch.randn(x_eval.shape, generator=torch.Generator().manual_seed(97))
    with torch.no_grad():
        before = d.loss_at(model, x_eval, t_eval, noise_eval).item()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(60):
        x = structured_batch(32, data_gen)
        m = None if mask is None else mask.sample(32, 4, generator=step_gen)
        loss = d.training_loss(model, x, mask=m, generator=step_gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = d.loss_at(model, x_eval, t_eval, noise_eval).item()  # always scored unmasked
    assert after < 0.4 * before, (before, after)


def test_bad_config_raises_harness_error():
    for kwargs in ({"schedule": "quadratic"}, {"prediction": "score"}, {"loss": "huber"}, {"timesteps": 1},
                   {"weighting": "snr"}, {"min_snr_gamma": 0}, {"min_snr_gamma": True},
                   {"weighting": "min_snr", "loss": "l1"}):
        with pytest.raises(HarnessError):
            DiffusionConfig(**kwargs)


@pytest.mark.parametrize("file, schedule", [("linear.gin", "linear"), ("cosine.gin", "cosine")])
def test_gin_schedule_files(file, schedule):
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_SCHEDULES / file))
        assert DiffusionConfig() == DiffusionConfig(schedule=schedule, timesteps=1000, prediction="eps", loss="mse")
    finally:
        gin.clear_config()
