"""DiT: the diffusion transformer of Peebles & Xie (2023), with token dropping.

The image is cut into patches, embedded, given a fixed 2-D sin-cos position embedding and run through plain
transformer blocks; the time step (and the class) is not a token but conditions every block by adaLN-Zero: a
vector c = time embedding (+ class embedding) is mapped per block to shifts, scales and gates of the two
LayerNorm'ed residual branches, the map initialised to zero so that every block starts as the identity (and the
zero-initialised head makes the initial prediction zero). Layer and parameter names follow facebookresearch/DiT's
models.py (x_embedder, t_embedder, y_embedder, blocks[i].adaLN_modulation, final_layer); attention and MLP are
timm's layers, as there.

Token dropping works as in MaskedUViT (harness/models/uvit.py), with the same forward contract: with a mask only
the visible patches are embedded (their position embeddings gathered with them) and enter the blocks, and the
output holds one prediction per visible patch, in ascending patch order. Attention mixes the visible patches
only, so a visible patch's output differs from the one it has in the full image; it never depends on the pixels
of dropped patches.

MaskDiT (Zheng et al. 2023, "Fast Training of Diffusion Models with Masked Transformers", Anima-Lab/MaskDiT
models/maskdit.py) adds a decoder when `DiTConfig.decoder_depth > 0`: the blocks above become the encoder (over the
visible patches only, as before); `decoder_layer` (a LayerNorm modulated by c, then a linear map to the decoder's
width) takes their output, a learned `mask_token` fills every masked position, a fixed sin-cos
`decoder_pos_embed` of the decoder's width is added to all N tokens, `decoder_blocks` (DiT blocks of the decoder's
width, modulated by the same c) run over the full sequence, and the final layer predicts every patch. With a mask
the output then holds all N patches in patch order, [B, N, p*p*C] (`predicts_all_patches`); the loss scores the
visible rows as denoising and the masked rows as MaskDiT's reconstruction (harness/diffusion.py). Without a mask
the decoder runs over the full sequence as well (no mask tokens), so both stages share one architecture.

Not included: learned sigma (the harness predicts eps, x0 or v with one output per pixel), classifier-free
guidance and label dropout (training takes no labels), the VAE (latents are the data's business:
`DataConfig.latent`, harness/latent.py).
"""
from __future__ import annotations

import functools

import torch
from timm.layers import Attention, Mlp, PatchEmbed
from torch import nn

