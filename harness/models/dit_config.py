"""`DiTConfig`: the size and options of a DiT (harness/models/dit.py), as plain data.

Kept apart from the network for the same reason as UViTConfig (harness/models/config.py): parsing a recipe and
planning its stages never import torch; `DiTConfig.build()` imports the network when a stage builds it, and the
network does not import this module at all.

The sizes of Peebles & Xie (2023), facebookresearch/DiT models.py: S 384 wide / 12 blocks / 6 heads, B 768/12/12,
L 1024/24/16, XL 1152/28/16, each with patch 2, 4 or 8 (`gin/backbones/dit_{s,b,l}.gin` bind the sizes; the recipe
binds img_size and patch_size). Differences from that code: pixel space (any `in_chans`), one output per pixel (no
learned sigma: the harness predicts eps, x0 or v), and the fixed sin-cos position embedding is a buffer, not a
frozen parameter, so it is neither saved nor counted.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import gin
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.models.dit import DiT


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Size and options of a DiT; cheap to build and hash, `.build()` makes the module.

    Bind it with `Stage.model = @DiTConfig()` (the `gin/backbones/dit_*.gin` files do). num_classes > 0 adds a
    class embedding (plus a null class for y=None); training takes no labels, so stages refuse it, as for UViT.
    """

    img_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    embed_dim: int = 384  # DiT's "hidden size"
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0

    TIME_FREQ_DIM: ClassVar[int] = 256  # the sinusoidal time-step embedding's width, before its MLP (as DiT)

    def __post_init__(self) -> None:
        if self.img_size < 1 or self.patch_size < 1 or self.img_size % self.patch_size:
            raise HarnessError(f"DiTConfig.patch_size={self.patch_size} must divide img_size={self.img_size}")
        if self.embed_dim < 4 or self.embed_dim % 4:
            raise HarnessError(f"DiTConfig.embed_dim={self.embed_dim} must be a multiple of 4 (the 2-D sin-cos "
                               "position embedding gives a quarter of it to each of sin/cos x row/column)")
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise HarnessError(f"DiTConfig.num_heads={self.num_heads} must divide embed_dim={self.embed_dim}")
        if self.depth < 1:
            raise HarnessError(f"DiTConfig.depth must be at least 1, got {self.depth}")
        if self.mlp_hidden < 1:
            raise HarnessError(f"DiTConfig.mlp_ratio={self.mlp_ratio} leaves the MLP without units")
        if self.num_classes < 0:
            raise HarnessError(f"DiTConfig.num_classes must be 0 (unconditional) or more, got {self.num_classes}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def extras(self) -> int:
        """Tokens besides the patches: none (time and class condition the blocks through adaLN, not as tokens)."""
        return 0

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def num_params(self) -> int:
        """Parameter count, computed from the sizes alone (equals the built module's count)."""
        d, h, out = self.embed_dim, self.mlp_hidden, self.patch_dim
        # adaLN modulation d -> 6d, qkv (with bias), proj, MLP; the LayerNorms have no affine parameters
        block = (d * 6 * d + 6 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (d * h + h) + (h * d + d)
        patch_embed = out * d + d
        time = (self.TIME_FREQ_DIM * d + d) + (d * d + d)
        classes = (self.num_classes + 1) * d if self.num_classes > 0 else 0
        final = (d * 2 * d + 2 * d) + (d * out + out)  # adaLN modulation d -> 2d, linear head
        return self.depth * block + patch_embed + time + classes + final

    def build(self) -> DiT:
        from harness.models.dit import DiT  # imported here: the network needs torch, the spec does not

        return DiT(self)
