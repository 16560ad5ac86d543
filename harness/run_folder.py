"""The layout of the results folder, in one place: file names, the plans, and a stage's state from its files.

    <results>/<experiment>/plan.json                  the plan: stages, ids, parents, folders (PLAN_FILE)
    <results>/<experiment>/<arm>/<stage>-<id8>/        one stage's run folder, with the files named below
    <results>/<sweep>/<experiment>/plan.json           sweep points are experiments one level down

Writers (stage.py, train.py, evaluate.py, the launchers) and readers (results.py and the report, `harness
status`) name the files through these constants. What each file holds: docs/internals.md, "Run folder files".
A leaf module: it imports nothing from the harness but its errors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.errors import HarnessError

PLAN_FILE = "plan.json"
# one stage's folder
RECIPE_FILE = "recipe.gin"  # the flattened gin text the launcher shipped
CONFIG_FILE = "config.gin"  # gin's operative config
STAGE_FILE = "stage.json"  # the stage description, id, parent, arms
DATA_MANIFEST_FILE = "data_manifest.json"
JOB_FILE = "job.json"  # how the stage was launched (launcher, job id, pid, logs)
METRICS_FILE = "metrics.jsonl"  # training rows at log steps
EVAL_FILE = "eval.jsonl"  # evaluation rows
COST_FILE = "cost.json"
CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
EVAL_FEATURES_DIR = "eval_features"  # the evaluation samples' Inception features
EVAL_SAMPLES_DIR = "eval_samples"  # the evaluation samples themselves, with EvalConfig.keep_samples
EVENTS_DIR = "tensorboard"  # TensorBoard event files (Stage.tensorboard)
DONE_MARKER = "DONE"  # written last: the stage finished
FAILED_MARKER = "FAILED"  # the error of a failed stage; removed when a retry starts
LOCK_FILE = ".lock"  # held (flock) by the process training the stage


def step_name(step: int, suffix: str = "") -> str:
    """The name of a step's file in a run folder: step_0001000.pt, samples/step_0001000.png, ... (7 digits, so
    that names sort as steps do)."""
    return f"step_{int(step):07d}{suffix}"


def stage_status(stage_dir: Path) -> str:
    """A stage's state from its files alone: done (DONE) | failed (FAILED) | running (training rows, not
    finished) | pending. `harness status` refines it with the job and the queue (launch/state.py); the records
    mark a pending stage whose parent failed as blocked (results.status_after_parent)."""
    if (stage_dir / DONE_MARKER).is_file():
        return "done"
    if (stage_dir / FAILED_MARKER).is_file():
        return "failed"
    if (stage_dir / METRICS_FILE).is_file():
        return "running"
    return "pending"


def find_experiments(path: str | Path) -> list[Path]:
    """The experiment folders (holding plan.json) at `path` or anywhere below it (a sweep's points), sorted."""
    path = Path(path)
    if not path.is_dir():
        raise HarnessError(f"results folder {path} does not exist; pass results/<experiment> or a sweep folder")
    if (path / PLAN_FILE).is_file():
        return [path]
    found = sorted(p.parent for p in path.rglob(PLAN_FILE))
    if not found:
        raise HarnessError(f"no experiment under {path} (no {PLAN_FILE} found); run `harness run RECIPE` first "
                           "(or pass the --results-dir it wrote to)")
    return found


def load_plan(experiment_dir: Path) -> dict[str, Any]:
    """An experiment's plan.json as written by `launch_plan` (Plan.write)."""
    path = Path(experiment_dir) / PLAN_FILE
    if not path.is_file():
        raise HarnessError(f"{experiment_dir} has no {PLAN_FILE}: give the folder of one experiment "
                           f"(results/<experiment>) or a folder that contains experiments")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise HarnessError(f"{path} is not valid JSON ({err}); rerun `harness run` to rewrite the plan") from err
