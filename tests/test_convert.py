"""MaskDM checkpoints in and out: a reference-layout checkpoint built from the layout's description (random
weights), a forward pass written directly against its tensor names, bit-exact round trips, loud failures, and an
imported checkpoint as the start of a training stage."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from harness.checkpoint import load_checkpoint, newest_valid_checkpoint
from harness.cli import main as cli_main
from harness.config import load_recipe
from harness.convert import default_heads, export_maskdm, import_maskdm, read_maskdm
from harness.errors import HarnessError
from harness.experiment import plan_from_gin
from harness.models.config import UViTConfig
from harness.stage import run_stage


@dataclasses.dataclass
class RefSizes:
    width: int = 32
    patch: int = 4
    chans: int = 3
    grid: int = 4  # 16 px images
    in_blocks: int = 2
    mlp_ratio: int = 4
    qv_bias: bool = False
    classes: int = 0  # 0: unconditional (the reference's num_classes = -1)
    time_mlp: bool = False
    decoder_depth: int = 0  # > 0: the reference's ViT decoder instead of the linear head
    decoder_width: int = 16


def reference_net(s: RefSizes, seed: int) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as the reference MaskedUViT (linear head) stores them."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, std=0.2: torch.randn(*shape, generator=g) * std  # noqa: E731
    d, pd = s.width, s.patch * s.patch * s.chans
    extras = 2 if s.classes else 1
    net = {"encoder.patch_embed.proj.weight": rnd(d, s.chans, s.patch, s.patch),
           "encoder.patch_embed.proj.bias": rnd(d, std=0.1),
           "encoder.encoder_pos_embed": rnd(1, extras + s.grid**2, d)}
    if s.time_mlp:
        net.update({"encoder.time_embed.0.weight": rnd(4 * d, d), "encoder.time_embed.0.bias": rnd(4 * d, std=0.1),
                    "encoder.time_embed.2.weight": rnd(d, 4 * d, std=0.1), "encoder.time_embed.2.bias": rnd(d)})
    if s.classes:
        net.update({"encoder.label_emb.weight": rnd(s.classes, d), "encoder.uncond_embed": rnd(1, d)})
    blocks = [f"encoder.in_blocks.{i}" for i in range(s.in_blocks)] + ["encoder.mid_block"]
    blocks += [f"encoder.out_blocks.{i}" for i in range(s.in_blocks)]
    blocks += [f"decoder.blocks.{i}" for i in range(s.decoder_depth)]
    for b in blocks:
        p, w = f"{b}.", s.decoder_width if b.startswith("decoder.") else d
        if b.startswith("encoder.out"):
            net[p + "skip_linear.weight"], net[p + "skip_linear.bias"] = rnd(d, 2 * d, std=0.1), rnd(d, std=0.1)
        for ln in ("norm1", "norm2"):
            net[p + ln + ".weight"], net[p + ln + ".bias"] = 1 + rnd(w, std=0.1), rnd(w, std=0.1)
        net[p + "attn.qkv.weight"] = rnd(3 * w, w)
        if s.qv_bias:
            net[p + "attn.q_bias"], net[p + "attn.v_bias"] = rnd(w), rnd(w)
        net[p + "attn.proj.weight"], net[p + "attn.proj.bias"] = rnd(w, w), rnd(w, std=0.1)
        net[p + "mlp.fc1.weight"], net[p + "mlp.fc1.bias"] = rnd(w * s.mlp_ratio, w), rnd(w * s.mlp_ratio, std=0.1)
        net[p + "mlp.fc2.weight"], net[p + "mlp.fc2.bias"] = rnd(w, w * s.mlp_ratio, std=0.1), rnd(w, std=0.1)
    net["encoder.norm.weight"], net["encoder.norm.bias"] = 1 + rnd(d, std=0.1), rnd(d, std=0.1)
    if s.decoder_depth:
        dd = s.decoder_width
        net["encoder_to_decoder.weight"] = rnd(dd, d)
        net["decoder_pos_embed"] = rnd(1, extras + s.grid**2, dd)
        net["decoder.norm.weight"], net["decoder.norm.bias"] = 1 + rnd(dd, std=0.1), rnd(dd, std=0.1)
        net["decoder.head.weight"], net["decoder.head.bias"] = rnd(pd, dd), rnd(pd, std=0.1)
    else:
        net["encoder_to_output.weight"], net["encoder_to_output.bias"] = rnd(pd, d), rnd(pd, std=0.1)
    return net


def reference_schedule(T: int = 1000, s: float = 0.008) -> dict[str, torch.Tensor]:
    """The reference wrapper's buffers for its cosine schedule (its formulas: linspace, normalised by abar_0)."""
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    ac = torch.cos(((x / T) + s) / (1 + s) * math.pi * 0.5) ** 2
    ac = ac / ac[0]
    betas = torch.clip(1 - ac[1:] / ac[:-1], 0, 0.999)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, 0)
    prev = F.pad(abar[:-1], (1, 0), value=1.0)
    pv = betas * (1 - prev) / (1 - abar)
    out = {"alphas": alphas, "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": prev,
           "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
           "log_one_minus_alphas_cumprod": (1 - abar).log(), "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
           "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(), "posterior_variance": pv,
           "posterior_log_variance_clipped": pv.clamp(min=1e-20).log(),
           "posterior_mean_coef1": betas * prev.sqrt() / (1 - abar),
           "posterior_mean_coef2": (1 - prev) * alphas.sqrt() / (1 - abar),
           "loss_weight": (1 + abar / (1 - abar)) ** -0.0}
    return {k: v.float() for k, v in out.items()}


