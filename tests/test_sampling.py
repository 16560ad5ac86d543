"""Samplers: the maths (an oracle denoiser recovers the data), DDPM = DDIM(eta=1, all steps), seeding."""
from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)
from pathlib import Path

import pytest
import torch

import gin
from harness.diffusion import DiffusionConfig
from harness.errors import HarnessError
from harness.models.config import UViTConfig
from harness.sampling import SamplerConfig, image_seed, sample_batch, sample_images

GIN_SAMPLING = Path(__file__).resolve().parent.parent / "gin" / "sampling"
SHAPE = (3, 8, 8)


class Oracle(torch.nn.Module):
    """The exact denoiser for data that is always the same image `target`: knows eps given x_t and t."""

    def __init__(self, diffusion, target: torch.Tensor) -> None:
        super().__init__()
        self.diffusion, self.target = diffusion, target

    def forward(self, x, t, y=None, mask=None):
        a = self.diffusion.alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.target) / (1 - a).sqrt()
        if self.diffusion.cfg.prediction == "eps":
            return eps
        if self.diffusion.cfg.prediction == "x0":
            return self.target.expand_as(x)
        return a.sqrt() * eps - (1 - a).sqrt() * self.target


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return UViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=4).build()


@pytest.mark.parametrize(
    "sampler, prediction, schedule",
    [
        (SamplerConfig("ddim", steps=10, eta=0.0), "eps", "linear"),
        (SamplerConfig("ddim", steps=25, eta=1.0), "v", "cosine"),
        (SamplerConfig("ddim", steps=7, eta=0.5, clip_x0=False), "x0", "linear"),
        (SamplerConfig("ddpm", steps=1000), "eps", "cosine"),
    ],
)
def test_an_exact_denoiser_leads_every_sampler_to_the_data(sampler, prediction, schedule):
    d = DiffusionConfig(schedule=schedule, prediction=prediction).build()
    target = torch.linspace(-0.9, 0.9, 3 * 8 * 8).view(1, *SHAPE)
    out = sample_images(Oracle(d, target), d, sampler, n=3, shape=SHAPE, seed=0, batch_size=3)
    assert out.shape == (3, *SHAPE)
    assert torch.allclose(out, target.expand(3, *SHAPE), atol=2e-3)


def test_ddpm_equals_ddim_with_eta_one_on_every_step(tiny_model):
    d = DiffusionConfig(schedule="linear", timesteps=40).build()
    ddpm = sample_images(tiny_model, d, SamplerConfig("ddpm", steps=40), n=3, shape=SHAPE, seed=5)
    ddim = sample_images(tiny_model, d, SamplerConfig("ddim", steps=40, eta=1.0), n=3, shape=SHAPE, seed=5)
    assert torch.allclose(ddpm, ddim, atol=1e-4)
    ddim0 = sample_images(tiny_model, d, SamplerConfig("ddim", steps=40, eta=0.0), n=3, shape=SHAPE, seed=5)
    assert not torch.allclose(ddim0, ddim, atol=1e-2)  # eta matters


def test_seeded_and_independent_of_the_batch_size(tiny_model):
    d = DiffusionConfig().build()
    sampler = SamplerConfig("ddim", steps=8, eta=1.0)
    a = sample_images(tiny_model, d, sampler, n=5, shape=SHAPE, seed=3, batch_size=2)
    b = sample_images(tiny_model, d, sampler, n=5, shape=SHAPE, seed=3, batch_size=5)
    c = sample_images(tiny_model, d, sampler, n=5, shape=SHAPE, seed=4, batch_size=5)
    again = sample_images(tiny_model, d, sampler, n=5, shape=SHAPE, seed=3, batch_size=2)
    assert torch.equal(a, again)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-2)
    assert a.min() >= -1 and a.max() <= 1
    # image 3 alone is image 3 of the sequence
    alone = sample_batch(tiny_model, d, sampler, range(3, 4), SHAPE, seed=3, device="cpu")
    assert torch.allclose(alone[0], a[3], atol=1e-5)


