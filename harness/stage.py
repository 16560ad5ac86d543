"""The worker for one stage: the one place that ties config, data, training, evaluation and cost together.

`run_stage` takes only strings (gin text, stage id, results folder), so the same call runs inline, in a
submitit subprocess or on a SLURM node. It re-parses the gin text, rebuilds the plan, finds its stage, and
trains it into the stage's run folder, resuming from the newest valid checkpoint. It writes DONE last, and
FAILED (with the error) when the stage fails, so `harness status` and the report can tell them apart.
"""
from __future__ import annotations

import contextlib
import json
import logging
import traceback
from pathlib import Path
from typing import Any

import torch

from harness.checkpoint import checkpoint_path, is_valid, load_checkpoint, newest_valid_checkpoint
from harness.config import operative_config
from harness.errors import HarnessError
from harness.experiment import Plan, PlannedStage, plan_from_gin
from harness.fileio import atomic_write_text, exclusive_lock
from harness.ranks import from_rank0, rank_and_world_size
from harness.run_folder import (
    CHECKPOINTS_DIR,
    CONFIG_FILE,
    COST_FILE,
    DATA_MANIFEST_FILE,
    DONE_MARKER,
    FAILED_MARKER,
    LOCK_FILE,
    RECIPE_FILE,
    STAGE_FILE,
)

log = logging.getLogger(__name__)


