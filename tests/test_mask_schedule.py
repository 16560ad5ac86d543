"""Mask-ratio schedules (masks.RatioSchedule, Stage.mask_schedule): values at given steps, validation, the ratio 0,
stage ids, and a stage trained with a 0.75 -> 0 curriculum: its draws, logged ratios, exact cost and resume."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import TINY_RECIPE

from harness.checkpoint import load_checkpoint, newest_valid_checkpoint
from harness.config import load_recipe
from harness.cost import CostMeter, DeviceInfo, measure_step_flops
from harness.errors import HarnessError
from harness.experiment import Stage, plan_from_gin
from harness.masks import BlockMask, CropMask, NoMask, PatchMask, RatioSchedule
from harness.models.config import UViTConfig
from harness.stage import run_stage

# The tiny recipe's pretraining (8 steps, 8x8 patch grid, 2x2 blocks) on the shipped linear curriculum, from 75%.
CURRICULUM = TINY_RECIPE + """
include 'masks/curriculum_linear.gin'
RatioSchedule.start = 0.75
pretrain/Stage.mask_schedule = @RatioSchedule()
"""
# floor(r * 64) // 4 blocks of 4 patches at r = 0.75 * (1 - s / 7), s = 0..7
MASKED = [48, 40, 32, 24, 20, 12, 4, 0]


def _plan(recipe: Path, *bindings: str):
    text = load_recipe(recipe, list(bindings))
    return text, plan_from_gin()


# -- values at given steps --------------------------------------------------------------------------------------
def test_constant_is_its_start_everywhere():
    schedule = RatioSchedule(start=0.5, kind="constant")
    assert [schedule.ratio_at(s, 100) for s in (0, 50, 99)] == [0.5, 0.5, 0.5]


def test_linear_runs_from_start_at_step_0_to_end_at_the_last_step():
    schedule = RatioSchedule(start=0.9, end=0.0, kind="linear")  # 11 steps: the last is step 10
    assert schedule.ratio_at(0, 11) == 0.9
    assert schedule.ratio_at(5, 11) == pytest.approx(0.45)
    assert schedule.ratio_at(10, 11) == 0.0
    rising = RatioSchedule(start=0.2, end=0.6, kind="linear", end_step=4)  # reaches `end` at step 4, then stays
    assert [rising.ratio_at(s, 11) for s in (0, 2, 4, 7, 10)] == pytest.approx([0.2, 0.4, 0.6, 0.6, 0.6])


def test_cosine_follows_half_a_cosine_wave():
    schedule = RatioSchedule(start=0.9, end=0.1, kind="cosine")  # 9 steps: the last is step 8
    assert schedule.ratio_at(0, 9) == 0.9 and schedule.ratio_at(8, 9) == 0.1
    assert schedule.ratio_at(4, 9) == pytest.approx(0.5)  # halfway: the mean of the ends
    assert schedule.ratio_at(2, 9) == pytest.approx(0.1 + 0.8 * (1 + math.cos(math.pi / 4)) / 2)
    values = [schedule.ratio_at(s, 9) for s in range(9)]
    assert all(a > b for a, b in zip(values, values[1:]))
    # slow at both ends, fast in the middle
    assert values[0] - values[1] < values[4] - values[5] and values[7] - values[8] < values[4] - values[5]


def test_step_holds_start_then_each_value_from_its_milestone():
    schedule = RatioSchedule(start=0.9, kind="step", milestones=(100, 250), values=(0.5, 0.0))
    assert [schedule.ratio_at(s, 400) for s in (0, 99, 100, 249, 250, 399)] == [0.9, 0.9, 0.5, 0.5, 0.0, 0.0]


def test_the_mask_rounds_each_steps_ratio_to_whole_blocks():
    schedule = RatioSchedule(start=0.75, end=0.0)
    masks = [schedule.mask_at(BlockMask(0.3, 2), s, 8) for s in range(8)]
    assert [m.num_masked(8) for m in masks] == MASKED
    assert all(m.block_size == 2 for m in masks)  # the mask keeps its other parameters
    assert masks[1].ratio == pytest.approx(0.75 * 6 / 7) and masks[1].actual_ratio(8) == 40 / 64


# -- validation -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, words", [
    ({"kind": "exponential"}, "kind = 'exponential'"),
    ({"start": 1.0}, r"start = 1.0 must be a ratio in \[0, 1\)"),
    ({"end": -0.1}, "end = -0.1"),
    ({"start": "0.5"}, "start = '0.5' is not a valid float"),
    ({"kind": "step"}, "as many values as milestones"),
    ({"kind": "step", "milestones": (10, 20), "values": (0.5,)}, "as many values as milestones"),
    ({"kind": "step", "milestones": (20, 10), "values": (0.5, 0.1)}, "increasing"),
    ({"kind": "step", "milestones": (0,), "values": (0.5,)}, "at least 1"),
    ({"kind": "step", "milestones": (10,), "values": (1.5,)}, "values"),
    ({"kind": "linear", "milestones": (10,), "values": (0.5,)}, "takes no milestones"),
    ({"kind": "constant", "end_step": 10}, "only a linear or cosine"),
    ({"kind": "linear", "end_step": 0}, "at least 1"),
])
def test_a_bad_schedule_is_refused(kwargs, words):
    with pytest.raises(HarnessError, match=words):
        RatioSchedule(**kwargs)


@pytest.mark.parametrize("stage_kwargs, words", [
    ({"mask": None}, "no mask"),
    ({"mask": CropMask(4)}, "CropMask, which has no ratio"),
    ({"mask_schedule": RatioSchedule(end_step=20)}, "past the stage's last step"),
    ({"mask_schedule": RatioSchedule(kind="step", milestones=(5, 10), values=(0.5, 0.0))}, "past the stage's last"),
    ({"mask_schedule": BlockMask()}, "is not a RatioSchedule"),
])
def test_a_stage_refuses_a_schedule_it_cannot_follow(stage_kwargs, words):
    kwargs = {"name": "x", "steps": 10, "model": UViTConfig(img_size=32), "mask": BlockMask(0.5, 2),
              "mask_schedule": RatioSchedule(), **stage_kwargs}
    with pytest.raises(HarnessError, match=f"stage 'x': .*{words}"):
        Stage(**kwargs)


def test_a_stage_starts_from_its_schedules_first_ratio():
    """The mask's own ratio is replaced by the schedule's ratio at step 0: the description, the plan and the dry
    run show what the stage starts with, and an unused ratio does not split one stage into two ids."""
    model = UViTConfig(img_size=32)
    a = Stage(name="x", steps=10, model=model, mask=BlockMask(0.3, 2), mask_schedule=RatioSchedule(start=0.75))
    b = Stage(name="x", steps=10, model=model, mask=BlockMask(0.6, 2), mask_schedule=RatioSchedule(start=0.75))
    assert a.mask == BlockMask(0.75, 2) and a.describe() == b.describe()
    assert a.describe()["mask_schedule"]["type"] == "RatioSchedule"
    assert "mask_schedule" not in Stage(name="x", steps=10, model=model, mask=PatchMask(0.5)).describe()


def test_the_gin_file_binds_a_linear_curriculum_to_zero():
    import gin

    gin.parse_config_files_and_bindings([str(Path(__file__).parent.parent / "gin/masks/curriculum_linear.gin")], [])
    assert RatioSchedule() == RatioSchedule(start=0.9, end=0.0, kind="linear")


def test_stage_ids_do_not_move_without_a_schedule(tiny_recipe):
    _, plain = _plan(tiny_recipe)
    _, none = _plan(tiny_recipe, "Stage.mask_schedule = None")
    assert list(plain.stages) == list(none.stages)
    tiny_recipe.write_text(CURRICULUM)
    _, curriculum = _plan(tiny_recipe)
    ids = {ps.name: sid for sid, ps in plain.stages.items()}
    new = {ps.name: sid for sid, ps in curriculum.stages.items()}
    assert new["scratch"] == ids["scratch"]
    assert new["pretrain"] != ids["pretrain"] and new["finetune"] != ids["finetune"]


# -- ratio 0 ----------------------------------------------------------------------------------------------------
def test_ratio_zero_masks_nothing_and_the_model_takes_every_patch():
    """A curriculum's last steps mask nothing: a mask with no patch masked, the model given every patch's index,
    the same loss as the unmasked path."""
    from harness.diffusion import DiffusionConfig
    from harness.patches import visible_indices

    for mask_spec in (BlockMask(0.0, 2), PatchMask(0.0)):
        assert mask_spec.num_masked(8) == 0
        mask = mask_spec.sample(3, 8, generator=torch.Generator().manual_seed(0))
        assert mask.shape == (3, 64) and not mask.any()
    torch.manual_seed(0)
    cfg = UViTConfig(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2)
    model, diffusion = cfg.build(), DiffusionConfig().build()
    x0, noise, t = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32), torch.tensor([10, 500, 900])
    idx = visible_indices(mask)
    assert idx.shape == (3, 64) and model.tokens_entering_blocks(idx) == model.tokens_entering_blocks(None)
    assert model(x0, t, mask=idx).shape == (3, 64, 4 * 4 * 3)
    torch.testing.assert_close(diffusion.loss_at(model, x0, t, noise, mask=idx),
                               diffusion.loss_at(model, x0, t, noise), rtol=1e-5, atol=1e-6)


# -- the meter --------------------------------------------------------------------------------------------------
def test_the_meter_sums_each_steps_own_flops_tokens_and_ratio_and_resumes_them():
    schedule = RatioSchedule(start=0.5).describe(4)
    meter = CostMeter(DeviceInfo("cpu", "test", 1), flops_per_step=100, tokens_per_image=33, mask="patch",
                      mask_ratio=0.5, mask_schedule=schedule)
    meter.measured[32] = (33, 100)
    meter.step(8, tokens_per_image=33, flops=100, mask_ratio=0.5)
    meter.step(8, tokens_per_image=49, flops=150, mask_ratio=0.25)
    state = json.loads(json.dumps(meter.state_dict()))  # what a checkpoint would carry
    resumed = CostMeter(DeviceInfo("cpu", "test", 1), mask="patch", mask_schedule=schedule)
    resumed.load_state_dict(state)
    assert resumed.measured == {32: (33, 100)}
    resumed.step(8, tokens_per_image=65, flops=201, mask_ratio=0.0)
    out = resumed.to_json()
    assert out["train_flops"] == 451 and out["tokens_seen"] == 8 * (33 + 49 + 65) and out["steps"] == 3
    assert out["flops_per_step"] == 150  # the mean, rounded
    assert out["mask_ratio"] == pytest.approx(0.25) and out["mask_schedule"] == schedule
    assert schedule == {"start": 0.5, "end": 0.0, "kind": "linear", "end_step": 3, "milestones": [], "values": []}


# -- a stage that trains with a schedule -----------------------------------------------------------------------
class StopAt:
    """A stop event that is set at the loop's `calls`-th look (the stage checkpoints there and stops)."""

    def __init__(self, calls: int) -> None:
        self.calls, self.limit = 0, calls

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.limit


