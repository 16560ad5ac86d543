"""Helpers for the launcher tests: a recipe that trains in seconds, and the one-node SLURM cluster fixture.

Imported by test_launch.py, test_slurm.py and test_ddp.py (pytest loads only conftest.py by itself).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Callable

import pytest
from conftest import TINY_RECIPE

REPO = Path(__file__).resolve().parent.parent

# 16 px, 32 wide, 3 blocks: a stage is a few seconds, most of it process start-up.
FAST_RECIPE = TINY_RECIPE + textwrap.dedent("""
    include 'masks/patch.gin'
    DataConfig.num_images = 32
    DataConfig.resolution = 16
    UViTConfig.img_size = 16
    UViTConfig.embed_dim = 32
    UViTConfig.depth = 3
    Stage.batch_size = 4
    Stage.log_every = 1
    Stage.checkpoint_every = 2
    Stage.keep_checkpoints = 2
    Stage.num_sample_images = 0
    pretrain/Stage.steps = 3
    finetune/Stage.steps = 2
    scratch/Stage.steps = 3
    Experiment.name = 'fast'
""")


def write_fast_recipe(folder: Path) -> Path:
    path = folder / "fast.gin"
    path.write_text(FAST_RECIPE)
    return path


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def node_ready() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        out = subprocess.run(["sinfo", "--noheader", "--responding", "-o", "%t"], capture_output=True, text=True,
                             timeout=60)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0 and any(s.startswith(("idle", "mix", "alloc")) for s in out.stdout.split())


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """A running one-node SLURM cluster: started by ci/slurm/start.sh in CI, else skip when there is none."""
    if node_ready():
        return
    if not in_ci():
        pytest.skip("no SLURM cluster reachable (sinfo shows no responding node); start one with "
                    "`sudo ci/slurm/install.sh && sudo ci/slurm/start.sh`")
    if shutil.which("slurmctld") is None or shutil.which("sbatch") is None:
        pytest.fail("CI=true but SLURM is not installed: run ci/slurm/install.sh before the tests")
    start = subprocess.run(["bash", str(REPO / "ci" / "slurm" / "start.sh")], capture_output=True, text=True,
                           timeout=180)
    if start.returncode != 0 or not node_ready():
        pytest.fail(f"CI=true and ci/slurm/start.sh could not start SLURM:\n{start.stdout}\n{start.stderr}")


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.25) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def scontrol_job(job_id: str) -> dict[str, str]:
    """`scontrol show job` as key -> value (empty when SLURM no longer knows the job)."""
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", str(job_id)], capture_output=True, text=True,
                         timeout=30)
    fields = {}
    for token in out.stdout.split():
        key, sep, value = token.partition("=")
        if sep:
            fields.setdefault(key, value)
    return fields


def task_logs(stage_dir: Path, tasks: int) -> list[str]:
    """The stderr log of each task (rank) of the stage's job, from the path job.json records for task 0."""
    import json

    first = Path(json.loads((stage_dir / "job.json").read_text())["stderr"])
    assert first.name.endswith("_0_log.err"), first
    return [(first.parent / first.name.replace("_0_log.err", f"_{t}_log.err")).read_text() for t in range(tasks)]


def final_weights(stage_dir: Path) -> dict:
    """The model weights of the stage's newest checkpoint (its last step once DONE)."""
    from harness.checkpoint import load_checkpoint, newest_valid_checkpoint

    return load_checkpoint(newest_valid_checkpoint(stage_dir / "checkpoints"))["model"]


def one_process_weights(gin_text: str, results_dir: Path) -> dict:
    """The final weights of the (one-stage) plan trained inline, in one process: the reference for DDP runs."""
    from harness.experiment import plan_from_gin
    from harness.launch import InlineLauncher, launch_plan

    (out,) = launch_plan(plan_from_gin(gin_text), gin_text, results_dir, InlineLauncher())
    assert out["status"] == "done", out
    return final_weights(Path(out["dir"]))


def assert_same_weights(ranks: dict, single: dict) -> None:
    """Data-parallel weights equal one process's on the same global batches, to float tolerance (test_ddp.py)."""
    import torch

    assert ranks.keys() == single.keys()
    for name in ranks:
        torch.testing.assert_close(ranks[name], single[name], rtol=1e-4, atol=1e-5, msg=f"{name} vs one process")
