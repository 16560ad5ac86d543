"""`harness prepare`: counts, resolution, skipped files, subsets, resuming, the source left alone, the CLI."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import harness.prepare as prepare_module
from harness.cli import main as cli_main
from harness.data import DataConfig, subset_order
from harness.errors import HarnessError
from harness.prepare import prepare_dataset


def make_source(root: Path, n: int = 6, seed: int = 0) -> Path:
    """n readable images of assorted sizes and formats (some non-square), one corrupt file, one text file."""
    rng = np.random.default_rng(seed)
    sizes = [(20, 20), (24, 30), (30, 24), (16, 16), (40, 40), (22, 26)]
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        path = root / ("sub" if i % 2 else "") / f"im{i:02d}.{('png', 'jpg')[i % 3 == 2]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "readme.txt").write_text("not an image")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """Every file's content hash and mtime: what 'never modifies the source' is checked against."""
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def index_files(dst: Path) -> list[str]:
    """The source files of a prepared dataset, in row order."""
    return json.loads((dst / "dataset.json").read_text())["files"]


def test_folder_format_counts_resolution_skips_and_leaves_source_alone(tmp_path):
    src = make_source(tmp_path / "src")
    before = snapshot(src)
    result = prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, show_progress=False)
    assert snapshot(src) == before
    assert result.count == 6 and result.converted == 6
    assert [s["file"] for s in result.skipped] == ["corrupt.png"]
    index = json.loads((tmp_path / "dst" / "dataset.json").read_text())
    assert index["count"] == 6 and index["skipped"][0]["file"] == "corrupt.png"
    assert index["content_hash"] == result.content_hash
    outputs = sorted((tmp_path / "dst" / "images").rglob("*.png"))
    assert len(outputs) == 6 and all(Image.open(p).size == (8, 8) for p in outputs)
    assert not (tmp_path / "dst" / ".prepare-progress.json").exists()
    # The harness reads it: the same pixels as resizing the source on the fly.
    prepared = DataConfig(source="folder", root=str(tmp_path / "dst"), resolution=8).build()
    on_the_fly = DataConfig(source="folder", root=str(src / "sub"), resolution=8).build()
    i = prepared.names.index("images/sub/im01.png")
    assert torch.equal(prepared[i], on_the_fly[on_the_fly.names.index("im01.png")])


def test_npy_format_matches_folder_format(tmp_path):
    src = make_source(tmp_path / "src")
    prepare_dataset(src, tmp_path / "png", resolution=8, center_crop=True, show_progress=False)
    result = prepare_dataset(src, tmp_path / "npy", resolution=8, center_crop=True, fmt="npy",
                             show_progress=False)
    array = np.load(tmp_path / "npy" / "images.npy")
    assert array.dtype == np.uint8 and array.shape == (7, 8, 8, 3)  # a row was reserved for the corrupt file
    assert result.count == 6
    from_png = DataConfig(source="folder", root=str(tmp_path / "png"), resolution=8).build()
    from_npy = DataConfig(source="folder", root=str(tmp_path / "npy"), resolution=8).build()
    assert len(from_npy) == 6  # rows named by their source files, the corrupt one left out
    assert sorted(from_npy.names) == [f"{'sub/' if i % 2 else ''}im{i:02d}.{('png', 'jpg')[i % 3 == 2]}"
                                      for i in (0, 2, 4, 1, 3, 5)]
    by_name = {Path(n).stem: from_png[i] for i, n in enumerate(from_png.names)}
    for i, name in enumerate(from_npy.names):
        assert torch.equal(from_npy[i], by_name[Path(name).stem])
    with pytest.raises(HarnessError, match="prepared at 8 px"):
        DataConfig(source="folder", root=str(tmp_path / "npy"), resolution=16).build()


def test_non_square_images_need_center_crop(tmp_path):
    src = make_source(tmp_path / "src")
    result = prepare_dataset(src, tmp_path / "dst", resolution=8, show_progress=False)
    reasons = {s["file"]: s["reason"] for s in result.skipped}
    assert result.count == 3  # 20x20, 16x16 and 40x40
    assert "not square (30x24)" in reasons["sub/im01.png"] and "--center-crop" in reasons["sub/im01.png"]
    assert "corrupt.png" in reasons


