"""DiT: the forward contract MaskedUViT has (shapes, token dropping, visible patches in ascending order), adaLN-Zero,
the reference's layout and sin-cos position embedding, sizes from the spec, gin presets, and stages that train it."""
from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import gin
from harness.cli import main as cli_main
from harness.config import load_recipe, register_configurables
from harness.errors import HarnessError
from harness.experiment import plan_from_gin
from harness.masks import BlockMask, PatchMask
from harness.models.dit_config import DiTConfig
from harness.patches import gather_patches, patchify, unpatchify, visible_indices
from harness.stage import run_stage

GIN_BACKBONES = Path(__file__).resolve().parent.parent / "gin" / "backbones"
TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=3, num_heads=4)


def tiny(**overrides):
    """A tiny DiT whose every weight is random: at DiT's own initialisation (adaLN-Zero, a zero head) the output is
    exactly zero, and every comparison below would hold trivially."""
    torch.manual_seed(0)
    model = DiTConfig(**{**TINY, **overrides}).build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 1 / math.sqrt(p.shape[-1]))
    return model


def images(batch=2, size=16):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def test_output_shapes_masked_and_unmasked():
    model = tiny()
    x, t = images(3), torch.tensor([0, 500, 999])
    assert model(x, t).shape == (3, 3, 16, 16)
    mask = PatchMask(0.5).sample(3, 4, generator=torch.Generator().manual_seed(0))
    out = model(x, t, mask=mask)
    assert out.shape == (3, 8, 4 * 4 * 3)
    assert torch.equal(model(x, t, mask=visible_indices(mask)), out)  # precomputed indices: the same forward
    with pytest.raises(HarnessError, match="DiTConfig.img_size"):
        model(torch.randn(3, 3, 32, 32), t)


def test_adaln_zero_starts_every_block_as_the_identity_and_predicts_zero():
    torch.manual_seed(0)
    model = DiTConfig(**TINY).build()
    for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1],
                                                                   model.final_layer.linear]:
        assert not layer.weight.any() and not layer.bias.any()
    seen = []
    model.blocks[1].register_forward_hook(lambda mod, inp, out: seen.append(torch.equal(inp[0], out)))
    x, t = images(), torch.tensor([3, 900])
    assert not model(x, t).any() and seen == [True]
    # the rest as DiT initialises it: Xavier-uniform linear weights with zero biases, N(0, 0.02) time MLP
    qkv = model.blocks[0].attn.qkv
    assert qkv.weight.abs().max() <= math.sqrt(6 / (32 + 96)) and not qkv.bias.any()
    assert model.t_embedder.mlp[0].weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_all_patches_visible_equals_no_mask():
    """Passing the full visible index set (or a mask that hides nothing) is the unmasked forward, token for token."""
    model = tiny()
    x, t = images(), torch.tensor([1, 999])
    full = patchify(model(x, t), 4)
    assert torch.allclose(model(x, t, mask=torch.zeros(2, 16, dtype=torch.bool)), full, atol=1e-5)
    assert torch.allclose(model(x, t, mask=torch.arange(16).expand(2, -1)), full, atol=1e-5)


def test_output_rows_are_the_visible_patches_in_ascending_order():
    """Where dropping equals masking the full sequence (attention switched off, so that no token sees another),
    row k of the masked output is the full output's patch visible_indices(mask)[k]. With attention on, the rows
    differ from the full forward's: the visible patches attend to each other only."""
    model = tiny()
    x, t = images(), torch.tensor([10, 600])
    mask = BlockMask(0.5, 2).sample(2, 4, generator=torch.Generator().manual_seed(3))
    idx = visible_indices(mask)
    assert not torch.equal(idx[0], idx[1])  # the two images keep different patches
    with_attention = model(x, t, mask=mask)
    assert not torch.allclose(with_attention, gather_patches(patchify(model(x, t), 4), idx), atol=1e-3)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    assert torch.allclose(model(x, t, mask=mask), gather_patches(patchify(model(x, t), 4), idx), atol=1e-5)


