"""Latent space (harness/latent.py): encode -> cache -> train on latents -> sample latents -> decode -> FID.

The VAE is a tiny randomly initialised diffusers AutoencoderKL (3 levels: 4x downsampling, 4 latent channels,
48k parameters) that the tests save themselves: nothing is downloaded. Inception runs at 75 px here, as in
tests/test_evaluate.py, with a cache folder of its own.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness import inception, latent
from harness.config import load_recipe
from harness.data import DataConfig
from harness.diffusion import DiffusionConfig
from harness.errors import HarnessError
from harness.experiment import Stage, plan_from_gin
from harness.models.config import UViTConfig
from harness.sampling import SamplerConfig, sample_batch
from harness.stage import run_stage


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        block_out_channels=(8, 8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                        sample_size=32)
    path = tmp_path_factory.mktemp("tiny-vae")
    vae.save_pretrained(path)
    return path


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def encoder_calls(monkeypatch) -> list[int]:
    """The batch size of every call of the VAE's encoder."""
    calls: list[int] = []
    real = latent._encode_batch
    monkeypatch.setattr(latent, "_encode_batch", lambda vae, images: calls.append(len(images)) or real(vae, images))
    return calls


def test_latents_round_trip_through_the_vae(vae_dir, fresh_cache):
    cfg = latent.LatentConfig(vae_path=str(vae_dir))
    assert (cfg.channels, cfg.factor, cfg.scale, cfg.shift) == (4, 4, 0.18215, 0.0)
    assert cfg.latent_shape(32) == (4, 8, 8)
    images = DataConfig(source="shapes", num_images=10, hflip=False, latent=cfg).build()
    latents = latent.encode_dataset(images, cfg)
    assert latents.shape == (10, 4, 8, 8) and latents.dtype == np.float32
    vae = latent.load_vae(cfg)
    assert latent.load_vae(cfg) is vae  # loaded once per process
    with torch.no_grad():
        mean = vae.encode(images.get_batch(range(3))).latent_dist.mean
        expected = vae.decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(torch.from_numpy(np.array(latents[:3])), mean * 0.18215, atol=1e-5, rtol=1e-4)
    decoded = latent.decode(torch.from_numpy(np.array(latents[:3])), cfg)
    assert decoded.shape == (3, 3, 32, 32) and decoded.dtype == torch.float32
    assert -1 <= decoded.min() and decoded.max() <= 1
    torch.testing.assert_close(decoded, expected, atol=1e-4, rtol=1e-4)
    assert latent.decoder_for(DataConfig(), "cpu") is None  # pixels: nothing to decode


def test_latents_are_encoded_once_per_dataset_vae_and_scaling(vae_dir, fresh_cache, encoder_calls):
    cfg = latent.LatentConfig(vae_path=str(vae_dir), batch_size=4)
    images = DataConfig(source="shapes", num_images=10).build()
    first = np.array(latent.encode_dataset(images, cfg))  # (a copy: the cache file is memory-mapped)
    assert encoder_calls == [4, 4, 2]
    assert [p.suffix for p in (fresh_cache / "latents").iterdir() if not p.name.endswith(".lock")] == [".npy"]
    again = latent.encode_dataset(images, cfg)
    assert encoder_calls == [4, 4, 2] and np.array_equal(first, again)  # from the cache
    # the encoding batch is memory only: the same cache entry
    latent.encode_dataset(images, latent.LatentConfig(vae_path=str(vae_dir), batch_size=8))
    assert len(encoder_calls) == 3
    # another scaling, another dataset: encoded anew
    halved = latent.encode_dataset(images, latent.LatentConfig(vae_path=str(vae_dir), scaling_factor=0.5))
    np.testing.assert_allclose(halved, first / 0.18215 * 0.5, rtol=1e-5, atol=1e-6)
    latent.encode_dataset(DataConfig(source="shapes", num_images=10, seed=1).build(), cfg)
    assert len(encoder_calls) == 3 + 1 + 3
    # a copy of the VAE elsewhere is the same VAE (its content is hashed, not its path)
    copy = shutil.copytree(vae_dir, fresh_cache.parent / "vae-copy")
    latent.encode_dataset(images, latent.LatentConfig(vae_path=str(copy), batch_size=4))
    assert len(encoder_calls) == 7
    # a cache file of the wrong shape is not trusted (replaced, as the cache replaces its files: never rewritten in
    # place under a memory map)
    path = latent.cache_path(images.config.content_id(), cfg)
    np.save(path.with_suffix(".tmp.npy"), np.zeros((3, 4, 8, 8), dtype=np.float32))
    path.with_suffix(".tmp.npy").replace(path)
    np.testing.assert_array_equal(latent.encode_dataset(images, cfg), first)
    assert len(encoder_calls) == 10


