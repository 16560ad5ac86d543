"""Noise floor (real vs real at an evaluation's counts) and bootstrap spread (harness.noise, harness.evaluate).

Statistics are checked on synthetic features (no Inception); the floor runs Inception on a few embedded `shapes`
images with torch-fidelity's resize shrunk to 75 px (as tests/test_evaluate.py does), in its own cache folder.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric

from harness import evaluate as ev
from harness import inception, noise
from harness.data import DataConfig


@pytest.fixture(autouse=True)
def _small_inception(_isolated_cache, tmp_path_factory, monkeypatch):
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "harness-cache-75px-noise"))
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)


def _gaussian(n: int, d: int, seed: int, scale: float = 1.0) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, d)) * scale).astype(np.float32)


def _tf_fid(x: np.ndarray, y: np.ndarray) -> float:
    stats = [fid_features_to_statistics(torch.from_numpy(f)) for f in (x, y)]
    return fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]


# --------------------------------------------------------------------------------------------------- statistics


@pytest.mark.parametrize("n1,n2,d", [(30, 50, 64), (200, 150, 64), (40, 300, 64)])
def test_fast_fid_equals_torch_fidelitys(n1, n2, d):
    """Both factorisations (centred rows when n <= d, Cholesky when n > d) give torch-fidelity's number."""
    x = np.abs(_gaussian(n1, d, 0))
    y = np.abs(_gaussian(n2, d, 1, scale=1.3)) + 0.1
    assert noise.fid(x, y) == pytest.approx(_tf_fid(x, y), rel=1e-6)


def test_fast_fid_survives_a_singular_covariance():
    x, y = _gaussian(200, 16, 0), _gaussian(200, 16, 1)
    x[:, 3] = 0.5  # a constant feature: Cholesky fails, the eigen-factor is used
    assert noise.fid(x, y) == pytest.approx(_tf_fid(x, y), rel=1e-6)


def test_kid_without_resampling_is_torch_fidelitys_kid_over_the_whole_sets():
    x, y = _gaussian(60, 32, 0), _gaussian(60, 32, 1, scale=1.2)
    # one "subset" of all 60 images: torch-fidelity's unbiased MMD over the full sets (in float64 as ours:
    # torch-fidelity keeps the features' dtype, and float32 sums differ from it by ~1e-4 relative)
    theirs = kid_features_to_metric(torch.from_numpy(x).double(), torch.from_numpy(y).double(), kid_subsets=1,
                                    kid_subset_size=60, verbose=False)["kernel_inception_distance_mean"]
    assert float(noise.kid_unbiased(x, y)[0]) == pytest.approx(theirs, rel=1e-9)


def _observed(x, y) -> dict[str, float]:
    return {"frechet_inception_distance": _tf_fid(x, y),
            "kernel_inception_distance_mean": float(noise.kid_unbiased(x, y)[0])}


def test_bootstrap_is_deterministic_under_a_seed():
    x, y = _gaussian(40, 16, 0), _gaussian(50, 16, 1)
    obs = _observed(x, y)
    first = noise.bootstrap_scores(x, y, obs, 50, seed=3)
    assert noise.bootstrap_scores(x, y, obs, 50, seed=3) == first
    assert noise.bootstrap_scores(x, y, obs, 50, seed=4)["fid_ci_low"] != first["fid_ci_low"]
    assert first["bootstrap_method"] == noise.METHOD and first["bootstrap_resamples"] == 50
    assert set(first) == {"fid_boot_std", "fid_ci_low", "fid_ci_high", "kid_ci_low", "kid_ci_high",
                          "bootstrap_method", "bootstrap_resamples"}
    assert noise.bootstrap_scores(x, y, obs, 0, seed=3) == {"bootstrap_method": "none", "bootstrap_resamples": 0}
    only_fid = noise.bootstrap_scores(x, y, {"frechet_inception_distance": 1.0}, 20, seed=3)
    assert "kid_ci_low" not in only_fid and "fid_ci_low" in only_fid


