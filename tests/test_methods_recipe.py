"""recipes/methods_faces32.gin plans what its header says: four arms on one tiny DiT (scratch, MaskDM's two stages,
MaskDiT-style training with its decoder, a ratio curriculum), each spending scratch's training FLOPs.

The dry run and the plan are checked without training; the FLOPs per step are measured as the trainer measures
them (`Trainer.step_flops`: forward + backward of one image, times the batch), so the header's figures and the
matching of the arms' totals stay true to the recipe. The run itself is written down in
docs/results/methods_faces32.md.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.config import RECIPES_DIR, load_recipe
from harness.experiment import plan_from_gin

RECIPE = RECIPES_DIR / "methods_faces32.gin"
ARMS = {"scratch": ["scratch"], "maskdm_two_stage": ["maskdm_pretrain", "maskdm_finetune"],
        "maskdit_two_stage": ["maskdit_pretrain", "maskdit_finetune"], "curriculum": ["curriculum"]}
STEPS = {"scratch": 1600, "maskdm_pretrain": 3482, "maskdm_finetune": 800, "maskdit_pretrain": 1511,
         "maskdit_finetune": 756, "curriculum": 2859}
# FLOPs of one training step at batch 32 (the recipe's header)
UNMASKED, BLOCK75, MASKDIT50, MASKDIT_UNMASKED = 3_614_179_328, 830_210_048, 1_912_340_480, 3_824_943_104
CURRICULUM_MEAN = 2.0221e9


@pytest.fixture(scope="module")
def plan():
    return plan_from_gin(load_recipe(RECIPE))


def _specs(plan) -> dict[str, object]:
    return {plan.stages[sid].name: plan.stages[sid].spec for ids in plan.arms.values() for sid in ids}


def test_the_dry_run_plans_four_arms_and_trains_nothing(tmp_path, capsys):
    assert cli_main(["run", str(RECIPE), "--dry-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "methods_faces32" in out and "6 stage(s)" in out
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("eval.jsonl"))


def test_the_arms_are_the_four_methods_on_one_dit(plan):
    assert plan.experiment == "methods_faces32"
    assert {arm: [plan.stages[sid].name for sid in ids] for arm, ids in plan.arms.items()} == ARMS
    for arm, ids in plan.arms.items():  # each stage from its arm's previous one; no stage shared between arms
        assert [plan.stages[sid].parent for sid in ids] == [None, *ids[:-1]]
        assert [plan.stages[sid].arms for sid in ids] == [[arm]] * len(ids)
    specs = _specs(plan)
    assert {name: s.steps for name, s in specs.items()} == STEPS
    for name, s in specs.items():
        model = s.model
        assert type(model).__name__ == "DiTConfig", name
        assert (model.img_size, model.patch_size, model.embed_dim, model.depth, model.num_heads) == (32, 4, 64, 5, 4)
        # MaskDiT's decoder (1 block, 32 wide, 2 heads) on both of its stages, no other
        decoder = (1, 32, 2) if name.startswith("maskdit") else (0, 0, 0)
        assert (model.decoder_depth, model.decoder_embed_dim, model.decoder_heads) == decoder, name
        assert s.diffusion.mae_weight == (0.1 if name == "maskdit_pretrain" else 0.0), name
        assert s.data.source == "faces" and s.data.resolution == 32 and s.diffusion.prediction == "x0"
        assert (s.batch_size, s.lr, s.betas, s.ema_decay, s.seed) == (32, 2e-3, (0.9, 0.999), 0.999, 0)
        assert s.warmup_steps == (50 if name.endswith("finetune") else 0), name
        assert (s.mask_schedule is not None) == (name == "curriculum"), name


def test_the_masks_are_each_methods(plan):
    specs = _specs(plan)
    maskdm, maskdit, curriculum = specs["maskdm_pretrain"].mask, specs["maskdit_pretrain"].mask, specs["curriculum"]
    assert (maskdm.name, maskdm.num_masked(8)) == ("block2", 48)  # 12 of the 16 2x2 blocks: 75%
    assert (maskdit.name, maskdit.num_masked(8)) == ("patch", 32)  # 50% of the patches, at random
    schedule = curriculum.mask_schedule
    assert curriculum.mask.name == "block2" and (schedule.kind, schedule.start, schedule.end) == ("linear", 0.9, 0.0)
    assert schedule.mask_at(curriculum.mask, 0, 2859).actual_ratio(8) == 0.875  # 14 of 16 blocks: 90% rounded down
    assert schedule.mask_at(curriculum.mask, 2858, 2859).num_masked(8) == 0
    for name in ("scratch", "maskdm_finetune", "maskdit_finetune"):
        assert specs[name].mask.name == "none"


def test_every_arm_is_evaluated_at_its_end_and_before_it(plan):
    specs = _specs(plan)
    assert specs["maskdm_pretrain"].eval is None and specs["maskdit_pretrain"].eval is None
    evaluated = {name: s.eval.steps for name, s in specs.items() if s.eval is not None}
    assert evaluated == {"scratch": (800,), "maskdm_finetune": (400,), "maskdit_finetune": (378,),
                         "curriculum": (1906,)}  # and each at its last step
    for s in specs.values():
        if s.eval is not None:
            assert s.eval.num_samples == 250 and s.eval.bootstrap > 0 and s.eval.noise_floor


def test_the_arms_spend_scratchs_training_flops_as_the_header_says(plan):
    import torch

    from harness.train import TrainContext, Trainer

    specs = _specs(plan)
    per_step, totals = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for sid, planned in plan.stages.items():
            spec = planned.spec
            trainer = Trainer(TrainContext(spec=spec, stage_id=sid, run_dir=Path(tmp) / sid,
                                           device=torch.device("cpu")))
            if spec.mask_schedule is None:
                per_step[planned.name] = trainer.step_flops()
                totals[planned.name] = per_step[planned.name] * spec.steps
                continue
            # as the trainer counts a schedule: each step its own visible count, measured once per count
            first: dict[int, int] = {}
            counts: dict[int, int] = {}
            for step in range(spec.steps):
                visible = trainer.mask_at(step).num_visible(trainer.grid)
                first.setdefault(visible, step)
                counts[visible] = counts.get(visible, 0) + 1
            flops = {visible: trainer.step_flops(step) for visible, step in first.items()}
            assert (min(flops), max(flops)) == (8, 64) and flops[64] == UNMASKED
            totals[planned.name] = sum(flops[v] * n for v, n in counts.items())
    assert per_step == {"scratch": UNMASKED, "maskdm_pretrain": BLOCK75, "maskdm_finetune": UNMASKED,
                        "maskdit_pretrain": MASKDIT50, "maskdit_finetune": MASKDIT_UNMASKED}
    assert totals["curriculum"] / specs["curriculum"].steps == pytest.approx(CURRICULUM_MEAN, rel=1e-4)
    header = RECIPE.read_text().split("include")[0]
    for value in (UNMASKED, BLOCK75, MASKDIT50, MASKDIT_UNMASKED):
        assert f"{value:,}" in header
    budget = totals["scratch"]
    arms = {arm: sum(totals[name] for name in names) for arm, names in ARMS.items()}
    for arm, spent in arms.items():
        # within 0.03% of scratch (the header: -0.010%, -0.026%, -0.028%), never above it: the report compares an
        # arm's evaluations at or below scratch's budget
        assert budget * (1 - 3e-4) <= spent <= budget, arm
        assert f"{spent / 1e12:.4f} T" in header or arm == "scratch", arm
    assert f"{budget / 1e12:.4f} TFLOPs" in header
