"""Evaluation on every rank: 2 gloo ranks on the CPU score exactly what one process scores.

Each rank samples its share of the batches and extracts their Inception features; rank 0 gathers them, scores and
writes. The same evaluations are run by two spawned ranks and by the pytest process, into separate run folders,
with the same (seeded) tiny model, and compared: the rows (FID, KID, precision/recall, bootstrap, floor), the
feature arrays, eval.jsonl and the kept PNGs must be equal (the PNGs byte for byte, the features and the numbers
computed from them to float rounding: see `_same_features`). Then the
ranks fail on purpose (rank 0 while scoring, rank 1 while sampling, rank 1 while sending its kept samples, rank 0
making its kept samples' folder): both ranks must raise, none must hang, no row and no files must be left.

As in tests/test_evaluate.py, Inception runs at 75 px (the smallest input it takes) with its own cache folder:
every comparison is between two computations through the same extractor.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

STEP = 3
# (name, EvalConfig overrides): 4 batches of 6 (2 per rank, kept PNGs gathered to rank 0, the noise floor);
# 21 images in 5 batches (rank 0: 5 + 5 + 1, rank 1: 5 + 5); 5 images in one batch (rank 1 samples nothing).
CASES = (
    ("even", dict(num_samples=24, batch_size=6, keep_samples=True, noise_floor=True)),
    ("uneven", dict(num_samples=21, batch_size=5)),
    ("one_batch", dict(num_samples=5, batch_size=8, metrics=("fid",), bootstrap=0)),
)
TIMES = ("sample_seconds", "score_seconds")  # wall times differ by design


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _small_inception(cache: str) -> None:
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from harness import inception

    os.environ[inception.CACHE_ENV] = cache
    FeatureExtractorInceptionV3.INPUT_IMAGE_SIZE = 75


def _parts():
    """The tiny model of gin/backbones/uvit_tiny.gin (seeded: every process builds the same weights)."""
    from harness.data import DataConfig
    from harness.diffusion import DiffusionConfig
    from harness.models.config import UViTConfig

    torch.manual_seed(0)
    model = UViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=5, num_heads=4, qkv_bias=False).build()
    diffusion = DiffusionConfig(timesteps=50).build()
    # 48 images: the 24 of the reference, and the next ones for the noise floor's second set
    data = DataConfig(source="shapes", resolution=32, num_images=48, seed=3)
    return model, diffusion, data


def _cfg(**overrides):
    from harness.evaluate import EvalConfig
    from harness.sampling import SamplerConfig

    options = dict(sampler=SamplerConfig(kind="ddim", steps=2, eta=1.0), metrics=("fid", "kid", "prc"),
                   kid_subset_size=12, seed=7, feature_batch_size=16, reference_images=24, bootstrap=20,
                   noise_floor=False)
    return EvalConfig(**{**options, **overrides})


def _evaluate(name: str, overrides: dict, root: Path, rank: int = 0, world_size: int = 1) -> dict:
    from harness.evaluate import evaluate_stage

    model, diffusion, data = _parts()
    return evaluate_stage(model, diffusion, data, _cfg(**overrides), STEP, root / name, "cpu",
                          extra={"images_seen": 96}, rank=rank, world_size=world_size)


def _rank(rank: int, world_size: int, port: int, cache: str, root: str, go) -> None:
    """One spawned rank: the evaluations of CASES, then two that fail on purpose; outcomes as JSON files. It
    starts evaluating when `go` is set (once the pytest process has cached the reference)."""
    import torch.distributed as dist

    import harness.evaluate as ev
    import harness.sampling

    torch.set_num_threads(1)
    _small_inception(cache)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    out = Path(root)
    try:
        go.wait(timeout=120)
        for name, overrides in CASES:
            row = _evaluate(name, overrides, out / "ranks", rank, world_size)
            (out / f"row_{name}_{rank}.json").write_text(json.dumps(row))

        def attempt(name: str) -> None:
            try:
                _evaluate(name, dict(num_samples=12, batch_size=6, keep_samples=True, metrics=("fid",),
                                     bootstrap=0), out / "ranks", rank, world_size)
                outcome = "finished"
            except Exception as err:  # noqa: BLE001 (what each rank ended with is the point)
                outcome = f"{type(err).__name__}: {err}"
            (out / f"outcome_{name}_{rank}").write_text(outcome)

        if rank == 0:  # rank 0 fails while scoring, after every rank sampled and gathered
            def broken(*args, **kwargs):
                raise RuntimeError("inception ran out of memory")

            real, ev.score_features = ev.score_features, broken
            attempt("scoring_fails")
            ev.score_features = real
        else:
            attempt("scoring_fails")
        if rank == 1:  # rank 1 fails while sampling
            real_batches = harness.sampling.sample_batches

            def failing(*args, **kwargs):
                raise RuntimeError("CUDA error: an illegal memory access")
                yield  # a generator, as the real one

            harness.sampling.sample_batches = failing
            attempt("sampling_fails")
            harness.sampling.sample_batches = real_batches
        else:
            attempt("sampling_fails")
        if rank == 1:  # rank 1 fails while its kept PNGs go to rank 0, after the features were gathered
            real_share = ev._share_features

            def then_lose_a_png(folder, *args, **kwargs):
                features = real_share(folder, *args, **kwargs)
                (folder / "000006.png").unlink()  # its first sample (batches of 6)
                return features

            ev._share_features = then_lose_a_png
            attempt("collecting_fails")
            ev._share_features = real_share
        else:
            attempt("collecting_fails")
        if rank == 0:  # rank 0 cannot make its kept samples' folder (a file is in the way)
            (out / "ranks" / "folder_fails").mkdir(parents=True)
            (out / "ranks" / "folder_fails" / "eval_samples").write_text("not a folder")
        attempt("folder_fails")
    finally:
        dist.destroy_process_group()


def _same_features(a: np.ndarray, b: np.ndarray) -> None:
    """Equal to float rounding. The images are equal bit for bit (same seeds, same sampling batches: the PNG files
    are compared byte for byte below), but Inception sees each rank's share in feature batches of other members
    than one process does, and the convolutions round differently by batch (measured here: up to 1.4e-5 on
    features of size ~0.1-1, and the row's numbers agree to 1e-7 relative; 'one_batch', where rank 0 holds every
    image, is bit for bit equal)."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)


