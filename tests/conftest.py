"""Shared fixtures: a tiny recipe that trains in seconds on the embedded data."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

TINY_RECIPE = textwrap.dedent("""
    include 'backbones/uvit_tiny.gin'
    include 'schedules/cosine.gin'
    include 'masks/block2.gin'
    MASK_RATIO = 0.75
    DataConfig.source = 'shapes'
    DataConfig.num_images = 128
    Stage.batch_size = 8
    Stage.log_every = 2
    Stage.checkpoint_every = 4
    Stage.keep_checkpoints = 3
    Stage.num_sample_images = 4
    Stage.sample_steps = 3
    pretrain/Stage.mask = @BlockMask()
    pretrain/Stage.steps = 8
    finetune/Stage.steps = 4
    scratch/Stage.steps = 12
    Experiment.name = 'tiny'
    Experiment.arms = {'scratch': [@scratch/Stage()], 'two_stage': [@pretrain/Stage(), @finetune/Stage()]}
""")

# One 2-step stage per arm of a 3-block, 32-wide model: enough to reach the data and the weights, fast.
MICRO_RECIPE = TINY_RECIPE + textwrap.dedent("""
    UViTConfig.embed_dim = 32
    UViTConfig.depth = 3
    UViTConfig.num_heads = 2
    DataConfig.num_images = 16
    Stage.batch_size = 4
    Stage.num_sample_images = 0
    pretrain/Stage.steps = 2
    finetune/Stage.steps = 2
    scratch/Stage.steps = 2
""")


@pytest.fixture
def tiny_recipe(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.gin"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(autouse=True)
def _fresh_gin_config():
    """gin's bindings are process-global: a recipe parsed by one test must not reach the next one."""
    import importlib.util  # noqa: F401  (gin 0.5.0 needs it before parsing)

    import gin

    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep converted Inception weights and FID statistics in one cache per test session, not in ~/.cache."""
    cache = tmp_path_factory.getbasetemp() / "harness-cache"
    monkeypatch.setenv("MASKDM_HARNESS_CACHE", str(cache))


@pytest.fixture
def extractions(monkeypatch) -> list[str]:
    """Every time torch-fidelity really runs Inception over an input (cache hits do not count)."""
    import torch_fidelity.utils  # here, not at the top: collecting the suite should not import torch

    calls: list[str] = []
    real = torch_fidelity.utils.extract_featuresdict_from_input_id

    def counting(input_id, feat_extractor, **kwargs):
        calls.append(str(kwargs[f"input{input_id}"]))
        return real(input_id, feat_extractor, **kwargs)

    monkeypatch.setattr(torch_fidelity.utils, "extract_featuresdict_from_input_id", counting)
    return calls
