"""Patches: images <-> token rows, and the visible patches of a mask. A leaf module (torch only), shared by the
network (harness/models/uvit.py), the masked loss (harness/diffusion.py) and the trainer.

Token order: row-major over the patch grid; within a token (p1, p2, C), as in the MaskDM reference code.
"""
from __future__ import annotations

import math

import torch

from harness.errors import HarnessError


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C]."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: torch.Tensor, p: int, c: int) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W] for a square grid of N patches."""
    b, n, _ = tokens.shape
    g = math.isqrt(n)
    x = tokens.reshape(b, g, g, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, g * p, g * p)


def visible_indices(mask: torch.Tensor) -> torch.Tensor:
    """Indices of the visible (False) patches of a bool mask [B, N], ascending per row: LongTensor [B, N_visible].

    Every row must hide the same number of patches (masks.py guarantees it), so the result is rectangular.
    """
    counts = mask.sum(dim=1)
    if mask.shape[0] and bool((counts != counts[0]).any()):
        raise HarnessError("every image of a batch must mask the same number of patches; draw masks with "
                           "harness.masks")
    # nonzero() lists positions in row-major order, so each row's indices come out sorted.
    return (~mask).nonzero()[:, 1].reshape(mask.shape[0], -1)


def as_visible_indices(mask: torch.Tensor | None) -> torch.Tensor | None:
    """What the backbones' `forward(mask=...)` takes, as indices: None (no mask), a BoolTensor [B, N] (True =
    masked) turned into `visible_indices(mask)`, or those indices already (a caller that computed them once)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return visible_indices(mask)


def gather_patches(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], idx [B, K] -> [B, K, D] (one gather, no Python loop)."""
    return tokens.gather(1, idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def embed_patches(x: torch.Tensor, proj: torch.nn.Conv2d, pos: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """[B, N or N_visible, D]: the patches of `x` (or the visible ones, `idx` [B, N_visible]) embedded by the patch
    embedding `proj`, plus their position embedding `pos` [N, D].

    A patch embedding is a convolution whose stride equals its kernel, i.e. one linear map per patch. It is
    applied as that linear map to the visible patches only, gathered as pixels: masked patches then cost nothing,
    forward or backward (embedding every patch and gathering afterwards would pay for all of them and scatter a
    full-size gradient back). The parameters stay those of the conv, so checkpoints keep their layout.
    """
    pixels = patchify(x, proj.kernel_size[0])  # [B, N, p*p*C], each patch ordered (p1, p2, C)
    if idx is not None:
        pixels = gather_patches(pixels, idx)  # [B, N_visible, p*p*C]
        pos = pos[idx]  # [B, N_visible, D]
    weight = proj.weight.permute(0, 2, 3, 1).flatten(1)  # conv [D, C, p, p] -> linear over (p1, p2, C)
    return torch.nn.functional.linear(pixels, weight, proj.bias) + pos