@pytest.fixture(scope="module")
def curriculum(tmp_path_factory):
    """The curriculum's pretraining stage, trained straight through once for the tests below."""
    import gin

    folder = tmp_path_factory.mktemp("curriculum")
    recipe = folder / "curriculum.gin"
    recipe.write_text(CURRICULUM)
    text, plan = _plan(recipe)
    gin.clear_config()
    pre = plan.arms["two_stage"][0]
    assert run_stage(text, pre, folder / "straight")["status"] == "done"
    return text, plan, pre, plan.stage_dir(folder / "straight", pre)


def test_draws_and_logged_rows_follow_the_schedule(curriculum, tmp_path):
    from harness.train import TrainContext, Trainer

    _, plan, pre, folder = curriculum
    spec = plan.stages[pre].spec
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))
    assert [trainer.draw(s)[3].shape for s in range(8)] == [(8, 64 - m) for m in MASKED]
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    # the row of step k (after k steps) carries the actual ratio of the step just taken, k - 1
    assert [(r["step"], r["mask_ratio"]) for r in rows] == [(k, MASKED[k - 1] / 64) for k in (2, 4, 6, 8)]


def test_cost_is_exact_under_a_changing_ratio(curriculum, tmp_path):
    """train_flops is the sum over the steps of the FLOPs measured for each step's own batch shape; tokens_seen the
    sum of the tokens entering the blocks (visible patches + the time token) times the batch."""
    from harness.train import TrainContext, Trainer

    _, plan, pre, folder = curriculum
    spec = plan.stages[pre].spec
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))
    flops, tokens = [], []
    for step in range(spec.steps):
        x0, _, _, visible = trainer.draw(step)
        flops.append(measure_step_flops(trainer.model, trainer.diffusion, x0[:1], visible[:1]) * spec.batch_size)
        tokens.append((visible.shape[1] + 1) * spec.batch_size)
    assert all(a < b for a, b in zip(flops, flops[1:]))  # every step its own cost, rising as the ratio falls
    cost = json.loads((folder / "cost.json").read_text())
    assert cost["train_flops"] == sum(flops)
    assert cost["tokens_seen"] == sum(tokens)
    assert cost["images_seen"] == 8 * spec.batch_size and cost["steps"] == 8
    assert cost["mask_ratio"] == pytest.approx(sum(MASKED) / 64 / 8)  # the mean actual ratio
    assert cost["flops_per_step"] == round(sum(flops) / 8)
    assert cost["mask_schedule"]["kind"] == "linear" and cost["mask_schedule"]["end_step"] == 7


