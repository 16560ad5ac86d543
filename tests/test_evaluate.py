"""FID/KID/precision-recall through torch-fidelity, offline; reference caching; stage evaluation rows.

Inception runs at 299x299 whatever the input (about 0.7 s per image on 2 CPU cores). To stay fast, these tests
use tiny image sets (5-8 images of 32 px) and shrink torch-fidelity's internal resize to 75 px, the smallest
input InceptionV3 takes (16x fewer FLOPs), with their own cache folder so that no 75-px features leak into other
tests. Every comparison below is between two computations through the same extractor, so they test the
plumbing exactly; tests/test_inception.py checks the canonical 299-px features themselves.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch_fidelity
import torch_fidelity.utils
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from harness import evaluate as ev
from harness import inception
from harness.data import DataConfig
from harness.diffusion import DiffusionConfig
from harness.errors import HarnessError
from harness.inception import weights_path
from harness.models.config import UViTConfig
from harness.sampling import SamplerConfig

N = 8
NOISE = (8, 32, 128)  # pixel std of the Gaussian noise added to the reference images


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("harness-cache-75px")


@pytest.fixture(autouse=True)
def _small_inception(_isolated_cache, small_cache, monkeypatch):
    monkeypatch.setenv(inception.CACHE_ENV, str(small_cache))
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


@pytest.fixture
def canonical_inception(_small_inception, tmp_path_factory, monkeypatch):
    """For assertions about what Inception sees (at 75 px, noise does not raise FID monotonically): the real
    299-px input, with the session's cache (never the 75-px one)."""
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "harness-cache"))
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 299)


