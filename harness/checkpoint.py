"""Checkpoint files: atomic writes with a checksum, newest-valid lookup, safe loading.

`checkpoints/step_0001000.pt` is written to a temporary name and renamed; its SHA-256 then goes into
`step_0001000.pt.sha256` the same way. A checkpoint counts as valid only when both exist and agree, so a crash
at any moment leaves the previous checkpoint as the newest valid one. Files are read with
`torch.load(weights_only=True)`: a checkpoint that smuggles a pickled object is refused, never executed.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import Any

import torch

from harness.errors import HarnessError
from harness.fileio import atomic_write_bytes, atomic_write_text, sha256_file
from harness.run_folder import step_name

log = logging.getLogger(__name__)
_STEP_FILE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(folder: str | Path, step: int) -> Path:
    return Path(folder) / step_name(step, ".pt")


def save_checkpoint(folder: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `state` as the checkpoint of `step`, then prune all but the newest `keep` valid ones."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    path = checkpoint_path(folder, step)
    atomic_write_bytes(path, data)
    atomic_write_text(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest() + "\n")
    _prune(Path(folder), keep)
    return path


def _all_checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name))]
    return sorted(found)


def is_valid(path: Path) -> bool:
    digest_file = path.with_name(path.name + ".sha256")
    if not path.is_file() or not digest_file.is_file():
        return False
    return digest_file.read_text().strip() == sha256_file(path)


def newest_valid_checkpoint(folder: str | Path) -> Path | None:
    """The newest checkpoint whose checksum holds; corrupt newer ones are reported and passed over."""
    for step, path in reversed(_all_checkpoints(Path(folder))):
        if is_valid(path):
            return path
        log.warning("checkpoint %s is incomplete or corrupt (checksum mismatch); using an older one", path)
    return None


def _prune(folder: Path, keep: int) -> None:
    valid = [p for _, p in _all_checkpoints(folder) if is_valid(p)]
    for path in valid[:-keep] if keep > 0 else []:
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".sha256").unlink(missing_ok=True)


# torch.save writes a zip archive; files from before torch 1.6 are a bare pickle (protocol 2+: first byte 0x80)
_TORCH_FILE_HEADS = (b"PK\x03\x04", b"\x80")
# What torch's weights-only unpickler says when a file asks for a type it does not build (a class, a function,
# a numpy object array): such a file would run code under a plain torch.load
_CODE_SIGNS = ("Unsupported global", "Unsupported operand", "Can only build", "allowlisted")


def safe_torch_load(path: str | Path, what: str, *, if_code: str, otherwise: str = "", verb: str = "load",
                    map_location: str | torch.device = "cpu", extra_globals: tuple = (), mmap: bool = False) -> Any:
    """`torch.load(weights_only=True)` of a file someone else may have written, with errors that say what is wrong:
    missing, not a torch file at all, pickled code (refused, never run), or otherwise unreadable. `what` names the
    file in messages ("checkpoint", "the Inception weights"); `if_code` says what to do about a file holding
    code, `otherwise` about the other failures. `extra_globals` are the only non-tensor types allowed (e.g.
    numpy's, for torch-fidelity's statistics files). The one place the harness reads torch files it did not just
    write: checkpoints, MaskDM checkpoints, Inception weights, cached features."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{what} {path} does not exist")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_FILE_HEADS):
        raise HarnessError(f"cannot read {what} {path}: it is not a file written by torch.save (neither a zip "
                           f"archive nor a pickle); check the path. {otherwise}".rstrip())
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as err:
                if not mmap or "mmap" not in str(err):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)  # old files cannot be mapped
    except Exception as err:  # UnpicklingError, RuntimeError, EOFError ...: torch's message says which
        if any(sign in str(err) for sign in _CODE_SIGNS):
            raise HarnessError(f"refusing to {verb} {what} {path}: it contains pickled Python objects that could "
                               f"run code. {if_code}") from err
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HarnessError(f"cannot read {what} {path} ({first}). {otherwise}".rstrip()) from err


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely (tensors and plain containers only)."""
    return safe_torch_load(path, "checkpoint", map_location=map_location,
                           if_code="Only tensors and plain containers are accepted.")


def load_weights_strictly(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: str) -> str:
    """Load `weights` into `model`, failing loudly on any missing, unexpected or misshapen tensor.

    MaskDM's own configs can silently start fine-tuning from scratch when a key does not match; here a
    fine-tuning stage either gets every tensor of its parent or stops. Returns a one-line report.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    misshapen = sorted(k for k in set(expected) & set(weights) if tuple(expected[k].shape) != tuple(weights[k].shape))
    if missing or unexpected or misshapen:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", misshapen)):
            if keys:
                shown = ", ".join(keys[:5]) + (f" ... (+{len(keys) - 5})" if len(keys) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise HarnessError(f"the weights from {source} do not fit this stage's model ({'; '.join(parts)}); the "
                           "parent must have the same backbone and sizes (UViTConfig / DiTConfig) as the stage "
                           "that loads it")
    model.load_state_dict(weights, strict=True)
    numel = sum(t.numel() for t in weights.values())
    return f"loaded {len(weights)} tensors ({numel:,} values) from {source}"