def test_a_stage_resumed_mid_schedule_equals_a_straight_run(curriculum, tmp_path):
    text, plan, pre, straight = curriculum
    assert run_stage(text, pre, tmp_path, stop_event=StopAt(5))["status"] == "preempted"  # at step 5
    resumed = plan.stage_dir(tmp_path, pre)
    assert newest_valid_checkpoint(resumed / "checkpoints").name == "step_0000005.pt"
    assert run_stage(text, pre, tmp_path)["status"] == "done"

    a = load_checkpoint(newest_valid_checkpoint(straight / "checkpoints"))
    b = load_checkpoint(newest_valid_checkpoint(resumed / "checkpoints"))
    # Bit-identical with one thread. With two, the position embedding's gradient (its gathered rows summed over
    # the batch) can come out one rounding apart after a resume (measured: 1.9e-9 on pos_embed, every other tensor
    # and every logged loss identical); docs/guarantees.md says so.
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0 if torch.get_num_threads() == 1 else 1e-8,
                                       msg=f"{key}.{name}")
    cost_a, cost_b = (json.loads((d / "cost.json").read_text()) for d in (straight, resumed))
    for key in ("steps", "images_seen", "tokens_seen", "train_flops", "flops_per_step", "mask_ratio"):
        assert cost_b[key] == cost_a[key], key
    assert a["cost"]["measured"] == b["cost"]["measured"] and len(a["cost"]["measured"]) == 8
    ratios = [[(r["step"], r["mask_ratio"]) for r in map(json.loads, (d / "metrics.jsonl").open())]
              for d in (straight, resumed)]
    assert ratios[0] == ratios[1]


