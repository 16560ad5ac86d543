"""MaskDM reference checkpoints (github.com/jiachenlei/maskdm) in and out of the harness's MaskedUViT.

The reference layout (a `model-N.pt` written by its train_step.py) is one torch dict:

    step    int
    model   the diffusion wrapper's state dict: 14 noise-schedule buffers (betas, alphas_cumprod, ...,
            loss_weight; see SCHEDULE_BUFFERS) and the network's tensors under `model.`
    opt     AdamW's state dict                        (ignored on import; left out on export)
    ema     the ema-pytorch `EMA` module's state dict: `initted`, `step`, and the wrapper twice: under
            `online_model.` (the training model, the same tensors as `model`) and `ema_model.` (the average)
    scaler  the AMP GradScaler's state dict or None   (ignored on import; None on export)

Network tensors, reference (under `model.` or `ema_model.model.`) -> harness MaskedUViT:

| reference                                                | harness                                           |
|----------------------------------------------------------|---------------------------------------------------|
| encoder.patch_embed.proj.{weight,bias}                   | patch_embed.proj.{weight,bias}                    |
| encoder.encoder_pos_embed [1, extras + N, D]             | pos_embed (same token order: class, time, patches)|
| encoder.time_embed.{0,2}.{weight,bias} (mlp_time_embed)  | time_embed.{0,2}.{weight,bias} (time_mlp=True)    |
| encoder.label_emb.weight, encoder.uncond_embed           | label_emb.weight, uncond_embed (num_classes > 0)  |
| encoder.B.{norm1,norm2,attn.proj,mlp.fc1,mlp.fc2}.*      | B.{norm1,norm2,attn.proj,mlp.fc1,mlp.fc2}.*       |
| encoder.B.attn.qkv.weight                                | B.attn.qkv.weight                                 |
| encoder.B.attn.q_bias, encoder.B.attn.v_bias (qkv_bias)  | B.attn.qkv.bias = cat(q_bias, zeros, v_bias)      |
| encoder.out_blocks.i.skip_linear.{weight,bias}           | out_blocks.i.skip_linear.{weight,bias}            |
| encoder.norm.{weight,bias}                               | norm.{weight,bias}                                |
| encoder_to_output.{weight,bias} (decoder_depth = 0)      | decoder_pred.{weight,bias}                        |
| encoder_to_decoder.weight, decoder_pos_embed,            | the same names (decoder_depth > 0; the position   |
| decoder.blocks.i.*, decoder.norm.*, decoder.head.*       | embedding is a buffer: the reference detaches it) |

where B is in_blocks.i, mid_block or out_blocks.i (and decoder.blocks.i for the q/v biases). Both models compute
[class, time, patches] + pos_embed, pre-LN blocks with long skips, a final LayerNorm, then a linear head per
patch or the ViT decoder, unpatchified as (p1, p2, C).

What does not carry over, and how it is handled:
- The reference's final 3x3 conv (use_final_conv: final_layer.*) and its DWT model (MaskedDWTUViT) have no
  counterpart in MaskedUViT: import refuses them (HarnessError naming them), since dropping them would change
  the outputs.
- The reference attention has query and value biases but no key bias; ours has one fused bias. A key bias
  cannot change the output (it adds q.b_k to every logit of a softmax row), so import writes zeros there and
  export drops it (logging a warning when it is not zero, as after training with qkv_bias=True here).
- The number of heads is not stored in the tensors: `num_heads` defaults to width // 64 (768 -> 12, 512 -> 8,
  as in MaskDM's configs), and so does `decoder_heads` (192 -> 3, the reference's default); pass them when the
  model was trained otherwise. The reference's `qk_scale` option is
  not stored either; it is assumed unset (1/sqrt(head_dim), as PyTorch's SDPA).
- Depth: the reference builds depth // 2 in-blocks, a mid block and depth // 2 out-blocks, so its configs'
  encoder_depth 12 and 13 are the same network; import reports depth = 2 * in_blocks + 1 (13).
- Schedule buffers: import only reads `betas` to name the schedule (cosine or linear over T steps); export
  recomputes all 14 from the harness's DiffusionConfig (float64, cast to float32, the reference's formulas).
  The reference samples with T = 1000 (hard-coded in its main.py and eval.py) and eps prediction (objective
  'pred_noise'); export refuses anything else. `loss_weight` is its p2 weight with gamma 0, i.e. ones.

The reference loads an exported file as is: eval.py samples from `ema` (the `ema_model.` entries), main.py
fine-tunes from `model` (--pretrained_model_ckpt). Resuming a reference run (--resume_from) needs `opt`, which a
harness checkpoint cannot provide (our optimizer groups differ), so export leaves it out.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from harness.checkpoint import safe_torch_load
from harness.diffusion import DiffusionConfig, cosine_betas, linear_betas
from harness.errors import HarnessError
from harness.models.config import UViTConfig

log = logging.getLogger(__name__)

SCHEDULE_BUFFERS = (
    "alphas", "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
    "posterior_mean_coef1", "posterior_mean_coef2", "loss_weight",
)
NET = "model."  # the network inside the diffusion wrapper
EMA_MODEL, ONLINE_MODEL = "ema_model.", "online_model."
EMA_COUNTERS = ("initted", "step")

# Reference parts the harness model cannot represent: prefix -> what it is.
_UNSUPPORTED = {
    "final_layer.": "the final 3x3 conv (use_final_conv = True)",
    "encoder.approx_patch_embed.": "the DWT model (MaskedDWTUViT)",
    "approx_to_output.": "the DWT model (MaskedDWTUViT)",
}
_QV_BIAS = re.compile(r"^(.+)\.attn\.(q|v)_bias$")  # a reference block's query and value biases
_DECODER = ("encoder_to_decoder.", "decoder.", "decoder_pos_embed")  # named alike in both layouts


@dataclasses.dataclass
class MaskDMImport:
    """What a reference checkpoint holds, in harness terms (weights are MaskedUViT state dicts)."""

    config: UViTConfig
    raw: dict[str, torch.Tensor] | None  # from `model`
    ema: dict[str, torch.Tensor] | None  # from `ema` -> `ema_model.`
    step: int | None
    schedule: str | None  # 'cosine' | 'linear' when `betas` matches one of ours, else None
    timesteps: int | None

    def bindings(self) -> list[str]:
        """gin lines that build the same network (and schedule) in a recipe."""
        from harness.config import described_fields

        lines = [f"UViTConfig.{f.name} = {getattr(self.config, f.name)!r}" for f in described_fields(self.config)]
        if self.schedule:
            lines += [f"DiffusionConfig.schedule = {self.schedule!r}", f"DiffusionConfig.timesteps = {self.timesteps}"]
        return lines


# ----------------------------------------------------------------------------------------------------------------
# Names

def reference_name(ours: str) -> str:
    """Harness tensor name -> reference network name (the fused qkv bias is split separately)."""
    if ours == "pos_embed":
        return "encoder.encoder_pos_embed"
    if ours.startswith("decoder_pred."):
        return "encoder_to_output." + ours[len("decoder_pred."):]
    if ours.startswith(_DECODER):
        return ours
    return "encoder." + ours


def harness_name(ref: str) -> str | None:
    """Reference network name -> harness name; None for names outside the encoder and head."""
    if ref == "encoder.encoder_pos_embed":
        return "pos_embed"
    if ref.startswith("encoder_to_output."):
        return "decoder_pred." + ref[len("encoder_to_output."):]
    if ref.startswith(_DECODER):
        return ref
    if ref.startswith("encoder."):
        name = ref[len("encoder."):]
        return name if reference_name(name) == ref else None  # one-to-one: not encoder.pos_embed & co.
    return None


def expected_shapes(cfg: UViTConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a MaskedUViT with this config and its shape (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = cfg.build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def default_heads(width: int) -> int:
    """Heads of 64 channels, as every MaskDM config (768 -> 12, 512 -> 8)."""
    if width % 64:
        raise HarnessError(f"cannot guess the number of attention heads of a {width}-wide model (it is not "
                           "stored in the checkpoint): pass it, e.g. `harness convert import ... --heads 8`")
    return width // 64


# ----------------------------------------------------------------------------------------------------------------
# Reference network <-> harness state dict

def infer_config(net: Mapping[str, torch.Tensor], num_heads: int | None = None,
                 decoder_heads: int | None = None) -> UViTConfig:
    """The UViTConfig of a reference network state dict (names without the `model.` prefix)."""
    for prefix, what in _UNSUPPORTED.items():
        found = sorted(k for k in net if k.startswith(prefix))
        if found:
            shown = ", ".join(found[:3]) + (" ..." if len(found) > 3 else "")
            raise HarnessError(f"the checkpoint uses {what} ({shown}), "
                               "which the harness MaskedUViT does not have; only MaskDM U-ViTs without it "
                               "(use_final_conv: False) can be imported")
    for key in ("encoder.patch_embed.proj.weight", "encoder.encoder_pos_embed", "encoder.mid_block.mlp.fc1.weight"):
        if key not in net:
            raise HarnessError(f"not a MaskDM MaskedUViT checkpoint: its network has no '{key}' "
                               f"(it has e.g. {', '.join(sorted(net)[:4]) or 'nothing'})")
    proj, pos = net["encoder.patch_embed.proj.weight"], net["encoder.encoder_pos_embed"]
    width, in_chans, patch = proj.shape[0], proj.shape[1], proj.shape[2]
    num_classes = net["encoder.label_emb.weight"].shape[0] if "encoder.label_emb.weight" in net else 0
    extras = 2 if num_classes else 1
    grid = math.isqrt(pos.shape[1] - extras)
    if grid * grid != pos.shape[1] - extras:
        raise HarnessError(f"encoder_pos_embed has {pos.shape[1]} tokens: not {extras} extra token(s) plus a square "
                           "patch grid; is this an image U-ViT checkpoint?")
    in_blocks = {int(m.group(1)) for k in net if (m := re.match(r"encoder\.in_blocks\.(\d+)\.", k))}
    out_blocks = {int(m.group(1)) for k in net if (m := re.match(r"encoder\.out_blocks\.(\d+)\.", k))}
    if in_blocks != set(range(len(in_blocks))) or out_blocks != in_blocks:
        raise HarnessError(f"the checkpoint has in_blocks {sorted(in_blocks)} and out_blocks {sorted(out_blocks)}; "
                           "a U-ViT has the same number of each, numbered from 0")
    decoder = {}
    if "encoder_to_decoder.weight" in net:
        blocks = {int(m.group(1)) for k in net if (m := re.match(r"decoder\.blocks\.(\d+)\.", k))}
        if not blocks or blocks != set(range(len(blocks))):
            raise HarnessError(f"the checkpoint's ViT decoder has blocks {sorted(blocks)}; expected decoder.blocks.0 "
                               "onwards")
        dd = net["encoder_to_decoder.weight"].shape[0]
        decoder = dict(decoder_depth=len(blocks), decoder_embed_dim=dd,
                       decoder_heads=decoder_heads or default_heads(dd))
    return UViTConfig(
        img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=width,
        depth=2 * len(in_blocks) + 1, num_heads=num_heads or default_heads(width),
        mlp_ratio=net["encoder.mid_block.mlp.fc1.weight"].shape[0] / width,
        qkv_bias="encoder.mid_block.attn.q_bias" in net, num_classes=num_classes,
        time_mlp="encoder.time_embed.0.weight" in net, **decoder,
    )


def _check_names(what: str, got: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]],
                 unmapped: list[str], shown=lambda name: name) -> None:
    """Fail on names outside `expected`, missing ones and wrong shapes; `shown` names them for the user."""
    missing = sorted(shown(k) for k in set(expected) - set(got))
    misshapen = sorted(f"{shown(k)} {tuple(got[k].shape)} != {expected[k]}"
                       for k in set(got) & set(expected) if tuple(got[k].shape) != expected[k])
    unmapped = sorted(unmapped + [shown(k) for k in got if k not in expected])
    problems = [f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
                for label, keys in (("unmapped", unmapped), ("missing", missing), ("wrong shape", misshapen)) if keys]
    if problems:
        raise HarnessError(f"{what} does not map onto MaskedUViT: {'; '.join(problems)}")


def _reference_label(ours: str) -> str:
    """How the reference names the tensor(s) behind a harness name, for error messages."""
    if ours.endswith(".attn.qkv.bias"):
        return reference_name(ours).replace(".qkv.bias", ".q_bias/v_bias")
    return reference_name(ours)


def from_reference(net: Mapping[str, torch.Tensor], cfg: UViTConfig, what: str = "the checkpoint") -> dict:
    """Reference network state dict -> harness MaskedUViT state dict (fails on anything unmapped or missing)."""
    out: dict[str, torch.Tensor] = {}
    qv: dict[str, dict[str, torch.Tensor]] = {}
    unmapped = []
    for ref, tensor in net.items():
        if (m := _QV_BIAS.match(ref)) and (block := harness_name(m.group(1) + ".attn")) is not None:
            qv.setdefault(block[: -len(".attn")], {})[m.group(2)] = tensor
        elif (name := harness_name(ref)) is not None:
            out[name] = tensor
        else:
            unmapped.append(ref)
    for block, pair in qv.items():
        if set(pair) != {"q", "v"}:
            unmapped += [f"{reference_name(block)}.attn.{k}_bias" for k in pair]  # one without the other
            continue
        out[f"{block}.attn.qkv.bias"] = torch.cat([pair["q"], torch.zeros_like(pair["q"]), pair["v"]])
    _check_names(what, out, expected_shapes(cfg), unmapped, shown=_reference_label)
    return out


def to_reference(weights: Mapping[str, torch.Tensor], cfg: UViTConfig, what: str = "the weights") -> dict:
    """Harness MaskedUViT state dict -> reference network state dict (names without `model.`)."""
    _check_names(what, weights, expected_shapes(cfg), [])
    out: dict[str, torch.Tensor] = {}
    for name, tensor in weights.items():
        if name.endswith(".attn.qkv.bias"):
            block = name[: -len(".attn.qkv.bias")]
            d = cfg.decoder_embed_dim if block.startswith("decoder.") else cfg.embed_dim
            if bool(tensor[d : 2 * d].any()):
                log.warning("%s: dropping a non-zero key bias (the reference has none; it does not change the "
                            "output)", name)
            ref_block = reference_name(block)
            out[f"{ref_block}.attn.q_bias"] = tensor[:d].clone()  # clone: save a slice, not its storage
            out[f"{ref_block}.attn.v_bias"] = tensor[2 * d :].clone()
        else:
            out[reference_name(name)] = tensor
    return out


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule buffers

def schedule_buffers(diffusion: DiffusionConfig) -> dict[str, torch.Tensor]:
    """The reference wrapper's 14 buffers for our schedule: float64 maths, float32 values, its order."""
    if diffusion.timesteps != 1000 or diffusion.prediction != "eps":
        raise HarnessError(f"the reference code samples with 1000 time steps and eps prediction; this model uses "
                           f"{diffusion.timesteps} steps and {diffusion.prediction!r} prediction, so it cannot be "
                           "exported to the MaskDM layout")
    betas = linear_betas(diffusion.timesteps) if diffusion.schedule == "linear" else cosine_betas(diffusion.timesteps)
    alphas = 1 - betas
    abar = torch.cumprod(alphas, dim=0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    posterior_variance = betas * (1 - abar_prev) / (1 - abar)
    values = {
        "alphas": alphas, "betas": betas, "alphas_cumprod": abar, "alphas_cumprod_prev": abar_prev,
        "sqrt_alphas_cumprod": abar.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - abar).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - abar).log(), "sqrt_recip_alphas_cumprod": (1 / abar).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / abar - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * abar_prev.sqrt() / (1 - abar),
        "posterior_mean_coef2": (1 - abar_prev) * alphas.sqrt() / (1 - abar),
        "loss_weight": torch.ones_like(betas),  # p2 weighting with gamma 0, as every MaskDM config
    }
    return {name: values[name].to(torch.float32) for name in SCHEDULE_BUFFERS}


