"""The experiment layer, gin/experiments/scratch_vs_two_stage.gin: one declaration of the scratch-vs-two-stage shape
that the recipes include, setting only its macros and their own settings.

- a recipe that leaves out a required macro stops with one line naming it;
- the layer's arms, masks and evaluations are the shape its header describes, and its header lists every macro;
- moving the recipes onto the layer moved no stage: every recipe plans the stage ids it planned before, and so
  do the sweeps its docs give and a command-line override.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness.cli import main as cli_main
from harness.config import GIN_DIR, RECIPES_DIR, load_recipe
from harness.errors import HarnessError
from harness.experiment import plan_from_gin
from harness.sweep import build_sweep, parse_grid, sweep_folder_name

LAYER = GIN_DIR / "experiments" / "scratch_vs_two_stage.gin"
REQUIRED_MACROS = ("MASK", "PRETRAIN_STEPS", "FINETUNE_STEPS", "SCRATCH_STEPS")

# A recipe on the layer and nothing else a plan needs beyond the harness's defaults.
SMALL = """\
include 'demos/faces32_cpu.gin'
include 'experiments/scratch_vs_two_stage.gin'
MASK = @BlockMask()
PRETRAIN_STEPS = 30
FINETUNE_STEPS = 10
SCRATCH_STEPS = 40
Experiment.name = 'small'
"""


def _write(tmp_path: Path, text: str, name: str = "recipe.gin") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _specs(plan, arm):
    return [plan.stages[sid].spec for sid in plan.arms[arm]]


# ---------------------------------------------------------------------------------------- required macros
@pytest.mark.parametrize("macro", REQUIRED_MACROS + ("Experiment.name",))
def test_a_recipe_without_a_required_setting_stops_naming_it(tmp_path, macro):
    recipe = _write(tmp_path, re.sub(rf"^{re.escape(macro)} = .*\n", "", SMALL, flags=re.M))
    assert f"{macro} =" not in recipe.read_text()
    with pytest.raises(HarnessError, match=rf"must set {re.escape(macro)} \(required.*--gin '{macro} = <value>'"):
        load_recipe(recipe)


def test_a_missing_required_macro_is_one_line_from_the_cli(tmp_path, capsys):
    recipe = _write(tmp_path, SMALL.replace("PRETRAIN_STEPS = 30\n", "").replace("FINETUNE_STEPS = 10\n", ""))
    assert cli_main(["run", str(recipe), "--dry-run", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "must set FINETUNE_STEPS, PRETRAIN_STEPS" in err[0], err
    # ... and the macros given on the command line are enough
    assert cli_main(["run", str(recipe), "--dry-run", "--results-dir", str(tmp_path / "r"),
                     "--gin", "PRETRAIN_STEPS = 30", "--gin", "FINETUNE_STEPS = 10"]) == 0


def test_a_macro_set_before_the_include_is_still_required(tmp_path):
    """t5x's rule: the layer's `%gin.REQUIRED` comes later and wins, so a recipe binds after the include."""
    lines = SMALL.splitlines(keepends=True)
    before = _write(tmp_path, "".join(lines[:1] + lines[2:] + lines[1:2]), "before.gin")
    assert before.read_text().rstrip().endswith("include 'experiments/scratch_vs_two_stage.gin'")
    with pytest.raises(HarnessError, match="must set FINETUNE_STEPS, MASK, PRETRAIN_STEPS, SCRATCH_STEPS, Experiment"):
        load_recipe(before)


def test_the_header_lists_every_macro_the_layer_uses_as_required():
    text = LAYER.read_text()
    header = text.split("Commonly overridden")[0]
    required = set(re.findall(r"^#\s+([A-Z][A-Z_]+)\s", header.split("Required")[1], flags=re.M))
    bindings = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert required == set(REQUIRED_MACROS) == set(re.findall(r"%([A-Z][A-Z_]+)", bindings))
    assert "Experiment.name" in header.split("Required")[1]
    declared = re.findall(r"^([\w.]+) = %gin\.REQUIRED$", bindings, flags=re.M)
    assert sorted(declared) == sorted((*REQUIRED_MACROS, "Experiment.name"))


# ---------------------------------------------------------------------------------------- the layer's shape
def test_the_layer_declares_scratch_against_masked_pretraining_then_unmasked_finetuning(tmp_path):
    plan = plan_from_gin(load_recipe(_write(tmp_path, SMALL)))
    assert plan.experiment == "small"
    assert {arm: [plan.stages[sid].name for sid in ids] for arm, ids in plan.arms.items()} == {
        "scratch": ["scratch"], "two_stage": ["pretrain", "finetune"]}
    (scratch,) = _specs(plan, "scratch")
    pretrain, finetune = _specs(plan, "two_stage")
    assert (pretrain.steps, finetune.steps, scratch.steps) == (30, 10, 40)
    assert pretrain.mask.name == "block2" and pretrain.mask.ratio == 0.75
    assert finetune.mask.name == "none" and scratch.mask.name == "none"
    pre_id, fin_id = plan.arms["two_stage"]
    assert plan.stages[fin_id].parent == pre_id and plan.stages[pre_id].parent is None
    assert plan.stages[plan.arms["scratch"][0]].parent is None
    assert finetune.init_from == "raw" and finetune.init_checkpoint is None
    assert pretrain.eval is None and finetune.eval is not None and scratch.eval is not None


def test_the_layer_takes_another_mask_and_overrides_after_it(tmp_path):
    plan = plan_from_gin(load_recipe(_write(tmp_path, SMALL), [
        "include 'masks/patch.gin'", "MASK = @PatchMask()", "pretrain/Stage.eval = @EvalConfig()",
        "finetune/Stage.init_from = 'ema'"]))
    pretrain, finetune = _specs(plan, "two_stage")
    assert pretrain.mask.name == "patch" and pretrain.eval is not None and finetune.init_from == "ema"


def test_only_the_recipe_of_another_shape_declares_its_own_arms():
    for recipe in sorted(RECIPES_DIR.glob("*.gin")):
        text = recipe.read_text()
        if recipe.stem == "finetune_from_maskdm":  # scratch vs fine-tuning a released checkpoint: one stage each
            assert "Experiment.arms" in text and "scratch_vs_two_stage" not in text
        elif recipe.stem == "methods_faces32":  # four arms: scratch, two two-stage methods, a ratio curriculum
            assert "Experiment.arms" in text and "scratch_vs_two_stage" not in text
        elif recipe.stem == "celebahq_mask50":  # celebahq_mask90 with other settings
            assert "include 'celebahq_mask90.gin'" in text and "Experiment.arms" not in text
        else:
            assert "include 'experiments/scratch_vs_two_stage.gin'" in text, recipe.name
            assert "Experiment.arms" not in text and "/Stage.steps" not in text, recipe.name


# ---------------------------------------------------------------------------------------- no stage moved
# Stage ids (arm -> [stage ids], parents first) computed from the recipes as they were before they included the
# layer (commit e0427e3, 2026-12-03), with `plan_from_gin(load_recipe(recipe)).arms`. The layer must not move
# any of them: a moved id is a new run folder, and finished runs would train again.
IDS_BEFORE_THE_LAYER = {
    # the quickstart and the mini study changed later on purpose (gin/demos/learn_faster.gin, longer arms:
    # docs/results/quickstart.md); their ids with them
    "quickstart": {"scratch": ["3c99297538538367"], "two_stage": ["3e87c30536849ae0", "aac36fd0a286baff"]},
    "mini_study": {"scratch": ["db8145d5d54b5cc6"], "two_stage": ["3e87c30536849ae0", "dbefbc11f93fde02"]},
    "celebahq_mask90": {"scratch": ["7e6441096dbdeda6"], "two_stage": ["fd13c5bb1b339f74", "34228d61aff115e2"]},
    "celebahq_mask50": {"scratch": ["7e6441096dbdeda6"], "two_stage": ["8801c48298e7c3bf", "cd66deadebff1ace"]},
    "celeba64_mask_ablation": {"scratch": ["727ac410bc925b8e"],
                               "two_stage": ["b9a00f457bcdb644", "0a56849a8fb77d69"]},
    "lsun_church256": {"scratch": ["bab6d099333b5126"], "two_stage": ["f5c02e5a28c07e52", "f99f5b312204ff34"]},
    "vggface2_to_celebahq3k": {"scratch": ["a559b7ad4672cacb"],
                               "two_stage": ["cd5c75507be6846f", "a7ea399271ef9245"]},
    # not converted (another shape); pinned all the same
    "finetune_from_maskdm": {"maskdm": ["d976a0922bc4996d"], "scratch": ["9f0b85e436fc3189"]},
    # newer than the layer, another shape (four arms); pinned all the same, as first planned (2026-12-03)
    "methods_faces32": {"curriculum": ["78ec4693e5db2494"],
                        "maskdit_two_stage": ["4ced1cf5a82ce082", "77992b94af9a41c2"],
                        "maskdm_two_stage": ["89f57fe37e5050ae", "0f263e8614953dc5"],
                        "scratch": ["053f40b72f5b48a8"]},
}


@pytest.mark.parametrize("recipe", sorted(IDS_BEFORE_THE_LAYER))
def test_every_recipe_plans_the_stage_ids_it_planned_before_the_layer(recipe):
    plan = plan_from_gin(load_recipe(RECIPES_DIR / f"{recipe}.gin"))
    assert plan.experiment == recipe
    assert plan.arms == IDS_BEFORE_THE_LAYER[recipe]


def test_every_recipe_is_pinned():
    assert {p.stem for p in RECIPES_DIR.glob("*.gin")} == set(IDS_BEFORE_THE_LAYER)


def test_the_mini_study_sweep_plans_what_it_planned_before_the_layer():
    """`harness sweep recipes/mini_study.gin --grid 'SEED=[0,1,2]'`: the same points, stages and sweep folder
    (its hash covers every stage id) as before the layer; computed on the same date. (The study changed on
    purpose since, with gin/demos/learn_faster.gin and the quickstart's arms: these are the ids of its rerun,
    2026-12-04, whose records docs/results/mini_study/ holds.)"""
    variants = build_sweep(str(RECIPES_DIR / "mini_study.gin"), [], [parse_grid("SEED=[0,1,2]")])
    assert {v.experiment: v.plan.arms for v in variants} == {
        "mini_study-seed=0": {"scratch": ["db8145d5d54b5cc6"],
                              "two_stage": ["3e87c30536849ae0", "dbefbc11f93fde02"]},
        "mini_study-seed=1": {"scratch": ["3d42ac90d5224106"],
                              "two_stage": ["ae1dae8cd5d88020", "b3643f84af977b34"]},
        "mini_study-seed=2": {"scratch": ["fed34decf9f1c397"],
                              "two_stage": ["221e43d592869076", "563a0817b32508a0"]},
    }
    assert sweep_folder_name(variants) == "mini_study-sweep-df5881da"


def test_the_mask_ablation_sweeps_plan_what_they_planned_before_the_layer():
    """The two sweeps in recipes/celeba64_mask_ablation.gin's header (the grid key MASK is now the layer's
    macro): the same sweep folders as before the layer, so the same stage ids; computed on the same date."""
    ratios = build_sweep("celeba64_mask_ablation", [], [parse_grid("MASK_RATIO=[0.1,0.5,0.9]"),
                                                        parse_grid("MASK=['@PatchMask()','@BlockMask()']")])
    crops = build_sweep("celeba64_mask_ablation", ["MASK = @CropMask()"], [parse_grid("CROP_SIZE=[15,11,5]")])
    assert sweep_folder_name(ratios) == "celeba64_mask_ablation-sweep-55f9fe82"
    assert sweep_folder_name(crops) == "celeba64_mask_ablation-sweep-074ddfed"


def test_a_command_line_override_of_a_stage_still_wins():
    """`--gin 'pretrain/Stage.steps = 10'` overrides the layer's `pretrain/Stage.steps = %PRETRAIN_STEPS`, as it
    overrode the recipe's own binding before (ids computed before the layer, same date, and again after the
    quickstart changed on purpose, 2026-12-04); setting the macro instead plans the same stages."""
    expected = {"scratch": ["3c99297538538367"], "two_stage": ["231fbdc67c6bdc05", "557a71b39d5addf1"]}
    by_binding = plan_from_gin(load_recipe(RECIPES_DIR / "quickstart.gin", ["pretrain/Stage.steps = 10"]))
    assert by_binding.arms == expected
    assert by_binding.stages["231fbdc67c6bdc05"].spec.steps == 10
    by_macro = plan_from_gin(load_recipe(RECIPES_DIR / "quickstart.gin", ["PRETRAIN_STEPS = 10"]))
    assert by_macro.arms == expected


def test_the_readme_recipe_in_brief_is_the_quickstart(tmp_path):
    """The README's "A recipe in brief" block shows recipes/quickstart.gin: as gin, it plans the same stages."""
    readme = (RECIPES_DIR.parent / "README.md").read_text()
    block = readme.split("## A recipe in brief", 1)[1].split("```gin\n", 1)[1].split("```", 1)[0]
    shown = plan_from_gin(load_recipe(_write(tmp_path, block, "brief.gin")))
    assert shown.arms == IDS_BEFORE_THE_LAYER["quickstart"]
    settings = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    recipe = [line.split("#")[0].strip() for line in (RECIPES_DIR / "quickstart.gin").read_text().splitlines()
              if line.split("#")[0].strip()]
    assert settings == recipe