def test_the_bench_compares_a_scheduled_stage_with_its_unmasked_twin(curriculum):
    from harness.bench import unmasked_twin

    _, plan, pre, _ = curriculum
    twin = unmasked_twin(plan.stages[pre].spec)
    assert twin.mask == NoMask() and twin.mask_schedule is None


def test_the_plan_and_the_records_call_a_scheduled_stage_by_its_mean_ratio(curriculum):
    """The plan (and so records.csv and the report's labels) gives a scheduled stage the mean ratio its steps
    actually mask, the mean cost.json records after the run; not the ratio of step 0."""
    from harness.results import collect

    _, plan, pre, folder = curriculum
    assert plan.stages[pre].summary()["mask_ratio"] == pytest.approx(sum(MASKED) / 64 / 8)
    assert json.loads((folder / "cost.json").read_text())["mask_ratio"] == pytest.approx(sum(MASKED) / 64 / 8)
    results = folder.parent.parent.parent  # <results>/<experiment>/<arm>/<stage folder>
    plan.write(results)  # the records read plan.json
    records = collect(results / plan.experiment)
    loss = records[(records.stage_id == pre) & (records.metric == "loss")].sort_values("step")
    assert list(loss.step) == [8] and loss.train_flops.iloc[0] == pytest.approx(
        json.loads((folder / "cost.json").read_text())["train_flops"])


def test_the_cost_of_a_row_between_records_is_not_extrapolated_under_a_schedule():
    """A running stage's last loss row has no cost of its own: with a fixed mask it is the step count times the
    step's cost; under a schedule each step has its own, so it stays unknown."""
    from harness.results import _stage_cost_at

    cost = {"steps": 8, "flops_per_step": 100, "images_seen": 64, "tokens_seen": 640}
    fixed = _stage_cost_at(4, {}, {"batch_size": 8}, cost)
    assert (fixed["train_flops"], fixed["tokens_seen"], fixed["images_seen"]) == (400, 320, 32)
    scheduled = _stage_cost_at(4, {}, {"batch_size": 8}, {**cost, "mask_schedule": {"kind": "linear"}})
    assert math.isnan(scheduled["train_flops"]) and math.isnan(scheduled["tokens_seen"])
    assert scheduled["images_seen"] == 32
