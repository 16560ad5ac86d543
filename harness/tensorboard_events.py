"""TensorBoard event files for a stage (`Stage.tensorboard`, `harness run --tensorboard`).

Written by the main rank into `<stage folder>/tensorboard/`, beside metrics.jsonl and eval.jsonl, which stay the
record the harness reads; the events are for watching runs live: `tensorboard --logdir results/`. Training rows
go under `train/` (loss, lr, grad_norm, images_per_second, mask_ratio), evaluations under `eval/` (FID, KID,
precision, recall, their intervals and noise floors), sample grids under `samples`. A resumed stage purges the
events after its checkpoint's step, as it rewrites the JSONL rows after it.

TensorBoard is an optional dependency (`pip install -e '.[tensorboard]'`): without it a stage that asks for
events fails before training, saying so.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from harness.errors import HarnessError
from harness.run_folder import EVENTS_DIR

# metrics.jsonl keys that are not measurements
_NOT_SCALARS = {"step", "time"}
# eval.jsonl keys that measure the model (metrics, their spread and interval, the noise floor); the rest describe
# the evaluation (counts, sampler) or its cost
_EVAL_PREFIXES = ("frechet_", "kernel_", "precision", "recall", "fid_", "kid_", "floor_")


def _scalars(row: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k not in _NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class TensorBoardEvents:
    """A SummaryWriter for one stage folder; every method is a no-op when `enabled` is False or `write` is False.

    Every rank of a stage constructs one with the same `enabled`, so that a missing package stops every rank
    alike (not rank 0 alone, leaving the others waiting in a collective); only the main rank writes.
    """

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int = 0, write: bool = True) -> None:
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise HarnessError("Stage.tensorboard = True needs the tensorboard package: pip install -e "
                               "'.[tensorboard]' (or pip install tensorboard), or leave TensorBoard off") from None
        if write:
            # purge_step drops the events at and after it: those of the steps the stage is about to (re)do,
            # all of them when it starts over from step 0
            self.writer = SummaryWriter(log_dir=str(Path(run_dir) / EVENTS_DIR), purge_step=resume_step + 1)

    def training(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row (at a log step)."""
        if self.writer is not None:
            for key, value in _scalars(row).items():
                self.writer.add_scalar(f"train/{key}", value, int(row["step"]))

    def evaluation(self, row: dict[str, Any]) -> None:
        """One eval.jsonl row: its metrics, intervals and floors (cost keys are left to the JSONL record)."""
        if self.writer is not None:
            for key, value in _scalars(row).items():
                if key.startswith(_EVAL_PREFIXES) and not key.startswith("floor_n_"):
                    self.writer.add_scalar(f"eval/{key}", value, int(row["step"]))

    def image_grid(self, step: int, images: Any) -> None:
        """A sample grid: a float tensor [3, H, W] in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image("samples", images, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
