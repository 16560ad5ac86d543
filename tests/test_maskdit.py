"""MaskDiT-style masked training: the DiT's decoder (mask tokens at the masked positions, predictions for every
patch), the two loss terms on the right patches (denoising on the visible ones, the weighted reconstruction of the
normalised noisy input on the masked ones), the stage checks, and a masked stage followed by an unmasked tuning
stage that loads its weights strictly."""
from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)
import json
import math
from pathlib import Path

import pytest
import torch

import gin
from harness.cli import main as cli_main
from harness.config import load_recipe, register_configurables
from harness.diffusion import DiffusionConfig
from harness.errors import HarnessError
from harness.experiment import _plain, plan_from_gin
from harness.masks import PatchMask
from harness.models.config import UViTConfig
from harness.models.dit_config import DiTConfig
from harness.patches import patchify, unpatchify, visible_indices
from harness.stage import run_stage

GIN_METHODS = Path(__file__).resolve().parent.parent / "gin" / "methods"
TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=4, decoder_depth=2)


def tiny(**overrides):
    """A tiny MaskDiT with every weight random (at its own initialisation the zero maps would hide everything)."""
    torch.manual_seed(0)
    model = DiTConfig(**{**TINY, **overrides}).build()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3 if p.ndim == 1 else 1 / math.sqrt(p.shape[-1]))
    return model