def test_subsets_are_deterministic_and_match_data_config(tmp_path):
    src = make_source(tmp_path / "src", n=12)
    (src / "corrupt.png").unlink()  # with every file readable, prepare picks what DataConfig picks
    a = prepare_dataset(src, tmp_path / "a", resolution=8, center_crop=True, subset=5, seed=3, show_progress=False)
    b = prepare_dataset(src, tmp_path / "b", resolution=8, center_crop=True, subset=5, seed=3, show_progress=False)
    prepare_dataset(src, tmp_path / "c", resolution=8, center_crop=True, subset=5, seed=4, show_progress=False)
    files = lambda d: json.loads((tmp_path / d / "dataset.json").read_text())["files"]  # noqa: E731
    assert files("a") == files("b") and a.content_hash == b.content_hash
    assert set(files("a")) != set(files("c"))
    assert sorted(files("a")) == DataConfig(source="folder", root=str(src), subset=5, subset_seed=3).names()
    assert len(list((tmp_path / "a" / "images").rglob("*.png"))) == 5  # no extra images written


@pytest.mark.parametrize("fmt", ["folder", "npy"])
def test_a_prepared_subset_lists_its_images_in_the_order_data_config_does(tmp_path, fmt):
    """The rows came in the subset's seeded order: the same images as DataConfig(subset=N), but other batches for
    the same seed and other images for EvalConfig.reference_images=N."""
    src = make_source(tmp_path / "src", n=12)
    (src / "corrupt.png").unlink()
    prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, subset=5, seed=3, fmt=fmt,
                    show_progress=False)
    source = DataConfig(source="folder", root=str(src), resolution=8, subset=5, subset_seed=3)
    prepared = DataConfig(source="folder", root=str(tmp_path / "dst"), resolution=8)
    expected = source.names() if fmt == "npy" else [f"images/{Path(n).with_suffix('.png')}" for n in source.names()]
    assert prepared.names() == expected and index_files(tmp_path / "dst") == source.names()
    seeded = subset_order(12, 3)[:5]
    assert seeded != sorted(seeded)  # the order prepare converts them in is not the order they are listed in
    batch = list(range(5))
    assert torch.equal(prepared.build().get_batch(batch), source.build().get_batch(batch))  # the same pixels


def test_a_sort_of_the_npy_rows_stopped_half_way_resumes(tmp_path, monkeypatch):
    """The rows are copied into source order after conversion; a run stopped between the progress file taking the
    new order and the copy replacing the array finishes the swap, not a second sort."""
    src = make_source(tmp_path / "src", n=12)
    (src / "corrupt.png").unlink()
    settings = dict(resolution=8, center_crop=True, subset=5, seed=3, fmt="npy", show_progress=False)
    reference = prepare_dataset(src, tmp_path / "ref", **settings)
    real_replace, stopped = prepare_module.os.replace, []

    def stop_once(source, target):
        if str(source).endswith(prepare_module.SORTING) and not stopped:
            stopped.append(source)
            raise KeyboardInterrupt
        real_replace(source, target)

    monkeypatch.setattr(prepare_module.os, "replace", stop_once)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, tmp_path / "dst", **settings)
    assert (tmp_path / "dst" / prepare_module.SORTING).is_file()
    resumed = prepare_dataset(src, tmp_path / "dst", **settings)
    assert resumed.content_hash == reference.content_hash and resumed.converted == 0
    assert np.array_equal(np.load(tmp_path / "dst" / "images.npy"), np.load(tmp_path / "ref" / "images.npy"))
    assert sorted(p.name for p in (tmp_path / "dst").iterdir()) == ["dataset.json", "images.npy"]


def test_subset_replaces_unreadable_files(tmp_path):
    src = make_source(tmp_path / "src", n=6)
    # Find a seed whose first 3 candidates include the corrupt file: the subset must still hold 3 images.
    for seed in range(50):
        pick = DataConfig(source="folder", root=str(src), subset=3, subset_seed=seed).names()
        if "corrupt.png" in pick:
            break
    result = prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, subset=3, seed=seed,
                             show_progress=False)
    assert result.count == 3 and [s["file"] for s in result.skipped] == ["corrupt.png"]
    chosen = json.loads((tmp_path / "dst" / "dataset.json").read_text())["files"]
    assert set(pick) - {"corrupt.png"} <= set(chosen) and "corrupt.png" not in chosen
    with pytest.raises(HarnessError, match="only 6 images"):
        prepare_dataset(src, tmp_path / "too_many", resolution=8, center_crop=True, subset=7, show_progress=False)