def reference_checkpoint(s: RefSizes, step: int = 1234) -> dict:
    """A MaskDM train_step.py checkpoint: step, model, opt, ema (ema-pytorch), scaler."""
    buffers = reference_schedule()
    raw = {**buffers, **{"model." + k: v for k, v in reference_net(s, seed=1).items()}}
    ema_model = {**buffers, **{"model." + k: v for k, v in reference_net(s, seed=2).items()}}
    ema = {"initted": torch.tensor([1.0]), "step": torch.tensor([step])}
    ema.update({"online_model." + k: v for k, v in raw.items()})
    ema.update({"ema_model." + k: v for k, v in ema_model.items()})
    opt = {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.zeros(3)}},
           "param_groups": [{"lr": 1e-4, "betas": (0.99, 0.99), "weight_decay": 0.03, "params": [0]}]}
    scaler = {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
              "_growth_tracker": 0}
    return {"step": step, "model": raw, "opt": opt, "ema": ema, "scaler": scaler}


def reference_forward(net, x, t, heads, y=None, mask=None, decoder_heads=2):
    """The reference network's forward pass, written from its tensors alone (mask: bool [B, N] over patches)."""
    d = net["encoder.encoder_pos_embed"].shape[-1]
    proj = net["encoder.patch_embed.proj.weight"]
    p, c = proj.shape[-1], proj.shape[1]
    h = F.conv2d(x, proj, net["encoder.patch_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    freqs = torch.exp(-math.log(10000) * torch.arange(d // 2, dtype=torch.float32) / (d // 2))
    temb = torch.cat([torch.cos(t.float()[:, None] * freqs), torch.sin(t.float()[:, None] * freqs)], dim=1)
    if "encoder.time_embed.0.weight" in net:
        temb = F.silu(F.linear(temb, net["encoder.time_embed.0.weight"], net["encoder.time_embed.0.bias"]))
        temb = F.linear(temb, net["encoder.time_embed.2.weight"], net["encoder.time_embed.2.bias"])
    tokens = torch.cat([temb[:, None], h], dim=1)
    extras = 1
    if "encoder.label_emb.weight" in net:
        label = net["encoder.uncond_embed"].expand(x.shape[0], -1) if y is None else net["encoder.label_emb.weight"][y]
        tokens, extras = torch.cat([label[:, None], tokens], dim=1), 2
    tokens = tokens + net["encoder.encoder_pos_embed"]
    full = None
    if mask is not None:  # the reference's mask covers every token; the extra tokens are never masked
        full = torch.cat([torch.zeros(x.shape[0], extras, dtype=torch.bool), mask], dim=1)
        tokens = tokens[~full].reshape(x.shape[0], -1, d)

    def block(name, z, heads, skip=None):
        w = lambda k: net[f"{name}.{k}"]  # noqa: E731
        width = z.shape[-1]
        if skip is not None:
            z = F.linear(torch.cat([z, skip], dim=-1), w("skip_linear.weight"), w("skip_linear.bias"))
        a = F.layer_norm(z, (width,), w("norm1.weight"), w("norm1.bias"))
        bias = None
        if f"{name}.attn.q_bias" in net:
            bias = torch.cat([w("attn.q_bias"), torch.zeros(width), w("attn.v_bias")])
        b, n, _ = a.shape
        qkv = F.linear(a, w("attn.qkv.weight"), bias).reshape(b, n, 3, heads, width // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        z = z + F.linear((attn @ v).transpose(1, 2).reshape(b, n, width), w("attn.proj.weight"), w("attn.proj.bias"))
        m = F.layer_norm(z, (width,), w("norm2.weight"), w("norm2.bias"))
        m = F.gelu(F.linear(m, w("mlp.fc1.weight"), w("mlp.fc1.bias")))
        m = F.linear(m, w("mlp.fc2.weight"), w("mlp.fc2.bias"))
        return z + m

    n_in = len({k.split(".")[2] for k in net if k.startswith("encoder.in_blocks.")})
    skips = []
    for i in range(n_in):
        tokens = block(f"encoder.in_blocks.{i}", tokens, heads)
        skips.append(tokens)
    tokens = block("encoder.mid_block", tokens, heads)
    for i in range(n_in):
        tokens = block(f"encoder.out_blocks.{i}", tokens, heads, skips.pop())
    tokens = F.layer_norm(tokens, (d,), net["encoder.norm.weight"], net["encoder.norm.bias"])
    if "encoder_to_decoder.weight" in net:  # all tokens (the extras too), plus the detached position embedding
        z = F.linear(tokens, net["encoder_to_decoder.weight"])
        pos = net["decoder_pos_embed"].expand(x.shape[0], -1, -1)
        z = z + (pos if full is None else pos[~full].reshape(x.shape[0], -1, z.shape[-1]))
        n_dec = len({k.split(".")[2] for k in net if k.startswith("decoder.blocks.")})
        for i in range(n_dec):
            z = block(f"decoder.blocks.{i}", z, decoder_heads)
        z = F.layer_norm(z, (z.shape[-1],), net["decoder.norm.weight"], net["decoder.norm.bias"])
        out = F.linear(z, net["decoder.head.weight"], net["decoder.head.bias"])[:, extras:]
    else:
        out = F.linear(tokens, net["encoder_to_output.weight"], net["encoder_to_output.bias"])[:, extras:]
    if mask is not None:
        return out
    g = math.isqrt(out.shape[1])  # 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'
    return out.reshape(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, g * p, g * p)


def _net(ckpt: dict, section: str) -> dict[str, torch.Tensor]:
    prefix = "model." if section == "model" else "ema_model.model."
    return {k[len(prefix):]: v for k, v in ckpt[section].items() if k.startswith(prefix)}


VARIANTS = [RefSizes(), RefSizes(qv_bias=True, classes=5, time_mlp=True, in_blocks=1, grid=3, chans=1, patch=2),
            RefSizes(decoder_depth=2), RefSizes(decoder_depth=1, qv_bias=True, classes=5)]
IDS = ["plain", "qv_bias+classes+time_mlp", "vit_decoder", "vit_decoder+qv_bias+classes"]


@pytest.mark.parametrize("sizes", VARIANTS, ids=IDS)
@pytest.mark.parametrize("weights", ["raw", "ema"])
def test_imported_model_computes_the_reference_forward(sizes, weights):
    ckpt = reference_checkpoint(sizes)
    cfg, state = import_maskdm(ckpt, weights=weights, num_heads=4, decoder_heads=2)
    assert (cfg.decoder_depth, cfg.decoder_embed_dim if cfg.decoder_depth else 16) == (sizes.decoder_depth, 16)
    assert (cfg.embed_dim, cfg.patch_size, cfg.in_chans, cfg.img_size) == (32, sizes.patch, sizes.chans,
                                                                          sizes.grid * sizes.patch)
    assert (cfg.depth, cfg.qkv_bias, cfg.num_classes, cfg.time_mlp) == (2 * sizes.in_blocks + 1, sizes.qv_bias,
                                                                        sizes.classes, sizes.time_mlp)
    model = cfg.build().eval()
    model.load_state_dict(state, strict=True)
    net = _net(ckpt, "model" if weights == "raw" else "ema")

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, sizes.chans, cfg.img_size, cfg.img_size, generator=g)
    t = torch.tensor([0, 417, 999])
    y = torch.tensor([0, 4, 2]) if sizes.classes else None
    with torch.no_grad():
        ours, theirs = model(x, t, y=y), reference_forward(net, x, t, heads=4, y=y)
        assert ours.shape == x.shape
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        if sizes.classes:  # the unconditional token
            torch.testing.assert_close(model(x, t), reference_forward(net, x, t, heads=4), rtol=1e-5, atol=1e-5)
        mask = torch.zeros(3, cfg.num_patches, dtype=torch.bool)
        for row in range(3):
            mask[row, torch.randperm(cfg.num_patches, generator=g)[: cfg.num_patches // 2]] = True
        masked = model(x, t, y=y, mask=mask)
        assert masked.shape == (3, cfg.num_patches - cfg.num_patches // 2, sizes.patch**2 * sizes.chans)
        torch.testing.assert_close(masked, reference_forward(net, x, t, 4, y=y, mask=mask), rtol=1e-5, atol=1e-5)
        # a wrong head count gives another function: the number of heads really matters
        assert not torch.allclose(theirs, reference_forward(net, x, t, heads=2, y=y), atol=1e-3)
        if sizes.decoder_depth:  # and so does the decoder's
            assert not torch.allclose(theirs, reference_forward(net, x, t, 4, y=y, decoder_heads=1), atol=1e-3)


@pytest.mark.parametrize("sizes", VARIANTS, ids=IDS)
def test_import_then_export_is_bit_exact(sizes, tmp_path):
    original = reference_checkpoint(sizes)
    found = read_maskdm(original, num_heads=4, decoder_heads=2)
    assert (found.step, found.schedule, found.timesteps) == (1234, "cosine", 1000)
    exported = export_maskdm({"model": found.raw, "ema": found.ema, "step": found.step}, found.config)
    torch.save(exported, tmp_path / "out.pt")
    exported = torch.load(tmp_path / "out.pt", weights_only=True)  # the file is safe to load

    assert exported["step"] == 1234 and exported["scaler"] is None and "opt" not in exported
    for section in ("model", "ema"):
        assert set(exported[section]) == set(original[section])
        for key, tensor in original[section].items():
            # network tensors are copied; the schedule buffers are recomputed from the harness's cosine
            # schedule, and still come out bit-identical to the reference's formulas in float32
            got = exported[section][key]
            assert got.dtype == tensor.dtype and got.shape == tensor.shape and torch.equal(got, tensor), key


def test_exported_model_keeps_its_outputs_even_with_a_key_bias(caplog):
    """A model trained here with qkv_bias has a key bias the reference lacks: dropping it changes nothing."""
    torch.manual_seed(0)
    cfg = UViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=4, qkv_bias=True)
    model = cfg.build().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-zero biases everywhere, the key bias included
    with caplog.at_level(logging.WARNING, logger="harness.convert"):
        exported = export_maskdm(model.state_dict(), cfg)
    assert "key bias" in caplog.text
    cfg2, state = import_maskdm(exported, weights="ema", num_heads=4)
    assert cfg2 == cfg
    back = cfg.build().eval()
    back.load_state_dict(state)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    with torch.no_grad():
        torch.testing.assert_close(back(x, t), model(x, t), rtol=1e-5, atol=1e-5)
        # ... and the reference network computes what ours did
        torch.testing.assert_close(reference_forward(_net(exported, "ema"), x, t, 4), model(x, t), rtol=1e-5, atol=1e-5)
    assert not torch.equal(state["mid_block.attn.qkv.bias"], model.state_dict()["mid_block.attn.qkv.bias"])


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"].update({"model.encoder.extra_token": torch.zeros(3)}), "encoder.extra_token"),
    (lambda c: c["model"].pop("model.encoder.norm.weight"), "missing"),
    (lambda c: c["model"].update({"model.encoder.pos_embed": torch.zeros(1, 17, 32)}), "encoder.pos_embed"),
    (lambda c: c["model"].update({"model.encoder.mid_block.attn.q_bias": torch.zeros(32)}), "q_bias"),
    (lambda c: c["model"].update({"model.decoder.blocks.0.norm1.weight": torch.ones(8)}),
     "unmapped.*decoder.blocks.0.norm1.weight"),  # decoder blocks without the rest of a decoder
    (lambda c: c["model"].update({"model.final_layer.weight": torch.ones(3, 3, 3, 3)}), "final 3x3 conv"),
    (lambda c: c["ema"].update({"ema_model.something_new": torch.ones(1)}), "something_new"),
    (lambda c: c["ema"].update({"online_model.model.encoder.typo": torch.ones(1)}), "online_model.model.encoder.typo"),
    (lambda c: c.update({"extra": 1}), "extra"),
    (lambda c: c["model"].update({"model.encoder.norm.bias": torch.zeros(31)}), "wrong shape"),
])
def test_anything_unmapped_or_missing_fails_loudly(edit, message):
    ckpt = reference_checkpoint(RefSizes())
    edit(ckpt)
    with pytest.raises(HarnessError, match=message):
        read_maskdm(ckpt, num_heads=4)


def test_heads_default_to_64_channels_and_otherwise_must_be_given():
    assert (default_heads(768), default_heads(512)) == (12, 8)  # MaskDM's CelebA-HQ and transfer models
    with pytest.raises(HarnessError, match="--heads"):
        read_maskdm(reference_checkpoint(RefSizes()))  # 32 wide: no 64-channel heads


def test_cli_import_writes_a_safe_harness_checkpoint_and_prints_bindings(tmp_path, capsys):
    src, dst = tmp_path / "model-20.pt", tmp_path / "imported.pt"
    ckpt = reference_checkpoint(RefSizes())
    torch.save(ckpt, src)
    assert cli_main(["convert", "import", str(src), str(dst), "--heads", "4"]) == 0
    out = capsys.readouterr().out
    expected = UViTConfig(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=5, num_heads=4)
    for field in dataclasses.fields(UViTConfig):
        line = f"UViTConfig.{field.name} = {getattr(expected, field.name)!r}"
        assert (line not in out) if field.metadata.get("added_later") else (line in out)  # no decoder: not named
    assert "DiffusionConfig.schedule = 'cosine'" in out and f"Stage.init_checkpoint = '{dst}'" in out

    loaded = load_checkpoint(dst)  # weights_only
    assert loaded["config"] == dataclasses.asdict(expected) and loaded["maskdm"]["step"] == 1234
    assert torch.equal(loaded["model"]["decoder_pred.weight"], ckpt["model"]["model.encoder_to_output.weight"])
    assert torch.equal(loaded["ema"]["pos_embed"], ckpt["ema"]["ema_model.model.encoder.encoder_pos_embed"])

    assert cli_main(["convert", "import", str(src), str(dst), "--heads", "4", "--weights", "ema"]) == 0
    loaded = load_checkpoint(dst)
    assert torch.equal(loaded["model"]["pos_embed"], ckpt["ema"]["ema_model.model.encoder.encoder_pos_embed"])


def test_cli_refuses_pickled_objects_and_says_how_to_strip_them(tmp_path, capsys):
    src = tmp_path / "unsafe.pt"
    ckpt = reference_checkpoint(RefSizes())
    ckpt["args"] = argparse.Namespace(lr=1e-4)  # what a careless training script might pickle beside the tensors
    torch.save(ckpt, src)
    assert cli_main(["convert", "import", str(src), str(tmp_path / "x.pt"), "--heads", "4"]) == 2
    err = capsys.readouterr().err
    assert "refusing to unpickle" in err and "weights_only=False" in err
    assert not (tmp_path / "x.pt").exists()


FINETUNE = textwrap.dedent("""
    include 'backbones/uvit_tiny.gin'
    include 'schedules/cosine.gin'
    DataConfig.source = 'shapes'
    DataConfig.num_images = 64
    Stage.batch_size = 4
    Stage.log_every = 1
    Stage.checkpoint_every = 2
    Stage.num_sample_images = 1
    Stage.sample_steps = 2
    Stage.lr = 1e-5
    Stage.warmup_steps = 0
    finetune/Stage.steps = 2
    finetune/Stage.init_checkpoint = %MASKDM_CHECKPOINT
    finetune/Stage.init_from = %INIT_FROM
    Experiment.name = 'from_maskdm'
    Experiment.arms = {'maskdm': [@finetune/Stage()]}
""")


@pytest.mark.parametrize("init_from", ["raw", "ema"])
def test_imported_checkpoint_starts_a_training_stage(init_from, tmp_path, capsys):
    # the tiny backbone: 32 px, patch 4, 64 wide, 5 blocks, 4 heads
    sizes = RefSizes(width=64, grid=8, in_blocks=2)
    src, dst = tmp_path / "model-1.pt", tmp_path / "imported.pt"
    torch.save(reference_checkpoint(sizes), src)
    assert cli_main(["convert", "import", str(src), str(dst)]) == 0  # 64 wide -> 1 head by default
    bindings = [line.strip() for line in capsys.readouterr().out.splitlines() if "UViTConfig.num_heads" in line]
    assert bindings == ["UViTConfig.num_heads = 1"]

    recipe = tmp_path / "ft.gin"
    recipe.write_text(FINETUNE + f"MASKDM_CHECKPOINT = '{dst}'\nINIT_FROM = '{init_from}'\nUViTConfig.num_heads = 1\n")
    text = load_recipe(recipe, [])
    plan = plan_from_gin()
    (sid,) = plan.stages
    assert run_stage(text, sid, tmp_path / "results")["step"] == 2
    trained = load_checkpoint(newest_valid_checkpoint(plan.stage_dir(tmp_path / "results", sid) / "checkpoints"))
    imported = load_checkpoint(dst)
    start, other = (imported["model"], imported["ema"]) if init_from == "raw" else (imported["ema"], imported["model"])
    moved = max((trained["model"][k] - start[k]).abs().max().item() for k in start)
    # two AdamW steps at lr 1e-5 move each weight by at most ~2e-5: the stage started from the imported weights
    assert 0 < moved < 3e-5
    assert max((trained["model"][k] - other[k]).abs().max().item() for k in other) > 0.1

    # and back out: the stage folder exports to the reference layout, which imports to the trained weights
    exported = tmp_path / "exported.pt"
    assert cli_main(["convert", "export", str(plan.stage_dir(tmp_path / "results", sid)), str(exported)]) == 0
    out = capsys.readouterr().out
    assert "encoder_embed_dim: 64" in out and "encoder_heads: 1" in out and "step 2" in out
    back = read_maskdm(exported, num_heads=1)
    assert back.step == 2 and back.schedule == "cosine"
    for mine, theirs in ((trained["model"], back.raw), (trained["ema"], back.ema)):
        assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_missing_imported_checkpoint_fails_when_the_stage_runs(tmp_path):
    recipe = tmp_path / "ft.gin"
    recipe.write_text(FINETUNE + f"MASKDM_CHECKPOINT = '{tmp_path / 'nowhere.pt'}'\nINIT_FROM = 'raw'\n")
    text = load_recipe(recipe, [])
    (sid,) = plan_from_gin().stages
    with pytest.raises(HarnessError, match="nowhere.pt"):
        run_stage(text, sid, tmp_path / "results")
    assert not list((tmp_path / "results").rglob("*"))  # stopped before writing anything


def test_finetune_recipe_plans_without_the_checkpoint_and_uses_maskdm_settings(tmp_path, capsys):
    from harness.config import RECIPES_DIR

    recipe = RECIPES_DIR / "finetune_from_maskdm.gin"
    assert cli_main(["run", str(recipe), "--dry-run", "--results-dir", str(tmp_path)]) == 0
    assert "pending" in capsys.readouterr().out
    load_recipe(recipe, [f"MASKDM_CHECKPOINT = '{tmp_path / 'converted.pt'}'"])
    stages = {ps.name: ps.spec for ps in plan_from_gin().stages.values()}
    assert stages["finetune"].init_checkpoint == str(tmp_path / "converted.pt")
    assert stages["scratch"].init_checkpoint is None
    for spec in stages.values():
        assert (spec.batch_size, spec.lr, spec.warmup_steps, spec.grad_clip, spec.betas, spec.weight_decay) == (
            32, 1e-5, 5000, 1.0, (0.99, 0.99), 0.03)
        assert spec.mask.name == "none" and spec.init_from == "raw"
        assert (spec.model.embed_dim, spec.model.depth, spec.model.num_heads, spec.model.img_size) == (768, 13, 12, 256)


def test_schedules_are_recognised_and_export_refuses_what_the_reference_cannot_sample():
    from harness.convert import recognise_schedule, schedule_buffers
    from harness.diffusion import DiffusionConfig, cosine_betas, linear_betas

    assert recognise_schedule(reference_schedule()["betas"]) == "cosine"
    assert recognise_schedule(linear_betas(1000).float()) == "linear"
    assert recognise_schedule(cosine_betas(1000).float() * 1.01) is None  # e.g. the reference's shifted cosine
    linear = schedule_buffers(DiffusionConfig(schedule="linear"))
    torch.testing.assert_close(linear["alphas_cumprod"], torch.cumprod(1 - linear_betas(1000), 0).float())
    for bad in (DiffusionConfig(timesteps=500), DiffusionConfig(prediction="v")):
        with pytest.raises(HarnessError, match="1000 time steps and eps"):
            schedule_buffers(bad)