def images(batch=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def half_mask(batch=2, seed=0):
    return PatchMask(0.5).sample(batch, 4, generator=torch.Generator().manual_seed(seed))  # 8 of 16 masked


def on_patches(mask):
    """A pixel mask [B, 3, 16, 16]: True on the patches where `mask` [B, 16] is True."""
    return unpatchify(mask[:, :, None].expand(-1, -1, 48).float(), 4, 3).bool()


# ----------------------------------------------------------------------------------------------------------------
# The model

def test_shapes_and_every_patch_predicted_under_a_mask():
    model = tiny()
    x, t, mask = images(), torch.tensor([5, 900]), half_mask()
    assert model.predicts_all_patches and DiTConfig(**TINY).predicts_all_patches
    assert not DiTConfig(**{**TINY, "decoder_depth": 0}).build().predicts_all_patches
    assert model(x, t).shape == (2, 3, 16, 16)
    out = model(x, t, mask=mask)
    assert out.shape == (2, 16, 48)  # all 16 patches in patch order, not the 8 visible ones
    assert torch.equal(model(x, t, mask=visible_indices(mask)), out)
    # every patch visible is the unmasked forward (the decoder runs over the full sequence either way)
    full = patchify(model(x, t), 4)
    assert torch.allclose(model(x, t, mask=torch.arange(16).expand(2, -1)), full, atol=1e-5)
    # the encoder never sees the masked patches' pixels
    changed = torch.where(on_patches(mask), 10 * torch.randn_like(x), x)
    assert torch.allclose(model(changed, t, mask=mask), out, atol=1e-5)
    # a decoder of its own width and heads; the encoder's blocks see the visible patches only
    wide = tiny(decoder_embed_dim=48, decoder_heads=3)
    seen = []
    wide.blocks[0].register_forward_hook(lambda mod, inp, o: seen.append(inp[0].shape[1]))
    wide.decoder_blocks[0].register_forward_hook(lambda mod, inp, o: seen.append(inp[0].shape))
    assert wide(x, t, mask=mask).shape == (2, 16, 48) and seen == [8, (2, 16, 48)]
    assert wide.tokens_entering_blocks(mask) == 8


def test_the_decoder_sees_mask_tokens_at_the_masked_positions():
    model = tiny()
    x, t, mask = images(), torch.tensor([5, 900]), half_mask()
    inputs, encoded = [], []
    model.decoder_blocks[0].register_forward_pre_hook(lambda mod, args: inputs.append(args[0].detach()))
    model.blocks[-1].register_forward_hook(lambda mod, args, out: encoded.append(out.detach()))
    model(x, t, mask=mask)
    seq, pos = inputs[0], model.decoder_pos_embed  # [2, 16, 32], [16, 32]
    cond = model.t_embedder(t)
    mapped = model.decoder_layer(encoded[0], cond)  # the visible tokens in the decoder's width, ascending order
    for i in range(2):
        masked, visible = mask[i].nonzero()[:, 0], visible_indices(mask)[i]
        assert torch.allclose(seq[i, masked], model.mask_token[0].expand(8, -1) + pos[masked], atol=1e-6)
        assert torch.allclose(seq[i, visible], mapped[i] + pos[visible], atol=1e-5)
    # without a mask there are no mask tokens: every position holds its own patch
    inputs.clear()
    model(x, t)
    assert not any(torch.allclose(inputs[0][0, k], model.mask_token[0, 0] + pos[k], atol=1e-3) for k in range(16))


def test_reference_layout_initialisation_and_parameter_count():
    """Names as MaskDiT's models/maskdit.py (decoder_layer, mask_token, decoder_blocks, final_layer), its zero
    maps, and the count: the reference's DiT-S/2 with its decoder (8 x 512 wide, 16 heads) on 32x32x4 latents,
    unconditional, counts 67,962,256 parameters with its two frozen sin-cos embeddings (256 x 384 + 256 x 512),
    which are buffers here."""
    torch.manual_seed(0)
    model = DiTConfig(**TINY).build()
    names = dict(model.named_parameters())
    for name in ("mask_token", "decoder_layer.linear.weight", "decoder_layer.adaLN_modulation.1.weight",
                 "decoder_blocks.1.attn.qkv.weight", "decoder_blocks.0.adaLN_modulation.1.bias",
                 "final_layer.linear.weight"):
        assert name in names, name
    assert "decoder_pos_embed" not in model.state_dict() and "mask_token" in model.no_weight_decay()
    assert not model(images(), torch.tensor([1, 2]), mask=half_mask()).any()  # zero head: the output starts at 0
    assert not model.decoder_layer.linear.weight.any() and 0 < model.mask_token.std() < 0.05
    for overrides in ({}, {"decoder_embed_dim": 48, "decoder_heads": 6}, {"decoder_depth": 1, "mlp_ratio": 2.5}):
        cfg = DiTConfig(**{**TINY, **overrides})
        assert cfg.num_params() == sum(p.numel() for p in cfg.build().parameters())
    s2 = DiTConfig(img_size=32, patch_size=2, in_chans=4, embed_dim=384, depth=12, num_heads=6, decoder_depth=8,
                   decoder_embed_dim=512, decoder_heads=16)
    assert s2.num_params() + 256 * 384 + 256 * 512 == 67_962_256
    # every weight learns from the two loss terms
    model = tiny()
    terms = DiffusionConfig(mae_weight=0.1).build().loss_terms_at(
        model, images(), torch.tensor([100, 700]), torch.randn(2, 3, 16, 16), mask=half_mask())
    terms["loss"].backward()
    assert all(p.grad is not None and p.grad.any() for p in model.parameters())
    # unmasked, the mask token takes no part but still gets a (zero) gradient: DDP needs one for every parameter
    model.zero_grad()
    model(images(), torch.tensor([1, 2])).square().mean().backward()
    assert model.mask_token.grad is not None and not model.mask_token.grad.any()


@pytest.mark.parametrize("overrides, words", [({"decoder_depth": -1}, "decoder_depth"),
                                              ({"decoder_embed_dim": 30, "decoder_heads": 3}, "multiple of 4"),
                                              ({"decoder_embed_dim": 48, "decoder_heads": 5}, "decoder_heads"),
                                              ({"decoder_depth": 0, "decoder_heads": 4}, "does not have")])
def test_bad_decoder_config(overrides, words):
    with pytest.raises(HarnessError, match=words):
        DiTConfig(**{**TINY, **overrides})


# ----------------------------------------------------------------------------------------------------------------
# The loss

class FixedPrediction(torch.nn.Module):
    """Predicts a fixed tensor for every patch, whatever its input: a stand-in with MaskDiT's output format."""

    def __init__(self, batch=2):
        super().__init__()
        self.rows = torch.nn.Parameter(torch.randn(batch, 16, 48, generator=torch.Generator().manual_seed(5)))

    def forward(self, x, t, y=None, mask=None):
        return self.rows if mask is not None else unpatchify(self.rows, 4, 3)


def loss_inputs():
    torch.manual_seed(2)
    return torch.rand(2, 3, 16, 16) * 2 - 1, torch.randn(2, 3, 16, 16), torch.tensor([100, 700])


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
def test_each_term_moves_only_with_its_own_patches(prediction):
    d = DiffusionConfig(prediction=prediction, mae_weight=0.1).build()
    x0, noise, t = loss_inputs()
    mask = half_mask()
    pixels = on_patches(mask)
    for model in (FixedPrediction(), tiny()):
        base = d.loss_terms_at(model, x0, t, noise, mask=mask)
        assert set(base) == {"loss", "loss_denoise", "loss_mae"}
        # data and noise changed on the masked patches: the denoising term stays, the reconstruction term moves
        on_masked = d.loss_terms_at(model, torch.where(pixels, -x0, x0), t, torch.where(pixels, 3 * noise, noise),
                                    mask=mask)
        assert on_masked["loss_denoise"].item() == pytest.approx(base["loss_denoise"].item(), rel=1e-5)
        assert abs(on_masked["loss_mae"].item() - base["loss_mae"].item()) > 1e-3
        if isinstance(model, FixedPrediction):  # (the DiT's output depends on the visible pixels everywhere)
            on_visible = d.loss_terms_at(model, torch.where(pixels, x0, -x0), t,
                                         torch.where(pixels, noise, 3 * noise), mask=mask)
            assert on_visible["loss_mae"].item() == pytest.approx(base["loss_mae"].item(), rel=1e-6)
            assert abs(on_visible["loss_denoise"].item() - base["loss_denoise"].item()) > 1e-3


def test_the_terms_values_and_where_their_gradients_go():
    x0, noise, t = loss_inputs()
    mask = half_mask()
    d = DiffusionConfig(schedule="linear", mae_weight=0.25).build()
    model = FixedPrediction()
    terms = d.loss_terms_at(model, x0, t, noise, mask=mask)
    assert d.loss_at(model, x0, t, noise, mask=mask).item() == terms["loss"].item()
    assert terms["loss"].item() == pytest.approx((terms["loss_denoise"] + 0.25 * terms["loss_mae"]).item())
    # written out per image, independently of the vectorised code
    pred, target, noisy = model.rows.detach(), patchify(noise, 4), patchify(d.q_sample(x0, t, noise), 4)
    denoise, rebuild = [], []
    for i in range(2):
        keep, hide = ~mask[i], mask[i]
        denoise.append(((pred[i][keep] - target[i][keep]) ** 2).mean())
        patches = noisy[i][hide]
        normalised = (patches - patches.mean(1, keepdim=True)) / (patches.var(1, keepdim=True) + 1e-6).sqrt()
        rebuild.append(((pred[i][hide] - normalised) ** 2).mean())
    assert terms["loss_denoise"].item() == pytest.approx(torch.stack(denoise).mean().item(), rel=1e-6)
    assert terms["loss_mae"].item() == pytest.approx(torch.stack(rebuild).mean().item(), rel=1e-6)
    # the denoising term's gradient reaches the visible rows only, the reconstruction term's the masked rows only
    for key, rows in (("loss_denoise", ~mask), ("loss_mae", mask)):
        (grad,) = torch.autograd.grad(d.loss_terms_at(model, x0, t, noise, mask=mask)[key], model.rows)
        assert grad[rows].abs().sum(-1).gt(0).all() and not grad[~rows].any()
    # weight 0: the denoising loss alone, and no reconstruction computed
    plain = DiffusionConfig(schedule="linear").build().loss_terms_at(model, x0, t, noise, mask=mask)
    assert set(plain) == {"loss", "loss_denoise"} and plain["loss"].item() == terms["loss_denoise"].item()
    # unmasked: the denoising loss over every patch, no reconstruction term
    unmasked = d.loss_terms_at(model, x0, t, noise)
    assert "loss_mae" not in unmasked
    assert unmasked["loss"].item() == pytest.approx(((unpatchify(pred, 4, 3) - noise) ** 2).mean().item(), rel=1e-6)
    # nothing masked (a ratio schedule at 0): the reconstruction term is 0, not a mean over no patches
    nothing = d.loss_terms_at(model, x0, t, noise, mask=torch.zeros(2, 16, dtype=torch.bool))
    assert nothing["loss_mae"].item() == 0
    assert nothing["loss"].item() == pytest.approx(unmasked["loss"].item(), rel=1e-6)


def test_a_weight_needs_a_model_that_predicts_masked_patches():
    x0, noise, t = loss_inputs()
    torch.manual_seed(0)
    for model in (DiTConfig(**{**TINY, "decoder_depth": 0}).build(),
                  UViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4).build()):
        with pytest.raises(HarnessError, match="predicts the visible ones only"):
            DiffusionConfig(mae_weight=0.1).build().loss_at(model, x0, t, noise, mask=half_mask())
    assert DiffusionConfig(mae_weight=1).mae_weight == 1.0 and isinstance(DiffusionConfig(mae_weight=1).mae_weight,
                                                                         float)
    for bad in (-0.1, "0.1", float("nan"), True):
        with pytest.raises(HarnessError, match="mae_weight"):
            DiffusionConfig(mae_weight=bad)
    # the fields added for MaskDiT stay out of descriptions at their defaults: existing stage ids do not move
    assert "mae_weight" not in _plain(DiffusionConfig()) and "mae_weight" in _plain(DiffusionConfig(mae_weight=0.1))
    assert not any(k.startswith("decoder") for k in _plain(DiTConfig()))