def test_interval_holds_the_observed_value_and_shrinks_with_more_samples():
    widths = []
    for n in (60, 600):
        x, y = _gaussian(n, 8, 10), _gaussian(n, 8, 11)  # two samples of one Gaussian
        obs = _observed(x, y)
        spread = noise.bootstrap_scores(x, y, obs, 200, seed=0)
        assert spread["fid_ci_low"] < obs["frechet_inception_distance"] < spread["fid_ci_high"]
        assert spread["kid_ci_low"] < obs["kernel_inception_distance_mean"] < spread["kid_ci_high"]
        assert spread["fid_boot_std"] > 0
        widths.append((spread["fid_ci_high"] - spread["fid_ci_low"], spread["kid_ci_high"] - spread["kid_ci_low"]))
    assert widths[1][0] < widths[0][0] / 2 and widths[1][1] < widths[0][1] / 2  # ~1/sqrt(n): 10x more, ~3x


def test_interval_separates_two_different_distributions():
    x, y = _gaussian(300, 8, 0), _gaussian(300, 8, 1) + 0.5
    spread = noise.bootstrap_scores(x, y, _observed(x, y), 100, seed=0)
    assert spread["fid_ci_low"] > 1.0  # the mean shift alone is 8 * 0.25 = 2


# ---------------------------------------------------------------------------------------------------- the split


def test_floor_split_is_disjoint_and_exact_when_the_dataset_allows():
    a, b, note = noise.floor_split(1000, 400, 250)
    assert (a, b, note) == (range(0, 400), range(400, 650), "")
    assert not set(a) & set(b)


@pytest.mark.parametrize("total,n_ref,n_gen,expected", [
    (3000, 3000, 10000, (1500, 1500)),  # whole small dataset as reference: an even split
    (30000, 30000, 10000, (20000, 10000)),  # the samples' count kept, the reference shortened
    (3000, 400, 10000, (400, 2600)),  # the reference kept, the rest as the second set
])
def test_reduced_split_is_as_balanced_as_allowed_and_labelled(total, n_ref, n_gen, expected):
    a, b, note = noise.floor_split(total, n_ref, n_gen)
    assert (len(a), len(b)) == expected
    assert not set(a) & set(b) and a.start == 0 and b.stop <= total and a.stop <= n_ref
    assert note and f"{len(a)} and {len(b)}" in note
    with pytest.raises(ValueError):
        noise.floor_split(5, 5, 10, minimum=4)


# ------------------------------------------------------------------------------------------ floor on real images


def test_noise_floor_uses_disjoint_real_sets_and_is_cached(extractions):
    data = DataConfig(source="shapes", resolution=16, num_images=30, seed=5)
    reference = ev.dataset_reference(data, limit=8, batch_size=16)
    assert reference.num_images == 8 and len(extractions) == 1
    floor = ev.noise_floor(data, reference, ("fid", "kid", "prc"), 6, kid_subset_size=5, batch_size=16)
    assert len(extractions) == 2  # Inception on the 6 images after the reference only
    assert (floor["floor_n_a"], floor["floor_n_b"], floor["floor_note"]) == (8, 6, "")
    assert floor["floor_fid"] > 0 and 0 <= floor["floor_precision"] <= 1 and 0 <= floor["floor_recall"] <= 1
    assert np.isfinite(floor["floor_kid"])
    record = json.loads(next(ev.fidelity_cache_root().glob("floor_*.json")).read_text())
    assert record["set_a"] == [0, 8] and record["set_b"] == [8, 14]  # disjoint ranges of the dataset

    # the same numbers as torch-fidelity's on the two image folders
    dataset = data.build()
    folder_a, folder_b = ev.fidelity_cache_root().parent / "a", ev.fidelity_cache_root().parent / "b"
    for folder, (start, stop) in ((folder_a, (0, 8)), (folder_b, (8, 14))):
        folder.mkdir(parents=True, exist_ok=True)
        ev._write_dataset_range(dataset, folder, start, stop)
    direct = ev.score_folders(folder_b, folder_a, ("fid", "kid", "prc"), kid_subset_size=5, batch_size=16,
                              cache_reference=False)
    assert floor["floor_fid"] == pytest.approx(direct["frechet_inception_distance"], rel=1e-5)
    assert floor["floor_kid"] == pytest.approx(direct["kernel_inception_distance_mean"], rel=1e-5, abs=1e-9)
    assert (floor["floor_precision"], floor["floor_recall"]) == (direct["precision"], direct["recall"])

    extractions.clear()
    again = ev.noise_floor(data, reference, ("fid", "kid", "prc"), 6, kid_subset_size=5, batch_size=16)
    assert again == floor and extractions == []  # cached: no Inception, no metric work


