"""`harness convert import|export`: MaskDM reference checkpoints in and out (the mapping: harness/convert.py).

    harness convert import model-20.pt maskdm_celebahq.pt [--weights both|ema|raw] [--heads 12] [--decoder-heads 3]
    harness convert export results/exp/arm/finetune-1a2b3c4d maskdm_layout.pt   (or a checkpoints/step_*.pt)

An imported file is a harness checkpoint {"model", "ema", "config", "maskdm"} that `Stage.init_checkpoint`
accepts; `Stage.init_from` then picks its raw ("model") or EMA weights. With --weights ema or raw, both slots
hold the chosen weights, so the stage starts from them whatever init_from says.
"""
from __future__ import annotations

import argparse
from pathlib import Path

HELP = "MaskDM reference checkpoints in and out: `convert import SRC.pt DST.pt`, `convert export STAGE DST.pt`"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="direction", metavar="DIRECTION", required=True)
    imp = sub.add_parser("import", help="MaskDM checkpoint -> harness checkpoint (for Stage.init_checkpoint)")
    imp.add_argument("src", help="a MaskDM training checkpoint (model-N.pt: step, model, opt, ema, scaler)")
    imp.add_argument("dst", help="the harness checkpoint to write")
    imp.add_argument("--weights", choices=("both", "ema", "raw"), default="both",
                     help="both (default): raw -> 'model', EMA -> 'ema'; ema or raw: that set in both slots")
    imp.add_argument("--heads", type=int, default=None, metavar="N",
                     help="attention heads (not stored in the checkpoint; default width // 64: 768 -> 12, 512 -> 8)")
    imp.add_argument("--decoder-heads", type=int, default=None, metavar="N",
                     help="the ViT decoder's heads, if it has one (default width // 64: 192 -> 3, the reference's)")
    exp = sub.add_parser("export", help="harness stage folder or checkpoint -> MaskDM checkpoint layout")
    exp.add_argument("src", help="a stage folder (its newest valid checkpoint) or a checkpoint file")
    exp.add_argument("dst", help="the MaskDM-layout checkpoint to write")


def main(args: argparse.Namespace) -> int:
    return _import(args) if args.direction == "import" else _export(args)


def _save(obj: dict, dst: str | Path) -> None:
    import io

    import torch

    from harness.fileio import atomic_write_bytes

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(Path(dst).expanduser(), buffer.getvalue())  # no half-written file if interrupted


def _import(args: argparse.Namespace) -> int:
    import dataclasses

    from harness.convert import read_maskdm
    from harness.errors import HarnessError

    found = read_maskdm(args.src, num_heads=args.heads, decoder_heads=args.decoder_heads)
    raw, ema = found.raw, found.ema
    if args.weights in ("ema", "raw"):
        chosen = ema if args.weights == "ema" else raw
        if chosen is None:
            raise HarnessError(f"{args.src} has no {args.weights} weights; use --weights both")
        raw = ema = chosen
    out = {"model": raw if raw is not None else ema, "ema": ema if ema is not None else raw,
           "config": dataclasses.asdict(found.config),
           "maskdm": {"source": str(args.src), "step": found.step, "weights": args.weights,
                      "schedule": found.schedule, "timesteps": found.timesteps}}
    _save(out, args.dst)
    cfg = found.config
    sets = "raw + EMA" if found.raw is not None and found.ema is not None and args.weights == "both" else args.weights
    print(f"imported {args.src} (step {found.step}, {sets} weights) -> {args.dst}: {cfg.embed_dim} wide, "
          f"{cfg.depth} blocks, {cfg.num_heads} heads{' (assumed: width // 64)' if args.heads is None else ''}, "
          f"patch {cfg.patch_size}, {cfg.img_size} px, "
          + (f"a ViT decoder ({cfg.decoder_depth} blocks, {cfg.decoder_embed_dim} wide, {cfg.decoder_heads} heads), "
             if cfg.decoder_depth else "a linear head, ")
          + f"{cfg.num_params():,} parameters")
    if found.schedule is None and found.timesteps is not None:
        print(f"warning: its {found.timesteps}-step noise schedule is neither the harness's cosine nor linear one "
              "(shifted cosine?); fine-tuning here changes the schedule")
    print("recipe bindings:")
    for line in found.bindings():
        print(f"  {line}")
    print(f"  Stage.init_checkpoint = '{args.dst}'")
    return 0