# ----------------------------------------------------------------------------------------------------------------
# Through the harness

def test_gin_method_files():
    register_configurables()
    gin.add_config_file_search_path(str(GIN_METHODS.parent))  # (their includes name files under gin/)
    gin.parse_config_file(str(GIN_METHODS / "maskdit.gin"))
    cfg = DiTConfig()
    assert (cfg.decoder_depth, cfg.decoder_embed_dim, cfg.decoder_heads) == (8, 512, 16)
    assert PatchMask() == PatchMask(0.5)
    with gin.config_scope("pretrain"):
        assert DiffusionConfig().mae_weight == 0.1
    assert DiffusionConfig().mae_weight == 0.0
    gin.clear_config()
    gin.parse_config_file(str(GIN_METHODS / "maskdit_tiny.gin"))
    cfg = DiTConfig()
    assert (cfg.embed_dim, cfg.depth, cfg.decoder_depth, cfg.decoder_dim, cfg.decoder_num_heads) == (64, 5, 2, 64, 4)
    assert f"{cfg.num_params():,} parameters" in (GIN_METHODS / "maskdit_tiny.gin").read_text()


@pytest.fixture
def maskdit_recipe(tiny_recipe: Path) -> Path:
    """The tests' tiny recipe with MaskDiT on the tiny DiT: 4 masked steps, then 2 unmasked ones."""
    text = tiny_recipe.read_text().replace("include 'backbones/uvit_tiny.gin'\n", "")
    tiny_recipe.write_text(text + "include 'methods/maskdit_tiny.gin'\npretrain/Stage.mask = %MASK\n"
                                  "pretrain/Stage.steps = 4\nfinetune/Stage.steps = 2\n")
    return tiny_recipe