def _smooth_images(n: int, seed: int, size: int = 32) -> np.ndarray:
    """Smooth colour fields (upsampled 4x4 noise): image-like enough to give varied Inception features."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.uniform(0, 255, (n, 3, 4, 4))).float()
    fine = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return fine.permute(0, 2, 3, 1).round().clamp(0, 255).to(torch.uint8).numpy()


def _write(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fid-images")
    out = {"ref": _write(root / "ref", _smooth_images(N, seed=0)),
           "gen": _write(root / "gen", _smooth_images(N, seed=2))}
    # the noise test runs Inception at full size, so on a smaller set
    clean = _smooth_images(5, seed=0)
    out["clean"] = _write(root / "clean", clean)
    for sigma in NOISE:
        noise = np.random.default_rng(1).normal(0, sigma, clean.shape)
        out[f"noise{sigma}"] = _write(root / f"noise{sigma}", np.clip(clean + noise, 0, 255).astype(np.uint8))
    return out


def test_scores_equal_torch_fidelitys_own_call(folders):
    ours = ev.score_folders(folders["gen"], folders["ref"], ("fid", "kid"), kid_subset_size=4)
    theirs = torch_fidelity.calculate_metrics(
        input1=str(folders["gen"]), input2=str(folders["ref"]), fid=True, kid=True, kid_subset_size=4,
        feature_extractor="inception-v3-compat", feature_extractor_weights_path=str(weights_path()),
        cuda=False, cache=False, verbose=False)
    fid = ours["frechet_inception_distance"]
    assert fid > 1.0  # two different image sets
    # The harness runs Inception in channels-last layout on a CPU (evaluate._create_extractor): the features
    # round differently (within 1e-5), which moved this FID by 1.1e-6 relative (504.6272 against 504.6278).
    assert fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-5)
    assert ours["kernel_inception_distance_mean"] == pytest.approx(theirs["kernel_inception_distance_mean"],
                                                                   rel=1e-5)
    # KID reports its spread over subsets
    assert ours["kernel_inception_distance_std"] > 0
    assert ours["kernel_inception_distance_std"] == pytest.approx(theirs["kernel_inception_distance_std"],
                                                                  rel=1e-5)


def test_harness_fid_prints_the_bootstrap_interval(folders, capsys):
    from harness.cli import main

    assert main(["fid", str(folders["gen"]), str(folders["ref"]), "--metrics", "fid,kid", "--kid-subset-size", "4",
                 "--bootstrap", "30", "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["fid_ci_low"] <= scores["frechet_inception_distance"] <= scores["fid_ci_high"]
    assert scores["kid_ci_low"] <= scores["kernel_inception_distance_mean"] <= scores["kid_ci_high"]
    assert scores["bootstrap_resamples"] == 30 and scores["fid_boot_std"] > 0
    assert main(["fid", str(folders["gen"]), str(folders["ref"]), "--bootstrap", "30"]) == 0
    out = capsys.readouterr().out
    assert "frechet_inception_distance: " in out and "95% interval" in out and "30 resamples" in out


def test_a_set_against_itself_scores_perfectly(folders):
    scores = ev.score_folders(folders["ref"], folders["ref"], "fid,prc")
    assert abs(scores["frechet_inception_distance"]) < 1e-2
    # every image lies inside its own k-NN ball: precision = recall = 1
    assert scores["precision"] == 1.0 and scores["recall"] == 1.0


def test_fid_grows_with_noise(folders, canonical_inception):
    fids = [ev.score_folders(folders[f"noise{sigma}"], folders["clean"])["frechet_inception_distance"]
            for sigma in NOISE]
    assert 1.0 < fids[0] < fids[1] < fids[2]


def test_reference_cache_reused_and_invalidated_when_the_folder_changes(tmp_path, folders, extractions):
    ref = _write(tmp_path / "ref", _smooth_images(5, seed=5))
    first = ev.folder_reference(ref)
    assert first.num_images == 5 and len(extractions) == 1
    again = ev.folder_reference(ref)
    assert again == first and len(extractions) == 1  # served from the cache

    ev.score_folders(folders["gen"], ref, ("fid", "kid"), kid_subset_size=4)
    ev.score_folders(folders["gen"], ref, ("fid", "kid"), kid_subset_size=4)
    assert extractions[1:] == [str(folders["gen"])] * 2  # only the generated side is recomputed

    _write(tmp_path / "ref", _smooth_images(6, seed=6))  # a changed folder: other content, one more image
    changed = ev.folder_reference(ref)
    assert changed.name != first.name and changed.num_images == 6 and len(extractions) == 4
    assert ev.reference_manifest(changed.name)["num_images"] == 6


def test_bad_inputs_fail_clearly_before_any_feature_extraction(tmp_path, folders, extractions):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    with pytest.raises(HarnessError, match="no images"):
        ev.score_folders(folders["gen"], empty)
    with pytest.raises(HarnessError, match="KID subset size 100 exceeds the 8"):
        ev.score_folders(folders["gen"], folders["ref"], "fid,kid", kid_subset_size=100)
    with pytest.raises(HarnessError, match="does not exist"):
        ev.score_folders(folders["gen"], folders["ref"], weights=tmp_path / "missing.pth")
    with pytest.raises(HarnessError, match="Inception Score"):
        ev.score_folders(folders["gen"], folders["ref"], "fid,isc")
    with pytest.raises(HarnessError, match="unknown metric"):
        ev.check_metrics("fid,lpips")
    assert extractions == []


# --------------------------------------------------------------------------------------------- evaluate_stage


def _stage_parts():
    model = UViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2).build()
    diffusion = DiffusionConfig(timesteps=50).build()
    data = DataConfig(source="shapes", resolution=16, num_images=6, seed=3)
    return model, diffusion, data


def _eval_cfg(**overrides) -> ev.EvalConfig:
    options = dict(num_samples=5, batch_size=3, sampler=SamplerConfig(kind="ddim", steps=2, eta=1.0),
                   metrics=("fid", "kid"), kid_subset_size=4, steps=(2,), seed=7, feature_batch_size=8)
    options.update(overrides)
    return ev.EvalConfig(**options)


def test_evaluate_stage_at_two_steps_writes_two_rows(tmp_path, extractions):
    model, diffusion, data = _stage_parts()
    cfg = _eval_cfg()
    assert cfg.eval_steps(4) == [2, 4]
    run_dir = tmp_path / "run"
    rows = [ev.evaluate_stage(model, diffusion, data, cfg if step == 2 else _eval_cfg(keep_samples=True), step,
                              run_dir, "cpu", extra={"images_seen": 16 * step, "train_seconds": 1.5 * step})
            for step in cfg.eval_steps(4)]
    written = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert written == rows and [r["step"] for r in written] == [2, 4]
    for row in written:
        assert row["n_samples"] == 5 and row["n_reference"] == 6
        assert (row["sampler"], row["sampler_steps"], row["eta"]) == ("ddim", 2, 1.0)
        assert row["frechet_inception_distance"] > 0 and row["kernel_inception_distance_std"] >= 0
        assert row["sample_seconds"] > 0 and row["score_seconds"] > 0
    assert [r["images_seen"] for r in written] == [32, 64]
    assert written[0]["reference"] == written[1]["reference"]
    # same seed, same (untrained) model: the same samples, hence the same scores at both steps
    assert written[0]["frechet_inception_distance"] == pytest.approx(written[1]["frechet_inception_distance"])
    # the reference was extracted once (on its first use, unless an earlier test cached it), samples twice
    assert len(extractions) in (2, 3)
    kept = sorted((run_dir / "eval_samples" / "step_0000004").glob("*.png"))
    assert len(kept) == 5 and not (run_dir / "eval_samples" / "step_0000002").exists()
    assert Image.open(kept[0]).size == (16, 16)

    # the samples' features are kept, and the row's FID is redone from them and the cached reference's
    for row in written:
        features = np.load(run_dir / "eval_features" / f"step_{row['step']:07d}.npy")
        assert features.shape == (5, 2048) and features.dtype == np.float32
        reference = ev.cached_reference(row["reference"])
        stats = [fid_features_to_statistics(torch.from_numpy(f))
                 for f in (features, ev.load_reference_features(reference))]
        assert fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"] == pytest.approx(
            row["frechet_inception_distance"], rel=1e-6)
        # spread and floor (the 6-image dataset is all reference: the floor splits it 3 + 3, and says so)
        assert row["fid_ci_low"] <= row["frechet_inception_distance"] <= row["fid_ci_high"]
        assert row["kid_ci_low"] <= row["kernel_inception_distance_mean"] <= row["kid_ci_high"]
        assert row["fid_boot_std"] > 0 and (row["bootstrap_method"], row["bootstrap_resamples"]) == (
            "percentile-shifted", 200)
        assert (row["floor_n_a"], row["floor_n_b"]) == (3, 3) and "too small" in row["floor_note"]
        assert row["floor_fid"] > 0 and "floor_kid" in row and "floor_precision" not in row
    assert written[0]["fid_ci_low"] == written[1]["fid_ci_low"]  # same features, same seed: same resamples


def test_evaluate_stage_writes_no_row_when_it_fails(tmp_path, extractions):
    model, diffusion, data = _stage_parts()
    run_dir = tmp_path / "run"
    with pytest.raises(HarnessError, match="KID subset size 6 exceeds the 5"):
        _eval_cfg(kid_subset_size=6)  # caught when the config is made, before any training
    too_few = _eval_cfg(num_samples=8, kid_subset_size=8)  # more than the 6 reference images
    with pytest.raises(HarnessError, match="KID subset size 8 exceeds the 6 reference"):
        ev.evaluate_stage(model, diffusion, data, too_few, 2, run_dir, "cpu", extra={})
    with pytest.raises(HarnessError, match="does not exist"):
        ev.evaluate_stage(model, diffusion, data, _eval_cfg(weights_path=str(tmp_path / "nope.pth")), 2,
                          run_dir, "cpu", extra={})
    assert not (run_dir / "eval.jsonl").exists()
    assert not (run_dir / "eval_samples").exists()


def test_a_scoring_failure_after_sampling_leaves_no_row_and_no_samples(tmp_path, monkeypatch):
    model, diffusion, data = _stage_parts()
    run_dir = tmp_path / "run"

    def broken(*args, **kwargs):
        raise RuntimeError("inception ran out of memory")

    monkeypatch.setattr(ev, "score_features", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        ev.evaluate_stage(model, diffusion, data, _eval_cfg(keep_samples=True), 2, run_dir, "cpu", extra={})
    assert not (run_dir / "eval.jsonl").exists()
    assert not list((run_dir / "eval_samples").iterdir())  # neither a finished nor a partial folder


# ------------------------------------------------------------------------------------- checks before any work


def test_eval_config_refuses_counts_above_its_reference_cap():
    with pytest.raises(HarnessError, match="KID subset size 1000 exceeds the 400 reference images"):
        ev.EvalConfig(reference_images=400, kid_subset_size=1000)
    with pytest.raises(HarnessError, match="precision/recall need more than 3 reference images, got 3"):
        ev.EvalConfig(metrics=("fid", "prc"), reference_images=3)
    for bad in (0, 1, -1):
        with pytest.raises(HarnessError, match="reference_images must be at least 2"):
            ev.EvalConfig(reference_images=bad)
    assert ev.EvalConfig(reference_images=1000, kid_subset_size=1000).reference_images == 1000


def test_check_reference_size_uses_the_smaller_of_the_cap_and_the_dataset():
    uncapped = ev.EvalConfig(num_samples=500, kid_subset_size=100)
    capped = ev.EvalConfig(num_samples=500, kid_subset_size=100, reference_images=200)
    assert ev.reference_count(uncapped, 80) == 80 and ev.reference_count(capped, 80) == 80
    assert ev.reference_count(capped, 5000) == 200
    ev.check_reference_size(uncapped, 100)
    ev.check_reference_size(capped, 5000)
    with pytest.raises(HarnessError, match=r"exceeds the 80 reference images.*dataset has 80 images, "
                                           r"EvalConfig.reference_images=200\)"):
        ev.check_reference_size(capped, 80)
    with pytest.raises(HarnessError, match="only 1 reference image"):
        ev.check_reference_size(uncapped, 1)
    prc = ev.EvalConfig(num_samples=500, metrics=("fid", "prc"))
    ev.check_reference_size(prc, 4)
    with pytest.raises(HarnessError, match="precision/recall need more than 3 reference images, got 3"):
        ev.check_reference_size(prc, 3)


def test_score_against_refuses_a_reference_of_other_weights(tmp_path, folders, extractions):
    reference = ev.folder_reference(folders["ref"])
    extracted = len(extractions)
    other = tmp_path / "other-inception.pth"
    other.write_bytes(b"other weights")
    with pytest.raises(HarnessError, match="not computed with the Inception weights .*other-inception.pth"):
        ev.score_against(folders["gen"], reference, weights=other)
    foreign = ev.Reference(name=reference.name.rsplit("_w", 1)[0] + "_w000000000000",
                           num_images=reference.num_images, source=reference.source)
    with pytest.raises(HarnessError, match="not computed with the Inception weights"):
        ev.score_against(folders["gen"], foreign)
    assert len(extractions) == extracted  # refused before Inception ran


def test_reference_limits_below_two_are_refused_in_terms_of_the_dataset(tmp_path, extractions, capsys):
    from harness.cli import main as cli_main

    shapes = DataConfig(source="shapes", resolution=16, num_images=6, seed=3)
    for limit in (0, 1, -1):  # 0 once meant "no limit" and could return the full-dataset reference
        with pytest.raises(HarnessError, match=f"must be at least 2 images .*got {limit}"):
            ev.dataset_reference(shapes, limit=limit)
    with pytest.raises(HarnessError, match=r"the dataset \(source 'shapes'\) has 1 image") as err:
        ev.dataset_reference(DataConfig(source="shapes", resolution=16, num_images=1, seed=3))
    assert "maskdm-reference" not in str(err.value)  # not the temporary folder the user never chose
    for limit in ("0", "-1"):
        assert cli_main(["fid-stats", str(tmp_path), "--resolution", "16", "--limit", limit]) == 2
        assert f"--limit must be at least 2 images (or unset for the whole dataset), got {limit}" in \
            capsys.readouterr().err
    assert extractions == []


# ----------------------------------------------------------------------------------------------- CUDA devices


def test_cuda_context_only_for_an_indexed_cuda_device():
    assert isinstance(ev._cuda_context("cpu"), contextlib.nullcontext)
    assert isinstance(ev._cuda_context("cuda"), contextlib.nullcontext)  # torch-fidelity's current device
    chosen = ev._cuda_context("cuda:1")  # built without touching CUDA
    assert isinstance(chosen, torch.cuda.device) and chosen.idx == 1


def test_torch_fidelity_runs_with_the_requested_cuda_device_current(tmp_path, monkeypatch):
    """Without CUDA: fake torch.cuda.device and torch-fidelity, and check that the device is current around them."""
    current: list[int] = []
    seen: list[tuple[str, list[int]]] = []

    class FakeDevice:
        def __init__(self, device):
            self.idx = torch.device(device).index

        def __enter__(self):
            current.append(self.idx)

        def __exit__(self, *exc):
            current.pop()

    def fake(step):
        features = {"2048": torch.rand(3, 2048, generator=torch.Generator().manual_seed(0))}
        return lambda *args, **kwargs: seen.append((step, list(current))) or features

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", fake("extractor"))
    monkeypatch.setattr(torch_fidelity.utils, "extract_featuresdict_from_input_id_cached", fake("features"))
    ref = _write(tmp_path / "ref", _smooth_images(3, seed=11))
    scores = ev.score_folders(ref, ref, device="cuda:1", cache_reference=False)
    assert abs(scores["frechet_inception_distance"]) < 1e-2  # the fake features of both inputs are equal
    ev.folder_reference(ref, device="cuda:1")
    # scoring: the extractor, the samples' and the reference's features; then the reference is cached
    assert seen == [("extractor", [1]), ("features", [1]), ("features", [1]), ("extractor", [1]), ("features", [1])]
    assert current == []


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_scores_on_the_requested_cuda_device(folders, monkeypatch):
    where: list[tuple[int, torch.device]] = []
    real = torch_fidelity.utils.extract_featuresdict_from_input_id

    def recording(input_id, feat_extractor, **kwargs):
        where.append((torch.cuda.current_device(), next(feat_extractor.parameters()).device))
        return real(input_id, feat_extractor, **kwargs)

    monkeypatch.setattr(torch_fidelity.utils, "extract_featuresdict_from_input_id", recording)
    before = torch.cuda.current_device()
    scores = ev.score_folders(folders["gen"], folders["ref"], device="cuda:1", cache_reference=False)
    assert where == [(1, torch.device("cuda:1"))] * 2  # both inputs, on device 1
    assert torch.cuda.current_device() == before
    assert scores["frechet_inception_distance"] > 0
