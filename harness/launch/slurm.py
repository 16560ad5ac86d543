"""Submitting stages to SLURM through submitit: single jobs with afterok, or one job array per level.

A level is the set of stages at the same depth (all pretraining stages of a sweep, then all fine-tuning
stages). As arrays, level d+1 depends on level d element by element (`aftercorr`) when every element's parent
sits at the same index of one parent array; the level's order is chosen to make that true in the usual
sweep. Otherwise the whole array waits for the specific parent elements (`afterok:A_1:A_3`).
"""
from __future__ import annotations

import contextlib
import io
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from harness.errors import HarnessError
from harness.launch.jobs import StageJob, read_job_file, write_job_file
from harness.launch.specs import SlurmLauncher
from harness.launch.state import QueueEntry

log = logging.getLogger(__name__)


@dataclass
class SlurmSubmission:
    """A stage's job: `job_id` is 'A_i' for element i of array A."""

    stage: StageJob
    job_id: str
    array_id: str | None = None
    index: int | None = None
    handle: Any = None  # the submitit Job (None when the job was submitted by an earlier launch)
    dependency: str | None = None


def order_level(level: list[StageJob], parents: dict[str, SlurmSubmission]) -> list[StageJob]:
    """Children in the order of their parents' array indices, stages that have children first."""
    def key(job: StageJob) -> tuple:
        parent = parents.get(job.parent) if job.parent else None
        index = parent.index if parent is not None and parent.index is not None else float("inf")
        return (index, job.children == 0)

    return sorted(level, key=key)  # stable: ties keep plan order


def level_dependency(level: list[StageJob], parents: dict[str, SlurmSubmission]) -> str | None:
    """One dependency string for an ordered level submitted as an array."""
    waits = [parents.get(job.parent) if job.parent else None for job in level]
    if all(w is None for w in waits):
        return None
    one_to_one = (all(w is not None and w.array_id is not None for w in waits)
                  and len({w.array_id for w in waits}) == 1
                  and [w.index for w in waits] == list(range(len(level))))
    if one_to_one:
        return f"aftercorr:{waits[0].array_id}"
    ids = sorted({w.job_id for w in waits if w is not None}, key=_job_sort_key)
    return "afterok:" + ":".join(ids)


def _job_sort_key(job_id: str) -> tuple:
    head, _, tail = job_id.partition("_")
    return (int(head) if head.isdigit() else 0, int(tail) if tail.isdigit() else -1, job_id)


def still_in_queue(job: StageJob, queue: dict[str, QueueEntry] | None) -> SlurmSubmission | None:
    """A job submitted by an earlier launch (e.g. with --no-wait) that is still queued or running."""
    info = read_job_file(job.stage_dir)
    if queue is None or info.get("launcher") != "slurm" or not info.get("job_id"):
        return None
    entry = queue.get(str(info["job_id"]))
    finished = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
    if entry is None or entry.state in finished:
        return None
    return SlurmSubmission(stage=job, job_id=str(info["job_id"]), array_id=info.get("array_job_id"),
                           index=info.get("array_index"))


def log_folder(spec: SlurmLauncher, results_dir: str | Path) -> Path:
    """submitit's folder for a job's files and logs (`%j`: one folder per job id)."""
    return Path(spec.log_folder or Path(results_dir) / ".submitit") / "%j"


def job_parameters(spec: SlurmLauncher, name: str, dependency: str | None) -> dict[str, Any]:
    """Everything one submission asks SLURM for, as submitit SlurmExecutor parameters: the launcher's settings,
    the job's name (`<job_name>-<stage>`, `<job_name>-level<d>` for an array) and its dependency. The one home of
    that fact: `submit_to_slurm` submits with it and `harness run --dry-run` prints it (`sbatch_options`)."""
    return {**spec.sbatch_parameters(), "job_name": f"{spec.job_name}-{name}", "dependency": dependency}


def sbatch_options(params: dict[str, Any], folder: str | Path, array_size: int | None = None) -> list[str]:
    """The `#SBATCH` options (without the prefix) and the setup lines submitit writes for `params`, in its order.

    Rendered by submitit's own sbatch writer, so the dry run shows what the submission will send.
    """
    from submitit.slurm.slurm import _make_sbatch_string

    text = _make_sbatch_string(command="<the stage>", folder=str(folder), map_count=array_size, **params)
    lines = text.splitlines()
    options = [line.removeprefix("#SBATCH ").strip() for line in lines if line.startswith("#SBATCH ")]
    return options + [f"setup: {line}" for line in params.get("setup") or []]


