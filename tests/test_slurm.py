"""The launcher on a real one-node SLURM cluster: dependencies, sweeps as job arrays, preemption and requeue,
stages of two tasks (DDP ranks, gloo on CPU), and the cluster profile's options reaching the job.

Skipped with the reason when no cluster is reachable; with CI=true the fixture starts one (ci/slurm/start.sh)
and a missing cluster fails the tests instead.
"""
from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest_slurm import (  # noqa: F401
    assert_same_weights,
    final_weights,
    one_process_weights,
    scontrol_job,
    slurm_cluster,
    task_logs,
    wait_until,
    write_fast_recipe,
)

from harness.cli import main as harness_main

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

FAST_SLURM = ["--gin", "SlurmLauncher.poll_seconds = 1", "--gin", "SlurmLauncher.time_min = 10",
              "--gin", "SlurmLauncher.job_name = 'harness-test'"]


def _job(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "job.json").read_text())


def _steps(stage_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]


def _only(folder: Path, pattern: str) -> Path:
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {folder}, found {found}"
    return found[0]


def test_run_through_slurm_honours_the_dependency(slurm_cluster, tmp_path):
    recipe = write_fast_recipe(tmp_path)
    results = tmp_path / "results"
    code = harness_main(["run", str(recipe), "--launcher", "slurm", "--results-dir", str(results), "--no-report",
                         *FAST_SLURM])
    assert code == 0
    exp = results / "fast"
    scratch, pretrain = _only(exp / "scratch", "scratch-*"), _only(exp / "two_stage", "pretrain-*")
    finetune = _only(exp / "two_stage", "finetune-*")
    for stage, steps in ((scratch, 3), (pretrain, 3), (finetune, 2)):
        assert (stage / "DONE").is_file(), stage
        assert _steps(stage) == list(range(1, steps + 1))
        assert _job(stage)["launcher"] == "slurm"
    ids = {_job(s)["job_id"] for s in (scratch, pretrain, finetune)}
    assert len(ids) == 3  # one job per stage
    assert _job(finetune)["dependency"] == f"afterok:{_job(pretrain)['job_id']}"
    assert _job(scratch)["dependency"] is None and _job(pretrain)["dependency"] is None
    # The fine-tuning job started only after the pretraining stage had finished.
    assert (finetune / "stage.json").stat().st_mtime >= (pretrain / "DONE").stat().st_mtime
    # SLURM's own times agree (DONE is written just before the job exits, so let it exit first).
    wait_until(lambda: scontrol_job(_job(finetune)["job_id"]).get("JobState") == "COMPLETED", 60,
               "the fine-tuning job to exit")
    pre, fine = scontrol_job(_job(pretrain)["job_id"]), scontrol_job(_job(finetune)["job_id"])
    assert pre["JobState"] == "COMPLETED"
    assert fine["StartTime"] >= pre["EndTime"]  # ISO timestamps compare as strings

    from harness.commands.status import collect

    states = {(r["stage"], r["state"], r["job_id"], r["step"]) for r in collect(results)}
    assert states == {("scratch", "done", _job(scratch)["job_id"], 3),
                      ("pretrain", "done", _job(pretrain)["job_id"], 3),
                      ("finetune", "done", _job(finetune)["job_id"], 2)}