def test_progress_labels_and_training_mode(tiny_model):
    d = DiffusionConfig().build()
    seen = []
    tiny_model.train()
    sample_images(tiny_model, d, SamplerConfig(steps=2), n=5, shape=SHAPE, batch_size=2, progress=seen.append)
    assert seen == [2, 4, 5]
    assert tiny_model.training  # restored
    assert sample_images(tiny_model, d, SamplerConfig(steps=2), n=0, shape=SHAPE).shape == (0, *SHAPE)

    torch.manual_seed(0)
    cond = UViTConfig(img_size=8, patch_size=2, embed_dim=32, depth=3, num_heads=4, num_classes=3).build()
    labels = torch.tensor([0, 1, 2, 0])
    out = sample_images(cond, d, SamplerConfig(steps=3), n=4, shape=SHAPE, seed=1, batch_size=3, y=labels)
    same = sample_images(cond, d, SamplerConfig(steps=3), n=4, shape=SHAPE, seed=1, batch_size=4, y=labels)
    other = sample_images(cond, d, SamplerConfig(steps=3), n=4, shape=SHAPE, seed=1, batch_size=4, y=labels.flip(0))
    assert torch.allclose(out, same, atol=1e-5)
    assert torch.allclose(other[[0, 3]], same[[0, 3]], atol=1e-6)  # same labels there
    assert not torch.allclose(other[1], same[1], atol=1e-6)  # label 1 became 2
    with pytest.raises(HarnessError, match="label"):
        sample_images(cond, d, SamplerConfig(steps=3), n=4, shape=SHAPE, y=labels[:2])


def test_image_seeds_are_distinct_and_fit_a_cpu_generator():
    seeds = {image_seed(s, i) for s in range(4) for i in range(1000)}
    assert len(seeds) == 4000 and max(seeds) < 2**32  # mt19937 keeps 32 bits of a seed


def test_time_grid_and_validation():
    assert SamplerConfig("ddim", steps=4).time_pairs(1000) == [(999, 749), (749, 499), (499, 249), (249, -1)]
    pairs = SamplerConfig("ddim", steps=250).time_pairs(1000)
    assert len(pairs) == 250 and pairs[0][0] == 999 and pairs[-1] == (3, -1)
    assert all(t > prev for t, prev in pairs)
    assert SamplerConfig("ddpm", steps=5).time_pairs(5) == [(4, 3), (3, 2), (2, 1), (1, 0), (0, -1)]
    with pytest.raises(HarnessError, match="DDPM"):
        SamplerConfig("ddpm", steps=250).time_pairs(1000)
    with pytest.raises(HarnessError, match="exceeds"):
        SamplerConfig("ddim", steps=2000).time_pairs(1000)
    for kwargs in ({"kind": "euler"}, {"steps": 0}, {"eta": -1.0}):
        with pytest.raises(HarnessError):
            SamplerConfig(**kwargs)
    assert SamplerConfig().name == "ddim250_eta1" and SamplerConfig("ddpm", 1000).name == "ddpm"


def test_eta_must_lie_between_zero_and_one():
    assert SamplerConfig(eta=0.0).eta == 0.0 and SamplerConfig(eta=1.0).eta == 1.0
    # above 1, DDIM's sigma exceeds the step's variance and the eps coefficient would silently clamp to 0
    for eta in (1.5, -0.1, float("nan")):
        with pytest.raises(HarnessError, match="eta must be between 0 and 1"):
            SamplerConfig("ddim", steps=10, eta=eta)


@pytest.mark.parametrize(
    "file, expected",
    [
        ("ddim250.gin", SamplerConfig("ddim", 250, 1.0, True)),
        ("ddim50.gin", SamplerConfig("ddim", 50, 0.0, True)),
        ("ddpm.gin", SamplerConfig("ddpm", 1000, 1.0, True)),
    ],
)
def test_gin_sampler_files(file, expected):
    gin.clear_config()
    try:
        gin.parse_config_file(str(GIN_SAMPLING / file))
        with gin.config_scope("fid"):  # the evaluation's sampler (eval/*.gin: EvalConfig.sampler = @fid/...)
            assert SamplerConfig() == expected
    finally:
        gin.clear_config()