def preview_submissions(spec: SlurmLauncher, jobs: list[StageJob], results_dir: str | Path,
                        arrays: bool) -> list[tuple[int, list[StageJob], list[str]]]:
    """What `submit_to_slurm` would submit (`preview_levels`): (depth, its stages, its sbatch options) for each
    submission, a level's job array (`arrays`, more than one stage: `<job_name>-level<d>`, --array) as one. The
    options come from `job_parameters`, as the submission's, rendered by `sbatch_options`."""
    folder = log_folder(spec, results_dir)
    out = []
    for depth, level, dependency in preview_levels(jobs, arrays):
        array = len(level) > 1
        params = job_parameters(spec, f"level{depth}" if array else level[0].name, dependency)
        out.append((depth, level, sbatch_options(params, folder, len(level) if array else None)))
    return out


def preview_lines(submissions: list[tuple[int, list[StageJob], list[str]]], arrays: bool) -> list[str]:
    """The dry runs' view of `preview_submissions` (`harness run` and `harness sweep --dry-run`): the options every
    submission shares first (submitit's setup lines apart), then each submission's own, labelled by its stage,
    or by its level and array size (with `arrays`, the level first)."""
    import textwrap

    if not submissions:
        return []

    def wrapped(head: str, options: list[str]) -> str:
        return textwrap.fill(" ".join(options), width=118, initial_indent=f"  {head}", subsequent_indent="      ",
                             break_long_words=False, break_on_hyphens=False)

    common = [option for option in submissions[0][2] if all(option in options for _, _, options in submissions)]
    lines = [wrapped("every job: sbatch ", [o for o in common if not o.startswith("setup: ")])]
    lines += [f"  {o}" for o in common if o.startswith("setup: ")]
    for depth, level, options in submissions:
        what = (f"array[{len(level)}]" if len(level) > 1
                else f"{level[0].experiment}/{level[0].name} ({level[0].stage_id[:8]})")
        lines.append(wrapped(f"level {depth} {what}: " if arrays else f"{what}: ",
                             [o for o in options if o not in common]))
    return lines


def submit_to_slurm(jobs: list[StageJob], spec: SlurmLauncher, results_dir: str | Path, arrays: bool,
                    queue: dict[str, QueueEntry] | None) -> list[SlurmSubmission]:
    """Submit every unfinished stage (parents first); returns one submission per stage, new or earlier."""
    import submitit

    from harness.launch.worker import run_stage_job

    executor = submitit.SlurmExecutor(folder=log_folder(spec, results_dir), max_num_timeout=spec.max_requeues)
    submitted: dict[str, SlurmSubmission] = {}
    todo = [job for job in jobs if not job.done]
    for depth in sorted({job.depth for job in todo}):
        level = []
        for job in (j for j in todo if j.depth == depth):
            earlier = still_in_queue(job, queue)
            if earlier is not None:
                log.info("stage %s is already in SLURM's queue as job %s", job.stage_id, earlier.job_id)
                submitted[job.stage_id] = earlier
            else:
                level.append(job)
        if not level:
            continue
        def args(job: StageJob) -> tuple:  # strings only: gin bindings do not survive pickling
            return job.gin_text, job.stage_id, str(results_dir), spec.max_requeues

        if arrays and len(level) > 1:
            level = order_level(level, submitted)
            dependency = level_dependency(level, submitted)
            executor.update_parameters(**job_parameters(spec, f"level{depth}", dependency))
            with refused_by_sbatch(spec, f"the level-{depth} job array ({len(level)} stages)"), executor.batch():
                handles = [executor.submit(run_stage_job, *args(job)) for job in level]
            for index, (job, handle) in enumerate(zip(level, handles)):
                submitted[job.stage_id] = SlurmSubmission(job, handle.job_id, str(handle.job_id).split("_")[0],
                                                          index, handle, dependency)
        else:
            for job in level:
                parent = submitted.get(job.parent) if job.parent else None
                dependency = f"afterok:{parent.job_id}" if parent is not None else None
                executor.update_parameters(**job_parameters(spec, job.name, dependency))
                with refused_by_sbatch(spec, f"stage {job.name} ({job.stage_id[:8]})"):
                    handle = executor.submit(run_stage_job, *args(job))
                submitted[job.stage_id] = SlurmSubmission(job, str(handle.job_id), handle=handle,
                                                          dependency=dependency)
        for job in level:
            sub = submitted[job.stage_id]
            write_job_file(job.stage_dir, "slurm", sub.job_id, array_job_id=sub.array_id, array_index=sub.index,
                           dependency=sub.dependency, experiment=job.experiment, stage=job.name,
                           stdout=str(sub.handle.paths.stdout), stderr=str(sub.handle.paths.stderr))
            log.info("submitted stage %s (%s) as SLURM job %s%s", job.name, job.stage_id, sub.job_id,
                     f" after {sub.dependency}" if sub.dependency else "")
    return list(submitted.values())


