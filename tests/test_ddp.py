"""Data-parallel training synchronises: 2 gloo ranks end with identical weights, equal to one process.

Both runs go through the launcher's job body (`run_stage_job`: torch.distributed set-up from torchrun's
environment, the stop flag all-reduced every step, the stage, the trainer's DDP). The test only wraps
`Trainer.run` to save each rank's final weights, which the run folder (written by rank 0) cannot show.
The same through the local launcher (`LocalLauncher(tasks_per_node=2)`: submitit's rendezvous); SLURM's
two-task jobs are in test_slurm.py.
"""
from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch
from conftest_slurm import assert_same_weights, final_weights, one_process_weights, task_logs, write_fast_recipe

pytestmark = pytest.mark.slow

STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, world_size: int, port: int, gin_text: str, stage_id: str, results_dir: str,
           out: str) -> None:
    """One rank: torchrun's environment, then the launcher's job body; saves this rank's final weights."""
    import harness.train
    from harness.launch.worker import run_stage_job

    threads = torch.get_num_threads()  # restored below: the single-rank run happens in the pytest process
    torch.set_num_threads(1)
    os.environ.pop("SUBMITIT_EXECUTOR", None)
    if world_size > 1:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    original = harness.train.Trainer.run

    def run_and_keep_weights(self):
        status = original(self)
        torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()}, out.format(rank=rank))
        # what the step called: DDP around the attention-kernel wrapper around the model
        net = self.net.module if world_size > 1 else self.net
        Path(out.format(rank=rank) + ".net").write_text(f"{type(self.net).__name__} {getattr(net, 'backend', '-')}")
        return status

    harness.train.Trainer.run = run_and_keep_weights
    try:
        result = run_stage_job(gin_text, stage_id, results_dir)
    finally:
        harness.train.Trainer.run = original
        torch.set_num_threads(threads)
    assert result["status"] == "done"


def _stage(tmp_path: Path, batch_size: int) -> tuple[str, str]:
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin

    text = load_recipe(write_fast_recipe(tmp_path), [
        f"scratch/Stage.steps = {STEPS}", f"Stage.batch_size = {batch_size}", "Stage.checkpoint_every = 100",
        "Stage.attention = 'math'",  # a run option that wraps the model: DDP must wrap that wrapper
        "Experiment.arms = {'scratch': [@scratch/Stage()]}"])
    (sid,) = plan_from_gin(text).stages
    return text, sid


def test_two_gloo_ranks_match_one_process_on_the_same_global_batches(tmp_path):
    import torch.multiprocessing as mp

    from harness.checkpoint import load_checkpoint, newest_valid_checkpoint

    text, sid = _stage(tmp_path, batch_size=8)
    out = str(tmp_path / "weights_{rank}.pt")
    mp.spawn(_train, args=(2, _free_port(), text, sid, str(tmp_path / "ddp"), out), nprocs=2, join=True)
    rank0, rank1 = torch.load(out.format(rank=0)), torch.load(out.format(rank=1))
    assert Path(out.format(rank=1) + ".net").read_text() == "DistributedDataParallel math"

    single_out = str(tmp_path / "single_{rank}.pt")
    _train(0, 1, 0, text, sid, str(tmp_path / "single"), single_out)
    single = torch.load(single_out.format(rank=0))

    # The same global batch of 8 on one process with only half of it (what an unsynchronised rank learns).
    (tmp_path / "half").mkdir()
    half_text, half_sid = _stage(tmp_path / "half", batch_size=4)
    half_out = str(tmp_path / "half_{rank}.pt")
    _train(0, 1, 0, half_text, half_sid, str(tmp_path / "half_run"), half_out)
    half = torch.load(half_out.format(rank=0))

    assert rank0.keys() == rank1.keys() == single.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the ranks"
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-5, msg=f"{name} vs one process")
    # The comparison can fail: training moved the weights, and half the batch moves them elsewhere.
    moved = max((single[k] - half[k]).abs().max().item() for k in single if single[k].is_floating_point())
    assert moved > 1e-3
    # Only rank 0 wrote the run folder; its checkpoint holds the synchronised weights after all the steps.
    ckpt = load_checkpoint(newest_valid_checkpoint(tmp_path / "ddp" / "fast" / "scratch" /
                                                   f"scratch-{sid[:8]}" / "checkpoints"))
    assert ckpt["step"] == STEPS
    assert all(torch.equal(ckpt["model"][k], rank0[k]) for k in rank0)
    # The logged loss is the whole global batch's (all-reduced; each rank decides on it, e.g. for NaN).
    from harness.fileio import read_jsonl

    def losses(root: Path) -> list[float]:
        return [row["loss"] for row in read_jsonl(next(root.rglob("metrics.jsonl")))]

    assert losses(tmp_path / "ddp") and losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"),
                                                                                  rel=1e-5)


def _two_ranks(target, gin_text: str, stage_id: str, tmp_path: Path) -> list[str]:
    """Run `target(rank, 2, port, gin_text, stage_id, results_dir, out)` as two spawned ranks (killed after 120 s:
    a rank left waiting for the other is the failure some tests look for); each rank's outcome file, in order."""
    import multiprocessing

    out = str(tmp_path / "outcome_{rank}")
    context, port = multiprocessing.get_context("spawn"), _free_port()
    ranks = [context.Process(target=target, args=(r, 2, port, gin_text, stage_id, str(tmp_path / "results"), out))
             for r in (0, 1)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout=120)
    for p in ranks:
        if p.is_alive():
            p.kill()
    return [Path(out.format(rank=r)).read_text() if Path(out.format(rank=r)).exists() else "no outcome"
            for r in (0, 1)]