def test_a_missing_or_wrong_vae_folder_is_one_line_with_the_fix(vae_dir, tmp_path):
    missing = latent.LatentConfig(vae_path=str(tmp_path / "nope"))
    with pytest.raises(HarnessError, match="VAE folder .*nope does not exist") as err:
        missing.check()
    assert "\n" not in str(err.value) and "stabilityai/sd-vae-ft-ema" in str(err.value)
    with pytest.raises(HarnessError, match="VAE folder .*nope does not exist"):
        DataConfig(source="shapes", hflip=False, latent=missing).check()  # what `harness run` checks first
    with pytest.raises(HarnessError, match="does not exist"):
        latent.load_vae(missing)
    with pytest.raises(HarnessError, match="LatentConfig.vae_path is not set"):
        latent.LatentConfig()
    pipeline = tmp_path / "pipeline"
    shutil.copytree(vae_dir, pipeline / "vae")
    with pytest.raises(HarnessError, match=r"pipeline folder: set LatentConfig.vae_path = '.*pipeline/vae'"):
        latent.LatentConfig(vae_path=str(pipeline)).check()
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "block_out_channels": [8]}))
    with pytest.raises(HarnessError, match="holds a UNet2DModel that is not a diffusers AutoencoderKL"):
        latent.LatentConfig(vae_path=str(unet)).check()
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(vae_dir / "config.json", bare)
    with pytest.raises(HarnessError, match="has config.json but no weights"):
        latent.LatentConfig(vae_path=str(bare)).check()
    (bare / latent.WEIGHT_FILES[0]).write_bytes(b"not safetensors")
    with pytest.raises(HarnessError, match="cannot load the VAE in .*bare as a diffusers AutoencoderKL"):
        latent.load_vae(latent.LatentConfig(vae_path=str(bare)))


def test_stages_check_their_backbone_against_the_latents(vae_dir):
    cfg = latent.LatentConfig(vae_path=str(vae_dir))
    data = DataConfig(source="shapes", resolution=32, hflip=False, latent=cfg)
    small = dict(patch_size=2, embed_dim=32, depth=1, num_heads=2)
    stage = Stage(model=UViTConfig(img_size=8, in_chans=4, **small), data=data)
    assert stage.describe()["data"]["latent"] == {"type": "LatentConfig", "vae_path": str(vae_dir),
                                                  "scaling_factor": None, "batch_size": 32}
    with pytest.raises(HarnessError, match=r"stage 'train': DataConfig.latent trains on the VAE's 4 x 8 x 8 latents "
                                           r"of 32 px images, but UViTConfig.img_size = 32 and in_chans = 3; set "
                                           r"UViTConfig.img_size = 8 and UViTConfig.in_chans = 4"):
        Stage(model=UViTConfig(img_size=32, **small), data=data)
    with pytest.raises(HarnessError, match="resolution = 30 is not a multiple of the VAE's downsampling factor 4"):
        Stage(model=UViTConfig(img_size=8, in_chans=4, **small),
              data=DataConfig(source="shapes", resolution=30, hflip=False, latent=cfg))
    with pytest.raises(HarnessError, match="DataConfig.hflip = True with DataConfig.latent.*set DataConfig.hflip = "
                                           "False"):
        DataConfig(source="shapes", latent=cfg)
    # a VAE not readable where the plan is made: the stage is made, and DataConfig.check() stops the run
    away = DataConfig(source="shapes", hflip=False, latent=latent.LatentConfig(vae_path="/no/such/vae"))
    Stage(model=UViTConfig(img_size=32, **small), data=away)
    # pixel stages describe (and hash) as before: no latent key while it is None
    assert "latent" not in Stage(model=UViTConfig(img_size=32, **small), data=DataConfig()).describe()["data"]


def test_the_sd_vae_gin_file_makes_a_latent_stage_and_the_plan_names_a_missing_vae(tmp_path):
    images = tmp_path / "celebahq256"
    images.mkdir()
    Image.new("RGB", (256, 256)).save(images / "0.png")
    recipe = tmp_path / "latent.gin"
    recipe.write_text(textwrap.dedent("""
        include 'data/celebahq256.gin'
        include 'backbones/uvit_celebahq256.gin'
        include 'data/latent_sd_vae.gin'
        Experiment.name = 'latent'
        Experiment.arms = {'scratch': [@scratch/Stage()]}
    """))
    text = load_recipe(recipe, [f"CELEBAHQ_ROOT = '{images}'", f"SD_VAE_PATH = '{tmp_path / 'sd-vae'}'"])
    plan = plan_from_gin(text)
    (planned,) = plan.stages.values()
    spec = planned.spec
    assert spec.data.latent == latent.LatentConfig(vae_path=str(tmp_path / "sd-vae"))
    assert (spec.data.hflip, spec.model.in_chans, spec.model.img_size, spec.data.resolution) == (False, 4, 32, 256)
    (problem,) = plan.data_problems(tmp_path / "results")
    assert "sd-vae does not exist" in problem and "hf download stabilityai/sd-vae-ft-ema" in problem


