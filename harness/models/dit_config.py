"""`DiTConfig`: the size and options of a DiT (harness/models/dit.py), as plain data.

Kept apart from the network for the same reason as UViTConfig (harness/models/config.py): parsing a recipe and
planning its stages never import torch; `DiTConfig.build()` imports the network when a stage builds it, and the
network does not import this module at all.

The sizes of Peebles & Xie (2023), facebookresearch/DiT models.py: S 384 wide / 12 blocks / 6 heads, B 768/12/12,
L 1024/24/16, XL 1152/28/16, each with patch 2, 4 or 8 (`gin/backbones/dit_{s,b,l}.gin` bind the sizes; the recipe
binds img_size and patch_size). Differences from that code: pixels or latents (any `in_chans`;
`DataConfig.latent`), one output per pixel (no learned sigma: the harness predicts eps, x0 or v), and the fixed
sin-cos position embedding is a buffer, not a frozen parameter, so it is neither saved nor counted.

`decoder_depth > 0` adds MaskDiT's decoder (Zheng et al. 2023, Anima-Lab/MaskDiT models/maskdit.py): the blocks
above are the encoder, over the visible patches only; a conditioned linear map to the decoder's width, learned
mask tokens at the masked positions and a second fixed sin-cos position embedding make the full sequence, which
`decoder_depth` more DiT blocks (conditioned on the same time embedding) and the final layer turn into one
prediction per patch, masked or not. Without a mask the decoder runs over the full sequence too, so the masked
and the unmasked stage have one architecture and load each other's weights strictly.
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
    # MaskDiT's decoder (0 = none: the DiT above, unchanged). Its width and heads: 0 = the encoder's (MaskDiT's
    # DiT-XL/2 uses 512 and 16 against the encoder's 1152 and 16); its MLP ratio is the encoder's, as there.
    # (Added after the first release: left out of stage descriptions at their defaults, so ids stay as they were.)
    decoder_depth: int = dataclasses.field(default=0, metadata={"added_later": True})
    decoder_embed_dim: int = dataclasses.field(default=0, metadata={"added_later": True})
    decoder_heads: int = dataclasses.field(default=0, metadata={"added_later": True})

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
        for key in ("decoder_depth", "decoder_embed_dim", "decoder_heads"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise HarnessError(f"DiTConfig.{key} must be an integer, 0 or more, got {getattr(self, key)!r}")
        if not self.decoder_depth and (self.decoder_embed_dim or self.decoder_heads):
            raise HarnessError("DiTConfig.decoder_embed_dim / decoder_heads size a decoder the model does not have "
                               "(decoder_depth = 0): set decoder_depth, or leave them at 0")
        if self.decoder_depth:
            dd, heads = self.decoder_dim, self.decoder_num_heads
            if dd % 4:
                raise HarnessError(f"DiTConfig.decoder_embed_dim={dd} must be a multiple of 4 (the decoder's 2-D "
                                   "sin-cos position embedding)")
            if dd % heads:
                raise HarnessError(f"DiTConfig.decoder_heads={heads} must divide the decoder's width {dd} "
                                   "(decoder_embed_dim; 0 = embed_dim)")

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

    @property
    def decoder_dim(self) -> int:
        """The decoder's width: decoder_embed_dim, or the encoder's (embed_dim) when that is 0."""
        return self.decoder_embed_dim or self.embed_dim

    @property
    def decoder_num_heads(self) -> int:
        """The decoder's heads: decoder_heads, or the encoder's (num_heads) when that is 0."""
        return self.decoder_heads or self.num_heads

    def attention_head_dims(self) -> set[int]:
        """The widths of the network's attention heads (the encoder's, and the decoder's when it has one)."""
        dims = {self.embed_dim // self.num_heads}
        return dims | {self.decoder_dim // self.decoder_num_heads} if self.decoder_depth else dims

    @property
    def predicts_all_patches(self) -> bool:
        """With a mask, does the model predict every patch (MaskDiT's decoder) or the visible ones only?"""
        return self.decoder_depth > 0

    def num_params(self) -> int:
        """Parameter count, computed from the sizes alone (equals the built module's count)."""
        d, out = self.embed_dim, self.patch_dim

        def block(w: int) -> int:  # w wide, conditioned on c (d wide): adaLN c -> 6w, qkv (with bias), proj, MLP
            h = int(w * self.mlp_ratio)  # (the LayerNorms have no affine parameters)
            return (d * 6 * w + 6 * w) + (w * 3 * w + 3 * w) + (w * w + w) + (w * h + h) + (h * w + w)

        patch_embed = out * d + d
        time = (self.TIME_FREQ_DIM * d + d) + (d * d + d)
        classes = (self.num_classes + 1) * d if self.num_classes > 0 else 0
        w = self.decoder_dim if self.decoder_depth else d  # the final layer's width
        final = (d * 2 * w + 2 * w) + (w * out + out)  # adaLN modulation c -> 2w, linear head
        decoder = 0
        if self.decoder_depth:  # decoder_layer (adaLN c -> 2d, linear d -> w), mask token, decoder blocks
            decoder = (d * 2 * d + 2 * d) + (d * w + w) + w + self.decoder_depth * block(w)
        return self.depth * block(d) + patch_embed + time + classes + decoder + final

    def build(self) -> DiT:
        from harness.models.dit import DiT  # imported here: the network needs torch, the spec does not

        return DiT(self)