def test_two_gloo_ranks_score_what_one_process_scores(tmp_path, small_cache_dir):
    import multiprocessing

    from harness.fileio import read_jsonl

    started = time.perf_counter()
    context, port = multiprocessing.get_context("spawn"), _free_port()
    go = context.Event()
    ranks = [context.Process(target=_rank, args=(r, 2, port, str(small_cache_dir), str(tmp_path), go))
             for r in (0, 1)]
    for p in ranks:  # they import torch and join their process group meanwhile
        p.start()
    try:
        # the reference (and the floor's real features) extracted once, here, before the ranks need them
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as each rank: the same matmul kernels, hence the same images
        try:
            single = {name: _evaluate(name, overrides, tmp_path / "single") for name, overrides in CASES}
        finally:
            torch.set_num_threads(threads)
        one_process = time.perf_counter() - started
        go.set()
        for p in ranks:
            p.join(timeout=150)
    finally:
        hung = [p for p in ranks if p.is_alive()]
        for p in hung:
            p.kill()
    assert not hung, "a rank did not finish (waiting in a collective?)"
    assert [p.exitcode for p in ranks] == [0, 0]

    for name, overrides in CASES:
        rows = [json.loads((tmp_path / f"row_{name}_{r}.json").read_text()) for r in (0, 1)]
        assert rows[0] == rows[1]  # every rank returns rank 0's row
        ranked, alone = rows[0], single[name]
        assert ranked.keys() == alone.keys()
        assert {k: v for k, v in ranked.items() if k not in TIMES} == pytest.approx(
            {k: v for k, v in alone.items() if k not in TIMES}, rel=1e-4, abs=1e-6)
        assert ranked["n_samples"] == overrides["num_samples"]
        assert ("floor_fid" in ranked) == bool(overrides.get("noise_floor"))
        # rank 0 wrote the row and the features; the features are those of one process, in sample order
        assert read_jsonl(tmp_path / "ranks" / name / "eval.jsonl") == [ranked]
        features = np.load(tmp_path / "ranks" / name / "eval_features" / f"step_{STEP:07d}.npy")
        _same_features(features, np.load(tmp_path / "single" / name / "eval_features" / f"step_{STEP:07d}.npy"))
        assert len(features) == overrides["num_samples"]
        kept = tmp_path / "ranks" / name / "eval_samples" / f"step_{STEP:07d}"
        if overrides.get("keep_samples"):  # the same PNG files, byte for byte, both ranks' in rank 0's folder
            alone_kept = tmp_path / "single" / name / "eval_samples" / f"step_{STEP:07d}"
            names = sorted(p.name for p in kept.iterdir())
            assert names == sorted(p.name for p in alone_kept.iterdir()) and len(names) == overrides["num_samples"]
            assert all((kept / n).read_bytes() == (alone_kept / n).read_bytes() for n in names)
        else:
            assert not kept.parent.exists()

    # A failure on either rank raises on both (the other rank names it), and leaves no row and no samples.
    for name, failing, error in (("scoring_fails", 0, "RuntimeError: inception ran out of memory"),
                                 ("sampling_fails", 1, "RuntimeError: CUDA error: an illegal memory access")):
        outcomes = [(tmp_path / f"outcome_{name}_{r}").read_text() for r in (0, 1)]
        assert outcomes[failing] == error, outcomes
        assert outcomes[1 - failing].startswith(f"HarnessError: the evaluation at step {STEP} failed on rank "
                                                f"{failing} while "), outcomes
        assert outcomes[1 - failing].endswith(error), outcomes
        assert not (tmp_path / "ranks" / name / "eval.jsonl").exists()
        assert not any((tmp_path / "ranks" / name / "eval_samples").iterdir())
    # Rank 1 failing to read its PNGs for rank 0: rank 0 used to score, write the features, keep its samples and
    # append the row before hearing of it (a resume then counted the evaluation as done).
    lost = [(tmp_path / f"outcome_collecting_fails_{r}").read_text() for r in (0, 1)]
    assert lost[1].startswith("FileNotFoundError: ") and lost[1].endswith("000006.png'"), lost
    assert lost[0] == f"HarnessError: the evaluation at step {STEP} failed on rank 1 while collecting the kept " \
                      f"samples: {lost[1]}", lost
    assert not (tmp_path / "ranks" / "collecting_fails" / "eval.jsonl").exists()
    assert not (tmp_path / "ranks" / "collecting_fails" / "eval_features").exists()
    assert not any((tmp_path / "ranks" / "collecting_fails" / "eval_samples").iterdir())
    # Rank 0 failing to make its kept samples' folder: it used to leave while rank 1 waited in a collective.
    blocked = [(tmp_path / f"outcome_folder_fails_{r}").read_text() for r in (0, 1)]
    assert blocked[0].startswith("NotADirectoryError: "), blocked
    assert blocked[1] == f"HarnessError: the evaluation at step {STEP} failed on rank 0 while sampling: " \
                         f"{blocked[0]}", blocked
    assert not (tmp_path / "ranks" / "folder_fails" / "eval.jsonl").exists()
    assert (tmp_path / "ranks" / "folder_fails" / "eval_samples").read_text() == "not a folder"
    print(f"one process {one_process:.1f} s, all {time.perf_counter() - started:.1f} s")