def recognise_schedule(betas: torch.Tensor) -> str | None:
    """'cosine' or 'linear' when the reference's betas are ours (to float32 precision), else None."""
    for name, ours in (("cosine", cosine_betas), ("linear", linear_betas)):
        if torch.allclose(betas.double(), ours(len(betas)).float().double(), rtol=1e-5, atol=1e-7):
            return name
    return None


# ----------------------------------------------------------------------------------------------------------------
# Import

def load_reference(src: str | Path | Mapping[str, Any]) -> Mapping[str, Any]:
    """A reference checkpoint from a file (tensors and plain containers only), or the dict itself."""
    if isinstance(src, Mapping):
        return src
    path = Path(src).expanduser()
    strip = (f"If you trust the file, strip it in a separate environment: python -c \"import torch; c = torch.load("
             f"'{path}', map_location='cpu', weights_only=False); torch.save({{k: c[k] for k in ('step', 'model', "
             "'ema') if k in c}, 'clean.pt')\" and import clean.pt")
    return safe_torch_load(path, "MaskDM checkpoint", verb="unpickle", if_code=strip)


def _split_wrapper(state: Mapping[str, Any], where: str, unknown: list[str]) -> tuple[dict, dict]:
    """A diffusion wrapper's state dict -> (network tensors without `model.`, schedule buffers)."""
    if not isinstance(state, Mapping):
        raise HarnessError(f"{where.rstrip(':.')} is a {type(state).__name__}, not a state dict: "
                           "not a MaskDM checkpoint")
    net, buffers = {}, {}
    for key, value in state.items():
        if key in SCHEDULE_BUFFERS:
            buffers[key] = value
        elif key.startswith(NET) and isinstance(value, torch.Tensor):
            net[key[len(NET):]] = value
        else:
            unknown.append(f"{where}{key}")
    return net, buffers