def interrupt_at_seventh_image(monkeypatch) -> None:
    """Make prepare's 7th conversion raise KeyboardInterrupt, with progress saved every 3 candidates."""
    real_convert, calls = prepare_module._convert, []

    def interrupted(job):
        calls.append(job)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return real_convert(job)

    monkeypatch.setattr(prepare_module, "BLOCK", 3)
    monkeypatch.setattr(prepare_module, "_convert", interrupted)


@pytest.mark.parametrize("fmt", ["folder", "npy"])
def test_interrupted_run_resumes(tmp_path, monkeypatch, fmt):
    src = make_source(tmp_path / "src", n=10)
    reference = prepare_dataset(src, tmp_path / "ref", resolution=8, center_crop=True, fmt=fmt, show_progress=False)
    real_convert = prepare_module._convert
    interrupt_at_seventh_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, fmt=fmt, show_progress=False)
    assert not (tmp_path / "dst" / "dataset.json").exists()
    with pytest.raises(HarnessError, match="never finished"):
        DataConfig(source="folder", root=str(tmp_path / "dst"), resolution=8).check()
    with pytest.raises(HarnessError, match="other settings"):
        prepare_dataset(src, tmp_path / "dst", resolution=16, center_crop=True, fmt=fmt, show_progress=False)

    monkeypatch.setattr(prepare_module, "_convert", real_convert)
    resumed = prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, fmt=fmt, show_progress=False)
    assert resumed.content_hash == reference.content_hash and resumed.count == 10
    assert [s["file"] for s in resumed.skipped] == ["corrupt.png"]
    # Two blocks of 3 were saved before the interruption: folder outputs of that work are kept, not redone.
    if fmt == "folder":
        assert resumed.converted == 10 - 6 + 1  # the corrupt file is the first candidate and takes a slot
    # Running it again once complete does nothing and reports the same dataset.
    again = prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, fmt=fmt, show_progress=False)
    assert again.converted == 0 and again.content_hash == reference.content_hash


@pytest.mark.parametrize("fmt", ["folder", "npy"])
def test_dst_belongs_to_one_source(tmp_path, monkeypatch, fmt):
    src, other = make_source(tmp_path / "src", n=10), make_source(tmp_path / "other", n=10, seed=1)
    reference = prepare_dataset(src, tmp_path / "ref", resolution=8, center_crop=True, fmt=fmt, show_progress=False)
    real_convert = prepare_module._convert
    interrupt_at_seventh_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, fmt=fmt, show_progress=False)
    monkeypatch.setattr(prepare_module, "_convert", real_convert)
    # Another source for the unfinished DST is refused (it used to mix both sources' images, or hit a KeyError).
    with pytest.raises(HarnessError, match=f"prepared from {src}, not {other}; choose another DST or delete"):
        prepare_dataset(other, tmp_path / "dst", resolution=8, center_crop=True, fmt=fmt, show_progress=False)

    # The same source named by another relative path is the same source: the run resumes and finishes.
    monkeypatch.chdir(tmp_path / "other")
    resumed = prepare_dataset("../ref/../src", "../dst", resolution=8, center_crop=True, fmt=fmt,
                              show_progress=False)
    assert resumed.count == 10 and resumed.content_hash == reference.content_hash
    index = json.loads((tmp_path / "dst" / "dataset.json").read_text())
    assert index["source"] == str(src.resolve()) and index["files"] == index_files(tmp_path / "ref")
    assert prepare_dataset("../src", "../dst", resolution=8, center_crop=True, fmt=fmt,
                           show_progress=False).content_hash == reference.content_hash
    # A finished DST is not handed back as if it were made from another source.
    with pytest.raises(HarnessError, match=f"prepared from {src}, not {other}; choose another DST or delete"):
        prepare_dataset(other, tmp_path / "dst", resolution=8, center_crop=True, fmt=fmt, show_progress=False)


