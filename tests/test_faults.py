"""Fault injection: kills, corrupt checkpoints, crashes mid-write, concurrent writers, full disks, failing and
diverging stages. Each test injects one fault and asserts what the harness guarantees afterwards.

All training uses a micro recipe (one 6-step stage of a 3-block, 32-wide UViT, a checkpoint every step) so the
whole file stays fast on 2 CPU cores. `reference` is the uninterrupted run every faulty run must end up equal to.
"""
from __future__ import annotations

import errno
import json
import logging
import math
import multiprocessing
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import TINY_RECIPE
from fixtures.synthetic_runs import standard_experiment

from harness import checkpoint as ckpt_mod
from harness import fileio
from harness.checkpoint import checkpoint_path, load_checkpoint, newest_valid_checkpoint, save_checkpoint
from harness.cli import main as cli_main
from harness.config import load_recipe
from harness.experiment import plan_from_gin
from harness.fileio import read_jsonl
from harness.results import collect, read_records, write_records
from harness.stage import run_stage

STEPS = 6
MICRO = TINY_RECIPE + f"""
UViTConfig.embed_dim = 32
UViTConfig.depth = 3
UViTConfig.num_heads = 2
DataConfig.num_images = 32
Stage.batch_size = 4
Stage.num_sample_images = 0
Stage.log_every = 1
Stage.checkpoint_every = 1
Stage.keep_checkpoints = 3
scratch/Stage.steps = {STEPS}
Experiment.arms = {{'scratch': [@scratch/Stage()]}}
"""


@dataclass
class Reference:
    recipe: Path
    gin_text: str
    stage_id: str
    stage_dir: Path  # relative to a results folder
    state: dict  # the final checkpoint of an uninterrupted run


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
    root = tmp_path_factory.mktemp("reference")
    recipe = root / "micro.gin"
    recipe.write_text(MICRO)
    text = load_recipe(recipe)
    plan = plan_from_gin()
    sid = plan.arms["scratch"][0]
    assert run_stage(text, sid, root / "results")["status"] == "done"
    stage_dir = plan.stage_dir(root / "results", sid)
    state = load_checkpoint(checkpoint_path(stage_dir / "checkpoints", STEPS))
    return Reference(recipe, text, sid, stage_dir.relative_to(root / "results"), state)


class StopAfter:
    """A stop event that is set once `steps` training steps have run (the loop asks once per step)."""

    def __init__(self, steps: int) -> None:
        self.calls, self.steps = 0, steps

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.steps


class Crash(BaseException):
    """A stand-in for the process dying (not an Exception, so no handler mistakes it for a user error)."""


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    for pid, slot in a["optimizer"]["state"].items():
        for name, tensor in slot.items():
            torch.testing.assert_close(b["optimizer"]["state"][pid][name], tensor, rtol=0, atol=0,
                                       msg=f"optimizer.{pid}.{name}")


def final_state(results: Path, ref: Reference) -> dict:
    return load_checkpoint(checkpoint_path(results / ref.stage_dir / "checkpoints", STEPS))


def logged_steps(stage_dir: Path) -> list[int]:
    return [row["step"] for row in read_jsonl(stage_dir / "metrics.jsonl")]


def harness_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "harness.cli", *args]


# ------------------------------------------------------------------------------------------------- kills


