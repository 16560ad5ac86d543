"""Launcher specs: where the stages of a plan run (this process, local subprocesses, or SLURM jobs).

Each spec is a gin-configurable dataclass holding plain values, so `gin/launch/slurm.gin` (or `--gin
'SlurmLauncher.partition = "gpu"'`) sets it like any other component. This module imports nothing heavy: gin
re-parses recipes that name these specs in every worker, which must not pay for submitit or torch to do so.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import gin
from harness.errors import HarnessError


@gin.configurable
@dataclass
class InlineLauncher:
    """Run the stages one after another in this process (the default; also what `torchrun` ranks use)."""

    name = "inline"


@gin.configurable
@dataclass
class LocalLauncher:
    """Run each stage as a submitit subprocess on this machine, children after their parents."""

    name = "local"
    timeout_min: int = 24 * 60
    tasks_per_node: int = 1  # >1: data-parallel processes per stage (torch.distributed, one per GPU)
    gpus_per_node: int = 0
    max_parallel: int = 1  # stages running at once (they share this machine's CPUs/GPUs)
    poll_seconds: float = 2.0
    log_folder: str | None = None  # default: <results_dir>/.submitit


@gin.configurable
@dataclass
class SlurmLauncher:
    """Submit each stage as a SLURM job (sweeps: one job array per level) through submitit.

    A child stage waits for its parent with `--dependency=afterok` (`aftercorr` between arrays that map one to
    one), and `--kill-on-invalid-dep` cancels it when the parent fails. SLURM sends SIGUSR2 `signal_delay_s`
    before the time limit (only then); the stage checkpoints and the job requeues itself, at most `max_requeues`
    times. Preemption sends SIGTERM: the stage checkpoints, and the job comes back only where the cluster
    requeues preempted jobs (PreemptMode=REQUEUE); elsewhere launch again to resume.
    """

    name = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = 4 * 60  # the job's time limit in minutes (--time)
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int | None = None  # default: one task per GPU (1 without GPUs)
    cpus_per_task: int | None = None
    mem_gb_per_task: float | None = None  # --mem = this x tasks per node
    constraint: str | None = None
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ['--reservation=abc', '--exclusive']
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    array_parallelism: int = 32  # most elements of one job array running at once (the %N of --array)
    max_requeues: int = 3  # restarts (SLURM's count, preemption requeues too) before a time limit fails the job
    signal_delay_s: int = 120  # SIGUSR2 this many seconds before the time limit: time to save a checkpoint
    job_name: str = "harness"
    log_folder: str | None = None  # default: <results_dir>/.submitit
    poll_seconds: float = 10.0

    @property
    def ntasks(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def sbatch_parameters(self) -> dict:
        """These settings as submitit SlurmExecutor parameters (sbatch options)."""
        params: dict = {"time": int(self.time_min), "nodes": self.nodes, "ntasks_per_node": self.ntasks,
                        "signal_delay_s": self.signal_delay_s, "array_parallelism": self.array_parallelism,
                        "job_name": self.job_name, "setup": list(self.setup)}
        optional = {"partition": self.partition, "account": self.account, "qos": self.qos,
                    "cpus_per_task": self.cpus_per_task, "constraint": self.constraint}
        params.update({k: v for k, v in optional.items() if v is not None})
        if self.gpus_per_node:
            params["gpus_per_node"] = self.gpus_per_node
        if self.mem_gb_per_task is not None:
            params["mem"] = f"{int(round(self.mem_gb_per_task * self.ntasks * 1024))}M"
        # Requeueable (self-requeue; preemption where PreemptMode=REQUEUE); cancel children whose parent failed.
        extra: dict = {"requeue": True, "kill_on_invalid_dep": "yes"}
        extra.update(parse_sbatch_lines(self.extra_sbatch))
        params["additional_parameters"] = extra
        return params


LauncherSpec = InlineLauncher | LocalLauncher | SlurmLauncher
LAUNCHERS = {"inline": InlineLauncher, "local": LocalLauncher, "slurm": SlurmLauncher}


def parse_sbatch_lines(lines: list[str]) -> dict:
    """['--reservation=abc', '#SBATCH --exclusive'] -> {'reservation': 'abc', 'exclusive': True}.

    submitit writes each key back as `--key-with-dashes[=value]`.
    """
    out: dict = {}
    for line in lines:
        text = line.strip().removeprefix("#SBATCH").strip()
        if not text.startswith("--"):
            raise HarnessError(f"extra sbatch line {line!r} must be a long option like '--reservation=abc' "
                               "(SlurmLauncher.extra_sbatch)")
        key, _, value = text[2:].partition("=")
        out[key.strip().replace("-", "_")] = value.strip() if value else True
    return out


@gin.configurable
def default_launcher(launcher: LauncherSpec | None = None) -> LauncherSpec:
    """The launcher a recipe asks for (`include 'launch/slurm.gin'` binds it); inline when none."""
    return launcher if launcher is not None else InlineLauncher()


def launcher_from_name(name: str | None = None, require_slurm: bool = True) -> LauncherSpec:
    """The spec for `--launcher NAME`, with gin's bindings applied (so call it after parsing the recipe).

    No name: the recipe's choice (`default_launcher.launcher`), else inline. A SLURM launcher, chosen either way,
    needs `sbatch` here unless `require_slurm` is False (a dry run only previews the jobs).
    """
    if name is not None and name not in LAUNCHERS:
        raise HarnessError(f"unknown launcher '{name}': use one of {', '.join(LAUNCHERS)}")
    chosen = default_launcher()
    if name is not None and not isinstance(chosen, LAUNCHERS[name]):
        chosen = LAUNCHERS[name]()  # else keep the recipe's configured instance (e.g. a scoped one)
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]  # submitit needs both
    if require_slurm and isinstance(chosen, SlurmLauncher) and missing:
        how = "--launcher slurm" if name is not None else "the recipe's launcher (default_launcher.launcher)"
        raise HarnessError(f"{how}: SLURM is not installed here (no `{'`, `'.join(missing)}` on PATH); run on a "
                           "cluster login node, or use --launcher local")
    return chosen
