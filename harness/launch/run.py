"""Run a plan's stages with a launcher: inline, as local submitit subprocesses, or as SLURM jobs.

Every launcher runs the same job body (`worker.run_stage_job`) on strings only: the gin text, a stage id and
the results folder. Each returns one result dict per distinct stage:
`{"stage_id", "name", "experiment", "dir", "status", "job_id", "error"}` with status one of
done | skipped (already done) | failed | preempted | cancelled (its parent did not finish, or an inline run was
stopped before it started) | submitted (--no-wait).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.launch.jobs import StageJob, Variant, build_jobs, link_shared_folders, write_job_file
from harness.launch.specs import InlineLauncher, LauncherSpec, LocalLauncher, SlurmLauncher
from harness.launch.state import PARENT_FAILED, tail
from harness.launch.watch import Watcher
from harness.run_folder import DONE_MARKER, FAILED_MARKER

log = logging.getLogger(__name__)


def launch_plan(plan: Any, gin_text: str, results_dir: str | Path, launcher: LauncherSpec | None = None,
                stage_ids: list[str] | None = None, wait: bool = True,
                built_jobs: list[StageJob] | None = None) -> list[dict[str, Any]]:
    """Run one experiment's plan (`harness run`): one job per stage, children after their parents.

    `stage_ids` restricts the launch to those stages (their parents must then be done already). `built_jobs`:
    what `build_jobs` made of this plan, when the caller has it already (it walks the results folder).
    """
    return launch_variants([Variant(gin_text=gin_text, plan=plan)], results_dir, launcher, stage_ids=stage_ids,
                           wait=wait, built_jobs=built_jobs)


def launch_variants(variants: list[Variant], results_dir: str | Path, launcher: LauncherSpec | None = None,
                    stage_ids: list[str] | None = None, wait: bool = True, arrays: bool = False,
                    search_root: str | Path | None = None,
                    built_jobs: list[StageJob] | None = None) -> list[dict[str, Any]]:
    """Run several experiments' stages together, each distinct stage once (`arrays`: SLURM job arrays).

    Writes each experiment's plan.json first (`harness run`, `harness sweep` and API callers alike). A stage
    finished in another experiment under `search_root` (default: `results_dir`) is linked, not run again.
    """
    launcher = launcher if launcher is not None else InlineLauncher()
    check_wait(launcher, wait)
    results_dir = Path(results_dir)
    every = built_jobs if built_jobs is not None else build_jobs(variants, results_dir, search_root)
    jobs = every if stage_ids is None else [job for job in every if job.stage_id in set(stage_ids)]
    _check_parents_done(jobs, every)
    if _is_main_rank():
        for variant in variants:
            variant.plan.write(results_dir)
        # Every point's folder for a shared stage, finished ones too: a point added to an earlier sweep finds its
        # parent (and its report its baseline) there. Rank 0 links before any rank starts a stage.
        for job in every:
            link_shared_folders(job)
    if isinstance(launcher, InlineLauncher):
        return _run_inline(jobs, results_dir)
    if isinstance(launcher, LocalLauncher):
        return _run_local(jobs, launcher, results_dir)
    if isinstance(launcher, SlurmLauncher):
        return _run_slurm(jobs, launcher, results_dir, wait, arrays)
    raise HarnessError(f"unknown launcher {launcher!r}: use InlineLauncher, LocalLauncher or SlurmLauncher")


def check_wait(launcher: LauncherSpec, wait: bool) -> None:
    """--no-wait only makes sense for SLURM: inline and local stages end with this process."""
    if not wait and not isinstance(launcher, SlurmLauncher):
        raise HarnessError("--no-wait needs --launcher slurm: inline and local stages run in (or under) this "
                           "process, which waits for them; drop --no-wait or use --launcher slurm")


def _check_parents_done(selected: list[StageJob], every: list[StageJob]) -> None:
    """A stage whose parent is left out of the launch (--stage) needs that parent finished already."""
    chosen = {job.stage_id for job in selected}
    by_id = {job.stage_id: job for job in every}
    for job in selected:
        parent = by_id.get(job.parent) if job.parent is not None else None
        if parent is not None and parent.stage_id not in chosen and not parent.done:
            raise HarnessError(f"stage {job.name} ({job.stage_id[:8]}) needs its parent {parent.name} "
                               f"({parent.stage_id[:8]}) finished first: add --stage {parent.name}, or run "
                               "without --stage")


def _is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes


def _result(job: StageJob, status: str, job_id: str | None = None, error: str = "") -> dict[str, Any]:
    return {"stage_id": job.stage_id, "name": job.name, "experiment": job.experiment, "dir": str(job.stage_dir),
            "status": status, "job_id": job_id, "error": error}


def _parent_blocks(job: StageJob, outcome: dict[str, str]) -> bool:
    return job.parent is not None and outcome.get(job.parent, "done") not in ("done", "skipped")


def _run_inline(jobs: list[StageJob], results_dir: Path) -> list[dict[str, Any]]:
    from harness.launch.worker import run_stage_job

    results, outcome = [], {}
    stopped = ""  # the signal that preempted a stage: this process was asked to stop, so start nothing more
    for job in jobs:
        if job.done:
            results.append(_result(job, "skipped"))
        elif stopped:
            results.append(_result(job, "cancelled",
                                   error=f"not started: the run was stopped ({stopped}); run again to resume"))
        elif _parent_blocks(job, outcome):
            results.append(_result(job, "cancelled", error=f"parent stage {job.parent} did not finish"))
        else:
            if _is_main_rank():
                write_job_file(job.stage_dir, "inline", None, pid=os.getpid(), experiment=job.experiment,
                               stage=job.name)
            try:
                out = run_stage_job(job.gin_text, job.stage_id, str(results_dir))
                results.append({**_result(job, out.get("status", "done")), **out})
            except KeyboardInterrupt:
                raise
            except Exception as err:  # the stage wrote FAILED with the traceback; go on with the others
                log.error("stage %s (%s) failed: %s", job.name, job.stage_id, err)
                results.append(_result(job, "failed", error=_first_lines(str(err))))
            if results[-1]["status"] == "preempted":
                stopped = results[-1].get("signal") or "a stop signal"
                log.warning("stage %s (%s) checkpointed on %s; not starting the remaining stages", job.name,
                            job.stage_id, stopped)
        outcome[job.stage_id] = results[-1]["status"]
    return results


def _run_local(jobs: list[StageJob], spec: LocalLauncher, results_dir: Path) -> list[dict]:
    """Subprocesses through submitit's LocalExecutor; a child is submitted once its parent is done."""
    import submitit

    from harness.launch.worker import run_stage_job

    executor = submitit.LocalExecutor(folder=Path(spec.log_folder or results_dir / ".submitit") / "%j")
    executor.update_parameters(timeout_min=spec.timeout_min, tasks_per_node=spec.tasks_per_node,
                               gpus_per_node=spec.gpus_per_node)
    results = {job.stage_id: _result(job, "skipped") for job in jobs if job.done}
    waiting = [job for job in jobs if not job.done]
    running: dict[str, tuple[StageJob, Any]] = {}
    # A parent left out of the launch (--stage) is done: launch_variants checked it.
    launched = {job.stage_id for job in jobs}
    outcome = {sid: "done" for sid in results}
    watcher = Watcher(jobs)
    while waiting or running:
        for job in list(waiting):
            if _parent_blocks(job, outcome):
                waiting.remove(job)
                results[job.stage_id] = _result(job, "cancelled",
                                                error=f"parent stage {job.parent} did not finish")
                outcome[job.stage_id] = "cancelled"
            elif (job.parent is None or job.parent not in launched or job.parent in outcome) \
                    and len(running) < spec.max_parallel:
                waiting.remove(job)
                handle = executor.submit(run_stage_job, job.gin_text, job.stage_id, str(results_dir))
                write_job_file(job.stage_dir, "local", str(handle.job_id), pid=int(handle.job_id),
                               experiment=job.experiment, stage=job.name, stdout=str(handle.paths.stdout),
                               stderr=str(handle.paths.stderr))
                running[job.stage_id] = (job, handle)
        for sid, (job, handle) in list(running.items()):
            if handle.done():
                del running[sid]
                results[sid] = _collect(job, handle)
                outcome[sid] = results[sid]["status"]
        watcher.update()
        if waiting or running:
            time.sleep(spec.poll_seconds)
    watcher.close()
    return [results[job.stage_id] for job in jobs]


