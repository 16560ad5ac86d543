"""The state of a launched stage, from the files it wrote and (when reachable) the SLURM queue.

Truth comes first from the stage folder: DONE means done, FAILED holds the error. For a stage still without
either, job.json says how it was launched, and the queue (squeue) or the process table says whether the job is
still queued or running. Nothing here needs SLURM accounting (`sacct`), which many clusters do not expose.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from harness.launch.jobs import read_job_file
from harness.run_folder import CHECKPOINTS_DIR, FAILED_MARKER, METRICS_FILE, stage_status

# SLURM job states -> ours; any state not listed (COMPLETED without DONE, FAILED, CANCELLED, TIMEOUT, ...)
# means the job is over without finishing the stage.
_QUEUED = {"PENDING", "SUSPENDED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
_RUNNING = {"RUNNING", "CONFIGURING", "COMPLETING", "RESIZING", "STAGE_OUT", "SIGNALING"}
_REQUEUED = {"REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
ACTIVE_STATES = ("pending", "queued", "running", "requeued")
PARENT_FAILED = "cancelled: its parent stage did not finish"


@dataclass
class QueueEntry:
    state: str  # SLURM's state name, e.g. PENDING
    reason: str  # e.g. Dependency, BeginTime, None


def slurm_queue() -> dict[str, QueueEntry] | None:
    """This user's SLURM jobs (one line per array element, finished ones while SLURM remembers them).

    None when SLURM cannot be asked (no squeue, or the controller does not answer).
    """
    if shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "--me", "--states=all", "--array", "--noheader", "-o", "%i|%T|%r"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    queue = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3:
            queue[parts[0]] = QueueEntry(state=parts[1], reason=parts[2])
    return queue


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def tail(path: str | Path | None, lines: int = 12) -> str:
    if not path:
        return ""
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


@dataclass
class StageState:
    state: str  # pending | blocked (its parent failed) | queued | running | requeued | done | failed | unknown
    job_id: str | None = None
    launcher: str | None = None
    detail: str = ""  # SLURM's state/reason, or why we think the stage failed
    step: int | None = None  # last logged step
    loss: float | None = None  # last logged loss
    log_tail: str = ""  # a failed stage's error / job log

    @property
    def active(self) -> bool:
        return self.state in ACTIVE_STATES[1:]  # launched and not over


def stage_state(stage_dir: str | Path, queue: dict[str, QueueEntry] | None, log_lines: int = 12) -> StageState:
    """What is happening to the stage whose run folder is `stage_dir` (which may not exist yet)."""
    from harness.fileio import read_jsonl

    stage_dir = Path(stage_dir)
    job = read_job_file(stage_dir)
    rows = [r for r in read_jsonl(stage_dir / METRICS_FILE) if "step" in r]
    last = rows[-1] if rows else {}
    out = StageState(state="pending", job_id=job.get("job_id"), launcher=job.get("launcher"),
                     step=last.get("step"), loss=last.get("loss"))
    files = stage_status(stage_dir)  # the files' word: done | failed | running | pending
    if files == "done":
        out.state = "done"
        return out
    failed = stage_dir / FAILED_MARKER
    # FAILED is written by the worker as it fails and removed when a retry starts, so without SLURM (whose queue
    # may hold a requeued retry) it is the truth, even while the launching process (an inline run going on
    # with other arms, or an unrelated process that reused the pid) is alive.
    if files == "failed" and job.get("launcher") != "slurm":
        out.state, out.log_tail = "failed", tail(failed, log_lines)
        return out
    if not job:
        return out
    out.state, out.detail = _job_state(job, queue, has_progress=bool(rows) or _has_checkpoint(stage_dir))
    if out.state == "failed":
        out.log_tail = tail(failed, log_lines) if failed.is_file() else tail(job.get("stderr"), log_lines)
    return out


def _has_checkpoint(stage_dir: Path) -> bool:
    return any((stage_dir / CHECKPOINTS_DIR).glob("step_*.pt"))


def _job_state(job: dict, queue: dict[str, QueueEntry] | None, has_progress: bool) -> tuple[str, str]:
    launcher, job_id = job.get("launcher"), job.get("job_id")
    if launcher == "slurm":
        if queue is None:
            return "unknown", "SLURM's queue cannot be read from here"
        entry = queue.get(str(job_id))
        if entry is None:
            return "failed", "the job is no longer in SLURM's queue and the stage has no DONE marker"
        if entry.state in _REQUEUED or (entry.state == "PENDING" and has_progress):
            return "requeued", f"{entry.state} ({entry.reason})"
        if entry.state in _QUEUED:
            return "queued", f"{entry.state} ({entry.reason})"
        if entry.state in _RUNNING:
            return "running", entry.state
        if entry.state == "CANCELLED" and "Dependency" in entry.reason:  # --kill-on-invalid-dep
            return "failed", f"{PARENT_FAILED} ({entry.reason})"
        return "failed", f"SLURM state {entry.state} ({entry.reason}) without a DONE marker"
    pid = job.get("pid")
    if pid and pid_alive(int(pid)):
        return "running", f"pid {pid}"
    return "failed", "the process ended without a DONE marker (crashed or stopped; launch again to resume)"