def test_sweep_becomes_job_arrays_with_the_baseline_once(slurm_cluster, tmp_path):
    recipe = write_fast_recipe(tmp_path)
    results = tmp_path / "results"
    code = harness_main(["sweep", str(recipe), "--grid", "MASK_RATIO=[0.5,0.75]",
                         "--grid", "pretrain/Stage.mask=['@PatchMask()','@BlockMask()']", "--launcher", "slurm",
                         "--results-dir", str(results), *FAST_SLURM])
    assert code == 0
    from harness.sweep import build_sweep, parse_grid, sweep_folder_name

    folder = results / sweep_folder_name(build_sweep(str(recipe), FAST_SLURM[1::2], [
        parse_grid("MASK_RATIO=[0.5,0.75]"), parse_grid("pretrain/Stage.mask=['@PatchMask()','@BlockMask()']")]))
    experiments = sorted(p.parent for p in folder.glob("*/plan.json"))
    assert len(experiments) == 4 and not list(results.glob("*/plan.json"))  # the points are in the sweep folder

    # The shared scratch baseline: one real folder, the other three points link to it; it trained once.
    scratch_dirs = [_only(e / "scratch", "scratch-*") for e in experiments]
    real = [d for d in scratch_dirs if not d.is_symlink()]
    assert len(real) == 1 and all(d.resolve() == real[0].resolve() for d in scratch_dirs)
    assert _steps(real[0]) == [1, 2, 3]

    pretrains = [_only(e / "two_stage", "pretrain-*") for e in experiments]
    finetunes = [_only(e / "two_stage", "finetune-*") for e in experiments]
    assert len({p.name for p in pretrains}) == 4  # the grid reaches every pretraining stage
    level0 = [_job(d) for d in [*pretrains, real[0]]]
    level1 = [_job(d) for d in finetunes]
    # Each level is one array; fine-tuning element i waits for pretraining element i (aftercorr).
    assert len({j["array_job_id"] for j in level0}) == 1 and len({j["array_job_id"] for j in level1}) == 1
    assert sorted(j["array_index"] for j in level0) == [0, 1, 2, 3, 4]
    assert sorted(j["array_index"] for j in level1) == [0, 1, 2, 3]
    assert {j["dependency"] for j in level1} == {f"aftercorr:{level0[0]['array_job_id']}"}
    for pre, fine in zip(pretrains, finetunes):
        assert _job(fine)["array_index"] == _job(pre)["array_index"]
        assert _job(fine)["job_id"] == f"{_job(fine)['array_job_id']}_{_job(fine)['array_index']}"
        assert (fine / "DONE").is_file() and (pre / "DONE").is_file()
        assert (fine / "stage.json").stat().st_mtime >= (pre / "DONE").stat().st_mtime
    record = json.loads((folder / "sweep.json").read_text())
    assert sorted(p["experiment"] for p in record["points"]) == [e.name for e in experiments]


