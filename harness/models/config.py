"""`UViTConfig`: the size and options of a MaskedUViT, as plain data.

Kept apart from harness/models/uvit.py (the network) so that parsing a recipe and planning its stages never
import torch; `UViTConfig.build()` imports the network when a stage actually builds it. The network module
does not import this one, not even for type checking: the two never import each other.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import gin
from harness.errors import HarnessError

if TYPE_CHECKING:
    from harness.models.uvit import MaskedUViT


@gin.configurable
@dataclasses.dataclass(frozen=True)
class UViTConfig:
    """Size and options of a MaskedUViT; cheap to build and hash, `.build()` makes the module."""

    img_size: int = 64
    patch_size: int = 4
    in_chans: int = 3
    embed_dim: int = 512
    depth: int = 13
    num_heads: int = 8
    mlp_ratio: float = 4.0
    qkv_bias: bool = False
    num_classes: int = 0
    time_mlp: bool = False
    # The reference's optional ViT decoder; 0 = a linear head. (Added after the first release: left out of stage
    # descriptions while at their defaults, so that existing stage ids stay as they were.)
    decoder_depth: int = dataclasses.field(default=0, metadata={"added_later": True})
    decoder_embed_dim: int = dataclasses.field(default=192, metadata={"added_later": True})
    decoder_heads: int = dataclasses.field(default=3, metadata={"added_later": True})

    def __post_init__(self) -> None:
        if self.img_size < 1 or self.patch_size < 1 or self.img_size % self.patch_size:
            raise HarnessError(
                f"UViTConfig.patch_size={self.patch_size} must divide img_size={self.img_size}"
            )
        if self.embed_dim < 1 or self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise HarnessError(
                f"UViTConfig.num_heads={self.num_heads} must divide embed_dim={self.embed_dim}"
            )
        if self.depth < 1:
            raise HarnessError(f"UViTConfig.depth must be at least 1, got {self.depth}")
        if self.num_classes < 0:
            raise HarnessError(f"UViTConfig.num_classes must be 0 (unconditional) or more, got {self.num_classes}")
        if self.decoder_depth < 0:
            raise HarnessError(f"UViTConfig.decoder_depth must be 0 (a linear head) or more, "
                               f"got {self.decoder_depth}")
        if self.decoder_depth and (self.decoder_embed_dim < 1 or self.decoder_heads < 1
                                   or self.decoder_embed_dim % self.decoder_heads):
            raise HarnessError(f"UViTConfig.decoder_heads={self.decoder_heads} must divide "
                               f"decoder_embed_dim={self.decoder_embed_dim}")

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def extras(self) -> int:
        """Tokens besides the patches: the time token, and the class token when conditional."""
        return 2 if self.num_classes > 0 else 1

    @property
    def mlp_hidden(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        return self.patch_size**2 * self.in_chans

    def attention_head_dims(self) -> set[int]:
        """The widths of the network's attention heads (the encoder's, and the ViT decoder's when it has one)."""
        dims = {self.embed_dim // self.num_heads}
        return dims | {self.decoder_embed_dim // self.decoder_heads} if self.decoder_depth else dims

    def num_params(self) -> int:
        """Parameter count, computed from the sizes alone (equals the built module's count)."""
        d, blocks = self.embed_dim, 2 * (self.depth // 2) + 1

        def block(w: int) -> int:
            h = int(w * self.mlp_ratio)
            return 4 * w + 3 * w * w + (3 * w if self.qkv_bias else 0) + w * w + w + 2 * w * h + h + w

        skips = (self.depth // 2) * (2 * d * d + d)
        embeds = self.patch_dim * d + d + (self.extras + self.num_patches) * d
        time = 2 * (d * 4 * d) + 4 * d + d if self.time_mlp else 0
        classes = (self.num_classes + 1) * d if self.num_classes > 0 else 0
        head = 2 * d + d * self.patch_dim + self.patch_dim  # final norm + linear head
        if self.decoder_depth:  # final norm, d -> decoder width, decoder blocks, decoder norm + head
            dd = self.decoder_embed_dim
            head = 2 * d + d * dd + self.decoder_depth * block(dd) + 2 * dd + dd * self.patch_dim + self.patch_dim
        return blocks * block(d) + skips + embeds + time + classes + head

    def build(self) -> MaskedUViT:
        from harness.models.uvit import MaskedUViT  # imported here: the network needs torch, the spec does not

        return MaskedUViT(self)