def _run_stage_as_rank(rank: int, world_size: int, port: int, gin_text: str, stage_id: str, results_dir: str,
                       out: str) -> None:
    """One rank of a stage that another run finishes while rank 0 waits for its lock."""
    import contextlib

    import torch.distributed as dist

    import harness.stage

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    if rank == 0:
        @contextlib.contextmanager
        def lock_released_after_the_other_run_finished(path, waiting=""):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            (Path(path).parent / "DONE").write_text("step 4\n")
            yield

        harness.stage.exclusive_lock = lock_released_after_the_other_run_finished
    else:
        harness.stage.DONE_MARKER = "DONE-invisible"  # this rank cannot see DONE by itself
    try:
        Path(out.format(rank=rank)).write_text(harness.stage.run_stage(gin_text, stage_id, results_dir)["status"])
    finally:
        dist.destroy_process_group()


def test_every_rank_follows_rank_0s_decision_to_skip_a_finished_stage(tmp_path):
    """Only rank 0 takes the stage's lock: had the other ranks decided on their own, a rank that saw no DONE
    would wait in DDP's set-up for a rank 0 that had gone home (until the 6 h process-group timeout)."""
    text, sid = _stage(tmp_path, batch_size=8)
    outcomes = _two_ranks(_run_stage_as_rank, text, sid, tmp_path)
    assert outcomes == ["skipped", "skipped"]


def _train_with_nan_on_rank_1(rank: int, world_size: int, port: int, gin_text: str, stage_id: str,
                              results_dir: str, out: str) -> None:
    """One rank; rank 1 alone gets a NaN loss at step 1 (0-based)."""
    import torch.distributed as dist

    from harness.diffusion import GaussianDiffusion
    from harness.stage import run_stage
    from harness.train import Trainer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    if rank == 1:
        current, real_draw, real_loss = {"step": -1}, Trainer.draw, GaussianDiffusion.loss_at

        def draw(self, step):
            current["step"] = step
            return real_draw(self, step)

        def loss_at(self, *args, **kwargs):
            loss = real_loss(self, *args, **kwargs)
            return loss * float("nan") if current["step"] == 1 else loss

        Trainer.draw, GaussianDiffusion.loss_at = draw, loss_at
    try:
        run_stage(gin_text, stage_id, results_dir)
        outcome = "finished"
    except Exception as err:  # noqa: BLE001 (what each rank ended with is the point)
        outcome = f"{type(err).__name__}: {err}"
    Path(out.format(rank=rank)).write_text(outcome)


def test_a_nan_loss_on_one_rank_stops_every_rank(tmp_path):
    """Ranks decide on the all-reduced loss: a rank that decided on its own finite loss would go on alone (and
    wait for the stopped rank at the next all-reduce). Without clipping or a log step no gradient norm is
    computed, so the loss is all that tells the ranks."""
    from harness.config import load_recipe
    from harness.experiment import plan_from_gin

    text = load_recipe(write_fast_recipe(tmp_path), [
        f"scratch/Stage.steps = {STEPS}", "Stage.batch_size = 8", "Stage.checkpoint_every = 100",
        "Stage.grad_clip = 0.0", "Stage.log_every = 100", "Stage.nan_policy = 'stop'",
        "Experiment.arms = {'scratch': [@scratch/Stage()]}"])
    (sid,) = plan_from_gin(text).stages
    outcomes = _two_ranks(_train_with_nan_on_rank_1, text, sid, tmp_path)
    for outcome in outcomes:
        assert outcome.startswith("NonFiniteLoss") and "loss became nan at step 1" in outcome, outcomes


def test_local_launcher_runs_a_stage_as_two_ranks_like_one_process(tmp_path, capsys):
    """LocalLauncher(tasks_per_node=2): two submitit processes find each other (rendezvous from submitit's
    environment), train to DONE without a warning on either rank, and end with one process's weights; `harness
    status` shows the job."""
    from harness.cli import main as harness_main
    from harness.experiment import plan_from_gin
    from harness.launch import LocalLauncher, launch_plan

    text, sid = _stage(tmp_path, batch_size=8)
    results = tmp_path / "local"
    (out,) = launch_plan(plan_from_gin(text), text, results, LocalLauncher(tasks_per_node=2, poll_seconds=0.2))
    assert out["status"] == "done", out
    stage_dir = Path(out["dir"])
    logs = task_logs(stage_dir, 2)
    for rank, log in enumerate(logs):
        assert f"rank {rank} of 2" in log, log
        assert not re.search("warn", log, re.IGNORECASE), log  # e.g. DDP's FutureWarning on broadcast_buffers
    assert "step 4/4" in logs[0]  # rank 0 trained and logged every step
    assert_same_weights(final_weights(stage_dir), one_process_weights(text, tmp_path / "single"))

    capsys.readouterr()
    assert harness_main(["status", str(results)]) == 0
    job_id = json.loads((stage_dir / "job.json").read_text())["job_id"]
    row = next(line for line in capsys.readouterr().out.splitlines() if sid[:8] in line)
    assert job_id in row and "done" in row and f"{STEPS}" in row, row
