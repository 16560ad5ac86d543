"""Planning stays torch-free: `harness run --dry-run` and `harness sweep --dry-run` must not import torch.

`import torch` alone takes about 3 s on a slow 2-core machine, the whole budget of a dry run. The gin
configurables (masks, UViTConfig, DataConfig, DiffusionConfig, SamplerConfig, EvalConfig, Stage) are plain data
and import torch only inside the functions that compute with it. Each check runs in a fresh interpreter: the
test process itself has imported torch long before.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.gin"))


def _run_python(code: str, cwd: Path) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line last, which is returned."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_there_are_recipes_to_check():
    assert "celebahq_mask90.gin" in RECIPES and "quickstart.gin" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_planning_a_shipped_recipe_imports_no_torch(recipe, tmp_path):
    seen = _run_python(f"""
        import json, sys
        from harness.config import load_recipe
        from harness.experiment import plan_from_gin

        plan = plan_from_gin(load_recipe({str(REPO / "recipes" / recipe)!r}))
        plan.data_problems({str(tmp_path / "results")!r})  # what `harness run` checks before anything trains
        json.dump({{"stages": len(plan.stages), "heavy": sorted({{"torch", "PIL"}} & set(sys.modules))}},
                  sys.stdout)
        print()
    """, cwd=tmp_path)
    assert seen["stages"] >= 1
    assert seen["heavy"] == []


def test_dry_runs_of_run_and_sweep_import_no_torch(tmp_path):
    results = tmp_path / "results"
    seen = _run_python(f"""
        import contextlib, io, json, sys
        from harness.cli import main

        codes = []
        with contextlib.redirect_stdout(io.StringIO()):
            codes.append(main(["run", "--dry-run", "quickstart", "--results-dir", {str(results)!r}]))
            codes.append(main(["sweep", "quickstart", "--grid", "MASK_RATIO=[0.5,0.75]", "--dry-run",
                               "--results-dir", {str(results)!r}]))
        json.dump({{"codes": codes, "heavy": sorted({{"torch", "PIL"}} & set(sys.modules))}}, sys.stdout)
        print()
    """, cwd=tmp_path)
    assert seen == {"codes": [0, 0], "heavy": []}


def test_configs_still_build_the_torch_objects():
    """The lazy imports are the only change: the specs still build networks, schedules and datasets."""
    from harness.data import DataConfig
    from harness.datasets import ImageDataset
    from harness.diffusion import DiffusionConfig, linear_beta_max, linear_betas
    from harness.models.config import UViTConfig
    from harness.models.uvit import MaskedUViT

    model = UViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2).build()
    assert isinstance(model, MaskedUViT)
    assert sum(p.numel() for p in model.parameters()) == model.cfg.num_params()
    assert DiffusionConfig(schedule="linear", timesteps=50).build().betas.shape == (50,)
    assert isinstance(DataConfig(source="shapes", num_images=4, resolution=8).build(), ImageDataset)
    for timesteps in (2, 19, 20, 21, 1000):  # the torch-free check agrees with the schedule itself
        assert linear_betas(timesteps).max().item() == linear_beta_max(timesteps)
