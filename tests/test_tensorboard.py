"""TensorBoard events (Stage.tensorboard): written beside metrics.jsonl, read back with TensorBoard's own reader."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.config import load_recipe
from harness.experiment import plan_from_gin
from harness.run_folder import EVENTS_DIR
from harness.stage import run_stage
from harness.tensorboard_events import TensorBoardEvents

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _events(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder / EVENTS_DIR), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scratch(tiny_recipe: Path, *bindings: str):
    text = load_recipe(tiny_recipe, list(bindings))
    plan = plan_from_gin()
    return text, plan, plan.arms["scratch"][0]


def test_a_stage_writes_its_training_rows_and_sample_grids(tiny_recipe, tmp_path):
    text, plan, scratch = _scratch(tiny_recipe, "Stage.tensorboard = True")
    assert run_stage(text, scratch, tmp_path)["status"] == "done"
    folder = plan.stage_dir(tmp_path, scratch)
    acc = _events(folder)
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    for key in ("loss", "grad_norm", "lr", "images_per_second"):
        events = acc.Scalars(f"train/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)  # float32 in events
    (grid,) = acc.Images("samples")
    assert grid.step == 12 and grid.width > 0


def test_tensorboard_is_a_run_option_and_off_by_default(tiny_recipe, tmp_path):
    text, plan, scratch = _scratch(tiny_recipe)
    _, plan_on, scratch_on = _scratch(tiny_recipe, "Stage.tensorboard = True")
    assert scratch == scratch_on  # switching it on for a half-done stage resumes that stage
    text = load_recipe(tiny_recipe, ["scratch/Stage.steps = 2"])
    run_stage(text, plan_from_gin().arms["scratch"][0], tmp_path)
    assert not list(tmp_path.rglob(EVENTS_DIR))


def test_a_resumed_stage_logs_each_step_once(tiny_recipe, tmp_path):
    """Stopped after step 4's checkpoint with rows of steps 2 and 4 written, then resumed: the events hold each
    log step once, as metrics.jsonl does."""
    text, plan, scratch = _scratch(tiny_recipe, "Stage.tensorboard = True")

    class StopAt:
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 6  # after step 6, logged but not checkpointed (checkpoints every 4 steps)

    assert run_stage(text, scratch, tmp_path, stop_event=StopAt())["status"] == "preempted"
    assert run_stage(text, scratch, tmp_path)["status"] == "done"
    steps = [e.step for e in _events(plan.stage_dir(tmp_path, scratch)).Scalars("train/loss")]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_evaluation_rows_become_eval_scalars(tmp_path):
    row = {"step": 40, "frechet_inception_distance": 110.3, "fid_ci_low": 106.0, "fid_ci_high": 115.1,
           "kernel_inception_distance_mean": 0.083, "floor_fid": 25.7, "floor_n_a": 400, "n_samples": 250,
           "train_flops": 1.5e13, "sampler": "ddim", "sample_precision": "float32"}
    events = TensorBoardEvents(tmp_path, enabled=True)
    events.evaluation(row)
    events.close()
    acc = _events(tmp_path)
    tags = set(acc.Tags()["scalars"])
    assert tags == {"eval/frechet_inception_distance", "eval/fid_ci_low", "eval/fid_ci_high",
                    "eval/kernel_inception_distance_mean", "eval/floor_fid"}
    (fid,) = acc.Scalars("eval/frechet_inception_distance")
    assert fid.step == 40 and fid.value == pytest.approx(110.3)


def test_harness_run_tensorboard_switches_it_on(tiny_recipe, tmp_path):
    from harness.cli import main as cli_main

    recipe = tiny_recipe.parent / "short.gin"
    recipe.write_text(tiny_recipe.read_text() + "\nscratch/Stage.steps = 2\n")
    results = tmp_path / "results"
    assert cli_main(["run", str(recipe), "--stage", "scratch", "--no-report", "--tensorboard",
                     "--results-dir", str(results)]) == 0
    (events,) = results.rglob(EVENTS_DIR)
    assert [e.step for e in _events(events.parent).Scalars("train/loss")] == [2]


def test_a_stage_started_over_from_step_0_drops_its_old_events(tmp_path):
    """A crash before the first checkpoint restarts the stage at step 0: its rows are dropped, so are its events."""
    first = TensorBoardEvents(tmp_path, enabled=True)
    for step in (2, 4):
        first.training({"step": step, "loss": 1.0})
    first.close()
    again = TensorBoardEvents(tmp_path, enabled=True, resume_step=0)
    again.training({"step": 2, "loss": 0.5})
    again.close()
    assert [(e.step, e.value) for e in _events(tmp_path).Scalars("train/loss")] == [(2, 0.5)]


def test_a_missing_package_stops_every_rank_not_only_the_writer(tmp_path, monkeypatch):
    import sys

    from harness.errors import HarnessError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    for write in (True, False):  # rank 0, another rank
        with pytest.raises(HarnessError, match="needs the tensorboard package"):
            TensorBoardEvents(tmp_path, enabled=True, write=write)
    TensorBoardEvents(tmp_path, enabled=False)  # off: nothing to import


def test_the_quickstart_writes_events_when_asked(tmp_path):
    """The README's quickstart with --tensorboard (shortened: 4 steps of the scratch arm, no evaluation)."""
    from harness.cli import main as cli_main

    results = tmp_path / "results"
    assert cli_main(["run", "quickstart", "--stage", "scratch", "--tensorboard", "--no-report",
                     "--results-dir", str(results), "--gin", "SCRATCH_STEPS = 4",
                     "--gin", "scratch/Stage.eval = None", "--gin", "Stage.log_every = 2"]) == 0
    (events,) = results.glob(f"quickstart/scratch/*/{EVENTS_DIR}")
    acc = _events(events.parent)
    assert [e.step for e in acc.Scalars("train/loss")] == [2, 4]
    assert [e.step for e in acc.Images("samples")] == [4]
