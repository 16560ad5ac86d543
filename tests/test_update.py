"""The update rule (harness/update.py): learning-rate schedules at given steps, and a stage that trains with one."""
from __future__ import annotations

import math

import pytest

from harness.config import load_recipe
from harness.errors import HarnessError
from harness.experiment import Stage, plan_from_gin
from harness.update import lr_at


def _plan(recipe, *bindings: str):
    load_recipe(recipe, list(bindings))
    return plan_from_gin()


def test_warmup_then_constant_is_the_old_rule():
    # the rule the loop used before schedules existed: lr * min(1, (step + 1) / warmup)
    for step in (0, 4, 9, 10, 500):
        assert lr_at(step, 1e-3, 10, 1000) == pytest.approx(1e-3 * min(1.0, (step + 1) / 10), rel=0, abs=1e-18)
    assert lr_at(0, 1e-3, 0, 1000) == 1e-3


def test_cosine_and_linear_decay_from_the_end_of_the_warmup_to_zero():
    lr, warmup, steps = 2e-3, 100, 1100  # 1000 decayed steps
    assert lr_at(99, lr, warmup, steps, "cosine") == pytest.approx(lr)  # the warm-up's last step
    assert lr_at(100, lr, warmup, steps, "cosine") == pytest.approx(lr)  # progress 0
    assert lr_at(600, lr, warmup, steps, "cosine") == pytest.approx(lr / 2)  # progress 1/2: cos(pi/2) = 0
    assert lr_at(350, lr, warmup, steps, "cosine") == pytest.approx(lr * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_at(600, lr, warmup, steps, "linear") == pytest.approx(lr / 2)
    assert lr_at(1099, lr, warmup, steps, "linear") == pytest.approx(lr / 1000)  # the last step: one step from 0
    values = [lr_at(s, lr, warmup, steps, "cosine") for s in range(100, 1100)]
    assert all(a > b for a, b in zip(values, values[1:])) and values[-1] > 0


def test_an_unknown_schedule_is_refused_by_the_stage():
    with pytest.raises(HarnessError, match="lr_schedule = 'step'"):
        Stage(name="x", lr_schedule="step")


def test_the_default_schedule_keeps_stage_ids(tiny_recipe):
    """`lr_schedule` came later: at its default it stays out of the stage description (ids do not move)."""
    plain = _plan(tiny_recipe)
    constant = _plan(tiny_recipe, "Stage.lr_schedule = 'constant'")
    cosine = _plan(tiny_recipe, "Stage.lr_schedule = 'cosine'")
    assert list(plain.stages) == list(constant.stages)
    assert not set(plain.stages) & set(cosine.stages)


def test_a_stage_logs_the_scheduled_learning_rate(tiny_recipe, tmp_path):
    import torch

    from harness.train import TrainContext, Trainer

    plan = _plan(tiny_recipe, "Stage.lr_schedule = 'linear'", "Stage.warmup_steps = 0")
    spec = next(ps.spec for ps in plan.stages.values() if ps.name == "finetune")
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))
    seen = []
    for step in range(3):
        trainer.train_step(step)
        seen.append(trainer.update.lr)
    assert seen == pytest.approx([spec.lr * (1 - s / spec.steps) for s in range(3)])
