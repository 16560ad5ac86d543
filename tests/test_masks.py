"""Masks: exact counts, actual fractions, shapes of the masked regions, validation, gin binding."""
from __future__ import annotations

import dataclasses
import importlib.util  # noqa: F401  (gin 0.5.0 needs it imported before parsing)
from pathlib import Path

import pytest
import torch

import gin
from harness.errors import HarnessError
from harness.masks import BlockMask, CropMask, NoMask, PatchMask, describe

GIN_MASKS = Path(__file__).resolve().parent.parent / "gin" / "masks"


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "mask, grid, masked, fraction",
    [
        (PatchMask(0.9), 16, 230, 230 / 256),  # int(0.9 * 256) = 230
        (PatchMask(0.5), 8, 32, 0.5),
        (PatchMask(0.29), 10, 29, 0.29),  # 0.29 * 100 is 28.999... in floating point: still 29
        (BlockMask(0.9, 4), 16, 224, 0.875),  # 230 // 16 = 14 blocks of 16 patches: the 87.5%
        (BlockMask(0.9, 2), 16, 228, 228 / 256),  # 230 // 4 = 57 blocks of 4
        (BlockMask(0.5, 4), 8, 32, 0.5),
        (BlockMask(0.1, 4), 8, 0, 0.0),  # 6 // 16 = 0 blocks: rounds to nothing
        (CropMask(11), 16, 135, 135 / 256),  # 121 visible
        (CropMask(8), 8, 0, 0.0),
        (NoMask(), 16, 0, 0.0),
    ],
)
def test_counts_and_actual_fraction(mask, grid, masked, fraction):
    assert mask.num_masked(grid) == masked
    assert mask.actual_ratio(grid) == pytest.approx(fraction)
    assert mask.num_visible(grid) == grid**2 - masked
    sample = mask.sample(6, grid, generator=gen())
    if isinstance(mask, NoMask):
        assert sample is None
        return
    assert sample.dtype == torch.bool and sample.shape == (6, grid * grid)
    assert sample.sum(dim=1).tolist() == [masked] * 6  # every row equal: the gather stays rectangular


def test_rows_differ_and_generator_makes_it_reproducible():
    for mask in (PatchMask(0.5), BlockMask(0.5, 2), CropMask(4)):
        a = mask.sample(16, 8, generator=gen(1))
        b = mask.sample(16, 8, generator=gen(1))
        c = mask.sample(16, 8, generator=gen(2))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
        assert len({tuple(row.tolist()) for row in a}) > 1, f"{mask.name}: all rows identical"


def test_patch_mask_is_uniform_over_patches():
    masks = PatchMask(0.25).sample(4000, 4, generator=gen(3)).float()
    freq = masks.mean(dim=0)  # each of the 16 patches should be masked about 25% of the time
    assert torch.all((freq - 0.25).abs() < 0.03), freq


def test_block_mask_masks_whole_aligned_blocks():
    grid, b = 16, 4
    masks = BlockMask(0.6, b).sample(32, grid, generator=gen(4))
    blocks = masks.view(32, grid // b, b, grid // b, b)
    # inside every b x b block all patches agree
    assert torch.all(blocks.all(dim=(2, 4)) == blocks.any(dim=(2, 4)))
    assert blocks.all(dim=(2, 4)).sum(dim=(1, 2)).tolist() == [int(0.6 * 256) // 16] * 32


def test_crop_mask_keeps_one_contiguous_square_anywhere():
    grid, c = 8, 3
    masks = CropMask(c).sample(400, grid, generator=gen(5)).view(400, grid, grid)
    corners = set()
    for visible in ~masks:
        rows = visible.any(dim=1).nonzero().flatten()
        cols = visible.any(dim=0).nonzero().flatten()
        top, left = int(rows[0]), int(cols[0])
        assert rows.tolist() == list(range(top, top + c)) and cols.tolist() == list(range(left, left + c))
        assert visible[top : top + c, left : left + c].all() and int(visible.sum()) == c * c
        corners.add((top, left))
    # all (grid - c + 1)^2 = 36 corner positions are reachable
    assert corners == {(r, q) for r in range(grid - c + 1) for q in range(grid - c + 1)}


@pytest.mark.parametrize(
    "mask, grid, words",
    [
        (PatchMask(1.0), 16, "ratio"),
        (PatchMask(-0.1), 16, "ratio"),
        (BlockMask(1.2, 4), 16, "ratio"),
        (BlockMask(0.5, 3), 16, "block_size"),
        (BlockMask(0.5, 0), 16, "block_size"),
        (CropMask(17), 16, "crop_size"),
        (CropMask(0), 16, "crop_size"),
        (PatchMask(0.5), 0, "grid"),
    ],
)
def test_bad_parameters_raise_harness_error(mask, grid, words):
    with pytest.raises(HarnessError, match=words):
        mask.validate(grid)
    with pytest.raises(HarnessError):
        mask.sample(2, grid)


def test_names_and_plain_description():
    assert [m.name for m in (NoMask(), PatchMask(0.5), BlockMask(0.9, 4), CropMask(8))] == [
        "none", "patch", "block4", "crop8"]
    assert dataclasses.asdict(BlockMask(0.9, 2)) == {"ratio": 0.9, "block_size": 2}
    d = describe(BlockMask(0.9, 4), 16)
    assert d == {"name": "block4", "params": {"ratio": 0.9, "block_size": 4}, "num_masked": 224,
                 "actual_ratio": 0.875}


@pytest.mark.parametrize(
    "file, bindings, expected",
    [
        ("none.gin", [], NoMask()),
        ("patch.gin", ["MASK_RATIO = 0.75"], PatchMask(0.75)),
        ("block2.gin", ["MASK_RATIO = 0.9"], BlockMask(0.9, 2)),
        ("block4.gin", ["MASK_RATIO = 0.9"], BlockMask(0.9, 4)),
        ("crop.gin", ["CROP_SIZE = 11"], CropMask(11)),
    ],
)
def test_gin_files_bind_the_masks(file, bindings, expected):
    gin.parse_config_files_and_bindings([str(GIN_MASKS / file)], bindings)
    cls = type(expected)
    assert cls() == expected
    with gin.config_scope("pretrain"):  # recipes use the mask from a scope: unscoped bindings still apply
        assert cls() == expected