# The training process kills itself with SIGKILL at a chosen step and moment: right after that step's metrics
# row (its checkpoint not yet written), or right after its checkpoint. A kill from outside, timed by watching the
# log, could land a few steps late on a loaded machine or after the run had finished.
KILL_SELF = """
import os, signal, sys
import harness.train as train
from harness.cli import main

kill_at, moment = int(sys.argv[1]), sys.argv[2]
real_append, real_save = train.append_jsonl, train.save_checkpoint

def append_jsonl(path, row):
    real_append(path, row)
    if moment == "logged" and str(path).endswith("metrics.jsonl") and row.get("step") == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

def save_checkpoint(folder, step, state, keep=2):
    path = real_save(folder, step, state, keep=keep)
    if moment == "checkpointed" and step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return path

train.append_jsonl, train.save_checkpoint = append_jsonl, save_checkpoint
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("kill_at, moment", [(2, "logged"), (4, "checkpointed")])
def test_sigkill_mid_run_then_restart_gives_the_uninterrupted_weights(reference, tmp_path, kill_at, moment):
    results = tmp_path / "results"
    args = ["run", str(reference.recipe), "--results-dir", str(results), "--no-report"]
    stage_dir = results / reference.stage_dir
    first = subprocess.run([sys.executable, "-c", KILL_SELF, str(kill_at), moment, *args], capture_output=True,
                           text=True, timeout=300)
    assert first.returncode == -signal.SIGKILL, first.stderr
    assert not (stage_dir / "DONE").exists()
    assert logged_steps(stage_dir) == list(range(1, kill_at + 1))
    newest = newest_valid_checkpoint(stage_dir / "checkpoints")
    assert newest == checkpoint_path(stage_dir / "checkpoints", kill_at - (moment == "logged"))

    rerun = subprocess.run(harness_cmd(*args), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    retrained = [line for line in rerun.stderr.splitlines() if f"/{STEPS} loss" in line]
    assert len(retrained) == STEPS - int(newest.stem.split("_")[1]), rerun.stderr  # resumed, not started over
    assert (stage_dir / "DONE").is_file()
    assert_same_training_state(reference.state, final_state(results, reference))
    assert logged_steps(stage_dir) == list(range(1, STEPS + 1))  # each step logged once


# ------------------------------------------------------------------------------------- corrupt checkpoints


@pytest.mark.parametrize("damage", ["truncated", "bit-flipped"])
def test_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used(reference, tmp_path, caplog, damage):
    results = tmp_path / "results"
    assert run_stage(reference.gin_text, reference.stage_id, results, stop_event=StopAfter(4))["status"] == \
        "preempted"
    folder = results / reference.stage_dir / "checkpoints"
    newest = checkpoint_path(folder, 4)
    data = bytearray(newest.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))

    assert newest_valid_checkpoint(folder) == checkpoint_path(folder, 3)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert run_stage(reference.gin_text, reference.stage_id, results)["status"] == "done"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step_0000004.pt" in w and "corrupt" in w for w in warnings), warnings
    assert any("step_0000003.pt (step 3)" in r.getMessage() for r in caplog.records)  # resumed from the previous
    assert_same_training_state(reference.state, final_state(results, reference))
    assert logged_steps(results / reference.stage_dir) == list(range(1, STEPS + 1))


# ------------------------------------------------------------------------------------- crashes mid-write


@pytest.mark.parametrize("moment", ["renaming the checkpoint", "before its checksum"])
def test_crash_while_writing_a_checkpoint_leaves_nothing_taken_for_valid(reference, tmp_path, monkeypatch, moment):
    results = tmp_path / "results"
    folder = results / reference.stage_dir / "checkpoints"
    target = checkpoint_path(folder, 4)
    if moment == "renaming the checkpoint":
        real_replace = fileio.os.replace

        def replace(src, dst):
            if Path(dst) == target:
                raise Crash()
            real_replace(src, dst)

        monkeypatch.setattr(fileio.os, "replace", replace)
    else:
        real_write_text = ckpt_mod.atomic_write_text

        def write_text(path, text):
            if Path(path).name == target.name + ".sha256":
                raise Crash()
            real_write_text(path, text)

        monkeypatch.setattr(ckpt_mod, "atomic_write_text", write_text)

    with pytest.raises(Crash):
        run_stage(reference.gin_text, reference.stage_id, results)
    monkeypatch.undo()
    assert target.exists() == (moment == "before its checksum")  # the .pt can be in place, its checksum not
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]  # no half-written leftovers
    assert newest_valid_checkpoint(folder) == checkpoint_path(folder, 3)
    assert not (results / reference.stage_dir / "DONE").exists()
    assert "Crash" in (results / reference.stage_dir / "FAILED").read_text()

    assert run_stage(reference.gin_text, reference.stage_id, results)["status"] == "done"
    assert not (results / reference.stage_dir / "FAILED").exists()
    assert_same_training_state(reference.state, final_state(results, reference))


def test_files_left_by_a_writer_killed_mid_write_are_never_valid(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    for step in (1, 2):
        save_checkpoint(folder, step, {"step": step, "w": torch.full((3,), float(step))})
    good = checkpoint_path(folder, 2).read_bytes()
    # What SIGKILL can leave behind: a temp file of step 5, step 4 renamed into place without its checksum,
    # and step 3 with a checksum of other bytes (a torn rename on a flaky file system).
    (folder / ".step_0000005.pt.x1y2.tmp").write_bytes(good[:10])
    checkpoint_path(folder, 4).write_bytes(good[: len(good) // 2])
    checkpoint_path(folder, 3).write_bytes(good)
    (folder / "step_0000003.pt.sha256").write_text("0" * 64 + "\n")
    with caplog.at_level(logging.WARNING):
        newest = newest_valid_checkpoint(folder)
    assert newest == checkpoint_path(folder, 2)
    assert load_checkpoint(newest)["step"] == 2
    assert sum("step_0000004.pt" in r.getMessage() or "step_0000003.pt" in r.getMessage()
               for r in caplog.records) == 2


def test_a_torn_metrics_line_from_a_kill_is_dropped_on_resume(reference, tmp_path):
    results = tmp_path / "results"
    run_stage(reference.gin_text, reference.stage_id, results, stop_event=StopAfter(3))
    metrics = results / reference.stage_dir / "metrics.jsonl"
    with metrics.open("a") as handle:
        handle.write('{"step": 4, "loss": 0.5, "gra')  # the process died in the middle of an append
    assert logged_steps(results / reference.stage_dir) == [1, 2, 3]  # readers skip the torn line
    assert run_stage(reference.gin_text, reference.stage_id, results)["status"] == "done"
    lines = metrics.read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == list(range(1, STEPS + 1))  # every line parses


def test_crash_while_writing_records_keeps_the_previous_table(tmp_path, monkeypatch):
    folder = standard_experiment(tmp_path).dir
    first = write_records(folder)
    before = (folder / "records.parquet").read_bytes()
    (folder / "scratch").rename(folder / "scratch-moved")  # the next table would differ
    real_replace = fileio.os.replace

    def replace(src, dst):
        if Path(dst).name == "records.parquet":
            raise Crash()
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(Crash):
        write_records(folder)
    monkeypatch.undo()
    assert (folder / "records.parquet").read_bytes() == before
    pd.testing.assert_frame_equal(read_records(folder), first)
    assert not list(folder.glob(".*.tmp"))


# ------------------------------------------------------------------------------------- concurrent writers


def _aggregate_repeatedly(folder: str, times: int) -> None:
    for _ in range(times):
        write_records(folder)


def test_two_aggregations_at_once_never_tear_or_duplicate_rows(tmp_path):
    folder = standard_experiment(tmp_path).dir
    expected = collect(folder)
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_aggregate_repeatedly, args=(str(folder), 15)) for _ in range(2)]
    for worker in workers:
        worker.start()
    reads = 0
    while any(w.is_alive() for w in workers):  # a reader meanwhile always sees a whole table
        if (folder / "records.parquet").is_file():
            pd.testing.assert_frame_equal(read_records(folder), expected)
            reads += 1
    for worker in workers:
        worker.join()
        assert worker.exitcode == 0
    assert reads > 0
    pd.testing.assert_frame_equal(read_records(folder), expected)
    csv = pd.read_csv(folder / "records.csv")
    assert len(csv) == len(expected) and not csv.duplicated().any()
    assert not list(folder.glob(".*.tmp"))


def test_two_runs_into_one_results_folder_at_once(reference, tmp_path):
    results = tmp_path / "results"
    cmd = harness_cmd("run", str(reference.recipe), "--results-dir", str(results), "--no-report")
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    stage_dir = results / reference.stage_dir
    assert logged_steps(stage_dir) == list(range(1, STEPS + 1))  # no row twice
    assert_same_training_state(reference.state, final_state(results, reference))


def test_a_run_that_waited_for_the_lock_skips_the_stage_the_other_run_finished(reference, tmp_path, monkeypatch):
    """The second run takes the lock only after the first wrote DONE: it must skip the stage, not resume it from
    the final checkpoint and rewrite its files (the test above cannot tell: its second run may start too late)."""
    import contextlib

    import harness.stage
    import harness.train

    stage_dir = tmp_path / "results" / reference.stage_dir

    @contextlib.contextmanager
    def lock_released_after_the_other_run_finished(path, waiting=""):
        stage_dir.mkdir(parents=True, exist_ok=True)
        (stage_dir / "DONE").write_text("step 6\n")
        yield

    def no_training(*args, **kwargs):
        raise AssertionError("the stage was trained again")

    monkeypatch.setattr(harness.stage, "exclusive_lock", lock_released_after_the_other_run_finished)
    monkeypatch.setattr(harness.train, "Trainer", no_training)
    assert run_stage(reference.gin_text, reference.stage_id, tmp_path / "results")["status"] == "skipped"
    assert sorted(p.name for p in stage_dir.iterdir()) == ["DONE"]  # nothing rewritten


# ------------------------------------------------------------------------------------- full or read-only disk


class FailingOs:
    """`os` as seen by harness/fileio.py, with writes failing once `full()` says so."""

    def __init__(self, full, code: int) -> None:
        self._full, self._code = full, code

    def __getattr__(self, name):
        return getattr(os, name)

    def _check(self) -> None:
        if self._full():
            raise OSError(self._code, os.strerror(self._code))

    def write(self, fd, data):
        self._check()
        return os.write(fd, data)

    def fsync(self, fd):
        self._check()
        return os.fsync(fd)


def test_disk_full_mid_training_is_a_clear_error_and_keeps_the_last_checkpoint(reference, tmp_path, monkeypatch,
                                                                                 capsys):
    results = tmp_path / "results"
    folder = results / reference.stage_dir / "checkpoints"
    monkeypatch.setattr(fileio, "os", FailingOs(lambda: (folder / "step_0000003.pt.sha256").exists(), errno.ENOSPC))
    code = cli_main(["run", str(reference.recipe), "--results-dir", str(results), "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("harness run: error: ") and "No space left on device" in err[-1]
    assert "cannot write" in err[-1] and "--results-dir" in err[-1]
    assert not (results / reference.stage_dir / "DONE").exists()
    monkeypatch.undo()
    newest = newest_valid_checkpoint(folder)
    assert newest == checkpoint_path(folder, 3) and load_checkpoint(newest)["step"] == 3


def test_read_only_results_folder_is_a_clear_error(tmp_path, monkeypatch, capsys, reference):
    # Tests run as root, where chmod does not stop writes: make every write of the harness fail instead.
    results = tmp_path / "results"
    monkeypatch.setattr(fileio, "os", FailingOs(lambda: True, errno.EROFS))
    code = cli_main(["run", str(reference.recipe), "--results-dir", str(results), "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "Read-only file system" in err[0] and "--results-dir" in err[0]
    assert not list(results.rglob("*.pt")) and not list(results.rglob("DONE"))

    folder = standard_experiment(tmp_path / "synthetic").dir
    assert cli_main(["report", str(folder), "--quiet"]) == 2
    assert "Read-only file system" in capsys.readouterr().err
    assert not (folder / "records.parquet").exists()


# ------------------------------------------------------------------------------------- failing stages, NaN


def test_failing_stage_is_marked_failed_and_the_other_arms_still_report(reference, tmp_path, capsys):
    recipe = tmp_path / "two_arms.gin"
    recipe.write_text(MICRO + """