def test_latent_sampling_does_not_clip_x0_and_decodes():
    """x0 is clipped to [-1, 1] in pixel space only: latents are not bounded there."""
    diffusion = DiffusionConfig(timesteps=10, prediction="x0").build()

    class Far(torch.nn.Module):  # predicts x0 = 2 everywhere
        def forward(self, x, t, y=None):
            return torch.full_like(x, 2.0)

    sampler = SamplerConfig(kind="ddim", steps=2, eta=0.0)
    pixels = sample_batch(Far(), diffusion, sampler, range(2), (4, 2, 2), seed=0, device="cpu")
    decoded = sample_batch(Far(), diffusion, sampler, range(2), (4, 2, 2), seed=0, device="cpu",
                           decode=lambda z: z[:, :3] / 4)
    assert torch.equal(pixels, torch.ones(2, 4, 2, 2))
    torch.testing.assert_close(decoded, torch.full((2, 3, 2, 2), 0.5))


LATENT_RECIPE = textwrap.dedent("""
    include 'schedules/cosine.gin'
    UViTConfig.img_size = 8
    UViTConfig.patch_size = 2
    UViTConfig.in_chans = 4
    UViTConfig.embed_dim = 32
    UViTConfig.depth = 2
    UViTConfig.num_heads = 2
    DataConfig.source = 'shapes'
    DataConfig.num_images = 16
    DataConfig.hflip = False
    DataConfig.latent = @LatentConfig()
    LatentConfig.vae_path = %VAE
    LatentConfig.batch_size = 8
    Stage.batch_size = 4
    Stage.steps = 3
    Stage.log_every = 1
    Stage.checkpoint_every = 3
    Stage.num_sample_images = 4
    Stage.sample_steps = 2
    Stage.eval = @EvalConfig()
    EvalConfig.num_samples = 5
    EvalConfig.batch_size = 3
    EvalConfig.sampler = @SamplerConfig()
    SamplerConfig.steps = 2
    EvalConfig.metrics = ('fid',)
    EvalConfig.reference_images = 6
    EvalConfig.bootstrap = 0
    EvalConfig.noise_floor = False
    EvalConfig.keep_samples = True
    EvalConfig.feature_batch_size = 8
    EvalConfig.weights_path = %WEIGHTS
    Experiment.name = 'latent'
    Experiment.arms = {'scratch': [@scratch/Stage()]}
""")


def test_a_stage_trains_on_latents_and_is_scored_on_decoded_images(vae_dir, tmp_path, monkeypatch,
                                                                    encoder_calls):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    weights = inception.weights_path()  # converted once per session, in the session's cache
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path / "cache"))  # 75-px features stay out of it
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    decoded: list[tuple[int, ...]] = []
    real_decode = latent.decode
    monkeypatch.setattr(latent, "decode", lambda z, **kw: decoded.append(tuple(z.shape)) or real_decode(z, **kw))
    recipe = tmp_path / "latent.gin"
    recipe.write_text(LATENT_RECIPE)
    text = load_recipe(recipe, [f"VAE = '{vae_dir}'", f"WEIGHTS = '{weights}'"])
    plan = plan_from_gin(text)
    (sid,) = plan.stages
    result = run_stage(text, sid, tmp_path / "results")
    assert result["status"] == "done" and result["step"] == 3
    assert encoder_calls == [8, 8]  # the 16 images, encoded once
    # the sample grid (4 images) and the evaluation (5 samples in batches of 3) decode latents [B, 4, 8, 8]
    assert sorted(decoded) == [(2, 4, 8, 8), (3, 4, 8, 8), (4, 4, 8, 8)]
    run_dir = plan.stage_dir(tmp_path / "results", sid)
    assert Image.open(run_dir / "samples" / "step_0000003.png").size == (2 * 32 + 3 * 2,) * 2  # 2 x 2 of 32 px
    kept = sorted((run_dir / "eval_samples" / "step_0000003").glob("*.png"))
    assert len(kept) == 5 and {Image.open(p).size for p in kept} == {(32, 32)}
    (row,) = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert np.isfinite(row["frechet_inception_distance"]) and row["n_samples"] == 5
    assert "_r32_n6_" in row["reference"]  # the dataset's real images at 32 px
    manifest = json.loads((run_dir / "data_manifest.json").read_text())
    assert manifest["count"] == 16 and manifest["config"]["latent"]["vae_path"] == str(vae_dir)
    # the next run of the same stage on the same data reads the cached latents
    rerun = tmp_path / "rerun"
    assert run_stage(text, sid, rerun)["status"] == "done"
    assert encoder_calls == [8, 8]