def pick_device(rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _looks_like_maskdm(weights: Any) -> bool:
    """A MaskDM reference file: its network tensors live under `model.encoder.` / `ema_model.model.`."""
    return isinstance(weights, dict) and any(
        isinstance(k, str) and k.startswith(("model.encoder.", "ema_model.", "online_model.", "encoder."))
        for k in weights)


def _weights_from(checkpoint: dict[str, Any], which: str, source: str) -> dict[str, torch.Tensor]:
    """Pick the raw or EMA weights out of a checkpoint (ours, or a plain state dict)."""
    if which not in ("raw", "ema"):
        raise HarnessError(f"init_from must be 'raw' or 'ema', got {which!r}")
    if _looks_like_maskdm(checkpoint) or _looks_like_maskdm(checkpoint.get("model")):
        raise HarnessError(f"{source} is a MaskDM reference checkpoint; convert it first with `harness convert "
                           "import SRC DST` and point Stage.init_checkpoint at DST")
    if "model" in checkpoint or "ema" in checkpoint:
        key = "model" if which == "raw" else "ema"
        if key not in checkpoint:
            raise HarnessError(f"{source} has no '{key}' weights (init_from = '{which}')")
        return checkpoint[key]
    if all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        if which == "ema":  # a bare state dict holds one set of weights; which one, the file cannot say
            raise HarnessError(f"{source} is a plain state dict, with no separate EMA weights; set "
                               "Stage.init_from = 'raw' to start from the weights it holds")
        return checkpoint
    raise HarnessError(f"{source} is neither a harness checkpoint nor a state dict; convert it with "
                       "`harness convert` first")


def start_checkpoint(plan: Plan, planned: PlannedStage, results_dir: Path) -> Path | None:
    """The file a new stage starts from (its parent's final checkpoint, an external file) or None; raises when it
    cannot be used, so that a stage is refused before its folder is made."""
    spec = planned.spec
    if planned.parent is not None:
        parent_dir = plan.stage_dir(results_dir, planned.parent)
        if not (parent_dir / DONE_MARKER).is_file():
            raise HarnessError(f"stage '{spec.name}' needs its parent {parent_dir} to be finished first "
                               "(run the whole recipe, or its parent stage)")
        # the parent's *final* weights: an older checkpoint would silently shorten the arm's pretraining
        path = checkpoint_path(parent_dir / CHECKPOINTS_DIR, plan.stages[planned.parent].spec.steps)
        if not is_valid(path):
            raise HarnessError(f"the parent stage {parent_dir} is marked done but its final checkpoint {path.name} "
                               "is missing or corrupt; delete its DONE file to train the rest of it again")
        return path
    if spec.init_checkpoint:
        path = Path(spec.init_checkpoint).expanduser()
        if not path.is_file():
            raise HarnessError(f"checkpoint {path} does not exist (Stage.init_checkpoint of stage '{spec.name}')")
        return path
    return None


def initial_weights(spec: Any, path: Path | None) -> tuple[dict | None, str]:
    """The weights in `path` that the stage starts from (raw or EMA, `Stage.init_from`), and where from."""
    if path is None:
        return None, ""
    source = f"{path} ({spec.init_from} weights)"
    return _weights_from(load_checkpoint(path), spec.init_from, source), source


def _write_stage_files(plan: Plan, planned: PlannedStage, run_dir: Path, gin_text: str) -> None:
    info = {"id": planned.id, "parent": planned.parent, "arms": planned.arms, "experiment": plan.experiment,
            "stage": planned.spec.describe()}
    atomic_write_text(run_dir / STAGE_FILE, json.dumps(info, indent=2) + "\n")
    atomic_write_text(run_dir / RECIPE_FILE, gin_text)  # what the launcher shipped: re-runnable as is
    atomic_write_text(run_dir / CONFIG_FILE, operative_config())  # rewritten at the end, when complete


def _data_change(data: Any, manifest_path: Path) -> str | None:
    """Why a stage must not resume on its data, or None: the image list differs from the one it started with.

    The data is not part of the stage id (a folder may move between machines), so a resumed stage checks the
    list it recorded: another list would change every later batch and mix two datasets in one run. File times
    are not compared: copying a dataset to a node's local disk changes them and nothing else.
    """
    manifest = None
    with contextlib.suppress(OSError, ValueError):
        manifest = json.loads(manifest_path.read_text())
    if not (isinstance(manifest, dict) and isinstance(manifest.get("files"), list)):
        return None  # no record (a folder from before manifests were kept): nothing to compare with
    then, now = manifest["files"], data.names()
    if then == now:
        return None
    changed = next((f"image {i}: {a} then, {b} now" for i, (a, b) in enumerate(zip(then, now)) if a != b),
                   f"{len(then)} images then, {len(now)} now")
    return (f"the data of this stage changed since it started ({changed}; recorded in {manifest_path}); restore "
            f"the data, or delete {manifest_path.parent} to start the stage over")


def run_stage(gin_text: str, stage_id: str, results_dir: str | Path, stop_event: Any = None) -> dict[str, Any]:
    """Train (or resume) one stage of the plan in `gin_text`; returns {"status": done|preempted|skipped, ...}."""
    from harness.train import TrainContext, Trainer

    results_dir = Path(results_dir)
    plan = plan_from_gin(gin_text)
    if stage_id not in plan.stages:
        raise HarnessError(f"stage {stage_id} is not part of experiment '{plan.experiment}'")
    planned = plan.stages[stage_id]
    spec = planned.spec
    run_dir = plan.stage_dir(results_dir, stage_id)
    summary = {"stage_id": stage_id, "name": spec.name, "dir": str(run_dir)}
    rank, world_size = rank_and_world_size()
    if from_rank0((run_dir / DONE_MARKER).is_file()):
        return {**summary, "status": "skipped"}

    is_main = rank == 0
    device = pick_device(rank)
    spec.data.check()
    # A new stage is refused (missing parent or file) before its folder is made; one with checkpoints of its own
    # may resume without them, which is decided under the lock.
    start = None if (run_dir / CHECKPOINTS_DIR).is_dir() else start_checkpoint(plan, planned, results_dir)
    # One writer per run folder: a second run of the same stage (two `harness run`s, overlapping sweeps) waits
    # here and then finds it done, instead of training beside the first and logging every row twice. What the
    # folder holds is read under the lock, by rank 0, for every rank.
    lock = (exclusive_lock(run_dir / LOCK_FILE, f"stage {spec.name}: {run_dir} is in use by another process; "
                           "waiting for it to finish") if is_main else contextlib.nullcontext())
    with lock:
        if from_rank0((run_dir / DONE_MARKER).is_file()):
            return {**summary, "status": "skipped"}
        resuming = from_rank0(is_main and newest_valid_checkpoint(run_dir / CHECKPOINTS_DIR) is not None)
        manifest = run_dir / DATA_MANIFEST_FILE
        problem = from_rank0(_data_change(spec.data, manifest) if is_main and resuming else None)
        if problem:
            raise HarnessError(problem)  # before anything in the folder is rewritten
        # A stage resuming from its own checkpoint needs nothing from its parent (whose files may be gone by now).
        if resuming:
            init_weights, init_source = None, ""
        else:
            if start is None:  # not looked up above (checkpoints/ but no valid one), or nothing to look up
                start = start_checkpoint(plan, planned, results_dir)
            init_weights, init_source = initial_weights(spec, start)
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / FAILED_MARKER).unlink(missing_ok=True)  # a retry starts clean
            _write_stage_files(plan, planned, run_dir, gin_text)
            if not (resuming and manifest.is_file()):  # the record of what the stage started on is kept
                spec.data.write_manifest(manifest)

        evaluate = None
        if spec.eval is not None:
            from harness.evaluate import evaluate_stage

            # every rank samples its share; rank 0 gathers the features, scores, writes (usage/evaluation.md)
            ranks = dict(rank=rank, world_size=world_size) if world_size > 1 else {}

            def evaluate(ema, diffusion, step: int, cost: dict) -> dict:
                return evaluate_stage(ema, diffusion, spec.data, spec.eval, step, run_dir, device, extra=cost, **ranks)

        ctx = TrainContext(spec=spec, stage_id=stage_id, run_dir=run_dir, device=device, init_weights=init_weights,
                           init_source=init_source, stop_event=stop_event, rank=rank, world_size=world_size)
        try:
            trainer = Trainer(ctx, evaluate)
            status = trainer.run()
        except BaseException as err:
            if is_main and not isinstance(err, KeyboardInterrupt):
                detail = str(err) if isinstance(err, HarnessError) else traceback.format_exc()
                atomic_write_text(run_dir / FAILED_MARKER, f"{type(err).__name__}: {detail}\n")
            raise
        if is_main:
            trainer.cost.write(run_dir / COST_FILE)
            if status == "done":
                atomic_write_text(run_dir / CONFIG_FILE, operative_config())
                atomic_write_text(run_dir / DONE_MARKER, f"step {trainer.step}\n")
        return {**summary, "status": status, "step": trainer.step, "cost": trainer.cost.to_json()}