def _collect(job: StageJob, handle: Any) -> dict[str, Any]:
    """The outcome of a finished submitit job: its returned dict, or its error."""
    job_id = str(handle.job_id)
    try:
        out = handle.result()
    except Exception as err:  # submitit re-raises the job's exception as text
        if (job.stage_dir / DONE_MARKER).is_file():  # finished, then something after it failed
            return _result(job, "done", job_id)
        detail = tail(job.stage_dir / FAILED_MARKER) or _first_lines(str(err), 12)
        return _result(job, "failed", job_id, error=detail)
    return {**_result(job, out.get("status", "done"), job_id), **out, "job_id": job_id}


def _run_slurm(jobs: list[StageJob], spec: SlurmLauncher, results_dir: Path, wait: bool,
               arrays: bool) -> list[dict]:
    from harness.launch.slurm import submit_to_slurm
    from harness.launch.state import slurm_queue

    queue = slurm_queue()
    subs = {s.stage.stage_id: s for s in submit_to_slurm(jobs, spec, results_dir, arrays, queue)}
    results = {job.stage_id: _result(job, "skipped") for job in jobs if job.done}
    if not wait:
        for sid, sub in subs.items():
            results[sid] = _result(sub.stage, "submitted", sub.job_id)
        return [results[job.stage_id] for job in jobs]
    watcher = Watcher(jobs)
    while True:
        states = watcher.update(slurm_queue())
        # "unknown": squeue did not answer this time (a busy controller); ask again rather than give up.
        if not any(states[sid].active or states[sid].state == "unknown" for sid in subs):
            break
        time.sleep(spec.poll_seconds)
    watcher.close()
    for sid, sub in subs.items():
        state = states[sid]
        if state.state == "done":
            results[sid] = _result(sub.stage, "done", sub.job_id)
        elif state.detail.startswith(PARENT_FAILED):
            results[sid] = _result(sub.stage, "cancelled", sub.job_id, error=state.detail)
        else:
            results[sid] = _result(sub.stage, "failed", sub.job_id,
                                   error=f"{state.detail}\n{state.log_tail}".strip())
    return [results[job.stage_id] for job in jobs]


def _first_lines(text: str, n: int = 3) -> str:
    return "\n".join(text.strip().splitlines()[:n])


def raise_for_failures(results: list[dict[str, Any]]) -> None:
    """Raise one HarnessError naming every stage that did not finish (for the CLI's exit status)."""
    bad = [r for r in results if r["status"] in ("failed", "cancelled", "preempted")]
    if bad:
        lines = [f"{r['experiment']}/{r['name']} ({r['stage_id'][:8]}): {r['status']}"
                 + (f": {r['error'].splitlines()[-1]}" if r.get("error") else "") for r in bad]
        raise HarnessError(f"{len(bad)} stage(s) did not finish; see `harness status` and their run folders:\n  "
                           + "\n  ".join(lines))
