"""Datasets: image folders, prepared datasets, deterministic subsets and the embedded procedural datasets.

`DataConfig` is the gin-configurable spec (plain data, cheap: planning with it imports neither torch nor PIL);
`DataConfig.build()` makes an `ImageDataset` (harness/datasets.py), a torch Dataset of float32 [C, H, W] images
in [-1, 1]. Trainers call `get_batch(indices)`, which gathers a whole batch at once (one array lookup for
embedded and .npy data). The dataset never flips: the trainer mirrors images itself (`hflip`) with its own seeded
draw, and evaluation and FID references see the images as they are.

Sources:
- `shapes`, `faces`: procedural images generated in memory from `seed` (see harness/embedded.py).
- `folder`: png/jpg/jpeg/webp files under `root` (recursive, sorted by relative path), or a dataset written by
  `harness prepare` (recognised by its `dataset.json`; the `npy` format is read through a memory map).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import gin
from harness import embedded
from harness.errors import HarnessError
from harness.latent import LatentConfig

if TYPE_CHECKING:
    from harness.datasets import ImageDataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
PREPARED_INDEX = "dataset.json"  # written last by harness/prepare.py: its presence means "complete"
PREPARE_PROGRESS = ".prepare-progress.json"  # present while a `harness prepare` run is unfinished
SOURCES = ("folder", *embedded.SOURCES)


@gin.configurable
@dataclasses.dataclass
class DataConfig:
    """What images to train and evaluate on. `seed` only drives the embedded generators."""

    source: str = "shapes"
    root: str | None = None
    resolution: int = 32
    center_crop: bool = True  # folder: resize the shorter side to `resolution`, then crop the centre square
    hflip: bool = True  # random horizontal flips while training (drawn by the trainer, not get_batch)
    subset: int | None = None  # keep this many images, chosen reproducibly by subset_seed
    subset_seed: int = 0
    num_images: int = 4096  # embedded sources: how many images to generate
    seed: int = 0
    # Split lists (folders only: ignored by the embedded sources, as `root` is, so that a recipe's unscoped
    # binding does not stop a fallback to them; added later, so left out of stage ids while unset).
    # `split_file` names the images to keep: one per line, or "<image> <partition>" lines as CelebA's
    # Eval/list_eval_partition.txt, from which `split` picks a partition ('train' = 0, 'val' = 1, 'test' = 2, or
    # a label as written in the file). Images match by file name without extension, so '000001.jpg' in the list
    # finds a prepared 'images/000001.png'.
    # The subset, if any, is then drawn from the split.
    split_file: str | None = dataclasses.field(default=None, metadata={"added_later": True})
    split: str | None = dataclasses.field(default=None, metadata={"added_later": True})
    # Train on the latents of a diffusers AutoencoderKL on local disk (harness/latent.py) instead of pixels: a
    # LatentConfig, or None (pixels). Added later: left out of stage ids while None. Evaluation still scores
    # images of `resolution` against the real images (the samples are decoded).
    latent: LatentConfig | None = dataclasses.field(default=None, metadata={"added_later": True})

    def __post_init__(self) -> None:
        from harness.config import check_field_types  # here: config imports this module to register it

        check_field_types(self, "DataConfig")
        if self.source not in SOURCES:
            raise HarnessError(f"DataConfig.source={self.source!r} is not known; use one of {SOURCES}")
        if self.source == "folder" and not self.root:
            raise HarnessError("DataConfig.source='folder' needs DataConfig.root (the folder of images)")
        if self.resolution < 8:
            raise HarnessError(f"DataConfig.resolution={self.resolution} is too small; use 8 pixels or more")
        if self.subset is not None and self.subset < 1:
            raise HarnessError(f"DataConfig.subset={self.subset} must be a positive number of images (or None)")
        if self.source != "folder" and self.num_images < 1:
            raise HarnessError(f"DataConfig.num_images={self.num_images} must be positive")
        if self.split is not None and self.split_file is None:
            raise HarnessError(f"DataConfig.split={self.split!r} needs DataConfig.split_file (e.g. CelebA's "
                               "list_eval_partition.txt); or set DataConfig.split = None")
        if self.latent is not None and not isinstance(self.latent, LatentConfig):
            raise HarnessError(f"DataConfig.latent = {self.latent!r} is not a LatentConfig; bind it to one, e.g. "
                               "DataConfig.latent = @LatentConfig(), or None for pixels")
        if self.latent is not None and self.hflip:
            raise HarnessError("DataConfig.hflip = True with DataConfig.latent: the trainer would mirror latents, "
                               "and a mirrored latent is not the latent of the mirrored image; set "
                               "DataConfig.hflip = False (gin/data/latent_sd_vae.gin does)")

    # -- description ---------------------------------------------------------------------------------------
    def describe(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def root_path(self) -> Path:
        return Path(self.root).expanduser()

    def check(self) -> None:
        """Fail before anything trains when the data is not there (cheap: no image is decoded)."""
        if self.source == "folder":
            located = _locate(self.root_path)
            if self.split_file is not None:
                self._split_positions(located[2])
        if self.latent is not None:  # the VAE folder, and diffusers to load it
            self.latent.check()

    def content_id(self) -> str:
        """A short stable hash of what `build()` would return, used to cache FID reference statistics."""
        settings = {"resolution": self.resolution, "subset": self.subset, "subset_seed": self.subset_seed}
        if self.source != "folder":
            payload = {**settings, "source": self.source, "num_images": self.num_images, "seed": self.seed,
                       "generator_version": embedded.GENERATOR_VERSION}
        else:
            kind, root, names = _locate(self.root_path)
            settings["center_crop"] = self.center_crop
            if kind == "npy":  # one big file: its index's content hash plus its size and mtime
                stat = (root / "images.npy").stat()
                files = [(PREPARED_INDEX, _read_index(root).get("content_hash")), (stat.st_size, stat.st_mtime_ns)]
            else:
                files = []
                for name in names:
                    stat = (root / name).stat()
                    files.append((name, stat.st_size, stat.st_mtime_ns))
            if self.split_file is not None:  # (only then: unsplit datasets keep their ids and cached statistics)
                chosen = "\n".join(names[i] for i in self._split_positions(names))
                settings["split"] = [self.split, hashlib.sha256(chosen.encode()).hexdigest()]
            payload = {**settings, "files": files}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def names(self) -> list[str]:
        """The chosen images, by name, in dataset order (cheap: nothing is decoded or generated)."""
        return self._chosen()[1]

    def write_manifest(self, path: str | os.PathLike) -> None:
        """Record which images the dataset holds; the stage worker keeps this in the run folder."""
        manifest = {"config": self.describe(), "content_id": self.content_id(), "files": self.names()}
        manifest["count"] = len(manifest["files"])
        Path(path).write_text(json.dumps(manifest, indent=1) + "\n")

    # -- building ------------------------------------------------------------------------------------------
    def _chosen(self, located: tuple[str, Path, list[str]] | None = None) -> tuple[list[int], list[str]]:
        """(positions in the full dataset, names) of the images this config keeps."""
        if self.source != "folder":
            total, all_names = self.num_images, None
        else:
            all_names = (located or _locate(self.root_path))[2]
            total = len(all_names)
        split = self.split_file is not None and all_names is not None
        pool = self._split_positions(all_names) if split else list(range(total))
        if self.subset is None:
            keep = pool
        elif self.subset > len(pool):
            raise HarnessError(f"DataConfig.subset={self.subset} but the dataset has only {len(pool)} images"
                               f"{' in its split' if split else ''}; lower the subset or add images")
        else:
            keep = [pool[i] for i in choose_subset(len(pool), self.subset, self.subset_seed)]
        names = [f"{self.source}/{i:06d}" for i in keep] if all_names is None else [all_names[i] for i in keep]
        return keep, names

    def _split_positions(self, all_names: list[str]) -> list[int]:
        """Positions (ascending) of the folder's images that the split list keeps."""
        wanted = read_split_list(Path(self.split_file).expanduser(), self.split)
        by_stem: dict[str, int] = {}
        for position, name in enumerate(all_names):
            by_stem.setdefault(_stem(name), position)
        missing = [name for name in wanted if name not in by_stem]
        if missing:
            raise HarnessError(f"{len(missing)} of the {len(wanted)} images that {self.split_file} lists"
                               f"{f' for split {self.split!r}' if self.split is not None else ''} are not in "
                               f"{self.root} (e.g. {', '.join(missing[:3])}); point DataConfig.root at the "
                               "full dataset, or DataConfig.split_file at the list that belongs to it")
        return sorted(by_stem[name] for name in wanted)

    def build(self) -> ImageDataset:
        import numpy as np

        from harness.datasets import ArrayImages, FolderImages, check_headers

        if self.source != "folder":
            keep, names = self._chosen()
            images = embedded.generate(self.source, self.num_images, self.resolution, self.seed)
            return ArrayImages(self, images, names, keep)
        located = _locate(self.root_path)
        kind, root, _ = located
        keep, names = self._chosen(located)
        if kind == "npy":
            index = _read_index(root)
            if index["resolution"] != self.resolution:
                raise HarnessError(
                    f"{root} was prepared at {index['resolution']} px but DataConfig.resolution={self.resolution}; "
                    f"set the resolution to {index['resolution']} or run `harness prepare SRC DST "
                    f"--resolution {self.resolution}`")
            return ArrayImages(self, np.load(root / "images.npy", mmap_mode="r"), names, keep)
        if not (root / PREPARED_INDEX).is_file() or not self.center_crop:
            # Raw folders are checked up front (headers only), so a corrupt or wrong-size file stops the run
            # before training rather than hours into it; prepared ones were checked when they were written.
            check_headers(root, names, self.resolution, exact_size=not self.center_crop)
        return FolderImages(self, root, names)