diverge/Stage.lr = 1e30
diverge/Stage.steps = 3
Experiment.arms = {'diverge': [@diverge/Stage()], 'scratch': [@scratch/Stage()]}
""")
    results = tmp_path / "results"
    code = cli_main(["run", str(recipe), "--results-dir", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    assert "diverge" in err.strip().splitlines()[-1]
    experiment = results / "tiny"
    plan = json.loads((experiment / "plan.json").read_text())
    dirs = {info["name"]: experiment / info["dir"] for info in plan["stages"].values()}
    assert "at step 1" in (dirs["diverge"] / "FAILED").read_text()
    assert (dirs["scratch"] / "DONE").is_file()
    assert_same_training_state(reference.state, final_state(results, reference))

    assert cli_main(["status", str(results), "--json"]) == 0
    states = {r["stage"]: r["state"] for r in map(json.loads, capsys.readouterr().out.splitlines())}
    assert states == {"diverge": "failed", "scratch": "done"}
    records = pd.read_csv(experiment / "records.csv")
    assert set(records[records.arm == "diverge"].status) == {"failed"}
    assert set(records[records.arm == "scratch"].status) == {"done"}
    report = (experiment / "report.md").read_text()
    assert any("diverge" in line and "failed" in line for line in report.splitlines())
    assert any("scratch" in line and "done" in line for line in report.splitlines())


def spoil_one_step(monkeypatch, bad_step: int, spoil) -> None:
    """Replace the training loss of one chosen step (0-based) by `spoil(loss, model)`."""
    from harness.diffusion import GaussianDiffusion
    from harness.train import Trainer

    current = {"step": -1}
    real_draw, real_loss = Trainer.draw, GaussianDiffusion.loss_at

    def draw(self, step):
        current["step"] = step
        return real_draw(self, step)

    def loss_at(self, model, *args, **kwargs):
        loss = real_loss(self, model, *args, **kwargs)
        return spoil(loss, model) if current["step"] == bad_step else loss

    monkeypatch.setattr(Trainer, "draw", draw)
    monkeypatch.setattr(GaussianDiffusion, "loss_at", loss_at)


@pytest.fixture
def nan_loss_at(monkeypatch):
    """Make the training loss NaN for the batch of one chosen step (0-based), whatever the weights."""
    return lambda bad_step: spoil_one_step(monkeypatch, bad_step, lambda loss, model: loss * float("nan"))


def test_nan_loss_stops_the_stage_naming_the_step_and_keeps_the_last_good_checkpoint(reference, tmp_path,
                                                                                    nan_loss_at, capsys):
    nan_loss_at(3)  # the 4th batch: steps 1-3 are done and checkpointed
    results = tmp_path / "results"
    code = cli_main(["run", str(reference.recipe), "--results-dir", str(results), "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "loss became nan at step 3" in err[-1] and "nan_policy" in err[-1]
    stage_dir = results / reference.stage_dir
    assert "at step 3" in (stage_dir / "FAILED").read_text() and not (stage_dir / "DONE").exists()
    newest = newest_valid_checkpoint(stage_dir / "checkpoints")
    assert newest == checkpoint_path(stage_dir / "checkpoints", 3)
    state = load_checkpoint(newest)
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_nan_policy_skip_skips_the_batch_and_goes_on(reference, tmp_path, nan_loss_at):
    nan_loss_at(3)
    text = reference.gin_text + "\nStage.nan_policy = 'skip'\nStage.keep_checkpoints = 10\n"
    plan = plan_from_gin(text)
    sid = plan.arms["scratch"][0]
    results = tmp_path / "results"
    assert run_stage(text, sid, results)["status"] == "done"
    folder = plan.stage_dir(results, sid) / "checkpoints"
    states = {s: load_checkpoint(checkpoint_path(folder, s)) for s in (3, 4, 5)}
    for key in ("model", "ema"):  # the skipped batch changed nothing; the next one trained as usual
        for name, tensor in states[3][key].items():
            assert torch.equal(states[4][key][name], tensor), f"{key}.{name}"
    assert any(not torch.equal(states[5]["model"][n], t) for n, t in states[4]["model"].items())
    assert all(torch.isfinite(t).all() for t in load_checkpoint(checkpoint_path(folder, STEPS))["model"].values())
    rows = {r["step"]: r for r in read_jsonl(plan.stage_dir(results, sid) / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert rows[4]["loss"] != rows[4]["loss"] and rows[5]["loss"] == rows[5]["loss"]  # NaN, then finite


@pytest.fixture
def nan_gradient_at(monkeypatch):
    """Make the gradients NaN for the batch of one chosen step while its loss stays finite: the loss gains
    0 * sqrt(|p - p|^2) for the first parameter, whose value is 0 but whose gradient is inf * 0 = NaN."""

    def spoil(loss, model):
        p = next(model.parameters())
        return loss + torch.sqrt((p - p.detach()).pow(2).sum())

    return lambda bad_step: spoil_one_step(monkeypatch, bad_step, spoil)


# no clipping and no log step in reach: nothing else computes the gradient norm
QUIET = "\nStage.grad_clip = 0\nStage.log_every = 1000\nStage.keep_checkpoints = 10\n"


def test_nan_gradient_with_a_finite_loss_is_skipped_under_nan_policy_skip(reference, tmp_path, nan_gradient_at):
    nan_gradient_at(3)
    text = reference.gin_text + QUIET + "Stage.nan_policy = 'skip'\n"
    plan = plan_from_gin(text)
    sid = plan.arms["scratch"][0]
    results = tmp_path / "results"
    assert run_stage(text, sid, results)["status"] == "done"
    folder = plan.stage_dir(results, sid) / "checkpoints"
    before, after = (load_checkpoint(checkpoint_path(folder, s)) for s in (3, 4))
    for key in ("model", "ema"):  # the batch with NaN gradients changed nothing
        assert all(torch.equal(after[key][n], t) for n, t in before[key].items()), key
    final = load_checkpoint(checkpoint_path(folder, STEPS))
    assert all(torch.isfinite(t).all() for t in final["model"].values())


def test_nan_gradient_under_nan_policy_stop_is_never_checkpointed(reference, tmp_path, nan_gradient_at):
    nan_gradient_at(3)
    text = reference.gin_text + QUIET
    plan = plan_from_gin(text)
    sid = plan.arms["scratch"][0]
    results = tmp_path / "results"
    from harness.update import NonFiniteLoss

    with pytest.raises(NonFiniteLoss, match="weights became non-finite by step 4"):
        run_stage(text, sid, results)
    stage_dir = plan.stage_dir(results, sid)
    assert "weights became non-finite by step 4" in (stage_dir / "FAILED").read_text()
    newest = newest_valid_checkpoint(stage_dir / "checkpoints")
    assert newest == checkpoint_path(stage_dir / "checkpoints", 3)
    assert all(torch.isfinite(t).all() for t in load_checkpoint(newest)["model"].values())


def test_fp16_overflow_is_left_to_the_grad_scaler_not_stopped(reference, tmp_path, nan_gradient_at):
    """With fp16 the scaler owns non-finite gradients: it skips that update and halves its scale; the stage
    goes on (with clipping on, the norm is computed and non-finite, which must not stop the stage)."""
    from harness.train import TrainContext, Trainer

    nan_gradient_at(1)
    spec = plan_from_gin(reference.gin_text + "\nStage.precision = 'fp16'\nStage.grad_clip = 1.0\n")
    spec = next(iter(spec.stages.values())).spec
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))
    trainer.train_step(0)
    weights = {n: t.clone() for n, t in trainer.model.state_dict().items()}
    scale = trainer.update.scaler.get_scale()
    loss, norm = trainer.train_step(1)
    assert math.isfinite(loss) and not math.isfinite(norm)
    assert all(torch.equal(trainer.model.state_dict()[n], t) for n, t in weights.items())
    assert trainer.update.scaler.get_scale() == scale / 2
    loss, norm = trainer.train_step(2)
    assert math.isfinite(loss) and math.isfinite(norm)
    assert any(not torch.equal(trainer.model.state_dict()[n], t) for n, t in weights.items())


# ------------------------------------------------------------------------------------- resume bookkeeping


def _with(reference: Reference, tmp_path: Path, *bindings: str) -> tuple[str, str, Path]:
    """The micro recipe with `bindings`: (gin text, stage id, stage folder under tmp_path/results)."""
    text = load_recipe(reference.recipe, list(bindings))
    plan = plan_from_gin()
    sid = plan.arms["scratch"][0]
    return text, sid, plan.stage_dir(tmp_path / "results", sid)


@pytest.fixture
def fake_scores(monkeypatch):
    """Replace FID scoring by a row per evaluated step; the first call can be made to crash."""
    import harness.evaluate

    calls: list[int] = []
    crash_first = {"on": False}

    def evaluate_stage(ema, diffusion, data, cfg, step, run_dir, device, extra=None):
        calls.append(step)
        if crash_first["on"] and len(calls) == 1:
            raise Crash()
        fileio.append_jsonl(Path(run_dir) / "eval.jsonl", {"step": step, "frechet_inception_distance": 1.0})

    monkeypatch.setattr(harness.evaluate, "evaluate_stage", evaluate_stage)
    return calls, crash_first


def test_an_evaluation_cut_short_right_after_a_checkpoint_is_done_on_resume(reference, tmp_path, fake_scores):
    """Step 2 is checkpointed, then its evaluation dies: the rerun resumes *at* step 2 and must still score it."""
    calls, crash_first = fake_scores
    crash_first["on"] = True
    text, sid, stage_dir = _with(reference, tmp_path, "Stage.eval = @EvalConfig()", "EvalConfig.steps = (2,)")
    with pytest.raises(Crash):
        run_stage(text, sid, tmp_path / "results")
    assert newest_valid_checkpoint(stage_dir / "checkpoints").name == "step_0000002.pt"
    assert run_stage(text, sid, tmp_path / "results")["status"] == "done"
    assert calls == [2, 2, STEPS]
    assert [row["step"] for row in read_jsonl(stage_dir / "eval.jsonl")] == [2, STEPS]


def test_rows_logged_after_the_resumed_checkpoint_are_redone_once(reference, tmp_path, fake_scores):
    """An evaluation row newer than the checkpoint a run resumes from scored weights the rerun recomputes: it
    is dropped and scored again, so each step has one row, from the run that goes on."""
    calls, _ = fake_scores
    text, sid, stage_dir = _with(reference, tmp_path, "Stage.eval = @EvalConfig()", "EvalConfig.steps = (4,)")
    assert run_stage(text, sid, tmp_path / "results", stop_event=StopAfter(3))["status"] == "preempted"
    fileio.append_jsonl(stage_dir / "eval.jsonl", {"step": 4, "frechet_inception_distance": 99.0})  # stale
    assert run_stage(text, sid, tmp_path / "results")["status"] == "done"
    assert calls == [4, STEPS]
    rows = read_jsonl(stage_dir / "eval.jsonl")
    assert [(r["step"], r["frechet_inception_distance"]) for r in rows] == [(4, 1.0), (STEPS, 1.0)]
    assert logged_steps(stage_dir) == list(range(1, STEPS + 1))


def test_a_run_killed_before_its_first_checkpoint_does_not_log_its_steps_twice(reference, tmp_path):
    class DieAfter(StopAfter):
        def is_set(self) -> bool:
            if super().is_set():
                raise Crash()
            return False

    text, sid, stage_dir = _with(reference, tmp_path, "Stage.checkpoint_every = 100")
    with pytest.raises(Crash):
        run_stage(text, sid, tmp_path / "results", stop_event=DieAfter(3))
    assert logged_steps(stage_dir) == [1, 2, 3] and newest_valid_checkpoint(stage_dir / "checkpoints") is None
    assert run_stage(text, sid, tmp_path / "results")["status"] == "done"
    assert logged_steps(stage_dir) == list(range(1, STEPS + 1))
    final = load_checkpoint(checkpoint_path(stage_dir / "checkpoints", STEPS))
    assert_same_training_state(final, reference.state)  # checkpoint_every changes the files, not the training
