"""The torch Datasets that `DataConfig.build()` returns, and the image helpers they use (decoding, cropping,
moving batches to a device, exporting PNG folders).

Kept apart from harness/data.py, whose `DataConfig` must stay importable without torch or PIL: recipes
are parsed and stages planned (`harness run --dry-run`) without them.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, ImageOps

from harness.errors import HarnessError


class DataSpec(Protocol):
    """What the datasets use of their spec, `harness.data.DataConfig`. That module builds the datasets from this
    one (`DataConfig.build()`), so this one does not import it, not even for type checking."""

    resolution: int
    center_crop: bool

    def write_manifest(self, path: str | os.PathLike) -> None: ...

    def build(self) -> ImageDataset: ...


# ---------------------------------------------------------------------------------------------- datasets
@functools.lru_cache(maxsize=None)
def _pixel_table(device: str) -> torch.Tensor:
    # computed on the CPU whatever the device: CUDA divides by a scalar through its reciprocal, which can change
    # the last bit, and a batch must hold the same values on every device
    return torch.arange(256, dtype=torch.uint8).float().div_(127.5).sub_(1.0).to(device)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """`tensor` (on the CPU) on `device`. To a GPU through pinned memory without blocking: a copy from ordinary
    memory makes the host wait for the device (cudaStreamSynchronize) at every step."""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)  # torch keeps the pinned buffer until the copy ends


def pixel_values(device: torch.device | str) -> torch.Tensor:
    """float32 [256]: the value in [-1, 1] of each uint8 pixel value (v / 127.5 - 1), on `device`."""
    return _pixel_table(str(torch.device(device)))


class ImageDataset(torch.utils.data.Dataset):
    """Images as float32 [C, H, W] in [-1, 1]. Subclasses supply `uint8_batch` (uint8 [B, H, W, 3])."""

    def __init__(self, config: DataSpec, names: list[str]):
        self.config = config
        self.names = names  # file paths relative to the root, or `shapes/000123` for embedded images
        self.resolution = config.resolution
        self.channels = 3

    def __len__(self) -> int:
        return len(self.names)

    def uint8_batch(self, indices) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.get_batch([index])[0]

    def get_batch(self, indices, device: torch.device | str | None = None) -> torch.Tensor:
        """Images `indices` as float32 [B, C, H, W] in [-1, 1], on `device` (default: CPU), never mirrored."""
        indices = [int(i) for i in (indices.tolist() if torch.is_tensor(indices) else indices)]
        pixels = torch.from_numpy(self.uint8_batch(indices))
        if device is not None:
            pixels = to_device(pixels, device)  # the bytes travel: a quarter of the float32 batch
        return pixel_values(pixels.device)[pixels.int()].permute(0, 3, 1, 2).contiguous()

    def write_manifest(self, path: str | os.PathLike) -> None:
        self.config.write_manifest(path)


class ArrayImages(ImageDataset):
    """Images held in one uint8 [N, H, W, 3] array: generated in memory, or a memory-mapped prepared .npy."""

    def __init__(self, config: DataSpec, array: np.ndarray, names: list[str], rows: list[int]):
        super().__init__(config, names)
        self.array = array
        self.rows = np.asarray(rows, dtype=np.int64)

    def uint8_batch(self, indices) -> np.ndarray:
        return np.ascontiguousarray(self.array[self.rows[indices]])


class FolderImages(ImageDataset):
    """Image files decoded on demand (and resized/cropped when `center_crop`)."""

    def __init__(self, config: DataSpec, root: Path, names: list[str]):
        super().__init__(config, names)
        self.root = root

    def uint8_batch(self, indices) -> np.ndarray:
        return np.stack([self._load(self.names[i]) for i in indices])

    def _load(self, name: str) -> np.ndarray:
        path = self.root / name
        image = load_rgb(path)
        if self.config.center_crop:
            image = fit_square(image, self.resolution)
        elif image.size != (self.resolution, self.resolution):
            raise _size_error(path, image.size, self.resolution)
        return np.asarray(image, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------- images
def load_rgb(path: Path) -> Image.Image:
    """Decode an image as RGB (EXIF rotation applied); a HarnessError names the file when it cannot be read."""
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise HarnessError(f"cannot read image {path} ({err}); delete or replace it, or run "
                           f"`harness prepare SRC DST --resolution N`, which skips and lists unreadable files") from err


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """Crop the centre square (side = the shorter side), then resize it to resolution x resolution."""
    width, height = image.size
    side = min(width, height)
    if (width, height) != (side, side):
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:  # Lanczos filters when shrinking, so downsampled images do not alias
        image = image.resize((resolution, resolution), Image.LANCZOS)
    return image


def _size_error(path: Path, size: tuple[int, int], resolution: int) -> HarnessError:
    return HarnessError(f"image {path} is {size[0]}x{size[1]} but DataConfig.resolution={resolution} and "
                        f"center_crop is off; set DataConfig.center_crop=True or run `harness prepare SRC DST "
                        f"--resolution {resolution} --center-crop`")


def check_headers(root: Path, names: list[str], resolution: int, exact_size: bool) -> None:
    """Every file must open as an image (headers only) and, with `exact_size`, be resolution x resolution."""
    for name in names:
        path = root / name
        try:
            with Image.open(path) as image:
                size = image.size
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # a huge image: PIL's bomb guard
            raise HarnessError(f"cannot read image {path} ({err}); delete or replace it, or run "
                               f"`harness prepare SRC DST --resolution {resolution}`, which skips unreadable "
                               "files") from err
        if exact_size and size != (resolution, resolution):
            raise _size_error(path, size, resolution)


# ---------------------------------------------------------------------------------------------- export
def write_png_folder(dataset: ImageDataset | DataSpec, folder: str | os.PathLike, limit: int | None = None,
                     batch_size: int = 256) -> int:
    """Write the first `limit` images (all by default) as `000000.png`, ... into `folder`; returns the count.

    Pixels are the dataset's own uint8 values (no flip, no float round trip), so reference statistics computed
    from these files match the training images exactly.
    """
    if not isinstance(dataset, ImageDataset):  # a DataConfig
        dataset = dataset.build()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    count = len(dataset) if limit is None else min(limit, len(dataset))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        for offset, pixels in enumerate(dataset.uint8_batch(list(range(start, stop)))):
            Image.fromarray(pixels).save(folder / f"{start + offset:06d}.png")
    return count
