"""Latent space, optionally: train on the latents of a diffusers `AutoencoderKL` instead of on pixels.

`DataConfig.latent = @LatentConfig()` (plain data, no torch: planning stays cheap) names a VAE folder on local
disk, one that `AutoencoderKL.from_pretrained(folder, local_files_only=True)` loads: `config.json` beside
`diffusion_pytorch_model.safetensors` (or `.bin`), such as `stabilityai/sd-vae-ft-ema` downloaded once by the
user. Nothing is downloaded at run time. What changes with it:

- Training: the trainer's dataset holds the dataset's latents, `(posterior mean - shift_factor) * scaling_factor`
  (the VAE config's factors unless `LatentConfig.scaling_factor` is set; 0.18215 and no shift for SD's VAE),
  encoded once per (dataset content, VAE weights and config, factors) and cached as
  `<harness cache>/latents/<key>.npy`, then memory-mapped. The posterior mean, not a sample: the cache is then
  a function of the images alone (no seed), and the SD VAE's posterior std is small next to the latents' spread;
  DiT draws a new sample at every step instead, fast-DiT one sample when it caches. Encoding is preprocessing
  (as `harness prepare`): it is not on the stage's training or evaluation clock.
- The backbone sees latents: `in_chans` = the VAE's `latent_channels` and `img_size` = resolution / the VAE's
  downsampling factor (2 ** (levels - 1): 8 for SD's VAE), which `Stage.__post_init__` checks.
- `DataConfig.hflip` must be False: the trainer mirrors its batch, and a mirrored latent is not the latent of
  the mirrored image.
- Sampling draws latents; `decoder_for` decodes them to images in [-1, 1] before the sample grid and before the
  PNGs that FID scores (on every rank that samples). In latent space the sampler does not clip x0 to [-1, 1]
  (latents are not bounded there); the decoded images are clamped instead. FID's reference images stay the
  dataset's real images at full resolution.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import gin
from harness.errors import HarnessError
from harness.fileio import exclusive_lock, sha256_file
from harness.inception import cache_dir

if TYPE_CHECKING:  # torch and numpy only where latents are computed: a LatentConfig in a plan needs neither
    import numpy as np
    import torch

log = logging.getLogger(__name__)

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # what from_pretrained loads
DEFAULT_SCALING = 0.18215  # diffusers' AutoencoderKL default (SD's VAE), for configs that do not state one
CACHE_VERSION = 1  # part of every latent cache key: bump when the encoding changes
HOW_TO_GET = ("a folder holding the VAE's config.json and diffusion_pytorch_model.safetensors, e.g. "
              "stabilityai/sd-vae-ft-ema downloaded once (`hf download stabilityai/sd-vae-ft-ema config.json "
              "diffusion_pytorch_model.safetensors --local-dir vae/sd-vae-ft-ema`); docs/usage/data.md, "
              "'Latent space'")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class LatentConfig:
    """Train in the latent space of the `AutoencoderKL` saved under `vae_path` (see the module's docstring)."""

    vae_path: str = ""
    scaling_factor: float | None = None  # None: the VAE config's `scaling_factor` (0.18215 for SD's VAE)
    batch_size: int = 32  # images per VAE call, encoding and decoding (memory only: the latents do not change)

    def __post_init__(self) -> None:
        from harness.config import check_field_types  # here: config registers the modules that import this one

        check_field_types(self, "LatentConfig")
        if not self.vae_path:
            raise HarnessError(f"LatentConfig.vae_path is not set; point it at {HOW_TO_GET}")
        if self.scaling_factor is not None and self.scaling_factor <= 0:
            raise HarnessError(f"LatentConfig.scaling_factor = {self.scaling_factor} must be positive (or None: "
                               "the VAE config's)")
        if self.batch_size < 1:
            raise HarnessError(f"LatentConfig.batch_size must be at least 1, got {self.batch_size}")

    # -- the VAE folder (no torch) -----------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.vae_path).expanduser()

    def vae_config(self) -> dict[str, Any]:
        """The VAE's config.json; HarnessError when the folder is not a saved AutoencoderKL."""
        path = self.path
        if not path.is_dir():
            raise HarnessError(f"VAE folder {path} does not exist (cwd {Path.cwd()}); set LatentConfig.vae_path "
                               f"to {HOW_TO_GET}")
        hint = f"set LatentConfig.vae_path to {HOW_TO_GET}"
        if not (path / "config.json").is_file():
            if (path / "vae" / "config.json").is_file():  # a whole pipeline folder: its VAE is a subfolder
                hint = f"it looks like a pipeline folder: set LatentConfig.vae_path = '{path / 'vae'}'"
            raise HarnessError(f"VAE folder {path} has no config.json; {hint}")
        try:
            config = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as err:
            raise HarnessError(f"{path / 'config.json'} is unreadable ({err}); {hint}") from err
        kind = config.get("_class_name") if isinstance(config, dict) else None
        if kind != "AutoencoderKL" or not isinstance(config.get("block_out_channels"), list):
            raise HarnessError(f"{path} holds a {kind or 'config'} that is not a diffusers AutoencoderKL; {hint}")
        if self.weights_file() is None:
            raise HarnessError(f"VAE folder {path} has config.json but no weights ({' or '.join(WEIGHT_FILES)}); "
                               f"{hint}")
        return config

    def weights_file(self) -> Path | None:
        return next((self.path / name for name in WEIGHT_FILES if (self.path / name).is_file()), None)

    def check(self) -> None:
        """Fail before anything trains when the VAE or diffusers is missing (cheap: nothing is loaded)."""
        self.vae_config()
        if importlib.util.find_spec("diffusers") is None:
            raise HarnessError("latent space needs diffusers, which is not installed: "
                               "`pip install -e '.[latent]'` in the checkout (or `pip install 'diffusers>=0.30'`)")

    @property
    def channels(self) -> int:
        """The VAE's latent channels: the backbone's in_chans."""
        return int(self.vae_config().get("latent_channels", 4))

    @property
    def factor(self) -> int:
        """How much smaller the latent grid is than the image (diffusers' `vae_scale_factor`)."""
        return 2 ** (len(self.vae_config()["block_out_channels"]) - 1)

    @property
    def scale(self) -> float:
        return float(self.scaling_factor if self.scaling_factor is not None
                     else self.vae_config().get("scaling_factor") or DEFAULT_SCALING)

    @property
    def shift(self) -> float:
        """The VAE config's `shift_factor` (SD3 and FLUX VAEs; none, so 0, for SD's)."""
        return float(self.vae_config().get("shift_factor") or 0.0)

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        """(channels, height, width) of the latents of resolution x resolution images."""
        if resolution % self.factor:
            raise HarnessError(f"DataConfig.resolution = {resolution} is not a multiple of the VAE's downsampling "
                               f"factor {self.factor} ({self.path}); use a multiple of {self.factor}")
        return self.channels, resolution // self.factor, resolution // self.factor

    def check_backbone(self, resolution: int, model: Any) -> None:
        """The backbone must take the latents of `resolution` px images. Skipped when the VAE is not readable
        here (a plan made away from the data): `DataConfig.check()` then refuses to train, saying why."""
        try:
            self.vae_config()
        except HarnessError:
            return
        channels, size, _ = self.latent_shape(resolution)
        backbone = type(model).__name__
        if (model.img_size, model.in_chans) != (size, channels):
            raise HarnessError(f"DataConfig.latent trains on the VAE's {channels} x {size} x {size} latents of "
                               f"{resolution} px images, but {backbone}.img_size = {model.img_size} and in_chans = "
                               f"{model.in_chans}; set {backbone}.img_size = {size} and {backbone}.in_chans = "
                               f"{channels}")

    def identity(self) -> str:
        """A short hash of the VAE: its config.json and its weights' content (a copy elsewhere is the same VAE)."""
        weights = self.weights_file()
        if weights is None:
            self.vae_config()  # raises, saying what is missing
        stat = weights.stat()
        blob = (self.path / "config.json").read_bytes() + _content_hash(str(weights.resolve()), stat.st_size,
                                                                         stat.st_mtime_ns).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _content_hash(path: str, size: int, mtime_ns: int) -> str:  # (size, mtime: a rewritten file is hashed again)
    return sha256_file(path)


# ------------------------------------------------------------------------------------------------ the VAE itself
@functools.lru_cache(maxsize=4)
def _load(path: str, identity: str, device: str):
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise HarnessError("latent space needs diffusers: `pip install -e '.[latent]'` in the checkout (or "
                           "`pip install 'diffusers>=0.30'`)") from err
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise HarnessError(f"cannot load the VAE in {path} as a diffusers AutoencoderKL ({first}); set "
                           f"LatentConfig.vae_path to {HOW_TO_GET}") from err
    return vae.eval().requires_grad_(False).to(device)


def load_vae(cfg: LatentConfig, device: torch.device | str = "cpu"):
    """The AutoencoderKL in `cfg.vae_path` (float32, eval mode, frozen) on `device`; loaded once per process."""
    import torch

    cfg.vae_config()  # the one-line errors for a missing or wrong folder, before diffusers says it its way
    return _load(str(cfg.path.resolve()), cfg.identity(), str(torch.device(device)))


def _encode_batch(vae, images: torch.Tensor) -> torch.Tensor:
    """The posterior means of images [B, 3, H, W] in [-1, 1] (unscaled). Its own function: the tests count calls."""
    return vae.encode(images).latent_dist.mean


def cache_path(dataset_id: str, cfg: LatentConfig) -> Path:
    """Where the latents of the dataset with content id `dataset_id` under `cfg` are cached."""
    key = f"{dataset_id}|{cfg.identity()}|{cfg.scale!r}|{cfg.shift!r}|v{CACHE_VERSION}"
    return cache_dir() / "latents" / f"{dataset_id[:16]}_{hashlib.sha256(key.encode()).hexdigest()[:16]}.npy"


def encode_dataset(dataset, cfg: LatentConfig, device: torch.device | str = "cpu") -> np.ndarray:
    """The latents of every image of `dataset` (an ImageDataset, `DataConfig.build()`), float32 [N, C, h, w],
    scaled: `(mean - shift) * scale`. Encoded once per dataset content, VAE and factors, then read from the cache
    (memory-mapped, read-only); processes that need it at once (the ranks of a job) wait while one encodes."""
    path = cache_path(dataset.config.content_id(), cfg)
    shape = (len(dataset), *cfg.latent_shape(dataset.resolution))
    with exclusive_lock(path.with_name(path.name + ".lock"), f"waiting for another process encoding {path}"):
        latents = _read_cache(path, shape)
        if latents is None:
            latents = _encode_into(dataset, cfg, device, path, shape)
    return latents


def _read_cache(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    import numpy as np

    if not path.is_file():
        return None
    try:
        latents = np.load(path, mmap_mode="r")  # (never pickles: allow_pickle is off)
    except (OSError, ValueError) as err:
        log.warning("latent cache %s is unreadable (%s); encoding again", path, err)
        return None
    if latents.shape != shape or latents.dtype != np.float32:
        log.warning("latent cache %s holds %s %s, not float32 %s; encoding again", path, latents.dtype,
                    list(latents.shape), list(shape))
        return None
    return latents


def _encode_into(dataset, cfg: LatentConfig, device, path: Path, shape: tuple[int, ...]) -> np.ndarray:
    import numpy as np
    import torch

    vae, scale, shift = load_vae(cfg, device), cfg.scale, cfg.shift
    log.warning("encoding the %d images of the dataset with the VAE in %s (once: cached as %s)", shape[0],
                cfg.path, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        with torch.inference_mode():
            for start in range(0, shape[0], cfg.batch_size):
                stop = min(start + cfg.batch_size, shape[0])
                images = dataset.get_batch(list(range(start, stop)), device=device)
                latents = (_encode_batch(vae, images).float() - shift) * scale
                out[start:stop] = latents.cpu().numpy()
        out.flush()
        del out
        os.replace(tmp, path)  # complete or absent: a crash mid-encoding leaves no cache entry
    finally:
        Path(tmp).unlink(missing_ok=True)
    return np.load(path, mmap_mode="r")


def decode(latents: torch.Tensor, cfg: LatentConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Images in [-1, 1], [B, 3, H, W] float32 on the latents' device, of scaled latents [B, C, h, w], decoded
    `cfg.batch_size` at a time (on `device`, default the latents' own)."""
    import torch

    device = latents.device if device is None else torch.device(device)
    vae, scale, shift = load_vae(cfg, device), cfg.scale, cfg.shift
    out = []
    with torch.inference_mode():
        for chunk in latents.split(cfg.batch_size):
            images = vae.decode(chunk.to(device).float() / scale + shift).sample
            out.append(images.float().clamp(-1, 1).to(latents.device))
    if not out:  # (no latents: no images)
        return latents.new_zeros((0, 3, latents.shape[-2] * cfg.factor, latents.shape[-1] * cfg.factor))
    return torch.cat(out)


def decoder_for(data_cfg: Any, device: torch.device | str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """What the samplers decode their samples with: None for pixel data, else latents -> images in [-1, 1]."""
    cfg = getattr(data_cfg, "latent", None)
    if cfg is None:
        return None
    return functools.partial(decode, cfg=cfg, device=device)


class LatentImages:
    """What the trainer draws batches from in latent space: the cached latents of a dataset's images, in its order.
    `get_batch` has ImageDataset's contract, with latents [B, C, h, w] for images."""

    def __init__(self, images, latents: np.ndarray) -> None:
        self.images, self.latents = images, latents
        self.config, self.names = images.config, images.names

    @classmethod
    def encode(cls, images, cfg: LatentConfig, device: torch.device | str) -> LatentImages:
        return cls(images, encode_dataset(images, cfg, device))

    def __len__(self) -> int:
        return len(self.latents)

    def get_batch(self, indices, device: torch.device | str | None = None) -> torch.Tensor:
        import numpy as np
        import torch

        from harness.datasets import to_device

        indices = np.asarray(indices.tolist() if torch.is_tensor(indices) else indices, dtype=np.int64)
        batch = torch.from_numpy(np.ascontiguousarray(self.latents[indices]))
        return batch if device is None else to_device(batch, device)

    def write_manifest(self, path: str | os.PathLike) -> None:
        self.images.write_manifest(path)