def test_a_submission_the_cluster_refuses_is_one_line_naming_the_binding(slurm_cluster, tmp_path, capsys):
    """A partition the cluster does not have: sbatch refuses, and submitit's FailedJobError used to escape."""
    recipe = write_fast_recipe(tmp_path)
    code = harness_main(["run", str(recipe), "--launcher", "slurm", "--results-dir", str(tmp_path / "results"),
                         "--no-report", *FAST_SLURM, "--gin", "SlurmLauncher.partition = 'nope'"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("harness run: error: SLURM refused to submit stage ")
    assert "invalid partition" in err.lower() and "change SlurmLauncher.partition (now 'nope')" in err


def test_status_shows_the_child_of_a_failed_job_as_blocked(slurm_cluster, tmp_path):
    """The fine-tuning job waits on a pretraining job that fails: SLURM cancels it (--kill-on-invalid-dep), and
    `harness status` says blocked, as the records do, rather than failed."""
    from harness.commands.status import collect as status_of
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin
    from harness.launch import SlurmLauncher, launch_plan
    from harness.results import collect

    text = load_recipe(write_fast_recipe(tmp_path), [
        "Experiment.arms = {'two_stage': [@pretrain/Stage(), @finetune/Stage()]}",
        "pretrain/DataConfig.source = 'folder'", f"pretrain/DataConfig.root = '{tmp_path / 'missing'}'"])
    plan = plan_from_gin(text)
    results = tmp_path / "results"
    out = launch_plan(plan, text, results, SlurmLauncher(time_min=10, poll_seconds=1, job_name="harness-test"))
    assert [(r["name"], r["status"]) for r in out] == [("pretrain", "failed"), ("finetune", "cancelled")]
    states = {r["stage"]: (r["state"], r["detail"]) for r in status_of(results)}
    assert states["pretrain"][0] == "failed"
    assert states["finetune"] == ("blocked", f"waits for its parent stage pretrain ({out[0]['stage_id'][:8]}), "
                                             "which failed")
    assert set(collect(results / "fast").status) == {"failed", "blocked"}


def test_preempted_job_requeues_and_resumes_without_duplicate_rows(slurm_cluster, tmp_path):
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin
    from harness.launch import SlurmLauncher, launch_plan
    from harness.launch.state import slurm_queue, stage_state

    steps = 100  # long enough to signal mid-training (the test reacts within ~0.1 s), short enough to finish
    recipe = write_fast_recipe(tmp_path)
    text = load_recipe(recipe, [f"scratch/Stage.steps = {steps}", "Stage.checkpoint_every = 1000",
                                "Stage.keep_checkpoints = 5",
                                "Experiment.arms = {'scratch': [@scratch/Stage()]}"])
    plan = plan_from_gin(text)
    results = tmp_path / "results"
    (out,) = launch_plan(plan, text, results, SlurmLauncher(time_min=10, max_requeues=2), wait=False)
    assert out["status"] == "submitted"
    job_id, stage_dir = out["job_id"], Path(out["dir"])

    wait_until(lambda: (stage_dir / "metrics.jsonl").is_file() and len(_steps(stage_dir)) >= 3, 120,
               "the job to train a few steps", every=0.05)
    # SLURM's warning signal (what --signal=USR2@N sends before the time limit).
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    wait_until(lambda: scontrol_job(job_id).get("Restarts") == "1"
               and scontrol_job(job_id).get("JobState") == "PENDING", 60, "the job to requeue itself")
    requeued_at = time.time()
    assert stage_state(stage_dir, slurm_queue()).state == "requeued"
    stopped = _steps(stage_dir)[-1]
    assert 3 <= stopped < steps, "the signal arrived after training ended; the test cannot check a resume"
    assert (stage_dir / "checkpoints" / f"step_{stopped:07d}.pt").is_file()  # saved on the way out

    # SLURM holds a requeued job back for a while; let it start now.
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
    wait_until(lambda: (stage_dir / "DONE").is_file(), 180, "the requeued job to finish")

    assert _steps(stage_dir) == list(range(1, steps + 1))  # every step once: nothing lost, nothing repeated
    rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    # Resumed, not restarted: rows up to the checkpoint predate the requeue, the rest come after it.
    assert rows[stopped - 1]["time"] <= requeued_at < rows[stopped]["time"]
    assert scontrol_job(job_id).get("Restarts", "1") == "1"
    assert "requeueing job" in Path(_job(stage_dir)["stderr"]).read_text()


TWO_RANKS = ["scratch/Stage.steps = 4", "Stage.batch_size = 8", "Experiment.arms = {'scratch': [@scratch/Stage()]}"]


def test_a_two_task_job_trains_like_one_process_with_the_profiles_options(slurm_cluster, tmp_path, capsys):
    """`harness run --launcher slurm` with tasks_per_node = 2: the dry run shows the job's sbatch options, the job
    carries them (scontrol), both ranks train to DONE without a warning, the weights are one process's on the
    same global batches, and `harness status` shows the job."""
    from harness.config import load_recipe

    recipe = write_fast_recipe(tmp_path)
    results = tmp_path / "results"
    gin = [*TWO_RANKS, "SlurmLauncher.tasks_per_node = 2", "SlurmLauncher.time_min = 7",
           "SlurmLauncher.extra_sbatch = ['--comment=harness-two-ranks']", "SlurmLauncher.poll_seconds = 1",
           "SlurmLauncher.job_name = 'harness-test'"]
    args = ["run", str(recipe), "--launcher", "slurm", "--results-dir", str(results), "--no-report",
            *[arg for binding in gin for arg in ("--gin", binding)]]
    assert harness_main([*args, "--dry-run"]) == 0
    preview = capsys.readouterr().out
    for option in ("--ntasks-per-node=2", "--time=7", "--comment=harness-two-ranks", "--job-name=harness-test-scratch"):
        assert option in preview.split(), option
    assert harness_main(args) == 0

    stage_dir = _only(results / "fast" / "scratch", "scratch-*")
    assert (stage_dir / "DONE").is_file() and _steps(stage_dir) == [1, 2, 3, 4]
    job_id = _job(stage_dir)["job_id"]
    job = scontrol_job(job_id)
    assert (job["NumTasks"], job["TimeLimit"], job["Comment"], job["Requeue"], job["JobName"]) == (
        "2", "00:07:00", "harness-two-ranks", "1", "harness-test-scratch")
    logs = task_logs(stage_dir, 2)
    for rank, log in enumerate(logs):
        assert f"rank {rank} of 2" in log, log
        assert not re.search("warn", log, re.IGNORECASE), log  # e.g. DDP's FutureWarning on broadcast_buffers
    text = load_recipe(recipe, TWO_RANKS)
    assert_same_weights(final_weights(stage_dir), one_process_weights(text, tmp_path / "single"))

    capsys.readouterr()
    assert harness_main(["status", str(results)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "scratch" in line)
    assert job_id in row and "done" in row, row


def test_a_requeued_two_task_job_resumes_every_rank_from_the_same_checkpoint(slurm_cluster, tmp_path):
    """`scontrol requeue` while both ranks train: they stop at the same step (the stop flag is all-reduced), rank 0
    checkpoints, and after the restart each rank resumes from that checkpoint; the final weights are those of one
    uninterrupted process."""
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin
    from harness.launch import SlurmLauncher, launch_plan
    from harness.launch.state import slurm_queue, stage_state

    steps = 200  # ~10 s of training: requeued within a second of the first checkpoint, long before the end
    bindings = [f"scratch/Stage.steps = {steps}", "Stage.batch_size = 8", "Stage.checkpoint_every = 5",
                "Stage.keep_checkpoints = 5", "Experiment.arms = {'scratch': [@scratch/Stage()]}"]
    text = load_recipe(write_fast_recipe(tmp_path), bindings)
    launcher = SlurmLauncher(tasks_per_node=2, time_min=10, job_name="harness-test")
    (out,) = launch_plan(plan_from_gin(text), text, tmp_path / "results", launcher, wait=False)
    job_id, stage_dir = out["job_id"], Path(out["dir"])

    wait_until(lambda: list((stage_dir / "checkpoints").glob("step_*.pt")) if (stage_dir / "checkpoints").is_dir()
               else [], 180, "the first checkpoint", every=0.05)
    assert stage_state(stage_dir, slurm_queue()).state == "running"
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
    wait_until(lambda: scontrol_job(job_id).get("Restarts") == "1"
               and scontrol_job(job_id).get("JobState") == "PENDING", 60, "the job to be requeued")
    assert stage_state(stage_dir, slurm_queue()).state == "requeued"  # what `harness status` shows
    stopped = _steps(stage_dir)[-1]
    assert 5 <= stopped < steps, "the requeue came after training ended; the test cannot check a resume"
    assert (stage_dir / "checkpoints" / f"step_{stopped:07d}.pt").is_file()  # saved on the way out

    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
    wait_until(lambda: (stage_dir / "DONE").is_file(), 240, "the requeued job to finish")
    assert _steps(stage_dir) == list(range(1, steps + 1))  # every step once: nothing lost, nothing repeated
    resumed = re.compile(r"resumed stage scratch from \S+/step_(\d+)\.pt \(step (\d+)\)")
    for rank, log in enumerate(task_logs(stage_dir, 2)):
        assert log.count(f"rank {rank} of 2") == 2, log  # started, requeued, started again
        assert [tuple(map(int, m)) for m in resumed.findall(log)] == [(stopped, stopped)], log
    assert_same_weights(final_weights(stage_dir), one_process_weights(text, tmp_path / "single"))