def test_dropped_patches_pixels_do_not_matter():
    model = tiny()
    x, t = images(), torch.tensor([10, 20])
    mask = PatchMask(0.5).sample(2, 4, generator=torch.Generator().manual_seed(1))
    out = model(x, t, mask=mask)
    pixels_masked = unpatchify(mask[:, :, None].expand(-1, -1, 48).float(), 4, 3).bool()
    changed = torch.where(pixels_masked, torch.randn_like(x) * 10, x)
    assert torch.allclose(model(changed, t, mask=mask), out, atol=1e-6)
    # one visible patch changed: its own row and (through attention) the other visible rows change
    first = int(visible_indices(mask)[0, 0])
    one_visible = unpatchify(torch.nn.functional.one_hot(torch.tensor(first), 16).float()[None, :, None]
                             .expand(2, -1, 48), 4, 3).bool()
    moved = model(torch.where(one_visible, x + 1, x), t, mask=mask)
    assert not torch.allclose(moved[0, 0], out[0, 0], atol=1e-3)
    assert not torch.allclose(moved[0, 1:], out[0, 1:], atol=1e-3)


def test_tokens_entering_blocks_and_flops_fall_with_the_mask():
    model = tiny(img_size=32, embed_dim=64)  # 8x8 grid
    seen = []
    model.blocks[0].register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    x, t = images(2, 32), torch.tensor([3, 4])
    mask = BlockMask(0.75, 2).sample(2, 8, generator=torch.Generator().manual_seed(0))  # 48 of 64 masked
    flops = []
    for m in (None, mask):
        with FlopCounterMode(display=False) as counter:
            model(x, t, mask=m).sum().backward()
        flops.append(counter.get_total_flops())
    assert seen == [64, 16]  # no time or class token: they condition the blocks through adaLN
    assert model.tokens_entering_blocks(None) == 64 and model.tokens_entering_blocks(mask) == 16
    assert model.tokens_entering_blocks(visible_indices(mask)) == 16
    # the per-token work scales with 16/64 tokens, attention faster; the per-image adaLN maps do not scale
    assert 0.15 < flops[1] / flops[0] < 16 / 64 + 0.05, flops


def test_sincos_position_embedding_is_maes():
    """The fixed embedding as DiT computes it (MAE's get_2d_sincos_pos_embed, restated here with numpy): the
    first half from the column (np.meshgrid puts w first), the second from the row, each sin then cos."""
    dim, g = 32, 4

    def one_d(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid = np.stack(np.meshgrid(np.arange(g, dtype=np.float32), np.arange(g, dtype=np.float32)), axis=0)
    expected = np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)
    model = DiTConfig(img_size=16, patch_size=4, embed_dim=dim, depth=1, num_heads=4).build()
    assert model.pos_embed.shape == (16, dim)
    assert np.allclose(model.pos_embed.numpy(), expected, atol=1e-6)
    assert "pos_embed" not in dict(model.named_parameters()) and "pos_embed" not in model.state_dict()


def test_time_and_class_conditioning():
    model = tiny(num_classes=5)
    x = images()
    a = model(x, torch.tensor([5, 5]), y=torch.tensor([0, 0]))
    assert not torch.allclose(model(x, torch.tensor([5, 5]), y=torch.tensor([1, 1])), a, atol=1e-4)
    assert not torch.allclose(model(x, torch.tensor([5, 5])), a, atol=1e-4)  # y=None: the null class
    assert not torch.allclose(model(x, torch.tensor([6, 6]), y=torch.tensor([0, 0])), a, atol=1e-4)
    assert model.y_embedder.embedding_table.weight.shape == (6, 32)
    assert model.no_weight_decay() == {"y_embedder.embedding_table.weight"}


