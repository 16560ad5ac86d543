"""MaskedUViT: the pixel-space U-ViT backbone of MaskDM, with token dropping.

U-ViT (Bao et al. 2023) treats everything as tokens: the time step (and the class) is a token beside the image
patches, and long skips join the i-th in-block to the mirrored out-block. MaskDM (Lei et al. 2023) pretrains it
on masked images: the masked patches are *dropped* after the positional embedding is added, so the transformer
runs on `[time, (class), visible patches]` only and its cost falls with the mask ratio. The same code path serves
the unmasked model: "no mask" simply means every patch is visible and the gather is skipped.

Parameter names follow the reference layout (patch_embed, pos_embed, time_embed, in_blocks, mid_block,
out_blocks[i].skip_linear, norm, decoder_pred; per block norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2) so
that checkpoints of the reference code can be mapped onto it by name.

The head is a linear map per patch (MaskDM's 64 px and transfer models), or with `decoder_depth > 0` the
reference code's small ViT decoder (its CelebA-HQ 256 models: 4 blocks, 192 wide, 3 heads), which runs over the
same (visible) tokens as the encoder, the time token included. Not included: U-ViT's optional final 3x3 conv
(MaskDM's configs keep it off, and it cannot run on dropped patches).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import HarnessError
from harness.patches import as_visible_indices, embed_patches, unpatchify


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) time steps [B]: cos half then sin half."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# ----------------------------------------------------------------------------------------------------------------
# Layers

class Attention(nn.Module):
    """Multi-head self-attention: one fused qkv projection, then PyTorch's fused SDPA kernel."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        # [B, L, 3, H, Dh] -> three [B, H, L, Dh] views (no copies; SDPA accepts strided inputs)
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ViTDecoder(nn.Module):
    """The reference code's optional decoder: plain pre-LN blocks over all tokens, a LayerNorm, a linear head."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, out_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim, num_heads, int(dim * mlp_ratio), qkv_bias) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, x: torch.Tensor, extras: int) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x[:, extras:]))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; out-blocks first merge the long skip (concatenate, Linear 2d -> d)."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, qkv_bias: bool, skip: bool = False) -> None:
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_hidden)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# ----------------------------------------------------------------------------------------------------------------
# The model

class MaskedUViT(nn.Module):
    """U-ViT that runs on the visible patches only when given a mask.

    forward(x [B,C,H,W], t [B], y=None, mask=None):
      - mask None: the prediction for the whole image, [B, C, H, W];
      - mask bool [B, N] (True = masked), or the LongTensor [B, N_visible] of visible indices that
        `visible_indices(mask)` returns (lets the loss compute them once): predictions for the visible patches
        in ascending patch order, [B, N_visible, p*p*C].
    y: class labels [B] for a conditional model (num_classes > 0); None uses the learned unconditional embedding.
    """

    def __init__(self, cfg) -> None:
        # cfg: a harness.models.config.UViTConfig. Not imported, not even for type checking: that module builds
        # this one (UViTConfig.build), and the two must not import each other.
        super().__init__()
        from timm.layers import PatchEmbed  # imported here: timm takes seconds to import, recipes parse without it

        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_size = cfg.patch_size
        self.in_chans = cfg.in_chans
        self.extras = cfg.extras
        self.patch_embed = PatchEmbed(
            img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=d
        )
        self.time_embed = (
            nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU(), nn.Linear(4 * d, d)) if cfg.time_mlp else nn.Identity()
        )
        if cfg.num_classes > 0:
            self.label_emb = nn.Embedding(cfg.num_classes, d)
            self.uncond_embed = nn.Parameter(torch.zeros(1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.extras + cfg.num_patches, d))

        block = lambda skip: Block(d, cfg.num_heads, cfg.mlp_hidden, cfg.qkv_bias, skip=skip)  # noqa: E731
        self.in_blocks = nn.ModuleList([block(False) for _ in range(cfg.depth // 2)])
        self.mid_block = block(False)
        self.out_blocks = nn.ModuleList([block(True) for _ in range(cfg.depth // 2)])
        self.norm = nn.LayerNorm(d)
        if cfg.decoder_depth:
            dd = cfg.decoder_embed_dim
            self.encoder_to_decoder = nn.Linear(d, dd, bias=False)
            # The reference detaches its decoder position embedding, so it keeps its random initial values:
            # a buffer (saved, never trained) is the same thing, without a parameter that gets no gradient.
            self.register_buffer("decoder_pos_embed", torch.zeros(1, cfg.extras + cfg.num_patches, dd))
            self.decoder = ViTDecoder(dd, cfg.decoder_depth, cfg.decoder_heads, cfg.mlp_ratio, cfg.qkv_bias,
                                      cfg.patch_dim)
        else:
            self.decoder_pred = nn.Linear(d, cfg.patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # As U-ViT: truncated normal (std 0.02) for linear weights and learned embeddings, zero biases, LN 1/0.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cfg.decoder_depth:
            nn.init.trunc_normal_(self.decoder_pos_embed, std=0.02)
        if self.cfg.num_classes > 0:
            nn.init.trunc_normal_(self.uncond_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay (learned embeddings)."""
        return {"pos_embed", "uncond_embed"}

    def tokens_entering_blocks(self, mask: torch.Tensor | None = None) -> int:
        """Tokens per image that the transformer blocks process: visible patches + time (+ class) token."""
        if mask is None:
            visible = self.cfg.num_patches
        elif mask.dtype == torch.bool:
            visible = self.cfg.num_patches - int(mask[0].sum())
        else:
            visible = mask.shape[1]
        return visible + self.extras

    def _condition_tokens(self, t: torch.Tensor, y: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B, extras, D]: (class,) time tokens with their positional embedding."""
        tokens = self.time_embed(timestep_embedding(t, self.cfg.embed_dim)).unsqueeze(1)
        if self.cfg.num_classes > 0:
            label = self.uncond_embed.expand(batch, -1) if y is None else self.label_emb(y)
            # the reference puts the class token first: [class, time, patches...]
            tokens = torch.cat([label.unsqueeze(1), tokens], dim=1)
        return tokens + self.pos_embed[:, : self.extras]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, c, h, w = x.shape
        if (c, h, w) != (self.in_chans, self.cfg.img_size, self.cfg.img_size):
            raise HarnessError(
                f"the model expects images of {self.in_chans}x{self.cfg.img_size}x{self.cfg.img_size} but got "
                f"{c}x{h}x{w}; make UViTConfig.img_size / in_chans match the data's resolution and channels"
            )
        idx = as_visible_indices(mask)
        # only the visible patches are embedded (patches.embed_patches); the masked ones are gone from here on
        patches = embed_patches(x, self.patch_embed.proj, self.pos_embed[0, self.extras :], idx)
        h = torch.cat([self._condition_tokens(t, y, batch).to(patches.dtype), patches], dim=1)

        skips = []
        for blk in self.in_blocks:
            h = blk(h)
            skips.append(h)
        h = self.mid_block(h)
        for blk in self.out_blocks:
            h = blk(h, skips.pop())

        if self.cfg.decoder_depth:
            pos = self.decoder_pos_embed
            if idx is not None:  # the extra tokens' entries, then the visible patches'
                pos = torch.cat([pos[:, : self.extras].expand(batch, -1, -1), pos[0, self.extras + idx]], dim=1)
            out = self.decoder(self.encoder_to_decoder(self.norm(h)) + pos, self.extras)
        else:
            out = self.decoder_pred(self.norm(h[:, self.extras :]))
        if mask is not None:
            return out
        return unpatchify(out, self.patch_size, self.in_chans)
