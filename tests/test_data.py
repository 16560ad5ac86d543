"""Datasets: embedded generators, image folders, subsets, content ids, errors, PNG export and the gin files."""
from __future__ import annotations

import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gin
from harness import embedded
from harness.data import DataConfig, choose_subset, list_images
from harness.datasets import write_png_folder
from harness.errors import HarnessError

GIN_DATA = Path(__file__).resolve().parent.parent / "gin" / "data"


def save(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    options = {"lossless": True} if path.suffix == ".webp" else {}
    Image.fromarray(pixels.astype(np.uint8)).save(path, **options)
    return path


def solid(h: int, w: int, rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (h, w, 3)).copy()


def random_folder(root: Path, n: int, size: int = 16, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        save(root / f"img{i:02d}.png", rng.integers(0, 256, (size, size, 3)))
    return root


# ---------------------------------------------------------------------------------------------- embedded
@pytest.mark.parametrize("source", ["shapes", "faces"])
def test_embedded_items_shape_range_and_structure(source):
    data = DataConfig(source=source, resolution=32, num_images=64).build()
    assert len(data) == 64
    item = data[3]
    assert item.shape == (3, 32, 32) and item.dtype == torch.float32
    batch = data.get_batch(range(64))
    assert batch.min() >= -1.0 and batch.max() <= 1.0
    assert batch.min() < -0.6 and batch.max() > 0.6  # uses the range, not a grey blur
    # Real structure, not noise: neighbouring pixels are far closer than random pairs of pixels.
    neighbour = (batch[..., 1:] - batch[..., :-1]).abs().mean()
    shuffled = batch.flatten()[torch.randperm(batch.numel(), generator=torch.Generator().manual_seed(0))]
    random_pairs = (batch.flatten() - shuffled).abs().mean()
    assert neighbour < 0.25 * random_pairs
    # Images differ from one another.
    assert (batch[0] - batch[1]).abs().mean() > 0.05


@pytest.mark.parametrize("source", ["shapes", "faces"])
def test_embedded_generator_is_deterministic_and_prefix_stable(source):
    a = DataConfig(source=source, num_images=1100, seed=7).build()
    embedded.generate.cache_clear()  # drawn again, not handed back from memory
    b = DataConfig(source=source, num_images=1100, seed=7).build()
    assert torch.equal(a.get_batch(range(1100)), b.get_batch(range(1100)))
    # Images do not depend on how many were asked for (they are drawn in seeded chunks).
    small = DataConfig(source=source, num_images=5, seed=7).build()
    assert torch.equal(small.get_batch(range(5)), a.get_batch(range(5)))
    bigger = DataConfig(source=source, num_images=1051, seed=7).build()
    assert torch.equal(a.get_batch([1050]), bigger.get_batch([1050]))
    other = DataConfig(source=source, num_images=5, seed=8).build()
    assert (other.get_batch(range(5)) - small.get_batch(range(5))).abs().mean() > 0.05


def test_embedded_images_are_drawn_once_per_process_and_read_only():
    embedded.generate.cache_clear()
    first = embedded.generate("faces", 8, 16, 3)
    assert embedded.generate("faces", 8, 16, 3) is first and embedded.generate.cache_info().hits == 1
    with pytest.raises(ValueError):  # a caller cannot change what the next build gets
        first[0, 0, 0, 0] = 1
    assert embedded.generate("faces", 8, 16, 4) is not first


def test_embedded_resolutions():
    for resolution in (16, 64):
        assert DataConfig(source="faces", resolution=resolution, num_images=3).build()[0].shape == \
            (3, resolution, resolution)


# ---------------------------------------------------------------------------------------------- flips
def test_the_dataset_never_flips_the_trainer_does():
    """hflip is the trainer's (its own seeded draw); get_batch and __getitem__ return the images as they are."""
    data = DataConfig(num_images=32, hflip=True).build()
    plain = data.get_batch(range(32))
    assert torch.equal(plain, DataConfig(num_images=32, hflip=False).build().get_batch(range(32)))
    assert torch.equal(data[5], plain[5])
    with pytest.raises(TypeError):
        data.get_batch(range(32), flip=True)  # the old flip path is gone, not silently ignored


# ---------------------------------------------------------------------------------------------- subsets
def test_pixel_values_are_exact_and_the_same_on_every_device():
    """uint8 v -> v / 127.5 - 1 in float32, correctly rounded (numpy's IEEE division), from one table that is
    computed on the CPU and looked up wherever the batch lives (CUDA's scalar division may differ in the last
    bit)."""
    from harness.datasets import pixel_values

    exact = np.arange(256, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)
    assert np.array_equal(pixel_values("cpu").numpy(), exact)
    data = DataConfig(source="faces", resolution=16, num_images=8).build()
    batch = data.get_batch(range(8))
    raw = torch.from_numpy(data.uint8_batch(list(range(8)))).permute(0, 3, 1, 2)
    assert batch.dtype == torch.float32 and batch.is_contiguous() and batch.shape == (8, 3, 16, 16)
    assert torch.equal(batch, torch.from_numpy(exact)[raw.long()])
    assert torch.equal(data.get_batch(range(8), device="cpu"), batch)
    if torch.cuda.is_available():
        assert torch.equal(data.get_batch(range(8), device="cuda").cpu(), batch)


def test_subset_is_deterministic_and_recorded(tmp_path):
    full = DataConfig(num_images=200)
    a = DataConfig(num_images=200, subset=20, subset_seed=1)
    assert a.names() == DataConfig(num_images=200, subset=20, subset_seed=1).names()
    assert a.names() != DataConfig(num_images=200, subset=20, subset_seed=2).names()
    assert len(a.names()) == 20 and set(a.names()) <= set(full.names())
    built = a.build()
    positions = [int(name.split("/")[1]) for name in built.names]
    assert torch.equal(built.get_batch(range(20)), full.build().get_batch(positions))
    a.write_manifest(tmp_path / "manifest.json")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["files"] == built.names and manifest["count"] == 20
    assert manifest["content_id"] == a.content_id() and manifest["config"]["subset_seed"] == 1
    assert choose_subset(10, 10, 0) == list(range(10))


def test_subset_larger_than_dataset_is_an_error(tmp_path):
    random_folder(tmp_path / "d", 3)
    with pytest.raises(HarnessError, match="only 3 images"):
        DataConfig(source="folder", root=str(tmp_path / "d"), resolution=16, subset=4).build()


# ---------------------------------------------------------------------------------------------- folders
def test_folder_values_recursive_listing_and_crop(tmp_path):
    root = tmp_path / "imgs"
    save(root / "b" / "red.png", solid(8, 8, (255, 0, 0)))
    save(root / "a.JPG", solid(8, 8, (0, 0, 255)))
    # 12x8 image: 2 green columns on each side of a white 8x8 centre; the centre crop keeps only white.
    wide = solid(8, 12, (0, 255, 0))
    wide[:, 2:10] = 255
    save(root / "c" / "d" / "wide.webp", wide)
    (root / "notes.txt").write_text("not an image")
    assert list_images(root) == ["a.JPG", "b/red.png", "c/d/wide.webp"]

    data = DataConfig(source="folder", root=str(root), resolution=8, hflip=False).build()
    assert data.names == ["a.JPG", "b/red.png", "c/d/wide.webp"]
    red = data[1]
    assert red.shape == (3, 8, 8)
    assert torch.allclose(red[0], torch.ones(8, 8)) and torch.allclose(red[1:], -torch.ones(2, 8, 8))
    assert torch.allclose(data[2], torch.ones(3, 8, 8), atol=1e-6)  # green edges cropped away
    # Resizing the shorter side: a 16x16 red image becomes an 8x8 red one.
    save(root / "big.png", solid(16, 16, (255, 0, 0)))
    data = DataConfig(source="folder", root=str(root), resolution=8).build()
    assert torch.allclose(data[data.names.index("big.png")][0], torch.ones(8, 8))


def test_folder_errors_name_the_folder_or_file(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(HarnessError, match="nowhere.*does not exist.*harness prepare"):
        DataConfig(source="folder", root=str(missing)).check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(HarnessError, match="empty.*has no images.*harness prepare"):
        DataConfig(source="folder", root=str(tmp_path / "empty")).check()
    with pytest.raises(HarnessError, match="needs DataConfig.root"):
        DataConfig(source="folder")
    with pytest.raises(HarnessError, match="not known"):
        DataConfig(source="imagenet")

    corrupt = random_folder(tmp_path / "corrupt", 2)
    (corrupt / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(HarnessError, match="broken.png"):
        DataConfig(source="folder", root=str(corrupt), resolution=16).build()

    mixed = random_folder(tmp_path / "mixed", 2, size=16)
    save(mixed / "odd.png", solid(16, 20, (1, 2, 3)))
    with pytest.raises(HarnessError, match="odd.png is 20x16.*center_crop"):
        DataConfig(source="folder", root=str(mixed), resolution=16, center_crop=False).build()
    with pytest.raises(HarnessError, match="img00.png is 16x16.*resolution=8"):
        DataConfig(source="folder", root=str(random_folder(tmp_path / "ok", 2)), resolution=8,
                   center_crop=False).build()
    # With resizing on, mixed sizes are fine.
    assert len(DataConfig(source="folder", root=str(mixed), resolution=16).build()) == 3


def test_huge_image_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    """PIL refuses images over 2 x MAX_IMAGE_PIXELS on open (a decompression bomb): the header check of a raw
    folder and the decoder both turn that into a HarnessError naming the file, not a traceback."""
    from harness.datasets import load_rgb

    root = random_folder(tmp_path / "bomb", 2, size=16)  # 256 pixels each
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # the limit is 2 x 100 pixels
    for center_crop in (False, True):
        with pytest.raises(HarnessError, match=r"cannot read image .*img00\.png .*decompression bomb.*harness prep"):
            DataConfig(source="folder", root=str(root), resolution=16, center_crop=center_crop).build()
    with pytest.raises(HarnessError, match=r"cannot read image .*img01\.png .*decompression bomb"):
        load_rgb(root / "img01.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 256)  # back within the limit: no error, no warning
    assert len(DataConfig(source="folder", root=str(root), resolution=16, center_crop=False).build()) == 2


def test_unfinished_prepare_output_is_refused(tmp_path):
    random_folder(tmp_path / "half", 2)
    (tmp_path / "half" / ".prepare-progress.json").write_text("{}")
    with pytest.raises(HarnessError, match="never finished"):
        DataConfig(source="folder", root=str(tmp_path / "half")).check()


def test_content_id_tracks_files_and_settings(tmp_path):
    root = random_folder(tmp_path / "d", 3)
    cfg = DataConfig(source="folder", root=str(root), resolution=16)
    first = cfg.content_id()
    assert first == DataConfig(source="folder", root=str(root), resolution=16).content_id()
    assert first != DataConfig(source="folder", root=str(root), resolution=8).content_id()
    assert first != DataConfig(source="folder", root=str(root), resolution=16, subset=2).content_id()
    save(root / "img01.png", solid(16, 16, (9, 9, 9)))  # same name, new content
    second = cfg.content_id()
    assert second != first
    os.utime(root / "img02.png", ns=(1, 1))
    assert cfg.content_id() != second
    assert DataConfig(seed=1).content_id() != DataConfig(seed=2).content_id()
    assert DataConfig(source="faces").content_id() != DataConfig(source="shapes").content_id()
    assert DataConfig(seed=1).content_id() == DataConfig(seed=1, hflip=False).content_id()  # flips: training only


# ---------------------------------------------------------------------------------------------- export
def test_write_png_folder_round_trips_pixels(tmp_path):
    data = DataConfig(source="faces", num_images=10).build()
    assert write_png_folder(data, tmp_path / "png", limit=6) == 6
    files = sorted((tmp_path / "png").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(6)]
    for i, f in enumerate(files):
        pixels = torch.from_numpy(np.array(Image.open(f))).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(pixels, data[i], atol=1e-6)
    assert write_png_folder(DataConfig(num_images=4), tmp_path / "cfg") == 4


# ---------------------------------------------------------------------------------------------- gin files
@pytest.mark.parametrize("name,source,resolution,macro", [
    ("shapes32", "shapes", 32, None), ("faces32", "faces", 32, None),
    ("celebahq256", "folder", 256, "CELEBAHQ_ROOT"), ("celebahq256_3k", "folder", 256, "CELEBAHQ_ROOT"),
    ("celeba64", "folder", 64, "CELEBA_ROOT"), ("vggface2_256", "folder", 256, "VGGFACE2_ROOT")])
def test_gin_data_files(name, source, resolution, macro, tmp_path):
    gin.clear_config()
    gin.add_config_file_search_path(str(GIN_DATA.parent))
    try:
        gin.parse_config_files_and_bindings([str(GIN_DATA / f"{name}.gin")], [], finalize_config=False)
        cfg = DataConfig()
        assert (cfg.source, cfg.resolution) == (source, resolution)
        if macro is None:
            assert len(DataConfig(num_images=8).build()) == 8
            return
        assert cfg.root.startswith("data/")  # a relative default: dry-runs work without the data
        assert cfg.subset == (3000 if name.endswith("_3k") else None)
        with pytest.raises(HarnessError, match="harness prepare"):
            cfg.check()
        random_folder(tmp_path / "imgs", 2)
        gin.parse_config_files_and_bindings([], [f"{macro} = '{tmp_path / 'imgs'}'"], finalize_config=False)
        DataConfig().check()  # the macro reaches the root
    finally:
        gin.clear_config()