def test_parameter_names_follow_the_reference_layout_and_every_weight_learns():
    model = tiny(num_classes=3)
    names = dict(model.named_parameters())
    for name in ("x_embedder.proj.weight", "x_embedder.proj.bias", "t_embedder.mlp.0.weight",
                 "t_embedder.mlp.2.bias", "y_embedder.embedding_table.weight", "blocks.0.attn.qkv.weight",
                 "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.weight", "blocks.2.mlp.fc1.weight",
                 "blocks.2.mlp.fc2.bias", "blocks.1.adaLN_modulation.1.weight", "final_layer.linear.weight",
                 "final_layer.adaLN_modulation.1.bias"):
        assert name in names, name
    assert not any("norm" in n for n in names)  # DiT's LayerNorms have no affine parameters
    assert model.blocks[0].attn.fused_attn  # timm's attention runs torch's SDPA: Stage.attention reaches it
    mask = BlockMask(0.5, 2).sample(2, 4, generator=torch.Generator().manual_seed(0))
    model(images(), torch.tensor([1, 2]), y=torch.tensor([0, 2]), mask=mask).square().mean().backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())


@pytest.mark.parametrize("overrides", [{}, {"num_classes": 10}, {"depth": 1, "mlp_ratio": 2.5},
                                       {"img_size": 32, "patch_size": 8, "in_chans": 1, "embed_dim": 48}])
def test_num_params_matches_the_built_module(overrides):
    cfg = DiTConfig(**{**TINY, **overrides})
    assert cfg.num_params() == sum(p.numel() for p in cfg.build().parameters())


def test_num_params_of_the_paper_sizes():
    """DiT-S/2 on 256 px RGB, by hand: per block adaLN 384*2304 + 2304, qkv 384*1152 + 1152, proj 384*384 + 384,
    MLP 384*1536 + 1536 + 1536*384 + 384 = 2,659,968, x 12 = 31,919,616; patch embedding 12*384 + 384 = 4,992; time
    MLP 256*384 + 384 + 384*384 + 384 = 246,528; final adaLN 384*768 + 768 + head 384*12 + 12 = 300,300. The
    reference's count of DiT-XL/2 (32x32x4 latents, 1000 classes + the null class, learned sigma: "675M") is
    675,129,632 with its frozen position embedding counted; ours in that setting lacks only those two."""
    assert DiTConfig(img_size=256, patch_size=2).num_params() == 32_471_436
    xl = DiTConfig(img_size=32, patch_size=2, in_chans=4, embed_dim=1152, depth=28, num_heads=16, num_classes=1000)
    sigma_head, frozen_pos = 1152 * (2 * 2 * 4) + 2 * 2 * 4, 256 * 1152
    assert xl.num_params() + sigma_head + frozen_pos == 675_129_632


@pytest.mark.parametrize(
    "overrides, words",
    [({"patch_size": 3}, "patch_size"), ({"num_heads": 5}, "num_heads"), ({"embed_dim": 30, "num_heads": 3},
                                                                           "multiple of 4"),
     ({"depth": 0}, "depth"), ({"num_classes": -1}, "num_classes"), ({"mlp_ratio": 0.0}, "mlp_ratio")],
)
def test_bad_config_raises_harness_error(overrides, words):
    with pytest.raises(HarnessError, match=words):
        DiTConfig(**{**TINY, **overrides})


@pytest.mark.parametrize("file, width, depth, heads, params_at_patch_2", [
    ("dit_s.gin", 384, 12, 6, 32_471_436), ("dit_b.gin", 768, 12, 12, 129_528_588),
    ("dit_l.gin", 1024, 24, 16, 456_791_052), ("dit_tiny.gin", 64, 5, 4, None)])
def test_gin_backbone_presets(file, width, depth, heads, params_at_patch_2):
    register_configurables()
    text = (GIN_BACKBONES / file).read_text()
    gin.parse_config(text)
    cfg = DiTConfig()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.num_classes) == (width, depth, heads, 4.0, 0)
    assert "Stage.model = @DiTConfig()" in text  # a backbone file selects its backbone
    if params_at_patch_2 is None:  # the tiny preset fixes its size: 32 px, patch 4
        assert (cfg.img_size, cfg.patch_size) == (32, 4) and f"{cfg.num_params():,} parameters" in text
    else:  # the header states the counts at patch 2, 4 and 8
        assert f"{params_at_patch_2:,}" in text and cfg.num_params() == params_at_patch_2
        for p in (4, 8):
            assert f"{DiTConfig(embed_dim=width, depth=depth, num_heads=heads, patch_size=p).num_params():,}" in text