def _export(args: argparse.Namespace) -> int:
    import json

    from harness.checkpoint import load_checkpoint, newest_valid_checkpoint
    from harness.convert import config_of_weights, export_maskdm
    from harness.diffusion import DiffusionConfig
    from harness.errors import HarnessError
    from harness.models.config import UViTConfig
    from harness.run_folder import CHECKPOINTS_DIR, STAGE_FILE

    src = Path(args.src).expanduser()
    if src.is_dir():
        ckpt_path = newest_valid_checkpoint(src / CHECKPOINTS_DIR)
        if ckpt_path is None:
            raise HarnessError(f"{src} has no valid checkpoint under checkpoints/; is it a stage folder?")
        stage_json = src / STAGE_FILE
    else:
        ckpt_path, stage_json = src, src.parent.parent / STAGE_FILE  # <stage>/checkpoints/step_*.pt
    ckpt = load_checkpoint(ckpt_path)

    plain = lambda d: {k: v for k, v in d.items() if k != "type"}  # noqa: E731
    cfg, diffusion, origin = None, DiffusionConfig(), "assumed (no stage.json): cosine, 1000 steps, eps"
    if stage_json.is_file():
        stage = json.loads(stage_json.read_text())["stage"]
        if stage["model"].get("type") != "UViTConfig":  # MaskDM's checkpoints hold U-ViTs only
            raise HarnessError(f"{src} is a {stage['model'].get('type')} stage: only U-ViT stages can be exported "
                               "to MaskDM's checkpoint layout")
        cfg, diffusion = UViTConfig(**plain(stage["model"])), DiffusionConfig(**plain(stage["diffusion"]))
        origin = f"from {stage_json}"
    elif isinstance(ckpt.get("config"), dict):  # a file written by `harness convert import`
        cfg = UViTConfig(**ckpt["config"])
        meta = ckpt.get("maskdm") or {}
        if meta.get("schedule"):
            diffusion = DiffusionConfig(schedule=meta["schedule"], timesteps=meta.get("timesteps") or 1000)
            origin = "as recorded at import"
    heads_known = cfg is not None
    out = export_maskdm(ckpt, cfg, diffusion)
    _save(out, args.dst)
    if cfg is None:
        weights = ckpt.get("model", ckpt.get("ema", ckpt))
        cfg = config_of_weights(weights)
    print(f"exported {ckpt_path} (step {out['step']}) -> {args.dst}; noise schedule {diffusion.schedule}, "
          f"{diffusion.timesteps} steps ({origin})")
    print("reference config (network section; sample with its eval.py --ckpt, fine-tune with "
          "--pretrained_model_ckpt):")
    for key, value in (("img_size", cfg.img_size), ("patch_size", cfg.patch_size), ("in_chans", cfg.in_chans),
                       ("encoder_embed_dim", cfg.embed_dim), ("encoder_depth", cfg.depth),
                       ("encoder_heads", cfg.num_heads if heads_known else "? (not stored in the checkpoint)"),
                       ("decoder_depth", cfg.decoder_depth),
                       *((("decoder_embed_dim", cfg.decoder_embed_dim),
                          ("decoder_heads", cfg.decoder_heads if heads_known else "? (not stored in the checkpoint)"))
                         if cfg.decoder_depth else ()),
                       ("mlp_ratio", cfg.mlp_ratio), ("qkv_bias", cfg.qkv_bias),
                       ("num_classes", cfg.num_classes or -1), ("use_final_conv", False),
                       ("mlp_time_embed", cfg.time_mlp)):
        print(f"  {key}: {value}")
    print(f"  (top level) beta_schedule: {diffusion.schedule!r}")
    return 0