def read_maskdm(src: str | Path | Mapping[str, Any], num_heads: int | None = None,
                decoder_heads: int | None = None) -> MaskDMImport:
    """Read a MaskDM checkpoint: its architecture, and its raw and EMA weights as MaskedUViT state dicts."""
    ckpt = load_reference(src)
    if not isinstance(ckpt, Mapping) or not ({"model", "ema"} & set(ckpt)):
        keys = sorted(map(str, ckpt)) if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise HarnessError(f"not a MaskDM checkpoint: expected a dict with 'model' and/or 'ema' (got {keys})")
    unknown = [str(k) for k in ckpt if k not in ("step", "model", "opt", "ema", "scaler")]
    raw_net = ema_net = None
    buffers: dict[str, torch.Tensor] = {}
    if "model" in ckpt:
        raw_net, buffers = _split_wrapper(ckpt["model"], "model:", unknown)
    ema_step = None
    if "ema" in ckpt:
        ema = ckpt["ema"]
        under = lambda prefix: {k[len(prefix):]: v for k, v in ema.items() if k.startswith(prefix)}  # noqa: E731
        ema_net, ema_buffers = _split_wrapper(under(EMA_MODEL), f"ema:{EMA_MODEL}", unknown)
        buffers = buffers or ema_buffers
        # online_model duplicates `model` (the same module); only its names are checked
        online, _ = _split_wrapper(under(ONLINE_MODEL), f"ema:{ONLINE_MODEL}", unknown)
        unknown += [f"ema:{ONLINE_MODEL}{NET}{k}" for k in sorted(set(online) - set(ema_net))]
        unknown += [f"ema:{k}" for k in ema if not k.startswith((EMA_MODEL, ONLINE_MODEL)) and k not in EMA_COUNTERS]
        if "step" in ema:
            ema_step = int(torch.as_tensor(ema["step"]).reshape(-1)[0])
    if unknown:
        raise HarnessError(f"the checkpoint has entries this converter does not know ({len(unknown)}): "
                           f"{', '.join(unknown[:6])}{' ...' if len(unknown) > 6 else ''}")
    cfg = infer_config(raw_net if raw_net else ema_net or {}, num_heads, decoder_heads)
    raw = from_reference(raw_net, cfg, "checkpoint['model']") if raw_net is not None else None
    ema_weights = from_reference(ema_net, cfg, "checkpoint['ema']") if ema_net is not None else None
    step = ckpt.get("step", ema_step)
    betas = buffers.get("betas")
    return MaskDMImport(config=cfg, raw=raw, ema=ema_weights, step=None if step is None else int(step),
                        schedule=None if betas is None else recognise_schedule(betas),
                        timesteps=None if betas is None else len(betas))