@pytest.fixture
def small_cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """Inception at 75 px with a cache folder of its own (no 75-px features leak into other tests)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from harness import inception

    cache = tmp_path_factory.mktemp("harness-cache-75px-ranks")
    monkeypatch.setenv(inception.CACHE_ENV, str(cache))
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)
    return cache


def test_rank_batches_split_the_batches_of_one_process():
    from harness.errors import HarnessError
    from harness.sampling import rank_batches

    assert rank_batches(21, 5) == [range(0, 5), range(5, 10), range(10, 15), range(15, 20), range(20, 21)]
    assert rank_batches(21, 5, 0, 2) == [range(0, 5), range(10, 15), range(20, 21)]
    assert rank_batches(21, 5, 1, 2) == [range(5, 10), range(15, 20)]
    assert rank_batches(5, 8, 1, 2) == []
    for n, b, w in ((24, 6, 2), (21, 5, 3), (7, 2, 8), (0, 4, 2)):
        indices = sorted(i for r in range(w) for batch in rank_batches(n, b, r, w) for i in batch)
        assert indices == list(range(n))
    with pytest.raises(HarnessError, match="rank 2 is not one of 2 ranks"):
        rank_batches(4, 2, 2, 2)


def test_evaluating_as_one_of_several_ranks_needs_their_process_group(tmp_path):
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="rank 1 of 2 needs the initialised process group"):
        _evaluate("x", dict(num_samples=4, batch_size=2, kid_subset_size=4, metrics=("fid",)), tmp_path, 1, 2)
    assert not (tmp_path / "x").exists()


def _train_and_evaluate(rank: int, world_size: int, port: int, gin_text: str, stage_id: str, results_dir: str,
                        cache: str, out: str) -> None:
    """One rank of a stage that evaluates, through the launcher's job body (as tests/test_ddp.py)."""
    from harness.launch.worker import run_stage_job

    torch.set_num_threads(1)
    _small_inception(cache)
    os.environ.pop("SUBMITIT_EXECUTOR", None)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    try:
        outcome = run_stage_job(gin_text, stage_id, results_dir)["status"]
    except Exception as err:  # noqa: BLE001 (what each rank ended with is the point)
        outcome = f"{type(err).__name__}: {err}"
    Path(out.format(rank=rank)).write_text(outcome)


