"""`harness prepare SRC DST --resolution N`: resize/crop a folder of images into a fast dataset folder."""
from __future__ import annotations

import argparse

HELP = "resize/crop a folder of images into a dataset the harness reads fast (PNG folder or one .npy array)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="folder of source images (png/jpg/jpeg/webp, searched recursively); only read")
    parser.add_argument("dst", help="new output folder (not inside SRC); rerun the same command to resume")
    parser.add_argument("--resolution", type=int, required=True, help="output side in pixels, e.g. 256")
    parser.add_argument("--center-crop", action="store_true",
                        help="crop non-square images to their centre square (without it they are skipped)")
    parser.add_argument("--subset", type=int, default=None, metavar="N",
                        help="keep N images chosen reproducibly by --seed (unreadable ones are replaced)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset choice (default 0)")
    parser.add_argument("--format", choices=("folder", "npy"), default="folder",
                        help="folder: PNG files under DST/images; npy: one uint8 array DST/images.npy")
    parser.add_argument("--workers", type=int, default=1, help="decoding processes (default 1)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    from harness.prepare import prepare_dataset

    result = prepare_dataset(args.src, args.dst, resolution=args.resolution, center_crop=args.center_crop,
                             subset=args.subset, seed=args.seed, fmt=args.format, workers=args.workers,
                             show_progress=not args.no_progress)
    print(f"prepared {result.count} images at {result.resolution}x{result.resolution} into {result.dst} "
          f"({result.format}; {result.converted} converted now, {result.count - result.converted} already there)")
    if result.skipped:
        print(f"skipped {len(result.skipped)} files (listed in {result.dst / 'dataset.json'}):")
        for item in result.skipped[:20]:
            print(f"  {item['file']}: {item['reason']}")
        if len(result.skipped) > 20:
            print(f"  ... and {len(result.skipped) - 20} more")
    print(f"content hash {result.content_hash}")
    print(f"use it with: DataConfig.source = 'folder'  DataConfig.root = '{result.dst}'  "
          f"DataConfig.resolution = {result.resolution}")
    return 0
