"""MaskedUViT: shapes, token dropping (tokens and FLOPs really fall), attention maths, sizes, gin presets."""
from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)
import math
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gin
from harness.errors import HarnessError
from harness.masks import BlockMask, PatchMask
from harness.models.config import UViTConfig
from harness.models.uvit import timestep_embedding
from harness.patches import gather_patches, patchify, unpatchify, visible_indices

GIN_BACKBONES = Path(__file__).resolve().parent.parent / "gin" / "backbones"
TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=4)


def tiny(**overrides):
    torch.manual_seed(0)
    return UViTConfig(**{**TINY, **overrides}).build()


def test_patchify_order_and_round_trip():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8)
    tokens = patchify(x, 4)
    assert tokens.shape == (2, 4, 48)
    # token 1 is the top-right patch; its first entry is pixel (0, 4) of channel 0, then channel 1 of it
    assert tokens[0, 1, 0] == x[0, 0, 0, 4] and tokens[0, 1, 1] == x[0, 1, 0, 4]
    assert tokens[1, 2, 3] == x[1, 0, 4, 1]  # bottom-left patch, pixel (0, 1) within it, channel 0
    assert torch.equal(unpatchify(tokens, 4, 3), x)


def test_visible_indices_and_gather():
    mask = torch.tensor([[True, False, False, True], [False, True, False, True]])
    idx = visible_indices(mask)
    assert idx.tolist() == [[1, 2], [0, 2]]
    tokens = torch.arange(2 * 4 * 3).view(2, 4, 3)
    assert torch.equal(gather_patches(tokens, idx), torch.stack([tokens[0, [1, 2]], tokens[1, [0, 2]]]))
    with pytest.raises(HarnessError, match="same number"):
        visible_indices(torch.tensor([[True, False], [False, False]]))


def test_output_shapes_masked_and_unmasked():
    model = tiny()
    x, t = torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999])
    assert model(x, t).shape == (3, 3, 16, 16)
    mask = PatchMask(0.5).sample(3, 4, generator=torch.Generator().manual_seed(0))
    assert model(x, t, mask=mask).shape == (3, 8, 4 * 4 * 3)
    assert model(x, t, mask=visible_indices(mask)).shape == (3, 8, 48)  # precomputed indices work the same
    with pytest.raises(HarnessError, match="img_size"):
        model(torch.randn(3, 3, 32, 32), t)


def test_tokens_entering_blocks_fall_with_the_mask():
    model = tiny(img_size=32)  # 8x8 grid
    seen = []
    model.mid_block.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    mask = BlockMask(0.75, 2).sample(2, 8, generator=torch.Generator().manual_seed(0))  # 48 of 64 masked
    model(x, t)
    model(x, t, mask=mask)
    assert seen == [64 + 1, 16 + 1]
    assert model.tokens_entering_blocks(None) == 65 and model.tokens_entering_blocks(mask) == 17
    assert tiny(num_classes=10).tokens_entering_blocks(None) == 16 + 2


def test_masked_flops_fall_close_to_the_token_ratio():
    model = tiny(img_size=32, embed_dim=64)
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([3, 4])
    mask = BlockMask(0.75, 2).sample(2, 8, generator=torch.Generator().manual_seed(0))
    flops = []
    for m in (None, mask):
        with FlopCounterMode(display=False) as counter:
            model(x, t, mask=m).sum().backward()
        flops.append(counter.get_total_flops())
    ratio = flops[1] / flops[0]
    assert 0.2 < ratio < 17 / 65 + 0.05, ratio  # linear layers scale with 17/65 tokens, attention faster


DECODER = dict(decoder_depth=2, decoder_embed_dim=16, decoder_heads=2)


@pytest.mark.parametrize("head", [{}, DECODER], ids=["linear head", "ViT decoder"])
def test_masked_patch_content_is_really_dropped(head):
    model = tiny(**head)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 20])
    mask = PatchMask(0.5).sample(2, 4, generator=torch.Generator().manual_seed(1))
    out = model(x, t, mask=mask)
    pixels_masked = unpatchify(mask[:, :, None].expand(-1, -1, 48).float(), 4, 3).bool()
    changed = torch.where(pixels_masked, torch.randn_like(x) * 10, x)
    assert torch.allclose(model(changed, t, mask=mask), out, atol=1e-6)
    visible_changed = torch.where(pixels_masked, x, x + 1)
    assert not torch.allclose(model(visible_changed, t, mask=mask), out, atol=1e-3)


@pytest.mark.parametrize("head", [{}, DECODER], ids=["linear head", "ViT decoder"])
def test_empty_mask_gives_the_unmasked_prediction(head):
    # one code path: masking nothing must reproduce the full forward, token for token
    model = tiny(**head)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([1, 999])
    nothing = torch.zeros(2, 16, dtype=torch.bool)
    assert torch.allclose(model(x, t, mask=nothing), patchify(model(x, t), 4), atol=1e-6)


def test_attention_matches_the_textbook_formula():
    model = tiny()
    attn = model.mid_block.attn
    x = torch.randn(2, 5, 32)
    q, k, v = attn.qkv(x).split(32, dim=-1)
    heads = lambda a: a.view(2, 5, 4, 8).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.proj((weights @ heads(v)).transpose(1, 2).reshape(2, 5, 32))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_time_and_class_conditioning():
    emb = timestep_embedding(torch.tensor([0.0, 7.0]), 6)
    assert torch.allclose(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0]))
    freqs = [math.exp(-math.log(10000) * i / 3) for i in range(3)]
    assert torch.allclose(emb[1, :3], torch.tensor([math.cos(7 * f) for f in freqs]), atol=1e-6)

    model = tiny(num_classes=5, time_mlp=True)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 5])
    a, b = model(x, t, y=torch.tensor([0, 0])), model(x, t, y=torch.tensor([1, 1]))
    assert not torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(model(x, t), a, atol=1e-4)  # y=None uses the learned unconditional token
    assert not torch.allclose(model(x, torch.tensor([6, 6]), y=torch.tensor([0, 0])), a, atol=1e-4)


