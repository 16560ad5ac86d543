"""Bad input through the CLI: each mistake gives one clear line, exit status 2, and nothing written as if done.

Complements tests/test_plans_and_stages.py (unknown configurable or parameter, syntax error, bad precision, '..' in the
experiment name, empty arms, bad block size, missing macro, missing data folder, strict parent loading).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import MICRO_RECIPE as MICRO
from PIL import Image

from harness.cli import main as cli_main


def fails_cleanly(argv: list[str], capsys, *expected: str, results: Path | None = None) -> str:
    """Run the CLI; assert status 2, a single error line holding `expected`, and no finished work written."""
    code = cli_main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    # one line: no notes, warnings or traceback before it (a stage that failed while training still gets the
    # partial results' report first, and `harness run` says where it went)
    err = [line for line in err if not line.startswith("report: ")]
    assert len(err) == 1, err
    last = err[-1]
    assert last.startswith(f"harness {argv[0]}: error: "), err
    for text in expected:
        assert text in last, last
    if results is not None and results.exists():
        assert not list(results.rglob("DONE")) and not list(results.rglob("*.pt"))
        for records in results.rglob("records.csv"):  # a report may list the stage, as failed
            assert "done" not in set(pd.read_csv(records).status)
    return last


@pytest.fixture
def micro(tmp_path) -> Path:
    path = tmp_path / "micro.gin"
    path.write_text(MICRO)
    return path


# ------------------------------------------------------------------------------------------------ the recipe


@pytest.mark.parametrize("binding, shown", [
    ("scratch/Stage.steps = 'ten'", "steps = 'ten' is not a valid int"),
    ("scratch/Stage.steps = True", "steps = True is not a valid int"),
    ("scratch/Stage.lr = 'fast'", "lr = 'fast' is not a valid float"),
    ("scratch/Stage.seed = 1.5", "seed = 1.5 is not a valid int"),
    ("Stage.betas = 5", "betas = 5 is not a valid tuple"),
    ("Stage.batch_size = None", "batch_size = None"),
    ("Stage.ema_warmup = 'yes'", "ema_warmup = 'yes' is not a valid bool"),
])
def test_wrong_value_type(micro, tmp_path, capsys, binding, shown):
    results = tmp_path / "results"
    fails_cleanly(["run", str(micro), "--gin", binding, "--dry-run", "--results-dir", str(results)], capsys,
                  shown, "fix the binding")
    assert not results.exists()


@pytest.mark.parametrize("text, shown", [
    ("include 'backbones/uvit_tiny.gin'\nStage.steps = 3\n", "['name', 'arms']"),
    ("Experiment.name = 'x'\n", "['arms']"),
    ("", "Experiment.name and Experiment.arms"),
    ("Experiment.name = 'x'\nExperiment.arms = {'a': []}\n", "arm 'a' of experiment 'x' has no stages"),
])
def test_recipe_without_experiment_or_arms(tmp_path, capsys, text, shown):
    recipe = tmp_path / "bare.gin"
    recipe.write_text(text)
    results = tmp_path / "results"
    fails_cleanly(["run", str(recipe), "--results-dir", str(results)], capsys, shown)
    assert not results.exists()


@pytest.mark.parametrize("bindings, shown", [
    (["MASK_RATIO = 1.5"], "BlockMask.ratio must be in [0, 1)"),
    (["MASK_RATIO = -0.1"], "BlockMask.ratio must be in [0, 1)"),
    (["pretrain/Stage.mask = @PatchMask()", "PatchMask.ratio = 1.0"], "PatchMask.ratio"),
    (["pretrain/Stage.mask = @CropMask()", "CropMask.crop_size = 9"], "does not fit the 8x8 patch grid"),
    (["pretrain/Stage.mask = @CropMask()", "CropMask.crop_size = 0"], "CropMask.crop_size=0"),
])
def test_mask_parameters_out_of_range(micro, tmp_path, capsys, bindings, shown):
    dry_run_fails(micro, tmp_path, capsys, bindings, shown)


def dry_run_fails(micro, tmp_path, capsys, bindings: list[str], shown: str) -> None:
    """`harness run --dry-run` with these --gin bindings fails cleanly, showing `shown`, and writes nothing."""
    results = tmp_path / "results"
    argv = ["run", str(micro), "--dry-run", "--results-dir", str(results)]
    for binding in bindings:
        argv += ["--gin", binding]
    fails_cleanly(argv, capsys, shown)
    assert not results.exists()


@pytest.mark.parametrize("bindings, shown", [
    (["DiffusionConfig.timesteps = 40", "Stage.sample_steps = 50", "Stage.num_sample_images = 4"],
     "sample_steps = 50 is more than the diffusion's 40 timesteps"),
    (["DiffusionConfig.timesteps = 100", "scratch/Stage.eval = @EvalConfig()"],
     "EvalConfig.sampler: SamplerConfig.steps=250 exceeds the diffusion's 100 time steps"),
    (["DiffusionConfig.schedule = 'linear'", "DiffusionConfig.timesteps = 20"], "too few for the linear schedule"),
])
def test_samplers_and_schedules_that_cannot_meet_are_refused_before_training(micro, tmp_path, capsys, bindings,
                                                                             shown):
    """Found at planning time, not at the first sample grid hours into the stage."""
    dry_run_fails(micro, tmp_path, capsys, bindings, shown)


@pytest.mark.parametrize("bindings, shown", [
    (["EvalConfig.num_samples = 1"], "only 1 generated image(s)"),
    (["EvalConfig.num_samples = 10"], "KID subset size 1000 exceeds the 10 generated images"),
    (["EvalConfig.num_samples = 3", "EvalConfig.metrics = ('prc',)"], "precision/recall need more than 3"),
])
def test_evaluation_with_fewer_samples_than_the_metric_needs(micro, tmp_path, capsys, bindings, shown):
    results = tmp_path / "results"
    argv = ["run", str(micro), "--results-dir", str(results), "--gin", "scratch/Stage.eval = @EvalConfig()"]
    for binding in bindings:
        argv += ["--gin", binding]
    fails_cleanly(argv, capsys, shown)
    assert not results.exists()


# ------------------------------------------------------------------------------------------------ launchers


def test_unknown_launcher(micro, tmp_path, capsys):
    results = tmp_path / "results"
    fails_cleanly(["run", str(micro), "--launcher", "kubernetes", "--results-dir", str(results)], capsys,
                  "unknown launcher 'kubernetes'", "inline")
    assert not results.exists()


def test_slurm_launcher_without_slurm(micro, tmp_path, capsys, monkeypatch):
    bin_dir = tmp_path / "bin"  # a PATH with no sbatch, whatever this machine has installed
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    results = tmp_path / "results"
    fails_cleanly(["run", str(micro), "--launcher", "slurm", "--results-dir", str(results)], capsys,
                  "SLURM is not installed", "sbatch", "--launcher local")
    assert not results.exists()


# ------------------------------------------------------------------------------------------------ data


def _png(path: Path, width: int, height: int, seed: int = 0) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.mark.parametrize("problem", ["empty", "corrupt image", "mixed sizes without resize"])
def test_bad_data_folder(micro, tmp_path, capsys, problem):
    data = tmp_path / "images"
    data.mkdir()
    bindings = ["DataConfig.source = 'folder'", f"DataConfig.root = '{data}'"]
    if problem == "corrupt image":
        for i in range(4):
            _png(data / f"{i}.png", 32, 32, seed=i)
        (data / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        shown = ["cannot read image", "2.png"]
    elif problem == "mixed sizes without resize":
        for i in range(4):
            _png(data / f"{i}.png", 32 if i != 3 else 40, 32, seed=i)
        bindings.append("DataConfig.center_crop = False")
        shown = ["3.png is 40x32", "center_crop"]
    else:
        shown = ["has no images", str(data)]
    results = tmp_path / "results"
    argv = ["run", str(micro), "--results-dir", str(results), "--stage", "scratch"]
    for binding in bindings:
        argv += ["--gin", binding]
    fails_cleanly(argv, capsys, *shown, results=results)


def test_finetuning_a_parent_of_another_architecture(micro, tmp_path, capsys):
    results = tmp_path / "results"
    base = ["run", str(micro), "--results-dir", str(results), "--no-report"]
    assert cli_main(base + ["--stage", "pretrain"]) == 0
    capsys.readouterr()
    # Only the fine-tuning stage is widened: the parent keeps its id (and its trained folder).
    fails_cleanly(base + ["--stage", "finetune", "--gin", "finetune/UViTConfig.embed_dim = 48"], capsys,
                  "do not fit this stage's model", "shape mismatch")
    done = list(results.rglob("DONE"))
    assert [p.parent.name.split("-")[0] for p in done] == ["pretrain"]  # the finetune stage is not done
    finetune = [p for p in (results / "tiny" / "two_stage").iterdir() if p.name.startswith("finetune-")]
    assert len(finetune) == 1 and not list(finetune[0].rglob("*.pt"))
    assert "shape mismatch" in (finetune[0] / "FAILED").read_text()


def test_sample_steps_are_not_checked_when_no_sample_grid_is_drawn(micro, tmp_path):
    assert cli_main(["run", str(micro), "--dry-run", "--results-dir", str(tmp_path / "r"), "--gin",
                     "DiffusionConfig.timesteps = 40", "--gin", "Stage.sample_steps = 50",
                     "--gin", "Stage.num_sample_images = 0"]) == 0


@pytest.mark.parametrize("command", ["run", "bench"])
@pytest.mark.parametrize("binding, shown", [
    ("MASK_RATO = 0.5", "never uses macro %MASK_RATO, so this changes nothing"),
    ("pretrian/Stage.steps = 100", "no component runs in scope 'pretrian'"),
    ("pretrain/finetun/Stage.lr = 1.0", "no component runs in scope 'finetun'"),
])
def test_misspelt_gin_override_is_refused_not_ignored(micro, tmp_path, capsys, command, binding, shown):
    """Valid gin that names nothing the recipe uses would leave the recipe as it is, silently."""
    argv = [command, str(micro), "--gin", binding] + (["--dry-run"] if command == "run" else ["--steps", "1"])
    fails_cleanly(argv, capsys, shown, "check the name")


def test_well_spelt_overrides_still_pass(micro, tmp_path):
    results = tmp_path / "results"
    assert cli_main(["run", str(micro), "--dry-run", "--results-dir", str(results), "--gin", "MASK_RATIO = 0.5",
                     "--gin", "pretrain/Stage.steps = 7", "--gin", "Stage.compile = 'default'"]) == 0


def test_unfinished_gin_statement_names_its_line(tmp_path, capsys):
    recipe = tmp_path / "cut.gin"
    recipe.write_text("Experiment.name = 'x'\nStage.steps = (\n")
    fails_cleanly(["run", str(recipe), "--dry-run"], capsys, f"{recipe}", "line 3: EOF in multi-line statement")


@pytest.mark.parametrize("command", ["run", "sweep"])
def test_missing_data_of_a_later_stage_fails_before_anything_trains(micro, tmp_path, capsys, command):
    """The scratch arm's data is there, the pretraining stage's folder is not: nothing may train first."""
    results = tmp_path / "results"
    missing = tmp_path / "no_such_folder"
    argv = [command, str(micro), "--results-dir", str(results), "--gin", "pretrain/DataConfig.source = 'folder'",
            "--gin", f"pretrain/DataConfig.root = '{missing}'"]
    if command == "sweep":
        argv += ["--grid", "MASK_RATIO=[0.5,0.9]"]
    fails_cleanly(argv, capsys, f"data folder {missing} does not exist", "harness prepare")
    assert not results.exists()
    # a dry run still shows the plan, and says what is missing
    assert cli_main(argv + ["--dry-run"]) == 0
    assert f"note: data folder {missing} does not exist" in capsys.readouterr().err


def test_fid_names_an_unreadable_image_instead_of_miscounting(tmp_path, capsys):
    samples, reference = tmp_path / "samples", tmp_path / "reference"
    samples.mkdir()
    reference.mkdir()
    (samples / "0.png").write_text("not an image")
    for i in range(4):
        _png(reference / f"{i}.png", 16, 16, seed=i)
    shown = fails_cleanly(["fid", str(samples), str(reference)], capsys, "cannot read image", "0.png")
    assert "only 1" not in shown


@pytest.mark.parametrize("name", ["notes.pt", "picture.png"])
def test_convert_import_of_a_file_that_is_no_checkpoint_says_so(tmp_path, capsys, name):
    src = tmp_path / name
    src.write_text("hello, I am plain text")
    shown = fails_cleanly(["convert", "import", str(src), str(tmp_path / "out.pt")], capsys,
                          "not a file written by torch.save", name)
    assert "could run code" not in shown