SPLIT_NAMES = {"train": "0", "val": "1", "test": "2"}  # CelebA's partition labels (list_eval_partition.txt)


def _stem(name: str) -> str:
    """An image's name as split lists match it: the file name without folders and extension."""
    return Path(name).stem


def read_split_list(path: Path, split: str | None) -> list[str]:
    """The image stems a split list keeps, in file order (see DataConfig.split_file)."""
    if not path.is_file():
        raise HarnessError(f"split file {path} does not exist (cwd {Path.cwd()}); for CelebA use the release's "
                           "Eval/list_eval_partition.txt and set DataConfig.split_file (the recipe's "
                           "CELEBA_SPLIT_FILE macro) to it, or set DataConfig.split_file = None to use every image")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    if not rows:
        raise HarnessError(f"split file {path} lists no images; give one image per line, or '<image> <partition>'")
    columns = {len(row) for row in rows}
    if columns == {1}:
        if split is not None:
            raise HarnessError(f"split file {path} is a plain list (one image per line), so it has no partitions; "
                               f"set DataConfig.split = None (it is {split!r})")
        return [_stem(row[0]) for row in rows]
    if columns != {2}:
        raise HarnessError(f"split file {path} mixes line formats; give one image per line, or "
                           "'<image> <partition>' on every line (as CelebA's list_eval_partition.txt)")
    if split is None:
        labels = sorted({row[1] for row in rows})
        raise HarnessError(f"split file {path} has partitions {labels}; choose one with DataConfig.split "
                           f"('train', 'val', 'test' for CelebA's 0, 1, 2, or a label as written)")
    label = SPLIT_NAMES.get(split, split)
    kept = [_stem(image) for image, part in rows if part == label]
    if not kept:
        raise HarnessError(f"split file {path} has no images in partition {label!r} (DataConfig.split = "
                           f"{split!r}); its partitions: {sorted({row[1] for row in rows})}")
    return kept


