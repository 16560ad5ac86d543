"""Launching a plan's stages: inline, as local submitit subprocesses, or as SLURM jobs (arrays for sweeps).

specs.py    the gin-configurable launcher specs and `launcher_from_name`
jobs.py     plans -> distinct stage jobs (shared stages once), job.json
worker.py   the job body: stop-on-signal, torch.distributed set-up, the stage, requeue
run.py      `launch_plan` / `launch_variants`: inline, local and SLURM runs, waiting
slurm.py    submission with dependencies and job arrays
state.py    a stage's state from its folder, job.json and squeue (`harness status`)
watch.py    the live table shown while waiting

Importing this package registers the specs with gin and imports nothing heavy (workers parse recipes that
name them); `launch_plan` and friends load submitit and torch only when called.
"""
from __future__ import annotations

from typing import Any

from harness.launch.jobs import Variant
from harness.launch.specs import (
    LAUNCHERS,
    InlineLauncher,
    LauncherSpec,
    LocalLauncher,
    SlurmLauncher,
    default_launcher,
    launcher_from_name,
)

__all__ = ["LAUNCHERS", "InlineLauncher", "LauncherSpec", "LocalLauncher", "SlurmLauncher", "Variant",
           "default_launcher", "launch_plan", "launch_variants", "launcher_from_name", "raise_for_failures"]


def launch_plan(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    from harness.launch.run import launch_plan as _launch_plan

    return _launch_plan(*args, **kwargs)


def launch_variants(*args: Any, **kwargs: Any) -> list[dict[str, Any]]:
    from harness.launch.run import launch_variants as _launch_variants

    return _launch_variants(*args, **kwargs)


def raise_for_failures(results: list[dict[str, Any]]) -> None:
    from harness.launch.run import raise_for_failures as _raise

    _raise(results)