# words in sbatch's complaint -> the SlurmLauncher field that sets that option (first match wins)
_SBATCH_FIELDS = (("unrecognized option", "extra_sbatch"), ("invalid option", "extra_sbatch"),
                  ("account", "account"), ("qos", "qos"), ("partition", "partition"), ("feature", "constraint"),
                  ("constraint", "constraint"), ("gres", "gpus_per_node"), ("gpu", "gpus_per_node"),
                  ("memory", "mem_gb_per_task"), ("--mem", "mem_gb_per_task"), ("--time", "time_min"),
                  ("time limit", "time_min"), ("cpu", "cpus_per_task"), ("reservation", "extra_sbatch"))


def sbatch_complaint(text: str) -> str:
    """sbatch's error lines as one line ('invalid partition specified: x; Batch job submission failed: ...')."""
    lines = [line.strip().removeprefix("sbatch:").strip().removeprefix("error:").strip()
             for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if line and not line.startswith("Try ")] or ["no message"]
    return "; ".join(dict.fromkeys(lines))  # keep order, drop repeats


def sbatch_advice(spec: SlurmLauncher, complaint: str) -> str:
    """What to change: the SlurmLauncher binding behind the refused option, when the message names one."""
    lowered = complaint.lower()
    field = next((f for word, f in _SBATCH_FIELDS if word in lowered), None)
    if field is None:
        return ("check the SlurmLauncher bindings (partition, account, qos, time_min, gpus_per_node, cpus_per_task, "
                "mem_gb_per_task, constraint, extra_sbatch) in gin/launch/slurm.gin or --gin")
    return (f"change SlurmLauncher.{field} (now {getattr(spec, field)!r}) in gin/launch/slurm.gin or with "
            f"--gin 'SlurmLauncher.{field} = ...'")


@contextlib.contextmanager
def refused_by_sbatch(spec: SlurmLauncher, what: str) -> Iterator[None]:
    """A submission SLURM refuses (sbatch exits non-zero: a bad partition, option, ...) as one HarnessError line.

    Stages submitted before it stay queued; a later launch finds them there and does not submit them again.
    """
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    printed = io.StringIO()  # submitit also prints sbatch's stderr when it fails: it is in our one line instead
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except (FailedJobError, FailedSubmissionError, OSError, subprocess.SubprocessError) as err:
        complaint = sbatch_complaint(str(err) or printed.getvalue())
        raise HarnessError(f"SLURM refused to submit {what}: {complaint}; {sbatch_advice(spec, complaint)}") from err
    except BaseException:
        sys.stderr.write(printed.getvalue())
        raise
    sys.stderr.write(printed.getvalue())


def preview_levels(jobs: list[StageJob], arrays: bool) -> list[tuple[int, list[StageJob], str | None]]:
    """What `submit_to_slurm` would submit, level by level, with symbolic job ids ('<level0>_3')."""
    fake: dict[str, SlurmSubmission] = {}
    out = []
    todo = [job for job in jobs if not job.done]
    for depth in sorted({job.depth for job in todo}):
        level = [job for job in todo if job.depth == depth]
        array_id = f"<level{depth}>"
        if arrays and len(level) > 1:
            level = order_level(level, fake)
            out.append((depth, level, level_dependency(level, fake)))
            fake.update({job.stage_id: SlurmSubmission(job, f"{array_id}_{i}", array_id, i)
                         for i, job in enumerate(level)})
        else:
            for job in level:
                parent = fake.get(job.parent) if job.parent else None
                out.append((depth, [job], f"afterok:{parent.job_id}" if parent else None))
                fake[job.stage_id] = SlurmSubmission(job, f"<{job.name}-{job.stage_id[:8]}>")
    return out
