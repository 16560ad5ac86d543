"""What runs inside a job: signals -> a stop flag, torch.distributed set-up, the stage, and requeueing.

`run_stage_job` is the function submitit pickles; it receives only strings. Signal handlers only set a flag:
the trainer checks it at the next step boundary, saves a checkpoint and returns "preempted". Then, on SLURM,
rank 0 requeues the job on SIGUSR2, which SLURM sends only near the time limit (`--signal`, signal_delay_s),
and the requeued job resumes from that checkpoint. SIGTERM (scancel, or preemption) also checkpoints, but does
not requeue: a cancelled job should stay cancelled, and a preempted job comes back only where the cluster
requeues it itself (PreemptMode=REQUEUE); elsewhere a later launch resumes it.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import threading
from typing import Any, Iterator

from harness.errors import HarnessError

log = logging.getLogger(__name__)

# Every rank evaluates (each samples its share), but rank 0 alone builds the reference's feature cache (the first
# time), scores and computes the noise floor, while the other ranks wait in a collective (before sampling, and at
# the end); with torch's default 10-minute timeout the NCCL watchdog would kill them during a long wait. The job's
# time limit still applies.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=6)


class StopFlag:
    """A threading.Event-like stop request, agreed across data-parallel ranks.

    Ranks receive a signal at slightly different steps; if rank 0 stopped one step before rank 1, rank 1 would
    wait forever in the gradient all-reduce. So `is_set()` (which the trainer calls once per step on every
    rank) all-reduces the local flags: every rank stops at the same step.
    """

    def __init__(self) -> None:
        self._local = threading.Event()
        self.signal_name: str | None = None

    def set(self, signal_name: str | None = None) -> None:
        self.signal_name = self.signal_name or signal_name
        self._local.set()

    def is_set(self) -> bool:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self._local.is_set()
        import torch

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1.0 if self._local.is_set() else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, signals: tuple[str, ...] = ("SIGUSR2", "SIGTERM")) -> Iterator[None]:
    """Route the signals to `flag` for the duration (only possible on the main thread; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for name in signals:
        signum = getattr(signal, name)
        previous[signum] = signal.signal(signum, lambda num, _frame: flag.set(signal.Signals(num).name))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def rendezvous_variables() -> dict[str, str]:
    """torch.distributed's env:// variables for this task of a submitit job (SLURM or local), from its environment.

    On SLURM (submitit's SlurmJobEnvironment): RANK = SLURM_PROCID, LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE =
    SLURM_NTASKS (nodes x tasks per node), LOCAL_WORLD_SIZE = WORLD_SIZE / SLURM_JOB_NUM_NODES, MASTER_ADDR = the
    first host of SLURM_JOB_NODELIST (rank 0 runs there), MASTER_PORT = $MASTER_PORT when set, else a port in
    20000-60000 drawn from the job id: the same on every node, and again after a requeue. Locally the same from
    submitit's SUBMITIT_LOCAL_* variables, with this host as MASTER_ADDR.
    """
    import submitit

    env = submitit.helpers.TorchDistributedEnvironment()
    return {"MASTER_ADDR": env.master_addr, "MASTER_PORT": str(env.master_port), "RANK": str(env.rank),
            "WORLD_SIZE": str(env.world_size), "LOCAL_RANK": str(env.local_rank),
            "LOCAL_WORLD_SIZE": str(env.local_world_size)}


@contextlib.contextmanager
def distributed_from_env() -> Iterator[tuple[int, int]]:
    """Initialise torch.distributed when the job has several tasks; yields (rank, world_size).

    Inside a submitit job (SLURM or local) with several tasks, `rendezvous_variables` are exported (every task
    sees all of its node's GPUs and takes the one of its local rank); under `torchrun` they are already set. A
    single task initialises nothing.
    """
    import torch
    import torch.distributed as dist

    if os.environ.get("SUBMITIT_EXECUTOR") and "WORLD_SIZE" not in os.environ:
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            os.environ.update(rendezvous_variables())
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1 or (dist.is_available() and dist.is_initialized()):
        yield (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def slurm_restarts() -> int:
    """How many times SLURM has already restarted this job (0 on the first run)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def requeue_this_job() -> None:
    job_id = os.environ["SLURM_JOB_ID"]  # an array element has its own id too
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60, capture_output=True, text=True)


def _mark_failed(gin_text: str, stage_id: str, results_dir: str, err: Exception) -> None:
    """Write FAILED for a stage that failed before its trainer started (e.g. a missing data folder).

    The stage writes FAILED itself once training started; this covers the checks before that, so that
    `harness status` shows the reason instead of a job that ended without a trace.
    """
    from harness.experiment import plan_from_gin
    from harness.fileio import atomic_write_text
    from harness.run_folder import FAILED_MARKER

    try:
        stage_dir = plan_from_gin(gin_text).stage_dir(results_dir, stage_id)
        if not (stage_dir / FAILED_MARKER).is_file():
            atomic_write_text(stage_dir / FAILED_MARKER, f"{type(err).__name__}: {err}\n")
    except Exception:  # the plan itself is what failed: the job log has the error
        log.debug("could not write FAILED for stage %s", stage_id, exc_info=True)


@contextlib.contextmanager
def job_logging(rank: int, world_size: int) -> Iterator[None]:
    """In a submitit job, the harness's log records at INFO and above go to the task's stderr (its job log), each
    with its rank: what every rank did (e.g. `resumed stage ... (step N)`) can be read there. Elsewhere (an inline
    run) nothing changes."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        yield
        return
    logger = logging.getLogger("harness")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s harness rank {rank}/{world_size} %(levelname)s "
                                           "%(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def run_stage_job(gin_text: str, stage_id: str, results_dir: str, max_requeues: int = 3) -> dict[str, Any]:
    """The job body: run (or resume) one stage; on SLURM, requeue it when stopped near its time limit."""
    from harness.stage import run_stage

    flag = StopFlag()
    with stop_on_signals(flag), distributed_from_env() as (rank, world), job_logging(rank, world):
        if world > 1:
            log.info("stage %s: rank %d of %d (local rank %s), rendezvous at %s:%s", stage_id, rank, world,
                     os.environ.get("LOCAL_RANK"), os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"))
        try:
            result = run_stage(gin_text, stage_id, results_dir, stop_event=flag)
        except Exception as err:
            if rank == 0:
                _mark_failed(gin_text, stage_id, results_dir, err)
            raise
    if result.get("status") != "preempted":
        return result
    result["signal"] = flag.signal_name
    in_slurm = os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ
    if not in_slurm or rank != 0 or flag.signal_name != "SIGUSR2":
        return result  # inline/local: a later `harness run` resumes; SIGTERM: SLURM decides
    restarts = slurm_restarts()
    if restarts >= max_requeues:
        raise HarnessError(f"stage {stage_id} was stopped by SLURM after {restarts} requeues "
                           f"(SlurmLauncher.max_requeues = {max_requeues}); its checkpoint is kept: raise "
                           "max_requeues or the time limit, and launch again to resume")
    log.warning("stage %s stopped at step %s on %s; requeueing job %s (restart %d of at most %d)", stage_id,
                result.get("step"), flag.signal_name, os.environ["SLURM_JOB_ID"], restarts + 1, max_requeues)
    requeue_this_job()
    # Leave without a result file, as submitit does after a requeue: the requeued run writes the real one.
    raise SystemExit(0)
