"""The CPU demos plan what their docs say: recipes/quickstart.gin and recipes/mini_study.gin (swept over SEED).

Planning only (no training): the quickstart's run and the mini study's sweep are measured and written down in
docs/results/, which these tests keep true to the recipes.
"""
from __future__ import annotations

from pathlib import Path

import torch

from harness.config import load_recipe
from harness.cost import measure_step_flops
from harness.experiment import plan_from_gin
from harness.sweep import build_sweep, parse_grid

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _stages(plan, arm):
    return [plan.stages[sid].spec for sid in plan.arms[arm]]


def test_quickstart_compares_scratch_with_a_cheaper_two_stage_whose_pretraining_leaves_four_blocks_visible():
    plan = plan_from_gin(load_recipe(RECIPES / "quickstart.gin"))
    (scratch,) = _stages(plan, "scratch")
    pretrain, finetune = _stages(plan, "two_stage")
    assert (scratch.steps, pretrain.steps, finetune.steps) == (4000, 3000, 2000)
    grid = pretrain.model.grid
    assert grid == 8 and pretrain.mask.name == "block2"
    masked = pretrain.mask.num_masked(grid)
    assert masked == 48 and (grid * grid - masked) // 4 == 4  # 4 of the 16 2x2 blocks stay visible
    # the two-stage arm's 5000 steps cost less than scratch's 4000 (the recipe's header says 68% of the FLOPs)
    model, diffusion = scratch.model.build(), scratch.diffusion.build()
    x0 = torch.zeros(2, 3, 32, 32)
    per_step = {masked: measure_step_flops(model, diffusion, x0, pretrain.mask.sample(2, grid) if masked else None)
                for masked in (True, False)}
    share = (pretrain.steps * per_step[True] + finetune.steps * per_step[False]) / (scratch.steps * per_step[False])
    assert 0.66 < share < 0.70
    for spec in (scratch, pretrain, finetune):
        assert spec.data.source == "faces" and spec.data.resolution == 32
        assert spec.diffusion.prediction == "x0"
        assert (spec.diffusion.weighting, spec.diffusion.min_snr_gamma) == ("min_snr", 1.0)  # (demos file: none)
        assert spec.betas == (0.9, 0.999) and spec.lr == 4e-3 and spec.batch_size == 32  # (the demos file: 2e-3)
    assert finetune.mask.name == "none" and scratch.mask.name == "none"
    assert pretrain.eval is None
    assert scratch.eval.steps == (2000,) and scratch.eval.num_samples == 250
    for spec in (scratch, finetune):
        assert (spec.eval.sampler.steps, spec.eval.sampler.eta) == (50, 1.0)
    assert scratch.eval.bootstrap > 0 and scratch.eval.noise_floor


def test_mini_study_sweeps_three_seeds_with_paired_arms_and_several_evaluations():
    variants = build_sweep(str(RECIPES / "mini_study.gin"), [], [parse_grid("SEED=[0,1,2]")])
    assert [v.experiment for v in variants] == ["mini_study-seed=0", "mini_study-seed=1", "mini_study-seed=2"]
    all_ids = set()
    for seed, variant in enumerate(variants):
        plan = variant.plan
        (scratch,) = _stages(plan, "scratch")
        pretrain, finetune = _stages(plan, "two_stage")
        # every stage of a point trains and samples with its seed; the dataset itself never changes
        assert {s.seed for s in (scratch, pretrain, finetune)} == {seed}
        assert {s.eval.seed for s in (scratch, finetune)} == {seed}
        assert {s.data.seed for s in (scratch, pretrain, finetune)} == {0}
        assert scratch.steps == 4000 and (pretrain.steps, finetune.steps) == (3000, 2000)  # the quickstart's
        assert scratch.eval.steps == (1000, 2000, 3000) and finetune.eval.steps == (500, 1000, 1500)
        assert scratch.diffusion.weighting == "min_snr" and scratch.lr == 4e-3  # gin/demos/learn_faster.gin
        assert pretrain.mask.name == "block2" and pretrain.eval is None
        all_ids |= set(plan.stages)
    assert len(all_ids) == 9  # no stage shared between seeds


def test_the_committed_mini_study_results_come_from_the_committed_recipe():
    """docs/results/mini_study/records.csv names the stages the recipe plans today, seed by seed: a recipe
    change that moves a stage id must come with a rerun of the study (or the page would describe other runs)."""
    import pandas as pd

    records = pd.read_csv(RECIPES.parent / "docs" / "results" / "mini_study" / "records.csv")
    variants = build_sweep(str(RECIPES / "mini_study.gin"), [], [parse_grid("SEED=[0,1,2]")])
    planned = {v.experiment: set(v.plan.stages) for v in variants}
    evaluated = {name: set(group.stage_id) for name, group in records.groupby("experiment")}
    # the pretraining stages are not evaluated, so they have no rows: every evaluated stage is a planned one
    assert set(evaluated) == set(planned)
    for experiment, stage_ids in evaluated.items():
        assert stage_ids and stage_ids <= planned[experiment], experiment
