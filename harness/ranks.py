"""The ranks of a data-parallel stage: who we are, and rank 0's view for everyone.

Rank 0 alone holds a stage's lock, reads and writes its folder (checkpoints, eval.jsonl); the other ranks must
nevertheless take the same way through the stage, or they wait in a collective for a rank that went elsewhere
until the process group's timeout. `from_rank0` hands them rank 0's answer. (Evaluation's own agreement on
failures, phase by phase, is `evaluate._Ranks`.)
"""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank; the value itself when not distributed (or alone)."""
    if rank_and_world_size()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
