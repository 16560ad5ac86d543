"""Plans and stage ids, stage runs (parent loading, resume equivalence), the shipped recipes, the CLI."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.checkpoint import load_checkpoint, newest_valid_checkpoint
from harness.cli import main as cli_main
from harness.config import RECIPES_DIR, load_recipe
from harness.errors import HarnessError
from harness.experiment import plan_from_gin
from harness.stage import run_stage


def _plan(recipe: Path, *bindings: str):
    text = load_recipe(recipe, list(bindings))
    return text, plan_from_gin()


def test_stage_ids_are_stable_and_follow_config_changes(tiny_recipe):
    _, plan_a = _plan(tiny_recipe)
    _, plan_b = _plan(tiny_recipe)
    assert list(plan_a.stages) == list(plan_b.stages)

    ids = {ps.name: sid for sid, ps in plan_a.stages.items()}
    _, changed = _plan(tiny_recipe, "pretrain/Stage.steps = 9")
    new = {ps.name: sid for sid, ps in changed.stages.items()}
    assert new["scratch"] == ids["scratch"]  # untouched arm keeps its id
    assert new["pretrain"] != ids["pretrain"]
    assert new["finetune"] != ids["finetune"]  # a child changes with its parent
    assert changed.stages[new["finetune"]].parent == new["pretrain"]


def test_stage_ids_do_not_move_between_versions_nor_with_run_options(tiny_recipe):
    """Results folders are found by stage id: an id that changes with a harness version (or with a run option
    such as torch.compile) would silently retrain finished stages. These ids were computed by the first
    release; a deliberate change to what a stage means must update them and say so."""
    first_release = {"scratch": "61de2ea8e7a9179a", "pretrain": "4b9f2af2e57f1518", "finetune": "604d7e2876b5eae0"}
    # Stage.ema_decay's default became MaskDM's 0.999 (docs/fidelity.md, row 7), a deliberate change of meaning:
    # the first release's stages are those with 0.9999, now written out.
    first_release_ema = "Stage.ema_decay = 0.9999"
    for bindings in ([], ["Stage.compile = 'default'"], ["pretrain/Stage.compile = 'reduce-overhead'"],
                     ["Stage.attention = 'math'"]):
        _, plan = _plan(tiny_recipe, first_release_ema, *bindings)
        assert {ps.name: sid for sid, ps in plan.stages.items()} == first_release
    _, plan = _plan(tiny_recipe, "Stage.compile = 'default'")
    assert all(ps.spec.describe()["compile"] == "default" for ps in plan.stages.values())  # recorded all the same


def test_shared_stage_is_planned_once(tiny_recipe):
    text = tiny_recipe.read_text().replace(
        "Experiment.arms = {", "Experiment.arms = {'two_stage_b': [@pretrain/Stage(), @finetune2/Stage()], ")
    text += "\nfinetune2/Stage.steps = 6\n"
    tiny_recipe.write_text(text)
    _, plan = _plan(tiny_recipe)
    pretrain = [ps for ps in plan.stages.values() if ps.name == "pretrain"]
    assert len(pretrain) == 1
    assert sorted(pretrain[0].arms) == ["two_stage", "two_stage_b"]
    assert plan.arms["two_stage"][0] == plan.arms["two_stage_b"][0]


def test_two_stage_run_writes_run_folders_and_loads_parent(tiny_recipe, tmp_path):
    text, plan = _plan(tiny_recipe)
    results = tmp_path / "results"
    pre, fine = plan.arms["two_stage"]
    with pytest.raises(HarnessError, match="parent"):
        run_stage(text, fine, results)  # the parent is not trained yet
    assert run_stage(text, pre, results)["status"] == "done"
    assert run_stage(text, pre, results)["status"] == "skipped"
    out = run_stage(text, fine, results)
    assert out["status"] == "done" and out["step"] == 4
    folder = plan.stage_dir(results, fine)
    for name in ("DONE", "config.gin", "stage.json", "metrics.jsonl", "cost.json"):
        assert (folder / name).is_file(), name
    assert (folder / "samples" / "step_0000004.png").is_file()
    assert json.loads((folder / "stage.json").read_text())["parent"] == pre
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    cost = json.loads((folder / "cost.json").read_text())
    assert cost["images_seen"] == 4 * 8 and cost["steps"] == 4


def test_parent_of_another_architecture_is_refused(tiny_recipe, tmp_path):
    results = tmp_path / "results"
    text, plan = _plan(tiny_recipe)
    pre, fine = plan.arms["two_stage"]
    run_stage(text, pre, results)
    # Replace the parent's checkpoint by one of a wider model: fine-tuning must stop, not start from scratch.
    ckpt = newest_valid_checkpoint(plan.stage_dir(results, pre) / "checkpoints")
    state = load_checkpoint(ckpt)
    state["model"]["pos_embed"] = torch.zeros(1, 3, 3)
    from harness.checkpoint import save_checkpoint

    save_checkpoint(ckpt.parent, 8, state)
    with pytest.raises(HarnessError, match="shape mismatch: pos_embed"):
        run_stage(text, fine, results)


def test_resume_gives_the_same_weights_as_one_straight_run(tiny_recipe, tmp_path):
    text, plan = _plan(tiny_recipe)
    scratch = plan.arms["scratch"][0]
    straight = tmp_path / "straight"
    run_stage(text, scratch, straight)

    # Interrupted: stop after step 4 (a checkpoint), then run again from it.
    class StopAt:
        def __init__(self):
            self.calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 4

    resumed = tmp_path / "resumed"
    assert run_stage(text, scratch, resumed, stop_event=StopAt())["status"] == "preempted"
    assert not (plan.stage_dir(resumed, scratch) / "DONE").exists()
    assert run_stage(text, scratch, resumed)["status"] == "done"

    a = load_checkpoint(newest_valid_checkpoint(plan.stage_dir(straight, scratch) / "checkpoints"))
    b = load_checkpoint(newest_valid_checkpoint(plan.stage_dir(resumed, scratch) / "checkpoints"))
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    steps = [json.loads(line)["step"] for line in (plan.stage_dir(resumed, scratch) / "metrics.jsonl").open()]
    assert steps == [2, 4, 6, 8, 10, 12]  # every log step once: none lost, none twice
    for pid, slot in a["optimizer"]["state"].items():
        for name, tensor in slot.items():
            torch.testing.assert_close(b["optimizer"]["state"][pid][name], tensor, rtol=0, atol=0)


def test_gradient_accumulation_matches_the_whole_batch(tiny_recipe, tmp_path):
    """micro_batch_size splits the batch for memory; the update is the same up to float rounding."""
    weights = []
    for bindings in ([], ["Stage.micro_batch_size = 2"]):
        text, plan = _plan(tiny_recipe, "scratch/Stage.steps = 4", *bindings)
        sid = plan.arms["scratch"][0]
        run_stage(text, sid, tmp_path / str(len(bindings)))
        ckpt = newest_valid_checkpoint(plan.stage_dir(tmp_path / str(len(bindings)), sid) / "checkpoints")
        weights.append(load_checkpoint(ckpt)["model"])
    assert ckpt.name == "step_0000004.pt"
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPES_DIR.glob("*.gin")))
def test_every_shipped_recipe_dry_runs(recipe, tmp_path, capsys):
    assert cli_main(["run", str(RECIPES_DIR / recipe), "--dry-run", "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "pending" in out


@pytest.mark.parametrize("binding, message", [
    ("Stagee.steps = 3", "No configurable matching 'Stagee'"),
    ("Stage.stepz = 3", "doesn't have a parameter named 'stepz'"),
    ("Stage.steps = ", "Unable to parse"),
    ("Stage.precision = 'fp8'", "precision"),
    ("Stage.compile = 'fast'", "compile = 'fast'; use one of ('off', 'default', 'reduce-overhead'"),
    ("Stage.compile = True", "compile = True is not a valid str"),
    ("Experiment.name = '../escape'", "not allowed"),
    ("Experiment.arms = {}", "declares no arms"),
    ("BlockMask.block_size = 3", "block"),
    ("Stage.lr = -1e-4", "lr = -0.0001 must be positive"),
    ("Stage.warmup_steps = -10", "warmup_steps = -10 must be 0 or more"),
    ("Stage.ema_decay = 1.5", "ema_decay = 1.5 must be between 0 and 1"),
    ("Stage.sample_every = -3", "sample_every = -3 must be 0"),
    ("UViTConfig.num_classes = 2", "training takes no class labels"),
    ("DataConfig.resolution = 16", "DataConfig.resolution = 16 but UViTConfig.img_size = 32; make them equal"),
])
def test_bad_recipes_fail_in_one_line_with_status_2(tiny_recipe, tmp_path, capsys, binding, message):
    results = tmp_path / "results"
    code = cli_main(["run", str(tiny_recipe), "--gin", binding, "--dry-run", "--results-dir", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert not results.exists()  # nothing written


def test_missing_macro_is_named(tiny_recipe, tmp_path, capsys):
    tiny_recipe.write_text(tiny_recipe.read_text().replace("MASK_RATIO = 0.75", ""))
    code = cli_main(["run", str(tiny_recipe), "--dry-run", "--results-dir", str(tmp_path)])
    assert code == 2
    assert "%MASK_RATIO" in capsys.readouterr().err


def test_missing_data_folder_fails_before_training(tmp_path, capsys):
    code = cli_main(["run", "celebahq_mask90", "--gin", f"CELEBAHQ_ROOT = '{tmp_path / 'nowhere'}'",
                     "--results-dir", str(tmp_path / "results"), "--no-report"])
    err = capsys.readouterr().err
    assert code == 2
    assert "nowhere" in err and "harness prepare" in err
    assert not list((tmp_path / "results").rglob("checkpoints"))


def test_draw_gives_the_visible_indices_of_the_steps_mask(tiny_recipe, tmp_path):
    """Trainer.draw hands the loss the mask's visible indices (computed on the CPU), the same on every call for a
    step, one row per image with the mask's count of visible patches; unmasked stages get None."""
    import torch

    from harness.train import TrainContext, Trainer

    _, plan = _plan(tiny_recipe)
    specs = {ps.name: ps.spec for ps in plan.stages.values()}
    cpu = torch.device("cpu")
    trainer = Trainer(TrainContext(spec=specs["pretrain"], stage_id="x", run_dir=tmp_path, device=cpu))
    visible = trainer.draw(3)[3]
    grid = specs["pretrain"].model.grid
    assert visible.dtype == torch.long and visible.shape == (8, grid**2 - specs["pretrain"].mask.num_masked(grid))
    assert torch.equal(visible, trainer.draw(3)[3]) and not torch.equal(visible, trainer.draw(4)[3])
    assert all(bool((row[1:] > row[:-1]).all()) for row in visible)  # ascending, as visible_indices gives them
    unmasked = Trainer(TrainContext(spec=specs["finetune"], stage_id="y", run_dir=tmp_path, device=cpu))
    assert unmasked.draw(0)[3] is None