from harness.errors import HarnessError
from harness.models.uvit import timestep_embedding
from harness.patches import as_visible_indices, embed_patches, unpatchify


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [grid*grid, dim], tokens row-major over the grid (as patchify).

    DiT's (MAE's) layout: the first half of the channels encodes the patch's column, the second half its row; each
    half is sin(pos * w_i) then cos(pos * w_i), with w_i = 10000^(-i / (dim/4)), i < dim/4.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    row, col = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                              indexing="ij")  # [g, g] each

    def half(pos: torch.Tensor) -> torch.Tensor:  # [g, g] -> [g*g, dim/2]
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([half(col), half(row)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, D] shifted and scaled per image by shift, scale [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """t [B] -> [B, D]: the sinusoidal embedding (freq_dim wide), then Linear, SiLU, Linear."""

    def __init__(self, dim: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """y [B] -> [B, D]; row `num_classes` of the table is the null class (y=None)."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        if y is None:
            y = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        return self.embedding_table(y)


class DiTBlock(nn.Module):
    """Pre-LN transformer block whose two branches are modulated (shift, scale) and gated by c, adaLN-Zero.

    c is `cond_dim` wide (default: dim); MaskDiT's decoder blocks are narrower than the c they are modulated by.
    """

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=True)  # fused SDPA (Stage.attention applies)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, hidden_features=mlp_hidden, act_layer=functools.partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x [B, L, D], c [B, D_c] -> six [B, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """LayerNorm modulated by c (`cond_dim` wide, default dim), then one linear map per token to out_dim values:
    the head (out_dim = p*p*C) and, as MaskDiT's `decoder_layer`, the map from the encoder's width to the decoder's."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int | None = None) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim or dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, L, out_dim]


class DiT(nn.Module):
    """DiT that runs on the visible patches only when given a mask (MaskedUViT's contract).

    forward(x [B,C,H,W], t [B], y=None, mask=None):
      - mask None: the prediction for the whole image, [B, C, H, W];
      - mask bool [B, N] (True = masked), or the LongTensor [B, N_visible] of visible indices that
        `visible_indices(mask)` returns: predictions for the visible patches in ascending patch order,
        [B, N_visible, p*p*C]; with MaskDiT's decoder (`predicts_all_patches`), for all N patches in patch order,
        [B, N, p*p*C] (the masked rows made from mask tokens).
    y: class labels [B] for a conditional model (num_classes > 0); None uses the null class.
    """

    def __init__(self, cfg) -> None:
        # cfg: a harness.models.dit_config.DiTConfig (not imported: that module builds this one)
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_size, self.in_chans = cfg.patch_size, cfg.in_chans
        self.x_embedder = PatchEmbed(img_size=cfg.img_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                     embed_dim=d)
        self.t_embedder = TimestepEmbedder(d, cfg.TIME_FREQ_DIM)
        if cfg.num_classes > 0:
            self.y_embedder = LabelEmbedder(cfg.num_classes, d)
        # fixed, so a buffer computed from the sizes: not trained, not saved, not counted
        self.register_buffer("pos_embed", sincos_pos_embed(d, cfg.grid), persistent=False)  # [N, D]
        self.blocks = nn.ModuleList([DiTBlock(d, cfg.num_heads, cfg.mlp_hidden) for _ in range(cfg.depth)])
        self.predicts_all_patches = cfg.decoder_depth > 0
        if cfg.decoder_depth:  # MaskDiT's decoder (names as models/maskdit.py)
            dd = cfg.decoder_dim
            self.decoder_layer = FinalLayer(d, dd)  # modulated LayerNorm, encoder width -> decoder width
            self.mask_token = nn.Parameter(torch.zeros(1, 1, dd))
            self.register_buffer("decoder_pos_embed", sincos_pos_embed(dd, cfg.grid), persistent=False)  # [N, dd]
            self.decoder_blocks = nn.ModuleList([DiTBlock(dd, cfg.decoder_num_heads, int(dd * cfg.mlp_ratio),
                                                          cond_dim=d) for _ in range(cfg.decoder_depth)])
            self.final_layer = FinalLayer(dd, cfg.patch_dim, cond_dim=d)
        else:
            self.final_layer = FinalLayer(d, cfg.patch_dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # As DiT: Xavier-uniform linear weights and zero biases; the patch embedding as a linear map; N(0, 0.02)
        # for the time MLP and the class table; zero for every adaLN modulation and the head (adaLN-Zero).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.cfg.num_classes > 0:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        zeroed = [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1],
                                                                  self.final_layer.linear]
        if self.predicts_all_patches:
            # as MaskDiT: the mask token N(0, 0.02); zero adaLN maps in the decoder blocks and, like the final
            # layer, a zero decoder_layer (its adaLN map and its linear map)
            nn.init.normal_(self.mask_token, std=0.02)
            zeroed += [b.adaLN_modulation[-1] for b in self.decoder_blocks] + [
                self.decoder_layer.adaLN_modulation[-1], self.decoder_layer.linear]
        for layer in zeroed:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that AdamW should not decay (learned embeddings): the class table, MaskDiT's mask token."""
        return {"y_embedder.embedding_table.weight"} | ({"mask_token"} if self.predicts_all_patches else set())

    def tokens_entering_blocks(self, mask: torch.Tensor | None = None) -> int:
        """Tokens per image that the (encoder) blocks process: the visible patches (no extra tokens). MaskDiT's
        decoder runs over all N patches whatever the mask; its cost is in the measured FLOPs."""
        if mask is None:
            return self.cfg.num_patches
        if mask.dtype == torch.bool:
            return self.cfg.num_patches - int(mask[0].sum())
        return mask.shape[1]

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
                f"{c}x{h}x{w}; make DiTConfig.img_size / in_chans match the data's resolution and channels"
            )
        idx = as_visible_indices(mask)
        # [B, L, D]: only the visible patches are embedded; the dropped ones are gone from here on
        tokens = embed_patches(x, self.x_embedder.proj, self.pos_embed, idx)
        cond = self.t_embedder(t)  # [B, D]
        if self.cfg.num_classes > 0:
            cond = cond + self.y_embedder(y, batch, x.device)
        for block in self.blocks:
            tokens = block(tokens, cond)  # [B, L, D]
        if self.predicts_all_patches:
            tokens = self._decode(tokens, cond, idx)  # [B, N, decoder width]
        out = self.final_layer(tokens, cond)  # [B, L (N with a decoder), p*p*C]
        if mask is not None:
            return out
        return unpatchify(out, self.patch_size, self.in_chans)  # [B, C, H, W]

    def _decode(self, tokens: torch.Tensor, cond: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """MaskDiT's decoder: the encoder's tokens [B, L, D] -> all N patches [B, N, dd].

        The visible tokens are mapped to the decoder's width and put back at their positions, the mask token at
        every other one; the decoder's position embedding is added to all N, then the decoder blocks run.
        """
        x = self.decoder_layer(tokens, cond)  # [B, L, dd]
        if idx is not None:
            batch, _, dd = x.shape
            full = self.mask_token.to(x.dtype).expand(batch, self.cfg.num_patches, dd)
            x = full.scatter(1, idx.unsqueeze(-1).expand(-1, -1, dd), x)  # out of place: mask token elsewhere
        elif torch.is_grad_enabled() and self.mask_token.requires_grad:
            # Unmasked, the mask token takes no part; a zero term keeps it in the graph, so that DDP (which
            # expects a gradient for every parameter) accepts unmasked steps. MaskDiT adds 0 * sum(mask_token) to
            # its loss for the same reason (train_utils/loss.py).
            x = x + 0.0 * self.mask_token.sum()
        x = x + self.decoder_pos_embed  # (as the encoder's: the residual stream in the buffer's float32)
        for block in self.decoder_blocks:
            x = block(x, cond)
        return x
