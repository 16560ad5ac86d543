"""Untrusted files: checkpoints and FID statistics that carry pickled code are refused before anything runs it;
names in recipes cannot make the harness write outside the results folder."""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MICRO_RECIPE
from PIL import Image

from harness.checkpoint import checkpoint_path, load_checkpoint
from harness.cli import main as cli_main
from harness.config import load_recipe
from harness.errors import HarnessError
from harness.experiment import plan_from_gin
from harness.inception import weights_id, weights_path
from harness.stage import run_stage

MICRO = MICRO_RECIPE + """
Experiment.arms = {'scratch': [@scratch/Stage()]}
"""


class Payload:
    """Unpickling this runs code: it writes `marker`. (Only builtins.exec is named in the pickle.)"""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


def evil_bytes(marker: Path, wrap=lambda payload: {"model": {"w": payload}}) -> bytes:
    buffer = io.BytesIO()
    torch.save(wrap(Payload(marker)), buffer)
    return buffer.getvalue()


def write_with_checksum(path: Path, data: bytes) -> None:
    """As save_checkpoint would: the checksum holds, so only the safe loader stands in the way."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(data).hexdigest() + "\n")


@pytest.fixture
def micro(tmp_path) -> Path:
    path = tmp_path / "micro.gin"
    path.write_text(MICRO)
    return path


def test_the_payload_really_runs_code_when_unpickled_unsafely(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(evil_bytes(marker))
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert marker.read_text() == "pwned"  # so the refusals below are refusals of real code


def test_checkpoint_with_pickled_code_is_refused(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    path.write_bytes(evil_bytes(marker))
    with pytest.raises(HarnessError, match="refusing to load .*evil.pt: it contains pickled Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resuming_from_a_checkpoint_with_pickled_code_is_refused(micro, tmp_path, capsys):
    marker = tmp_path / "marker"
    text = load_recipe(micro)
    plan = plan_from_gin()
    sid = plan.arms["scratch"][0]
    results = tmp_path / "results"
    stage_dir = plan.stage_dir(results, sid)
    write_with_checksum(checkpoint_path(stage_dir / "checkpoints", 1), evil_bytes(marker))
    code = cli_main(["run", str(micro), "--results-dir", str(results), "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert "refusing to load" in err[-1] and "step_0000001.pt" in err[-1]
    assert not marker.exists()
    assert not (stage_dir / "DONE").exists() and "refusing to load" in (stage_dir / "FAILED").read_text()
    with pytest.raises(HarnessError, match="refusing"):
        run_stage(text, sid, results)
    assert not marker.exists()


@pytest.mark.parametrize("wrap", [lambda p: {"model": {"w": p}}, lambda p: p, lambda p: [torch.zeros(2), p]])
def test_init_checkpoint_with_pickled_code_is_refused(micro, tmp_path, capsys, wrap):
    marker = tmp_path / "marker"
    evil = tmp_path / "downloaded.pt"
    evil.write_bytes(evil_bytes(marker, wrap))
    results = tmp_path / "results"
    code = cli_main(["run", str(micro), "--results-dir", str(results), "--no-report",
                     "--gin", f"scratch/Stage.init_checkpoint = '{evil}'"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "refusing to load" in err[-1] and "downloaded.pt" in err[-1]
    assert not marker.exists()
    assert not list(results.rglob("*.pt")) and not list(results.rglob("DONE"))


# ------------------------------------------------------------------------------------------ FID statistics


def _png_folder(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    return folder


@pytest.mark.parametrize("tampered", ["features", "stat-fid", "features without manifest"])
def test_cached_fid_statistics_with_pickled_code_are_refused(tmp_path, tampered):
    """The reference cache may be shared (a cluster-wide cache folder): torch-fidelity reads its files with
    weights_only=False, so the harness vets them first."""
    from harness import evaluate

    marker = tmp_path / "marker"
    samples = _png_folder(tmp_path / "samples", 4)
    name = f"folder_{evaluate.folder_content_id(samples.resolve())[:20]}_w{weights_id(weights_path())}"
    features, manifest = evaluate._cache_files(name)
    stats = features.with_name(features.name.replace("-features-", "-stat-fid-"))
    clean = io.BytesIO()
    torch.save({"2048": torch.zeros(4, 2048)}, clean)
    features.parent.mkdir(parents=True, exist_ok=True)
    features.write_bytes(clean.getvalue() if tampered == "stat-fid" else evil_bytes(marker, lambda p: {"2048": p}))
    if tampered == "stat-fid":
        stats.write_bytes(evil_bytes(marker, lambda p: {"mu": p, "sigma": torch.eye(2)}))
    if tampered != "features without manifest":
        manifest.write_text('{"num_images": 4, "source": "elsewhere"}\n')
    try:
        with pytest.raises(HarnessError, match="refusing to use the cached reference features .*pickled Python"):
            evaluate.score_folders(samples, samples, metrics=("fid",), batch_size=4, device="cpu")
        assert not marker.exists()
    finally:
        for path in (features, stats, manifest):
            path.unlink(missing_ok=True)


def test_numpy_fid_statistics_pass_the_check_but_object_arrays_do_not(tmp_path):
    """torch-fidelity saves FID statistics as numpy arrays: those are data; an object array is code."""
    from harness.evaluate import refuse_pickled_code

    marker = tmp_path / "marker"
    plain, evil = tmp_path / "plain-stat-fid-2048.pt", tmp_path / "evil-stat-fid-2048.pt"
    torch.save({"mu": np.zeros(3), "sigma": np.eye(3, dtype=np.float32)}, plain)
    refuse_pickled_code(plain, "cached reference features")
    torch.save({"mu": np.array([Payload(marker)], dtype=object), "sigma": np.eye(3)}, evil)
    with pytest.raises(HarnessError, match="pickled Python objects"):
        refuse_pickled_code(evil, "cached reference features")
    assert not marker.exists()


def test_inception_weights_with_pickled_code_are_refused(tmp_path):
    from harness import evaluate

    marker = tmp_path / "marker"
    weights = tmp_path / "weights-inception.pth"
    weights.write_bytes(evil_bytes(marker, lambda p: {"conv.weight": p}))
    a, b = _png_folder(tmp_path / "a", 4), _png_folder(tmp_path / "b", 4)
    with pytest.raises(HarnessError, match="refusing to use the Inception weights .*pickled Python objects"):
        evaluate.score_folders(a, b, metrics=("fid",), weights=weights, batch_size=4, device="cpu",
                               cache_reference=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------ names and paths


@pytest.mark.parametrize("binding", [
    "Experiment.name = '/tmp/absolute'",
    "Experiment.name = 'a/b'",
    "Experiment.arms = {'../up': [@scratch/Stage()]}",
    "Experiment.arms = {'a/../../up': [@scratch/Stage()]}",
    "Experiment.arms = {'/etc': [@scratch/Stage()]}",
    "Experiment.arms = {'.hidden': [@scratch/Stage()]}",
    "Experiment.arms = {'..': [@scratch/Stage()]}",
    "scratch/Stage.name = '../../outside'",
    "scratch/Stage.name = 'a/b'",
    "scratch/Stage.name = '..'",
    "scratch/Stage.name = 'a\\x00b'",
])
def test_names_cannot_leave_the_results_folder(micro, tmp_path, capsys, binding):
    results = tmp_path / "deep" / "results"
    code = cli_main(["run", str(micro), "--gin", binding, "--results-dir", str(results)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "is not allowed" in err[0] and "no '..'" in err[0]
    assert not (tmp_path / "deep").exists() and not Path("/tmp/absolute").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro.gin"]  # nothing written anywhere beside it


def test_every_file_a_run_writes_lies_inside_the_results_folder(micro, tmp_path):
    results = tmp_path / "results"
    assert cli_main(["run", str(micro), "--results-dir", str(results), "--no-report"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["micro.gin", "results"]
    for path in results.rglob("*"):
        assert path.resolve().is_relative_to(results.resolve()), path