def test_npy_crash_between_rename_and_index_resumes(tmp_path, monkeypatch):
    src = make_source(tmp_path / "src")
    reference = prepare_dataset(src, tmp_path / "ref", resolution=8, center_crop=True, fmt="npy",
                                show_progress=False)
    real_write, crashed = prepare_module.atomic_write_text, []

    def crash_once_on_index(path, text):
        if Path(path).name == "dataset.json" and not crashed:
            crashed.append(path)
            raise KeyboardInterrupt
        real_write(path, text)

    monkeypatch.setattr(prepare_module, "atomic_write_text", crash_once_on_index)
    dst = tmp_path / "dst"
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, dst, resolution=8, center_crop=True, fmt="npy", show_progress=False)
    # The crash window: the array was renamed into place, but the index saying so was never written.
    assert (dst / "images.npy").is_file() and not (dst / "images.npy.partial").exists()
    assert not (dst / "dataset.json").exists() and (dst / ".prepare-progress.json").exists()

    resumed = prepare_dataset(src, dst, resolution=8, center_crop=True, fmt="npy", show_progress=False)
    assert resumed.count == 6 and resumed.converted == 0 and resumed.content_hash == reference.content_hash
    assert np.array_equal(np.load(dst / "images.npy"), np.load(tmp_path / "ref" / "images.npy"))
    assert index_files(dst) == index_files(tmp_path / "ref")
    assert sorted(p.name for p in dst.iterdir()) == ["dataset.json", "images.npy"]  # no temp or progress left


def test_refuses_dst_inside_src_and_non_empty_dst(tmp_path):
    src = make_source(tmp_path / "src")
    before = snapshot(src)
    with pytest.raises(HarnessError, match="inside SRC"):
        prepare_dataset(src, src / "prepared", resolution=8, show_progress=False)
    with pytest.raises(HarnessError, match="inside SRC"):
        prepare_dataset(src, src, resolution=8, show_progress=False)
    with pytest.raises(HarnessError, match="inside DST"):
        prepare_dataset(src, tmp_path, resolution=8, show_progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    with pytest.raises(HarnessError, match="not empty"):
        prepare_dataset(src, tmp_path / "busy", resolution=8, show_progress=False)
    with pytest.raises(HarnessError, match="does not exist"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out", resolution=8, show_progress=False)
    assert snapshot(src) == before


def test_workers_give_the_same_dataset(tmp_path):
    src = make_source(tmp_path / "src")
    one = prepare_dataset(src, tmp_path / "one", resolution=8, center_crop=True, fmt="npy", show_progress=False)
    two = prepare_dataset(src, tmp_path / "two", resolution=8, center_crop=True, fmt="npy", workers=2,
                          show_progress=False)
    assert one.content_hash == two.content_hash


def test_cli(tmp_path, capsys):
    src = make_source(tmp_path / "src")
    code = cli_main(["prepare", str(src), str(tmp_path / "dst"), "--resolution", "8", "--center-crop",
                     "--subset", "4", "--seed", "1", "--no-progress"])
    out = capsys.readouterr().out
    index = json.loads((tmp_path / "dst" / "dataset.json").read_text())
    assert code == 0 and "prepared 4 images at 8x8" in out and index["content_hash"] in out
    assert index["subset"] == 4 and index["seed"] == 1
    assert cli_main(["prepare", str(src), str(src / "x"), "--resolution", "8", "--no-progress"]) == 2
    assert "inside SRC" in capsys.readouterr().err


def test_a_run_interrupted_before_sources_were_recorded_still_resumes(tmp_path, monkeypatch):
    """Progress files of earlier versions carry no source: the resumed run adopts the one it is given."""
    src = make_source(tmp_path / "src", n=10)
    reference = prepare_dataset(src, tmp_path / "ref", resolution=8, center_crop=True, show_progress=False)
    real_convert = prepare_module._convert
    interrupt_at_seventh_image(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, show_progress=False)
    monkeypatch.setattr(prepare_module, "_convert", real_convert)
    progress_file = tmp_path / "dst" / prepare_module.PREPARE_PROGRESS
    progress = json.loads(progress_file.read_text())
    del progress["settings"]["source"]
    progress_file.write_text(json.dumps(progress))
    resumed = prepare_dataset(src, tmp_path / "dst", resolution=8, center_crop=True, show_progress=False)
    assert resumed.content_hash == reference.content_hash
    assert json.loads((tmp_path / "dst" / "dataset.json").read_text())["source"] == str(src.resolve())
