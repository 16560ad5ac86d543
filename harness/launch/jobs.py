"""From plans to the jobs to submit: one job per distinct stage, parents first, finished ones left out.

Several plans (the points of a sweep) may contain the same stage (same id: same config and same parents),
e.g. the from-scratch baseline that no sweep binding touches. It runs once, in the folder of the first plan
that has it; the other plans' folders for it become symlinks to that one, so every experiment folder stays
complete for `harness status` and the report.

Experiments launched separately share finished stages the same way: a stage whose folder does not exist yet is
linked to a finished (DONE) folder of the same stage id anywhere under the results root (e.g. the scratch
baseline that celebahq_mask50.gin inherits from celebahq_mask90.gin), instead of being trained again.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.run_folder import DONE_MARKER, JOB_FILE, STAGE_FILE


@dataclass
class Variant:
    """One experiment to launch: its flattened gin text and the plan built from it."""

    gin_text: str
    plan: Any  # harness.experiment.Plan
    label: str = ""  # the sweep point, e.g. "MASK_RATIO=0.5"; empty for a plain run


@dataclass
class StageJob:
    """A distinct stage and where it runs; `links` are the other variants' folders for the same stage."""

    stage_id: str
    name: str
    experiment: str
    gin_text: str
    stage_dir: Path
    depth: int
    parent: str | None
    done: bool
    links: list[Path] = field(default_factory=list)
    children: int = 0  # stages below this one in the launch (used to order job arrays)


def build_jobs(variants: list[Variant], results_dir: str | Path,
               search_root: str | Path | None = None) -> list[StageJob]:
    """Every distinct stage of the variants, in dependency order (parents first).

    `search_root` (default `results_dir`; a sweep passes the root its folder is in) is searched for finished
    folders of stages not finished here.
    """
    results_dir = Path(results_dir)
    jobs: dict[str, StageJob] = {}
    for variant in variants:
        plan = variant.plan
        for sid, planned in plan.stages.items():
            folder = plan.stage_dir(results_dir, sid)
            if sid in jobs:
                _share(jobs[sid], folder)
                continue
            jobs[sid] = StageJob(stage_id=sid, name=planned.name, experiment=plan.experiment,
                                 gin_text=variant.gin_text, stage_dir=folder, depth=planned.depth,
                                 parent=planned.parent, done=(folder / DONE_MARKER).is_file())
    _reuse_finished_elsewhere(list(jobs.values()), Path(search_root) if search_root is not None else results_dir)
    for job in jobs.values():
        if job.parent is not None:
            jobs[job.parent].children += 1
    return sorted(jobs.values(), key=lambda j: j.depth)  # stable: plan order within a level


def _reuse_finished_elsewhere(jobs: list[StageJob], root: Path) -> None:
    """Unfinished jobs whose folders do not exist yet run in a DONE folder of the same id under `root`, if any.

    A real folder is left to resume: its child would read the parent there, and we never replace user files.
    """
    wanted = [job for job in jobs if not job.done and not _exists(job.stage_dir)
              and not any(_exists(link) for link in job.links)]
    if not wanted:
        return
    finished = finished_stage_folders(root)
    for job in wanted:
        folder = finished.get(job.stage_id)
        if folder is not None:
            job.links.append(job.stage_dir)
            job.stage_dir, job.done = folder, True


def _exists(folder: Path) -> bool:
    return folder.exists()  # a symlink to a folder deleted since does not count (link_shared_folders removes it)


def finished_stage_folders(root: Path) -> dict[str, Path]:
    """Stage id (from stage.json, not the folder name's 8 characters) -> its first DONE folder under `root`.

    Walks real folders only (not symlinks, not hidden ones such as .submitit) and stops at each stage folder.
    """
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # os.walk does not follow symlinks
        if STAGE_FILE not in filenames:
            continue
        dirnames[:] = []  # nothing below a stage folder is another stage
        folder = Path(dirpath)
        stage_id = _stage_id_of(folder)
        if stage_id and DONE_MARKER in filenames:
            found.setdefault(stage_id, folder)
    return found


def _stage_id_of(folder: Path) -> str | None:
    try:
        info = json.loads((folder / STAGE_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return info.get("id") if isinstance(info, dict) and isinstance(info.get("id"), str) else None


def _share(job: StageJob, folder: Path) -> None:
    """Another variant has the same stage in `folder`: prefer a folder that already finished it."""
    if folder == job.stage_dir or folder in job.links:
        return
    if not job.done and (folder / DONE_MARKER).is_file() and not folder.is_symlink():
        job.links.append(job.stage_dir)
        job.stage_dir, job.done = folder, True
    else:
        job.links.append(folder)


def link_shared_folders(job: StageJob) -> None:
    """Point the other variants' folders for this stage at the folder where it runs (relative symlinks)."""
    if job.stage_dir.is_symlink() and not job.stage_dir.exists():
        job.stage_dir.unlink()  # its target was deleted: the stage runs here afresh
    for link in job.links:
        if link.is_symlink():
            if link.resolve() == job.stage_dir.resolve():
                continue
            link.unlink()
        elif link.exists():
            continue  # a real folder (e.g. from an earlier, separate run): leave it alone
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(job.stage_dir, link.parent), target_is_directory=True)


def write_job_file(stage_dir: Path, launcher: str, job_id: str | None, **extra: Any) -> dict[str, Any]:
    """Record how a stage was launched (job.json), keeping earlier job ids of the same stage."""
    from harness.fileio import atomic_write_text

    previous = read_job_file(stage_dir)
    history = list(previous.get("previous_job_ids", []))
    if previous.get("job_id") and previous.get("job_id") != job_id:
        history.append(previous["job_id"])
    info = {"launcher": launcher, "job_id": job_id, "submitted": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "submitted_unix": time.time(), **extra, "previous_job_ids": history}
    stage_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stage_dir / JOB_FILE, json.dumps(info, indent=2, default=str) + "\n")
    return info


def read_job_file(stage_dir: Path) -> dict[str, Any]:
    path = Path(stage_dir) / JOB_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # a torn or foreign file: treat the stage as never launched