def import_maskdm(src: str | Path | Mapping[str, Any], weights: str = "ema", num_heads: int | None = None,
                  decoder_heads: int | None = None) -> tuple[UViTConfig, dict[str, torch.Tensor]]:
    """(UViTConfig, MaskedUViT state dict) of a MaskDM checkpoint; `weights` is 'ema' or 'raw'."""
    if weights not in ("ema", "raw"):
        raise HarnessError(f"weights must be 'ema' or 'raw', got {weights!r}")
    found = read_maskdm(src, num_heads, decoder_heads)
    chosen = found.ema if weights == "ema" else found.raw
    if chosen is None:
        raise HarnessError(f"the checkpoint has no {weights} weights (no '{'ema' if weights == 'ema' else 'model'}' "
                           f"entry); use weights='{'raw' if weights == 'ema' else 'ema'}'")
    return found.config, chosen


# ----------------------------------------------------------------------------------------------------------------
# Export

def config_of_weights(weights: Mapping[str, torch.Tensor]) -> UViTConfig:
    """The architecture of MaskedUViT weights, read from the tensors (num_heads=1: heads are in neither layout)."""
    if "pos_embed" not in weights:
        raise HarnessError("these weights are not a MaskedUViT state dict (no 'pos_embed')")
    renamed = {}
    for name, tensor in weights.items():  # names only, so that infer_config can read them
        if name.endswith(".attn.qkv.bias"):
            renamed[reference_name(name).replace(".qkv.bias", ".q_bias")] = tensor[: tensor.shape[0] // 3]
        else:
            renamed[reference_name(name)] = tensor
    return infer_config(renamed, num_heads=1, decoder_heads=1)


def export_maskdm(source: Mapping[str, Any], cfg: UViTConfig | None = None,
                  diffusion: DiffusionConfig | None = None, step: int | None = None) -> dict[str, Any]:
    """A harness checkpoint ({'model', 'ema', ...}) or a plain MaskedUViT state dict -> the reference layout.

    Both the raw (`model`, `ema` -> `online_model.`) and the EMA (`ema` -> `ema_model.`) slots are filled; a
    plain state dict fills both. `cfg` (default: read from the tensors) is checked against the weights.
    """
    if "model" in source or "ema" in source:
        raw, ema = source.get("model"), source.get("ema")
        raw, ema = raw if raw is not None else ema, ema if ema is not None else raw
        if step is None:
            step = source.get("step", (source.get("maskdm") or {}).get("step"))
    else:
        raw = ema = source
    cfg = cfg if cfg is not None else config_of_weights(raw)
    diffusion = diffusion if diffusion is not None else DiffusionConfig()
    step = int(step or 0)
    buffers = schedule_buffers(diffusion)

    def wrapper(weights: Mapping[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
        net = to_reference(weights, cfg, what)
        return {**buffers, **{NET + k: v for k, v in net.items()}}

    model = wrapper(raw, "the raw weights")
    ema_model = model if ema is raw else wrapper(ema, "the EMA weights")
    ema_state = {"initted": torch.tensor([1.0]), "step": torch.tensor([step])}
    ema_state.update({ONLINE_MODEL + k: v for k, v in model.items()})
    ema_state.update({EMA_MODEL + k: v for k, v in ema_model.items()})
    return {"step": step, "model": model, "ema": ema_state, "scaler": None}