def test_a_maskdit_stage_trains_then_unmasked_tuning_loads_its_weights(maskdit_recipe, tmp_path):
    from harness.checkpoint import load_checkpoint, newest_valid_checkpoint

    text = load_recipe(maskdit_recipe, [])
    plan = plan_from_gin()
    pre, fine = plan.arms["two_stage"]
    pre_spec, fine_spec = plan.stages[pre].spec, plan.stages[fine].spec
    assert pre_spec.model == fine_spec.model and pre_spec.model.decoder_depth == 2
    assert (pre_spec.mask.name, pre_spec.mask.actual_ratio(8)) == ("patch", 0.5)
    assert pre_spec.diffusion.mae_weight == 0.1 and fine_spec.diffusion.mae_weight == 0.0
    results = tmp_path / "results"
    for sid, steps in ((pre, 4), (fine, 2)):
        out = run_stage(text, sid, results)
        assert out["status"] == "done" and out["step"] == steps
        rows = [json.loads(line) for line in (plan.stage_dir(results, sid) / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
        if sid == pre:  # the masked stage's rows carry both terms, and the loss is their weighted sum
            for r in rows:
                assert r["loss_mae"] > 0 and r["loss"] == pytest.approx(r["loss_denoise"] + 0.1 * r["loss_mae"])
        else:
            assert not any("loss_mae" in r for r in rows)
    cost = [json.loads((plan.stage_dir(results, s) / "cost.json").read_text()) for s in (pre, fine)]
    assert cost[0]["tokens_seen"] == 4 * 8 * 32 and cost[1]["tokens_seen"] == 2 * 8 * 64  # encoder tokens
    assert cost[0]["flops_per_step"] < cost[1]["flops_per_step"]  # the encoder runs on half the patches
    weights = [load_checkpoint(newest_valid_checkpoint(plan.stage_dir(results, s) / "checkpoints"))["model"]
               for s in (pre, fine)]
    assert weights[0].keys() == weights[1].keys()  # one architecture: tuning loaded pretraining's weights strictly
    torch.manual_seed(pre_spec.seed)
    initial = pre_spec.model.build().state_dict()
    # the mask token learned while masked, and stayed as pretraining left it while unmasked (zero gradient, no
    # decay): tuning started from pretraining's weights
    assert not torch.equal(weights[0]["mask_token"], initial["mask_token"])
    assert torch.equal(weights[1]["mask_token"], weights[0]["mask_token"])
    assert not torch.equal(weights[1]["final_layer.linear.weight"], weights[0]["final_layer.linear.weight"])


@pytest.mark.parametrize("binding, message", [
    ("finetune/DiffusionConfig.mae_weight = 0.1", "stage 'finetune': DiffusionConfig.mae_weight = 0.1 scores masked "
                                                  "patches, but the stage has no mask"),
    ("DiTConfig.decoder_depth = 0", "stage 'pretrain': DiffusionConfig.mae_weight = 0.1 scores the model's "
                                    "predictions of the masked patches, but DiTConfig predicts the visible ones only"),
])
def test_stage_checks(maskdit_recipe, tmp_path, capsys, binding, message):
    code = cli_main(["run", str(maskdit_recipe), "--gin", binding, "--dry-run", "--results-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
