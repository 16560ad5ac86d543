"""`harness status RESULTS_DIR`: every stage's job, state, step and loss; the log of the failed ones.

A stage whose parent failed (or is itself blocked) is `blocked`: it cannot run until its parent is run again and
finishes (`harness run` reports it as cancelled). That holds for a stage never launched and, under SLURM, for one
whose job waited on the parent and was cancelled with it (or is still held), as long as it did not fail by itself.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.launch.state import StageState

HELP = "show every stage of the experiments under a results folder: job, state, step, loss, failures"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", nargs="?", default="results",
                        help="a results folder (all experiments in it) or one experiment's folder")
    parser.add_argument("--lines", type=int, default=12, help="log lines shown per failed stage (default 12)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per stage instead")


def collect(results_dir: Path, log_lines: int = 12) -> list[dict]:
    """One record per stage of every experiment found (shared stages appear under each experiment)."""
    from harness.launch.state import slurm_queue, stage_state
    from harness.run_folder import JOB_FILE, find_experiments, load_plan

    needs_queue = False
    entries = []
    for experiment_dir in find_experiments(results_dir):  # experiments, and sweep folders' points
        plan = load_plan(experiment_dir)
        stages = plan.get("stages", {})
        for sid, info in sorted(stages.items(), key=lambda kv: kv[1].get("depth", 0)):  # parents first
            stage_dir = experiment_dir / info["dir"]
            entries.append((plan.get("experiment", experiment_dir.name), sid, info, stage_dir))
            needs_queue = needs_queue or '"slurm"' in _read(stage_dir / JOB_FILE)
    queue = slurm_queue() if needs_queue else None
    records = []
    seen: dict[tuple[str, str], tuple[str, str]] = {}  # (experiment, stage id) -> (state, stage name)
    for experiment, sid, info, stage_dir in entries:
        state = stage_state(stage_dir, queue, log_lines)
        parent_state, parent_name = seen.get((experiment, info.get("parent") or ""), ("", ""))
        if _blocked(state, parent_state, stage_dir):
            state.state = "blocked"
            which = "failed" if parent_state == "failed" else "is blocked"
            state.detail = f"waits for its parent stage {parent_name} ({info['parent'][:8]}), which {which}"
            state.log_tail = ""  # a cancelled job's log says nothing about the stage
        seen[(experiment, sid)] = (state.state, info.get("name", ""))
        records.append({"experiment": experiment, "arms": info.get("arms", []), "stage": info.get("name", ""),
                        "stage_id": sid, "dir": str(stage_dir), "steps": info.get("steps"),
                        "state": state.state, "job_id": state.job_id, "launcher": state.launcher,
                        "step": state.step, "loss": state.loss, "detail": state.detail, "log_tail": state.log_tail,
                        "_state": state})
    return records


def _blocked(state: StageState, parent_state: str, stage_dir: Path) -> bool:
    """Whether a stage waits on a parent that failed or is blocked (the records' `status_after_parent`).

    Under SLURM such a child never ran: its job was cancelled with the parent (--kill-on-invalid-dep), has left
    the queue since, or is still held there. Only a FAILED file of its own makes it failed rather than blocked.
    """
    from harness.results import status_after_parent
    from harness.run_folder import FAILED_MARKER

    if status_after_parent(state.state, parent_state) == "blocked":
        return True
    return (parent_state in ("failed", "blocked") and state.launcher == "slurm"
            and state.state in ("failed", "queued") and not (stage_dir / FAILED_MARKER).is_file())


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def main(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.panel import Panel
    from rich.text import Text

    from harness.launch.watch import Row, status_table

    records = collect(Path(args.results_dir), args.lines)
    if args.json:
        for r in records:
            print(json.dumps({k: v for k, v in r.items() if k != "_state"}))
        return 0
    console = Console()
    if not console.is_terminal:
        console.width = 200
    rows = [Row(r["experiment"], f"{'+'.join(r['arms'])}/{r['stage']}", r["stage_id"], r["_state"], r["steps"])
            for r in records]
    counts: dict[str, int] = {}
    for r in records:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    console.print(status_table(rows, title=f"{args.results_dir}: {summary}"))
    for r in records:
        if r["state"] == "failed" and r["log_tail"]:
            title = f"{r['experiment']}/{r['stage']} ({r['stage_id'][:8]}) job {r['job_id'] or '-'}"
            console.print(Panel(Text(r["log_tail"]), title=title, title_align="left", border_style="red",
                                expand=False))
    return 0