def test_noise_floor_of_a_dataset_too_small_is_reduced_and_labelled(extractions):
    data = DataConfig(source="shapes", resolution=16, num_images=12, seed=6)
    reference = ev.dataset_reference(data, batch_size=16)  # the whole dataset: nothing left for a second set
    floor = ev.noise_floor(data, reference, ("fid", "kid"), 10, kid_subset_size=8, batch_size=16)
    assert (floor["floor_n_a"], floor["floor_n_b"]) == (6, 6)
    assert "too small" in floor["floor_note"] and "subsets of 6" in floor["floor_note"]
    assert len(extractions) == 1  # the reference's features only: both halves are its rows
    assert "floor_precision" not in floor and floor["floor_fid"] > 0


def test_bca_breaks_down_on_fid_where_the_shifted_percentile_does_not():
    """Why the default is not BCa: with fewer samples than dimensions every resampled FID lies above the observed
    one (the duplicates' bias exceeds the spread), so BCa's bias correction z0 = ndtri(0) is infinite."""
    from scipy.stats import DegenerateDataWarning

    x, y = _gaussian(30, 64, 0), _gaussian(30, 64, 1)
    obs = _observed(x, y)
    with pytest.warns(DegenerateDataWarning):
        bca = noise.bootstrap_scores(x, y, obs, 40, seed=0, method="BCa")  # + a jackknife: 60 more FIDs
    assert bca["bootstrap_method"] == "BCa" and np.isnan(bca["fid_ci_low"])
    shifted = noise.bootstrap_scores(x, y, obs, 40, seed=0)
    assert shifted["fid_ci_low"] < obs["frechet_inception_distance"] < shifted["fid_ci_high"]


@pytest.mark.parametrize("n1,n2,d", [(30, 50, 64), (50, 30, 64), (200, 150, 64)])
def test_every_resample_fid_path_equals_torch_fidelitys(n1, n2, d):
    """The statistic scipy calls: Gram matrices when both sets are smaller than d, else moments."""
    x = np.abs(_gaussian(n1, d, 0))
    y = np.abs(_gaussian(n2, d, 1, scale=1.3)) + 0.1
    statistic = noise._Statistic(x, y, True, False, "cpu")
    assert (statistic.gram is not None) == (max(n1, n2) <= d)
    rng = np.random.default_rng(0)
    i1, i2 = rng.integers(0, n1, (3, n1)), rng.integers(0, n2, (3, n2))
    out = statistic(np.stack([i1, i1]), np.stack([i2, i2]))
    for b in range(3):
        assert out[0, b] == pytest.approx(_tf_fid(x[i1[b]], y[i2[b]]), rel=1e-6)
    observed = statistic(np.stack([np.arange(n1)] * 2), np.stack([np.arange(n2)] * 2))  # unbatched: the data
    assert observed.shape == (2,) and observed[0] == pytest.approx(_tf_fid(x, y), rel=1e-6)
