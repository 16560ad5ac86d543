"""Launcher specs: where the stages of a plan run (this process, local subprocesses, or SLURM jobs).

Each spec is a gin-configurable dataclass holding plain values, so `gin/launch/slurm.gin` (or `--gin
'SlurmLauncher.partition = "gpu"'`) sets it like any other component. This module imports nothing heavy: gin
re-parses recipes that name these specs in every worker, which must not pay for submitit or torch to do so.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import gin
from harness.config import check_field_types
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

    def __post_init__(self) -> None:
        check_field_types(self, "LocalLauncher")
        _at_least(self, "LocalLauncher", timeout_min=1, tasks_per_node=1, gpus_per_node=0, max_parallel=1)
        _positive(self, "LocalLauncher", "poll_seconds")
        _one_gpu_per_rank(self, "LocalLauncher", self.tasks_per_node)


@gin.configurable
@dataclass
class SlurmLauncher:
    """Submit each stage as a SLURM job (sweeps: one job array per level) through submitit.

    A child stage waits for its parent with `--dependency=afterok` (`aftercorr` between arrays that map one to
    one), and `--kill-on-invalid-dep` cancels it when the parent fails. SLURM sends SIGUSR2 `signal_delay_s`
    before the time limit (only then); the stage checkpoints and the job requeues itself, at most `max_requeues`
    times. Preemption sends SIGTERM: the stage checkpoints, and the job comes back only where the cluster
    requeues preempted jobs (PreemptMode=REQUEUE); elsewhere launch again to resume.

    `gin/launch/slurm.gin` is the cluster profile that documents each field; `harness run --launcher slurm
    --dry-run` prints the sbatch options each stage's job gets (`harness.launch.slurm.job_parameters`).
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
    exclusive: bool = False  # --exclusive: the job's nodes are not shared with other jobs
    extra_sbatch: list[str] = field(default_factory=list)  # e.g. ['--reservation=abc', '--mail-type=FAIL']
    setup: list[str] = field(default_factory=list)  # shell lines run before the job (module load ...)
    array_parallelism: int = 32  # most elements of one job array running at once (the %N of --array)
    max_requeues: int = 3  # restarts (SLURM's count, preemption requeues too) before a time limit fails the job
    signal_delay_s: int = 120  # SIGUSR2 this many seconds before the time limit: time to save a checkpoint
    job_name: str = "harness"
    log_folder: str | None = None  # default: <results_dir>/.submitit
    poll_seconds: float = 10.0

    def __post_init__(self) -> None:
        owner = "SlurmLauncher"
        check_field_types(self, owner)
        _at_least(self, owner, time_min=1, nodes=1, gpus_per_node=0, tasks_per_node=1, cpus_per_task=1,
                  array_parallelism=1, max_requeues=0, signal_delay_s=0)
        _positive(self, owner, "mem_gb_per_task", "poll_seconds")
        for name in ("partition", "account", "qos", "constraint", "job_name", "log_folder"):
            value = getattr(self, name)
            if value is not None and not value.strip():
                raise HarnessError(f"{owner}.{name} is empty: give a value, or None for the cluster's default")
        for name in ("extra_sbatch", "setup"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(isinstance(line, str) for line in value):
                raise HarnessError(f"{owner}.{name} = {value!r} must be a list of strings, e.g. "
                                   f"{owner}.{name} = {_LIST_EXAMPLES[name]}")
        if self.signal_delay_s >= self.time_min * 60:
            raise HarnessError(f"{owner}.signal_delay_s = {self.signal_delay_s} is not shorter than the time "
                               f"limit ({owner}.time_min = {self.time_min} minutes): SLURM would signal the job "
                               "before it trains; lower signal_delay_s or raise time_min")
        _one_gpu_per_rank(self, owner, self.ntasks)
        extra = parse_sbatch_lines(self.extra_sbatch)  # refuses a short option or one a field sets
        if self.mem_gb_per_task is not None and {"mem_per_cpu", "mem_per_gpu"} & set(extra):
            raise HarnessError(f"{owner}.extra_sbatch asks for --mem-per-cpu/--mem-per-gpu and "
                               f"{owner}.mem_gb_per_task sets --mem: sbatch takes one of them; set "
                               "mem_gb_per_task = None or drop the extra option")

    @property
    def ntasks(self) -> int:
        """Tasks (DDP ranks) per node."""
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    def sbatch_parameters(self) -> dict:
        """These settings as submitit SlurmExecutor parameters (sbatch options); a job adds its name and dependency
        (`harness.launch.slurm.job_parameters`)."""
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
        if self.exclusive:
            params["exclusive"] = True
        # Requeueable (self-requeue; preemption where PreemptMode=REQUEUE); cancel children whose parent failed.
        extra: dict = {"requeue": True, "kill_on_invalid_dep": "yes"}
        extra.update(parse_sbatch_lines(self.extra_sbatch))
        params["additional_parameters"] = extra
        return params


_LIST_EXAMPLES = {"extra_sbatch": "['--reservation=abc']", "setup": "['module load cuda/12.1']"}

# sbatch options that a SlurmLauncher field (or the harness itself) sets: not allowed in extra_sbatch, where
# they would silently override or contradict it. option (as parse_sbatch_lines keys it) -> what sets it
_SET_BY_FIELDS = {
    "partition": "SlurmLauncher.partition", "account": "SlurmLauncher.account", "qos": "SlurmLauncher.qos",
    "time": "SlurmLauncher.time_min", "nodes": "SlurmLauncher.nodes", "gpus_per_node": "SlurmLauncher.gpus_per_node",
    "gpus": "SlurmLauncher.gpus_per_node", "ntasks_per_node": "SlurmLauncher.tasks_per_node",
    "ntasks": "SlurmLauncher.tasks_per_node", "cpus_per_task": "SlurmLauncher.cpus_per_task",
    "mem": "SlurmLauncher.mem_gb_per_task", "constraint": "SlurmLauncher.constraint",
    "exclusive": "SlurmLauncher.exclusive", "signal": "SlurmLauncher.signal_delay_s",
    "job_name": "SlurmLauncher.job_name", "output": "SlurmLauncher.log_folder", "error": "SlurmLauncher.log_folder",
    "array": "the harness (sweeps; SlurmLauncher.array_parallelism)", "dependency": "the harness (stage order)",
    "requeue": "the harness (always requeueable)", "no_requeue": "the harness (always requeueable)",
    "kill_on_invalid_dep": "the harness (always yes)",
}
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
        key = key.strip().replace("-", "_")
        if key in _SET_BY_FIELDS:
            raise HarnessError(f"extra sbatch line {line!r}: --{key.replace('_', '-')} is set by "
                               f"{_SET_BY_FIELDS[key]}; use that instead of SlurmLauncher.extra_sbatch")
        out[key] = value.strip() if value else True
    return out


def _at_least(spec: object, owner: str, **lowest: int) -> None:
    """Refuse an integer field below its lowest sensible value (None, where allowed, means a default)."""
    for name, low in lowest.items():
        value = getattr(spec, name)
        if value is not None and value < low:
            raise HarnessError(f"{owner}.{name} = {value} must be at least {low}")


def _positive(spec: object, owner: str, *names: str) -> None:
    for name in names:
        value = getattr(spec, name)
        if value is not None and not value > 0:
            raise HarnessError(f"{owner}.{name} = {value} must be positive")


def _one_gpu_per_rank(spec: object, owner: str, tasks: int) -> None:
    """With GPUs, each task (DDP rank) takes one of its node's GPUs: two ranks cannot share one under NCCL."""
    gpus = getattr(spec, "gpus_per_node")
    if gpus and tasks > gpus:
        raise HarnessError(f"{owner}: {tasks} tasks per node but {gpus} GPUs per node: each task (DDP rank) needs "
                           f"a GPU of its own; set {owner}.tasks_per_node to at most {owner}.gpus_per_node (or "
                           "None: one task per GPU)")


@gin.configurable
def default_launcher(launcher: LauncherSpec | None = None) -> LauncherSpec:
    """The launcher a recipe asks for (`include 'launch/slurm.gin'` binds it); inline when none."""
    return launcher if launcher is not None else InlineLauncher()


def launcher_from_name(name: str | None = None, require_slurm: bool = True) -> LauncherSpec:
    """The spec for `--launcher NAME`, with gin's bindings applied (so call it after parsing the recipe).

    No name: the recipe's choice (`default_launcher.launcher`), else inline. A name the recipe did not choose:
    that launcher as its profile `gin/launch/<name>.gin` sets it (`from_profile`). A SLURM launcher, chosen either
    way, needs `sbatch` here unless `require_slurm` is False (a dry run only previews the jobs).
    """
    if name is not None and name not in LAUNCHERS:
        raise HarnessError(f"unknown launcher '{name}': use one of {', '.join(LAUNCHERS)}")
    chosen = default_launcher()
    if name is not None and not isinstance(chosen, LAUNCHERS[name]):
        chosen = from_profile(LAUNCHERS[name])  # else keep the recipe's configured instance (e.g. a scoped one)
    missing = [command for command in ("sbatch", "srun") if shutil.which(command) is None]  # submitit needs both
    if require_slurm and isinstance(chosen, SlurmLauncher) and missing:
        how = "--launcher slurm" if name is not None else "the recipe's launcher (default_launcher.launcher)"
        raise HarnessError(f"{how}: SLURM is not installed here (no `{'`, `'.join(missing)}` on PATH); run on a "
                           "cluster login node, or use --launcher local")
    return chosen


def profile_path(name: str) -> Path:
    """A launcher's profile: gin/launch/<name>.gin (for SLURM, the cluster's settings, filled in once)."""
    from harness.config import GIN_DIR

    return GIN_DIR / "launch" / f"{name}.gin"


def from_profile(cls: type) -> LauncherSpec:
    """`cls` as its profile sets it, under the bindings gin already holds: `--launcher slurm` with a recipe that
    does not include 'launch/slurm.gin' still gets the cluster's settings, and a `SlurmLauncher.*` binding of the
    recipe or of --gin wins over the profile's.
    """
    from gin import config_parser

    path = profile_path(cls.name)
    values: dict = {}
    if path.is_file():
        try:
            delegate = gin.config.ParserDelegate(skip_unknown=True)
            statements = list(config_parser.ConfigParser(path.read_text(), delegate))
        except (SyntaxError, ValueError) as err:
            raise HarnessError(f"bad gin config ({path}): {' '.join(str(err).split())}") from err
        for statement in statements:
            if not isinstance(statement, config_parser.BindingStatement):
                raise HarnessError(f"{path}: a launcher profile holds bindings only (line "
                                   f"{statement.location.line_num}: {statement.location.line_content.strip()!r})")
            if statement.scope or statement.selector != cls.__name__:
                continue  # `default_launcher.launcher = ...`: the choice is --launcher's
            if not isinstance(statement.value, (str, int, float, bool, list, tuple, type(None))):
                raise HarnessError(f"{path}, line {statement.location.line_num}: {cls.__name__}."
                                   f"{statement.arg_name} must be a plain value (a number, a string, a list, None)")
            values[statement.arg_name] = statement.value
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(values) - known)
    if unknown:
        raise HarnessError(f"{path}: {cls.__name__} has no setting {', '.join(unknown)} (settings: "
                           f"{', '.join(sorted(known))})")
    return cls(**{key: value for key, value in values.items() if not _bound(f"{cls.__name__}.{key}")})


def _bound(binding: str) -> bool:
    try:
        gin.query_parameter(binding)
    except ValueError:
        return False
    return True
