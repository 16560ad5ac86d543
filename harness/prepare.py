"""`harness prepare`: turn a folder of images into a dataset the harness reads fast.

Every readable image is centre-cropped to a square (`center_crop`; otherwise non-square images are skipped)
and resized to `resolution`, then written either as PNG files under DST/images/ (the source's relative path,
suffix .png) or into one uint8 array DST/images.npy [N, H, W, 3] that training reads through a memory map.
DST/dataset.json (the index: settings, source files in row order, skipped files with reasons, content hash) is
written last, so its presence means the dataset is complete.

Resuming: a run records its settings, the source folder among them, in DST/.prepare-progress.json. Run the
same command again after an interruption and it continues: PNG outputs already present are kept (they are written
atomically, so one that exists is whole); the .npy is filled in blocks and the progress file says how many blocks
are done. A DST belongs to one source: naming it with another SRC is refused rather than mixing the two.

Subsets take candidates in a seeded order (`harness.data.subset_order`) until N images have been read, so an
unreadable file is replaced by the next candidate; with no unreadable files the subset equals
`DataConfig(subset=N, subset_seed=S)` on the source folder. Rows are written in source order, the order in which
that DataConfig lists them (`names()`), so both give the same batches for a seed and the same first N reference
images for evaluation. The source is only ever read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from harness.data import IMAGE_SUFFIXES, PREPARE_PROGRESS, PREPARED_INDEX, list_images, subset_order
from harness.datasets import fit_square, load_rgb
from harness.errors import HarnessError
from harness.fileio import atomic_write_text

FORMATS = ("folder", "npy")
SORTING = "images.npy.sorting"  # the .npy rows being copied into source order
BLOCK = 512  # candidates per block: the unit of progress saving and of work handed to the process pool


@dataclasses.dataclass
class PrepareResult:
    dst: Path
    format: str
    resolution: int
    count: int  # images in the dataset
    converted: int  # images decoded and written by this run (the rest were already there)
    skipped: list[dict]  # {"file", "reason"} for every source file left out
    content_hash: str


def prepare_dataset(src: str | os.PathLike, dst: str | os.PathLike, resolution: int, center_crop: bool = False,
                    subset: int | None = None, seed: int = 0, fmt: str = "folder", workers: int = 1,
                    show_progress: bool = True) -> PrepareResult:
    src, dst = Path(src).expanduser().resolve(), Path(dst).expanduser().resolve()
    settings = _validate(src, dst, resolution, center_crop, subset, seed, fmt)
    if (dst / PREPARED_INDEX).is_file():
        index = json.loads((dst / PREPARED_INDEX).read_text())
        _check_source(dst, index, src)
        if {k: index.get(k) for k in settings} != settings:
            raise HarnessError(f"{dst} already holds a dataset prepared with other settings; choose another DST "
                               f"or delete {dst}")
        return PrepareResult(dst, fmt, resolution, index["count"], 0, index["skipped"], index["content_hash"])

    files = list_images(src)
    if not files:
        raise HarnessError(f"{src} has no images ({', '.join(IMAGE_SUFFIXES)}); "
                           f"point SRC at a folder of images")
    order = subset_order(len(files), seed) if subset is not None else list(range(len(files)))
    target = len(files) if subset is None else subset
    if target > len(files):
        raise HarnessError(f"--subset {subset} but {src} has only {len(files)} images; lower --subset")
    outputs = _output_names(files) if fmt == "folder" else None

    progress = _load_progress(dst, settings)
    rank = {name: i for i, name in enumerate(files)}
    if fmt == "npy":
        _adopt_sorted_rows(dst, progress, rank)
    array = _open_array(dst, target, resolution, resume=progress["position"] > 0) if fmt == "npy" else None
    converted = 0
    with _Progress(show_progress, total=target, done=len(progress["files"])) as bar, \
            _pool(workers) as pool:
        while len(progress["files"]) < target and progress["position"] < len(order):
            # Hand out only as many candidates as are still needed, so a subset run reads no extra images.
            need = min(BLOCK, target - len(progress["files"]))
            block = order[progress["position"]:progress["position"] + need]
            jobs = [(src / files[i], None if outputs is None else dst / "images" / outputs[i], resolution,
                     center_crop) for i in block]
            for i, (status, payload) in zip(block, pool.map(_convert, jobs, chunksize=8)):
                if status == "skipped":
                    progress["skipped"].append({"file": files[i], "reason": payload})
                    continue
                converted += status == "converted"
                if array is not None:
                    array[len(progress["files"])] = payload
                progress["files"].append(files[i])
                bar.advance()
            progress["position"] += len(block)
            if array is not None:
                array.flush()
            _save_progress(dst, progress)  # only after the block's outputs are on disk

    count = len(progress["files"])
    if count == 0 or (subset is not None and count < subset):
        skipped = progress["skipped"]
        reasons = "; ".join(f"{s['file']}: {s['reason']}" for s in skipped[:3])
        wanted = f" of the {subset} asked for by --subset" if subset is not None else ""
        raise HarnessError(f"only {count} images{wanted} could be prepared from {src}: {len(skipped)} were skipped "
                           f"(e.g. {reasons}); fix those (non-square ones need --center-crop) or lower --subset")
    if fmt == "folder":
        progress["files"].sort(key=lambda name: _source_rank(rank, name))
        output_of = dict(zip(files, outputs))
        chosen = [output_of[name] for name in progress["files"]]
        digest = _hash_files(dst / "images", chosen)
    else:
        array = _sort_rows(dst, array, progress, rank)
        chosen = None
        digest = _hash_array(array, count, progress["files"])
        del array
        os.replace(dst / "images.npy.partial", dst / "images.npy")
    index = {**settings, "count": count, "files": progress["files"],
             "skipped": progress["skipped"], "content_hash": digest}
    if chosen is not None:
        index["outputs"] = chosen
    atomic_write_text(dst / PREPARED_INDEX, json.dumps(index, indent=1) + "\n")
    (dst / PREPARE_PROGRESS).unlink()
    return PrepareResult(dst, fmt, resolution, count, converted, progress["skipped"], digest)


# ---------------------------------------------------------------------------------------------- one image
def _convert(job: tuple[Path, Path | None, int, bool]) -> tuple[str, object]:
    """Convert one file: ('converted' | 'kept', pixels or None) or ('skipped', reason). Runs in pool workers."""
    path, out, resolution, center_crop = job
    if out is not None and out.exists():
        return "kept", None
    try:
        image = load_rgb(path)
    except HarnessError as err:  # load_rgb chains the decoder's own error, which is the useful reason
        cause = err.__cause__ or err
        return "skipped", f"{type(cause).__name__}: {cause}"
    if not center_crop and image.width != image.height:
        return "skipped", f"not square ({image.width}x{image.height}); pass --center-crop"
    image = fit_square(image, resolution)
    if out is None:
        return "converted", np.asarray(image, dtype=np.uint8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, out)  # atomic: an output that exists is complete
    return "converted", None


def _output_names(files: list[str]) -> list[str]:
    """Output paths under images/: the source path with suffix .png; the full name when two stems collide."""
    stems = [str(Path(f).with_suffix(".png")) for f in files]
    seen: dict[str, int] = {}
    for stem in stems:
        seen[stem] = seen.get(stem, 0) + 1
    return [stem if seen[stem] == 1 else f"{f}.png" for f, stem in zip(files, stems)]


# ---------------------------------------------------------------------------------------------- bookkeeping
def _validate(src: Path, dst: Path, resolution: int, center_crop: bool, subset: int | None, seed: int,
              fmt: str) -> dict:
    if not src.is_dir():
        raise HarnessError(f"source folder {src} does not exist or is not a folder")
    if dst == src or src in dst.parents:
        raise HarnessError(f"DST {dst} is inside SRC {src}; the source is never modified, pick a DST outside it")
    if dst in src.parents:
        raise HarnessError(f"SRC {src} is inside DST {dst}; pick a DST that does not contain the source")
    if fmt not in FORMATS:
        raise HarnessError(f"--format {fmt!r} is not known; use one of {FORMATS}")
    if resolution < 8:
        raise HarnessError(f"--resolution {resolution} is too small; use 8 pixels or more")
    if subset is not None and subset < 1:
        raise HarnessError(f"--subset {subset} must be a positive number of images")
    # The source is a setting: resuming or reusing a DST from another folder would mix or misreport its images.
    # It is the resolved path, as dataset.json has always recorded it, so finished datasets still match.
    return {"source": str(src), "format": fmt, "resolution": resolution, "center_crop": center_crop, "subset": subset,
            "seed": seed if subset is not None else None}


def _load_progress(dst: Path, settings: dict) -> dict:
    path = dst / PREPARE_PROGRESS
    if path.is_file():
        progress = json.loads(path.read_text())
        if "source" not in progress["settings"]:  # started by a version that did not record it: adopt this one
            progress["settings"] = {"source": settings["source"], **progress["settings"]}
        _check_source(dst, progress["settings"], Path(settings["source"]))
        if progress["settings"] != settings:
            raise HarnessError(f"{dst} holds an unfinished `harness prepare` run with other settings "
                               f"({progress['settings']}); repeat that command, or choose another DST")
        return progress
    if dst.exists() and any(dst.iterdir()):
        raise HarnessError(f"DST {dst} exists and is not empty; choose a new folder (prepare never overwrites)")
    dst.mkdir(parents=True, exist_ok=True)
    progress = {"settings": settings, "position": 0, "files": [], "skipped": []}
    _save_progress(dst, progress)
    return progress


def _check_source(dst: Path, recorded: dict, src: Path) -> None:
    """Refuse a DST whose dataset or unfinished run (`recorded` settings) came from a folder other than `src`."""
    if recorded.get("source") != str(src):
        raise HarnessError(f"{dst} holds images prepared from {recorded.get('source') or 'an unrecorded source'}, "
                           f"not {src}; choose another DST or delete {dst}")


def _save_progress(dst: Path, progress: dict) -> None:
    atomic_write_text(dst / PREPARE_PROGRESS, json.dumps(progress) + "\n")


def _open_array(dst: Path, rows: int, resolution: int, resume: bool) -> np.memmap:
    """The .npy being filled; rows of skipped candidates are never allocated, so the tail may stay unused."""
    path = dst / "images.npy.partial"
    if resume:
        if not path.exists() and (dst / "images.npy").is_file():
            # A crash after the final rename but before dataset.json: the array is whole, so take it back and
            # let this run finish (hash, rename, index) as usual. Without dataset.json nothing reads it meanwhile.
            os.replace(dst / "images.npy", path)
        return np.load(path, mmap_mode="r+")
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(rows, resolution, resolution, 3))


def _source_rank(rank: dict[str, int], name: str) -> int:
    return rank.get(name, len(rank))  # a file gone from the source since (never expected) sorts last


def _in_source_order(names: list[str], rank: dict[str, int]) -> bool:
    keys = [_source_rank(rank, name) for name in names]
    return keys == sorted(keys)


def _sort_rows(dst: Path, array: np.memmap, progress: dict, rank: dict[str, int]) -> np.memmap:
    """The .npy rows (written in the subset's seeded order) copied into source order, block by block.

    The copy goes to images.npy.sorting; the progress file takes the new order once the copy is whole, and only
    then does the copy replace the partial array. A run stopped in between finishes it (`_adopt_sorted_rows`).
    """
    order = sorted(range(len(progress["files"])), key=lambda row: _source_rank(rank, progress["files"][row]))
    if order == list(range(len(order))):
        return array
    copy = np.lib.format.open_memmap(dst / SORTING, mode="w+", dtype=np.uint8, shape=array.shape)
    for start in range(0, len(order), BLOCK):
        copy[start:start + BLOCK] = array[order[start:start + BLOCK]]
    copy.flush()
    del copy, array
    progress["files"] = [progress["files"][row] for row in order]
    _save_progress(dst, progress)
    os.replace(dst / SORTING, dst / "images.npy.partial")
    return np.load(dst / "images.npy.partial", mmap_mode="r+")


def _adopt_sorted_rows(dst: Path, progress: dict, rank: dict[str, int]) -> None:
    """Finish a sort that stopped after the progress file took the sorted order but before the copy replaced the
    partial array; a copy left by a sort stopped earlier (progress still in the seeded order) is discarded."""
    copy = dst / SORTING
    if not copy.exists():
        return
    if progress["files"] and _in_source_order(progress["files"], rank):
        os.replace(copy, dst / "images.npy.partial")
    else:
        copy.unlink()


def _hash_files(folder: Path, names: list[str]) -> str:
    digest = hashlib.sha256()
    for name in names:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes())
    return digest.hexdigest()[:16]


def _hash_array(array: np.ndarray, count: int, names: list[str]) -> str:
    digest = hashlib.sha256("\n".join(names).encode())
    for start in range(0, count, BLOCK):
        digest.update(np.ascontiguousarray(array[start:min(start + BLOCK, count)]).tobytes())
    return digest.hexdigest()[:16]


class _Progress:
    """A rich progress bar, or nothing when `enabled` is False (tests, non-interactive use)."""

    def __init__(self, enabled: bool, total: int, done: int):
        self.enabled, self.total, self.done = enabled, total, done

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.progress import Progress
            self._bar = Progress(transient=False)
            self._bar.start()
            self._task = self._bar.add_task("preparing", total=self.total, completed=self.done)
        return self

    def advance(self) -> None:
        if self.enabled:
            self._bar.advance(self._task)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.stop()


class _InlinePool:
    def map(self, fn, jobs, chunksize=1):
        return map(fn, jobs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _pool(workers: int):
    return ProcessPoolExecutor(workers) if workers > 1 else _InlinePool()