def test_a_child_refuses_a_parent_whose_final_checkpoint_is_spoilt(tiny_recipe, tmp_path):
    """An older parent checkpoint would silently shorten the arm's pretraining: the child must stop instead."""
    text, plan = _plan(tiny_recipe)
    pre, fine = plan.arms["two_stage"]
    results = tmp_path / "results"
    run_stage(text, pre, results)
    final = plan.stage_dir(results, pre) / "checkpoints" / "step_0000008.pt"
    data = bytearray(final.read_bytes())
    data[len(data) // 2] ^= 0xFF
    final.write_bytes(bytes(data))
    assert newest_valid_checkpoint(final.parent).name == "step_0000004.pt"  # what the child used to take
    with pytest.raises(HarnessError, match="final checkpoint step_0000008.pt is missing or corrupt"):
        run_stage(text, fine, results)


def test_a_resumed_child_no_longer_needs_its_parents_checkpoints(tiny_recipe, tmp_path):
    import shutil

    text, plan = _plan(tiny_recipe, "finetune/Stage.checkpoint_every = 1")
    pre, fine = plan.arms["two_stage"]
    results = tmp_path / "results"
    run_stage(text, pre, results)

    class StopAfterTwo:
        calls = 0

        def is_set(self):
            self.calls += 1
            return self.calls > 2

    assert run_stage(text, fine, results, stop_event=StopAfterTwo())["status"] == "preempted"
    shutil.rmtree(plan.stage_dir(results, pre) / "checkpoints")  # cleaned up, or on another machine's disk
    assert run_stage(text, fine, results)["status"] == "done"


def _write_images(folder: Path, names: list[str]) -> None:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.new("RGB", (16, 16), (10 * i, 100, 200)).save(folder / name)


def test_a_stage_will_not_resume_on_other_images_than_it_started_with(tiny_recipe, tmp_path):
    """The data is not in the stage id (folders move between machines), so a resumed stage compares its image
    list with the one it recorded; copies that only change file times resume."""
    import os

    images = tmp_path / "images"
    _write_images(images, [f"img{i:02d}.png" for i in range(12)])
    text, plan = _plan(tiny_recipe, "DataConfig.source = 'folder'", f"DataConfig.root = '{images}'",
                       "scratch/Stage.checkpoint_every = 1")
    sid = plan.arms["scratch"][0]
    results = tmp_path / "results"

    class StopAfter:
        def __init__(self, steps):
            self.calls, self.steps = 0, steps

        def is_set(self):
            self.calls += 1
            return self.calls > self.steps

    assert run_stage(text, sid, results, stop_event=StopAfter(2))["status"] == "preempted"
    for path in images.iterdir():  # a copy to a node's local disk: new times, same files
        os.utime(path, (1e9, 1e9))
    assert run_stage(text, sid, results, stop_event=StopAfter(2))["status"] == "preempted"
    (images / "img03.png").unlink()
    _write_images(images, ["zzz.png"])
    folder = plan.stage_dir(results, sid)
    written = {name: (folder / name).stat().st_mtime_ns for name in ("stage.json", "recipe.gin", "config.gin")}
    with pytest.raises(HarnessError, match="data of this stage changed since it started .image 3: img03.png then"):
        run_stage(text, sid, results)
    assert {name: (folder / name).stat().st_mtime_ns for name in written} == written  # refused before any write
    manifest = json.loads((plan.stage_dir(results, sid) / "data_manifest.json").read_text())
    assert "img03.png" in manifest["files"]  # still the record of what the stage trained on


def test_external_weights_the_stage_cannot_use_are_refused_with_the_fix():
    from harness.stage import _weights_from

    plain = {"pos_embed": torch.zeros(2)}
    assert _weights_from(plain, "raw", "f.pt") is plain
    with pytest.raises(HarnessError, match="plain state dict, with no separate EMA weights; set Stage.init_from"):
        _weights_from(plain, "ema", "f.pt")
    maskdm = {"step": 3, "model": {"model.encoder.norm.weight": torch.zeros(2)}, "ema": {}}
    with pytest.raises(HarnessError, match="MaskDM reference checkpoint; convert it first with `harness convert"):
        _weights_from(maskdm, "raw", "f.pt")


def test_float_settings_written_as_integers_are_the_same_stage(tiny_recipe):
    _, plan_float = _plan(tiny_recipe, "Stage.grad_clip = 1.0", "Stage.weight_decay = 0.0")
    _, plan_int = _plan(tiny_recipe, "Stage.grad_clip = 1", "Stage.weight_decay = 0")
    assert list(plan_float.stages) == list(plan_int.stages)
    assert all(isinstance(ps.spec.grad_clip, float) for ps in plan_int.stages.values())


def test_the_transfer_recipe_follows_the_reference_transfer_configs():
    """MaskDM's configs/transfer: vggface2_small_90p.yml pretrains (batch 256, lr 2e-4, clip 1.0, no flips);
    celebahq_small_0.1.yml fine-tunes on 3000 CelebA-HQ images (batch 64, lr 5e-5, no clipping, no warm-up,
    flips at p = 0.5); the scratch arm trains like the fine-tuning."""
    _, plan = _plan(RECIPES_DIR / "vggface2_to_celebahq3k.gin")
    specs = {ps.name: ps.spec for ps in plan.stages.values()}
    pre = specs["pretrain"]
    assert (pre.batch_size, pre.lr, pre.grad_clip, pre.data.hflip) == (256, 2e-4, 1.0, False)
    for name in ("finetune", "scratch"):
        spec = specs[name]
        assert (spec.batch_size, spec.lr, spec.grad_clip, spec.warmup_steps, spec.data.hflip, spec.data.subset) \
            == (64, 5e-5, 0.0, 0, True, 3000), name


def test_a_dataset_too_small_for_the_metrics_fails_before_training(tiny_recipe, tmp_path, capsys):
    """128 images cannot serve KID subsets of 1000 (the default): said before the first step, not at the
    first evaluation hours later; a dry run only notes it."""
    bindings = ["--gin", "scratch/Stage.eval = @EvalConfig()", "--gin", "EvalConfig.num_samples = 2000"]
    results = tmp_path / "results"
    assert cli_main(["run", str(tiny_recipe), *bindings, "--dry-run", "--results-dir", str(results)]) == 0
    assert "note: " in (note := capsys.readouterr().err) and "the stage's dataset has 128 images" in note
    code = cli_main(["run", str(tiny_recipe), *bindings, "--results-dir", str(results), "--no-report"])
    err = capsys.readouterr().err
    assert code == 2 and "the stage's dataset has 128 images" in err
    assert not list(results.rglob("checkpoints"))


@pytest.mark.parametrize("init_from, parent_key", [("raw", "model"), ("ema", "ema")])
def test_a_child_starts_from_its_parents_final_weights(tiny_recipe, tmp_path, init_from, parent_key):
    """The child's step-0 weights and EMA both equal the chosen weights of the parent's final checkpoint (a stop
    before the first step checkpoints exactly what the child started from)."""
    text, plan = _plan(tiny_recipe, f"finetune/Stage.init_from = '{init_from}'")
    pre, fine = plan.arms["two_stage"]
    results = tmp_path / "results"
    run_stage(text, pre, results)

    class StopAtOnce:
        def is_set(self):
            return True

    assert run_stage(text, fine, results, stop_event=StopAtOnce())["status"] == "preempted"
    final = load_checkpoint(plan.stage_dir(results, pre) / "checkpoints" / "step_0000008.pt")
    parent, other = final[parent_key], final["ema" if parent_key == "model" else "model"]
    assert not torch.equal(parent["pos_embed"], other["pos_embed"])  # so the test can tell which one was taken
    child = load_checkpoint(plan.stage_dir(results, fine) / "checkpoints" / "step_0000000.pt")
    for key in ("model", "ema"):
        assert child[key].keys() == parent.keys()
        for name, tensor in parent.items():
            assert torch.equal(child[key][name], tensor), f"{key}.{name}"
