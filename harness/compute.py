"""How the network computes: the autocast precision and the attention kernel of a stage.

Wrappers rather than contexts around calls, so that torch.compile sees the choices inside the compiled code.
They share the wrapped module's parameters: checkpoints, EMA updates and FLOP counts keep using the plain module.
"""
from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn

from harness.errors import HarnessError


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `Stage.precision` on `device`; None means float32 (no autocast)."""
    if precision in ("auto", "auto_fp16"):  # fp16 trains with a GradScaler (update.UpdateRule), saved in checkpoints
        precision = ("bf16" if precision == "auto" else "fp16") if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast_to(device_type: str, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device_type`; None leaves the precision as it is."""
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def dtype_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype as text: bfloat16 / float16, or float32 for None (no autocast)."""
    return str(dtype or torch.float32).removeprefix("torch.")


def attention_kernel(backend: str) -> contextlib.AbstractContextManager:
    """Restrict scaled_dot_product_attention to one of torch's kernels (Stage.attention); 'auto': torch chooses.
    The forward's choice decides the backward's kernel too."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([{"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[backend]])


def check_attention_kernel(backend: str, device: torch.device, dtype: torch.dtype | None, head_dim: int) -> None:
    """Fail early, in one line, when the chosen attention kernel cannot run here (e.g. cuDNN on a CPU, or flash
    attention in float32 on a GPU), instead of at the first step."""
    if backend == "auto":
        return
    q = torch.zeros(1, 1, 8, head_dim, device=device, dtype=dtype or torch.float32)
    try:
        with attention_kernel(backend):
            torch.nn.functional.scaled_dot_product_attention(q, q, q)
    except RuntimeError as e:
        raise HarnessError(f"Stage.attention = '{backend}' cannot run on {device.type} in "
                           f"{dtype_name(dtype)} with {head_dim}-wide heads "
                           f"({str(e).split('. ')[0].strip()[:120]}); use 'auto'") from None


class WithAttentionKernel(nn.Module):
    """Runs a module with one attention kernel (Stage.attention)."""

    def __init__(self, module: nn.Module, backend: str) -> None:
        super().__init__()
        self.module, self.backend = module, backend

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with attention_kernel(self.backend):
            return self.module(*args, **kwargs)


class InPrecision(nn.Module):
    """Runs a module's forward under autocast to `dtype` (None: as it is). Sampling uses it, so that only the
    model's forward changes precision, never the sampler's arithmetic or the Inception features of FID."""

    def __init__(self, module: nn.Module, device_type: str, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.module, self.device_type, self.dtype = module, device_type, dtype

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with autocast_to(self.device_type, self.dtype):
            return self.module(*args, **kwargs)