def choose_subset(total: int, n: int, seed: int) -> list[int]:
    """`n` of `total` indices, reproducible in `seed`, ascending. `harness prepare --subset` makes the same pick."""
    return sorted(subset_order(total, seed)[:n])


def subset_order(total: int, seed: int) -> list[int]:
    """The order in which a subset takes candidates (prepare walks further along it past unreadable files)."""
    import numpy as np

    return np.random.default_rng(seed).permutation(total).tolist()



def list_images(root: Path) -> list[str]:
    """Image files under `root` (recursive), as sorted relative POSIX paths; hidden files are ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.lower().endswith(IMAGE_SUFFIXES) and not filename.startswith("."):
                found.append(Path(dirpath, filename).relative_to(root).as_posix())
    return sorted(found)


def _read_index(root: Path) -> dict:
    try:
        return json.loads((root / PREPARED_INDEX).read_text())
    except (OSError, ValueError) as err:
        raise HarnessError(f"{root / PREPARED_INDEX} is unreadable ({err}); prepare the dataset again with "
                           f"`harness prepare SRC {root} --resolution N`")


def _locate(root: Path) -> tuple[str, Path, list[str]]:
    """What kind of dataset `root` is ('folder' or 'npy') and its image names; HarnessError when unusable."""
    hint = f"point DataConfig.root (or the recipe's *_ROOT macro) at your images, or make the folder with " \
           f"`harness prepare SRC {root} --resolution N`"
    if not root.exists():
        raise HarnessError(f"data folder {root} does not exist (cwd {Path.cwd()}); {hint}")
    if not root.is_dir():
        raise HarnessError(f"data root {root} is not a folder; {hint}")
    if (root / PREPARED_INDEX).is_file():
        index = _read_index(root)
        kind = index.get("format", "folder")
        names = list(index.get("files", []))
        if kind == "npy":
            if not (root / "images.npy").is_file():
                raise HarnessError(f"{root} has {PREPARED_INDEX} but no images.npy; prepare it again")
        else:
            kind, names = "folder", [f"images/{name}" for name in index.get("outputs", names)]
        if not names:
            raise HarnessError(f"prepared dataset {root} holds no images; prepare it again from a folder of images")
        return kind, root, names
    if (root / PREPARE_PROGRESS).is_file():
        raise HarnessError(f"{root} is a `harness prepare` output that never finished; run the same "
                           f"`harness prepare` command again to complete it")
    names = list_images(root)
    if not names:
        raise HarnessError(f"data folder {root} has no images ({', '.join(IMAGE_SUFFIXES)}, searched "
                           f"recursively); {hint}")
    return "folder", root, names