def test_parameter_names_follow_the_reference_layout_and_init():
    model = tiny(num_classes=3)
    names = dict(model.named_parameters())
    for name in ("patch_embed.proj.weight", "pos_embed", "label_emb.weight", "uncond_embed",
                 "in_blocks.0.norm1.weight", "in_blocks.0.attn.qkv.weight", "in_blocks.0.attn.proj.bias",
                 "mid_block.mlp.fc1.weight", "mid_block.mlp.fc2.weight", "mid_block.norm2.bias",
                 "out_blocks.0.skip_linear.weight", "norm.weight", "decoder_pred.weight"):
        assert name in names, name
    assert "in_blocks.0.skip_linear.weight" not in names and "in_blocks.0.attn.qkv.bias" not in names
    assert names["pos_embed"].shape == (1, 2 + 16, 32)
    assert torch.all(names["norm.weight"] == 1) and torch.all(names["decoder_pred.bias"] == 0)
    big = UViTConfig(img_size=64, embed_dim=256, depth=3, num_heads=4).build()
    assert big.in_blocks[0].mlp.fc1.weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert big.pos_embed.std().item() == pytest.approx(0.02, rel=0.1)


def test_vit_decoder_layout_and_its_fixed_position_embedding():
    """The reference's decoder names (encoder_to_decoder without bias, decoder.blocks.i, decoder.norm,
    decoder.head) and no linear head; its position embedding is saved but never trained, as the reference
    detaches it. Masked, the decoder sees the time token and the visible patches at their own positions."""
    model = tiny(**DECODER)
    names = dict(model.named_parameters())
    for name in ("encoder_to_decoder.weight", "decoder.blocks.1.attn.qkv.weight", "decoder.blocks.0.mlp.fc2.bias",
                 "decoder.norm.weight", "decoder.head.weight", "decoder.head.bias"):
        assert name in names, name
    assert "encoder_to_decoder.bias" not in names and "decoder_pred.weight" not in names
    assert names["decoder.head.weight"].shape == (48, 16) and names["decoder.blocks.0.mlp.fc1.weight"].shape == (64, 16)
    assert "decoder_pos_embed" not in names and model.state_dict()["decoder_pos_embed"].shape == (1, 17, 16)
    assert model.decoder_pos_embed.std().item() == pytest.approx(0.02, rel=0.3)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 20])
    mask = BlockMask(0.5, block_size=2).sample(2, 4, generator=torch.Generator().manual_seed(0))
    model(x, t, mask=mask).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # the position embedding matters: shifting one visible patch's entry changes that patch's prediction
    before = model(x, t, mask=mask).detach()
    first_visible = int(visible_indices(mask)[0, 0])
    with torch.no_grad():
        model.decoder_pos_embed[0, 1 + first_visible] += torch.randn(16)  # (not a constant: LayerNorms drop it)
    after = model(x, t, mask=mask).detach()
    assert not torch.allclose(after[0, 0], before[0, 0], atol=1e-4)


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 10, "time_mlp": True, "qkv_bias": True}, {"depth": 4},
                                       {**DECODER, "qkv_bias": True, "mlp_ratio": 2.0}])
def test_num_params_matches_the_built_module(overrides):
    cfg = UViTConfig(**{**TINY, **overrides})
    assert cfg.num_params() == sum(p.numel() for p in cfg.build().parameters())


@pytest.mark.parametrize(
    "overrides, words",
    [({"patch_size": 3}, "patch_size"), ({"num_heads": 5}, "num_heads"), ({"depth": 0}, "depth"),
     ({"num_classes": -1}, "num_classes"), ({"decoder_depth": -1}, "decoder_depth"),
     ({"decoder_depth": 1, "decoder_embed_dim": 16, "decoder_heads": 3}, "decoder_heads=3 must divide")],
)
def test_bad_config_raises_harness_error(overrides, words):
    with pytest.raises(HarnessError, match=words):
        UViTConfig(**{**TINY, **overrides})


@pytest.mark.parametrize(
    "file, img_size, width, heads, params_millions",
    [
        ("uvit_tiny.gin", 32, 64, 4, 0.28),
        ("uvit_small_cpu.gin", 32, 128, 4, 1.5),
        ("uvit_celeba64.gin", 64, 512, 8, 44.3),  # the figure for MaskDM's CelebA-64 model
        ("uvit_celebahq256.gin", 256, 768, 12, 102.4),  # MaskDM's CelebA-HQ network: a linear head
        ("uvit_celebahq256_decoder.gin", 256, 768, 12, 104.3),  # with the first release's 4-block ViT decoder
        ("uvit_transfer256.gin", 256, 512, 8, 46.3),
    ],
)
def test_gin_backbone_presets(file, img_size, width, heads, params_millions):
    gin.parse_config_file(str(GIN_BACKBONES / file))
    cfg = UViTConfig()
    assert (cfg.img_size, cfg.embed_dim, cfg.num_heads, cfg.patch_size) == (img_size, width, heads, 4)
    assert round(cfg.num_params() / 1e6, 2 if params_millions < 1 else 1) == params_millions