# ----------------------------------------------------------------------------------------------------------------
# Through the harness: stages, the dry run, the stage checks

@pytest.fixture
def dit_recipe(tiny_recipe: Path) -> Path:
    """The tests' tiny recipe on the tiny DiT, with shorter stages."""
    text = tiny_recipe.read_text().replace("backbones/uvit_tiny.gin", "backbones/dit_tiny.gin")
    tiny_recipe.write_text(text + "\npretrain/Stage.steps = 4\nfinetune/Stage.steps = 2\n")
    return tiny_recipe


def test_stages_with_the_dit_train_masked_then_unmasked(dit_recipe, tmp_path):
    text = load_recipe(dit_recipe, [])
    plan = plan_from_gin()
    pre, fine = plan.arms["two_stage"]
    assert type(plan.stages[pre].spec.model).__name__ == "DiTConfig"
    results = tmp_path / "results"
    for sid, steps, tokens in ((pre, 4, 16), (fine, 2, 64)):
        out = run_stage(text, sid, results)
        assert out["status"] == "done" and out["step"] == steps
        folder = plan.stage_dir(results, sid)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
        cost = json.loads((folder / "cost.json").read_text())
        assert cost["tokens_seen"] == steps * 8 * tokens and cost["flops_per_step"] > 0
        assert (folder / "samples" / f"step_{steps:07d}.png").is_file()
    # the masked stage's FLOPs per step are about its share of tokens (16 of 64) of the unmasked stage's
    flops = [json.loads((plan.stage_dir(results, s) / "cost.json").read_text())["flops_per_step"] for s in (pre, fine)]
    assert 0.15 < flops[0] / flops[1] < 0.3
    # training moved the zero-initialised adaLN maps and head (gradients reach them even from a zero output)
    from harness.checkpoint import load_checkpoint, newest_valid_checkpoint

    weights = load_checkpoint(newest_valid_checkpoint(plan.stage_dir(results, fine) / "checkpoints"))["model"]
    assert weights["final_layer.linear.weight"].any() and weights["blocks.0.adaLN_modulation.1.weight"].any()
    # MaskDM's checkpoint layout holds U-ViTs only: exporting a DiT stage is refused in one line
    assert cli_main(["convert", "export", str(plan.stage_dir(results, fine)), str(tmp_path / "out.pt")]) == 2
    assert not (tmp_path / "out.pt").exists()


def test_dry_run_shows_the_dit_and_its_parameters(dit_recipe, tmp_path, capsys):
    assert cli_main(["run", str(dit_recipe), "--dry-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "DiT 64w 5L 4h p4 32px, 0.4M" in out


@pytest.mark.parametrize("binding, message", [
    ("DiTConfig.num_classes = 2", "DiTConfig.num_classes = 2, but training takes no class labels"),
    ("DataConfig.resolution = 16", "DataConfig.resolution = 16 but DiTConfig.img_size = 32; make them equal"),
    ("Stage.model = @DataConfig()", "is not a UViTConfig or DiTConfig; bind it to one, e.g. Stage.model = "
                                    "@UViTConfig()"),
])
def test_stage_checks_name_the_backbone(dit_recipe, tmp_path, capsys, binding, message):
    code = cli_main(["run", str(dit_recipe), "--gin", binding, "--dry-run", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_dit_stages_never_share_ids_with_uvit_stages(dit_recipe):
    """A DiT stage is described with its spec's type, so it never shares an id with a U-ViT stage."""
    uvit_text = dit_recipe.read_text().replace("backbones/dit_tiny.gin", "backbones/uvit_tiny.gin")
    load_recipe(dit_recipe, [])
    dit_ids = set(plan_from_gin().stages)
    dit_recipe.write_text(uvit_text)
    load_recipe(dit_recipe, [])
    plan = plan_from_gin()
    assert not dit_ids & set(plan.stages)
    assert all(ps.summary()["model"]["type"] == "UViTConfig" for ps in plan.stages.values())