def test_a_data_parallel_stage_evaluates_on_both_ranks(tmp_path, small_cache_dir):
    """The trainer calls the evaluation on every rank, in step with training: a 2-step stage on 2 gloo ranks,
    evaluated at steps 1 and 2, finishes on both ranks (a rank that skipped an evaluation would meet the other's
    gathers with its gradient all-reduce); rank 0 wrote every file; evaluation cost is wall time and
    device-hours for both ranks' devices."""
    import multiprocessing

    from conftest_slurm import write_fast_recipe

    from harness.config import load_recipe
    from harness.experiment import plan_from_gin
    from harness.fileio import read_jsonl

    text = load_recipe(write_fast_recipe(tmp_path), [
        "scratch/Stage.steps = 2", "Stage.batch_size = 4", "Stage.checkpoint_every = 100",
        "scratch/Stage.eval = @EvalConfig()", "EvalConfig.num_samples = 5", "EvalConfig.batch_size = 2",
        "EvalConfig.sampler = @fid/SamplerConfig()", "fid/SamplerConfig.steps = 2", "EvalConfig.metrics = ('fid',)",
        "EvalConfig.steps = (1,)", "EvalConfig.bootstrap = 0", "EvalConfig.noise_floor = False",
        "EvalConfig.reference_images = 8", "EvalConfig.feature_batch_size = 8", "EvalConfig.keep_samples = True",
        "Experiment.arms = {'scratch': [@scratch/Stage()]}"])
    (sid,) = plan_from_gin(text).stages
    out = str(tmp_path / "outcome_{rank}")
    context, port = multiprocessing.get_context("spawn"), _free_port()
    ranks = [context.Process(target=_train_and_evaluate, args=(r, 2, port, text, sid, str(tmp_path / "results"),
                                                                str(small_cache_dir), out)) for r in (0, 1)]
    for p in ranks:
        p.start()
    try:
        for p in ranks:
            p.join(timeout=150)
    finally:
        hung = [p for p in ranks if p.is_alive()]
        for p in hung:
            p.kill()
    outcomes = [Path(out.format(rank=r)).read_text() if Path(out.format(rank=r)).exists() else "no outcome"
                for r in (0, 1)]
    assert outcomes == ["done", "done"] and not hung

    (run_dir,) = (tmp_path / "results").rglob("eval.jsonl")
    run_dir = run_dir.parent
    rows = read_jsonl(run_dir / "eval.jsonl")
    assert [(r["step"], r["n_samples"]) for r in rows] == [(1, 5), (2, 5)]
    assert all(r["frechet_inception_distance"] > 0 for r in rows)
    assert [len(np.load(run_dir / "eval_features" / f"step_{s:07d}.npy")) for s in (1, 2)] == [5, 5]
    assert len(list((run_dir / "eval_samples" / "step_0000002").glob("*.png"))) == 5
    cost = json.loads((run_dir / "cost.json").read_text())
    assert cost["device_count"] == 2 and cost["eval_seconds"] > 0  # 2 ranks of 1 thread: 2 cores
    assert cost["eval_device_hours"] == pytest.approx(cost["eval_seconds"] * 2 / 3600)
