"""`harness bench`: the figures it reports and how they relate (no timing is asserted: machines vary), and the
performance fixes of the training step keep its maths (patch embedding of visible patches, conditional clipping,
fused AdamW, torch.compile, sampling in the stage's precision)."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from harness.bench import BenchOptions, run_bench
from harness.cli import main as cli_main
from harness.config import load_recipe
from harness.errors import HarnessError
from harness.experiment import plan_from_gin

ROW_FIELDS = {
    "stage", "variant", "mask", "mask_ratio", "batch_size", "tokens_per_image", "steps_timed", "step_seconds",
    "median_step_seconds", "images_per_second", "tokens_per_second", "flops_per_step", "achieved_flops_per_second",
    "matmul_shape", "matmul_flops_per_second", "matmul_fraction", "peak_memory_bytes", "peak_memory_kind",
    "loader_images_per_second", "sampler", "sampling_images_per_second", "stage_steps", "stage_batch_size",
    "estimated_hours", "estimated_device_hours", "device_hours_unit", "scaled_from_batch", "peak_fraction",
    "precision", "compiled", "attention", "sample_batch",
}


def _stages(recipe, *bindings):
    load_recipe(recipe, list(bindings))
    return {ps.name: ps for ps in plan_from_gin().stages.values()}


@pytest.fixture(scope="module")
def compare_report(tmp_path_factory) -> dict:
    """The JSON of `harness bench TINY --stage pretrain --compare-mask --json`, run once for the tests below."""
    from conftest import TINY_RECIPE

    recipe = tmp_path_factory.mktemp("bench") / "tiny.gin"
    recipe.write_text(TINY_RECIPE)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["bench", str(recipe), "--stage", "pretrain", "--steps", "3", "--warmup", "1",
                         "--compare-mask", "--json"]) == 0
    return json.loads(out.getvalue())


def test_json_has_every_field_and_consistent_figures(compare_report):
    report = compare_report
    assert {"recipe", "device", "threads", "torch_version", "load_average", "rows", "comparisons", "notes",
            "targets", "peak_flops", "peak_flops_source", "large_matmul_flops"} <= set(report)
    assert report["peak_flops"] is None and report["large_matmul_flops"] is None  # GPU only
    assert report["threads"] == torch.get_num_threads()
    rows = report["rows"]
    assert [(r["variant"], r["mask"]) for r in rows] == [("stage", "block2"), ("no mask", "none")]
    for row in rows:
        assert set(row) == ROW_FIELDS
        assert len(row["step_seconds"]) == row["steps_timed"] == 3
        median = row["median_step_seconds"]
        assert median == sorted(row["step_seconds"])[1]
        assert row["batch_size"] == row["stage_batch_size"] == 8 and not row["scaled_from_batch"]
        assert row["images_per_second"] == pytest.approx(8 / median)
        assert row["tokens_per_second"] == pytest.approx(8 * row["tokens_per_image"] / median)
        assert row["achieved_flops_per_second"] == pytest.approx(row["flops_per_step"] / median)
        assert row["matmul_fraction"] == pytest.approx(row["achieved_flops_per_second"]
                                                       / row["matmul_flops_per_second"])
        # the tiny model is 64 wide with a 256-wide MLP; the matmul has the row's (batch x tokens) rows
        assert row["matmul_shape"] == [8 * row["tokens_per_image"], 64, 256]
        assert row["estimated_hours"] == pytest.approx(8 * median / 3600)  # pretrain: 8 steps of batch 8
        assert row["estimated_device_hours"] == pytest.approx(row["estimated_hours"] * report["threads"])
        assert row["device_hours_unit"] == "core-hours"
        assert row["peak_memory_bytes"] > 10 * 2**20 and row["loader_images_per_second"] > 0
        assert (row["precision"], row["compiled"], row["peak_fraction"]) == ("float32", "off", None)
    # block 2 at 75% on the 8x8 grid hides 48 patches: 16 visible + the time token enter the blocks
    assert [r["tokens_per_image"] for r in rows] == [17, 65]
    assert rows[0]["mask_ratio"] == 0.75 and rows[1]["mask_ratio"] == 0.0
    assert rows[0]["sampler"] == "ddim3_eta1" and rows[0]["sampling_images_per_second"] > 0  # Stage.sample_steps
    assert rows[1]["sampler"] is None and rows[1]["sampling_images_per_second"] is None

    (comparison,) = report["comparisons"]
    masked, unmasked = rows
    assert comparison["stage"] == "pretrain" and comparison["mask"] == "block2"
    assert comparison["time_ratio"] == pytest.approx(masked["median_step_seconds"] / unmasked["median_step_seconds"])
    assert comparison["flops_ratio"] == pytest.approx(masked["flops_per_step"] / unmasked["flops_per_step"])
    assert comparison["quotient"] == pytest.approx(comparison["time_ratio"] / comparison["flops_ratio"])
    assert comparison["meets_target"] == (comparison["quotient"] <= 1.25)


def test_masked_flops_follow_the_tokens_kept(compare_report):
    """Dropping tokens removes their work: the FLOPs ratio is about the ratio of tokens in the blocks (a little
    below it, as attention is quadratic in the tokens)."""
    report = compare_report
    masked, unmasked = report["rows"]
    token_ratio = masked["tokens_per_image"] / unmasked["tokens_per_image"]
    flops_ratio = report["comparisons"][0]["flops_ratio"]
    assert 0.8 * token_ratio < flops_ratio <= token_ratio


def test_flops_ratio_scales_with_the_mask_ratio(tiny_recipe):
    """Three mask ratios: the masked FLOPs per step fall in proportion to the visible tokens."""
    from harness.bench import bench_spec, unmasked_twin
    from harness.train import TrainContext, Trainer

    ratios = {}
    for mask_ratio in (0.25, 0.5, 0.75):
        spec = _stages(tiny_recipe, f"MASK_RATIO = {mask_ratio}")["pretrain"].spec
        trainers = [Trainer(TrainContext(spec=s, stage_id="x", run_dir=tiny_recipe.parent, device=torch.device("cpu")))
                    for s in (spec, unmasked_twin(spec))]
        flops = [t.step_flops() for t in trainers]
        tokens = [t.model.tokens_entering_blocks(t.draw(0)[3]) for t in trainers]
        ratios[mask_ratio] = (flops[0] / flops[1], tokens[0] / tokens[1])
    for flops_ratio, token_ratio in ratios.values():
        assert flops_ratio == pytest.approx(token_ratio, rel=0.2)
    assert ratios[0.25][0] > ratios[0.5][0] > ratios[0.75][0]
    assert bench_spec(spec, BenchOptions(), []) is spec  # nothing to change: the very same stage


def test_missing_data_folder_falls_back_to_embedded_images_and_scales_the_estimate(tiny_recipe, tmp_path):
    stages = _stages(tiny_recipe, "DataConfig.source = 'folder'", f"DataConfig.root = '{tmp_path / 'nowhere'}'",
                     "DataConfig.resolution = 32")
    options = BenchOptions(batch_size=4, steps=1, warmup=0, sample_steps=1)
    report = run_bench("tiny", [stages["finetune"]], options)
    (row,) = report.rows
    (note,) = [note for note in report.notes if "embedded 'shapes'" in note]
    assert "nowhere' cannot be used (data folder" in note and "does not exist" in note and "32 px" in note
    assert any("scaled linearly" in note for note in report.notes)
    assert row.batch_size == 4 and row.stage_batch_size == 8 and row.scaled_from_batch
    assert row.estimated_hours == pytest.approx(4 * row.median_step_seconds * 8 / 4 / 3600)  # 4 steps of batch 8


def test_fallback_message_on_the_command_line(tiny_recipe, tmp_path, capsys):
    assert cli_main(["bench", str(tiny_recipe), "--stage", "finetune", "--steps", "1", "--warmup", "0",
                     "--sample-steps", "1", "--gin", "DataConfig.source = 'folder'",
                     "--gin", f"DataConfig.root = '{tmp_path / 'nowhere'}'",
                     "--gin", "DataConfig.resolution = 32"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "does not exist" in out and "timing on the embedded 'shapes' generator at 32 px" in out
    assert "finetune" in out and "core-hours" in out
    # the estimate column says what it counts
    assert "'stage est.': the stage's training steps only" in out and "evaluation (FID sampling)" in out


def test_a_broken_data_folder_is_reported_with_its_own_error_not_as_missing(tiny_recipe, tmp_path):
    """A folder that exists but holds no images: the bench still times the embedded data, and the note quotes
    the data check's own error instead of calling the folder missing."""
    from harness.bench import bench_spec

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    stages = _stages(tiny_recipe, "DataConfig.source = 'folder'",
                     f"DataConfig.root = '{tmp_path / 'empty'}'", "DataConfig.resolution = 32")
    notes: list[str] = []
    spec = bench_spec(stages["finetune"].spec, BenchOptions(batch_size=4), notes)
    assert (spec.data.source, spec.data.resolution, spec.batch_size) == ("shapes", 32, 4)
    (note,) = notes
    assert "has no images" in note and "does not exist" not in note and "not found" not in note
    assert note.startswith(f"finetune: data folder '{tmp_path / 'empty'}' cannot be used (data folder ")


def test_bad_options_are_harness_errors(tiny_recipe, capsys):
    assert cli_main(["bench", str(tiny_recipe), "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert cli_main(["bench", str(tiny_recipe), "--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The performance fixes keep the maths

def test_patch_embedding_of_visible_patches_equals_the_conv_then_gather():
    from harness.masks import BlockMask
    from harness.models.config import UViTConfig
    from harness.patches import embed_patches, gather_patches, visible_indices

    torch.manual_seed(0)
    model = UViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4).build()
    x = torch.randn(3, 3, 32, 32)
    conv = model.patch_embed(x) + model.pos_embed[:, model.extras:]  # timm's conv path, every patch

    def embedded(idx):  # what MaskedUViT.forward embeds
        return embed_patches(x, model.patch_embed.proj, model.pos_embed[0, model.extras:], idx)

    assert torch.allclose(embedded(None), conv, atol=1e-6)
    idx = visible_indices(BlockMask(0.5, 2).sample(3, 8, generator=torch.Generator().manual_seed(1)))
    assert torch.allclose(embedded(idx), gather_patches(conv, idx), atol=1e-6)
    assert not torch.allclose(embedded(idx), conv[:, : idx.shape[1]], atol=1e-3)


def _textbook_step(trainer, initial, max_norm):
    """(loss, gradient norm, parameters) after one step from `initial` on the trainer's step-0 batch:
    clip_grad_norm_ (unless max_norm is None), then the unfused AdamW."""
    from harness.update import param_groups

    model, spec = copy.deepcopy(initial), trainer.spec
    x0, t, noise, mask = trainer.draw(0)
    loss = trainer.diffusion.loss_at(model, x0, t, noise, mask=mask)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if max_norm is None else max_norm)
    torch.optim.AdamW(param_groups(model, spec.weight_decay), lr=spec.lr, betas=spec.betas, foreach=False).step()
    return loss.item(), norm.item(), list(model.parameters())


def _same_update(after, expected, before, rtol=1e-4) -> bool:
    return all(torch.allclose(p - p0, q - p0, rtol=rtol, atol=1e-9) for p, q, p0 in zip(after, expected, before))


@pytest.mark.parametrize("grad_clip", [1e-6, 1e6, 0.0])
def test_train_step_equals_clip_grad_norm_and_adamw(tiny_recipe, grad_clip):
    """One Trainer step against the textbook: clip_grad_norm_, then AdamW. A clip of 1e-6 shrinks the gradients
    below Adam's eps, so clipping visibly changes the update; 1e6 and 0 (off) leave the gradients alone."""
    from harness.train import TrainContext, Trainer

    spec = _stages(tiny_recipe, f"Stage.grad_clip = {grad_clip}", "Stage.weight_decay = 0.1")["pretrain"].spec
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tiny_recipe.parent, device=torch.device("cpu")))
    initial = copy.deepcopy(trainer.model)
    before = [p.detach().clone() for p in initial.parameters()]

    loss, grad_norm = trainer.train_step(0)

    expected_loss, expected_norm, expected = _textbook_step(trainer, initial, grad_clip if grad_clip > 0 else None)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grad_norm == pytest.approx(expected_norm, rel=1e-5)
    after = list(trainer.model.parameters())
    assert _same_update(after, expected, before)
    clips = grad_clip == 1e-6
    assert (expected_norm > grad_clip > 0) == clips
    if clips:  # the same step without clipping moves the weights otherwise
        assert not _same_update(after, _textbook_step(trainer, initial, None)[2], before, rtol=1e-2)


def test_compiled_step_equals_the_eager_step_and_bench_reports_it(tiny_recipe, tmp_path):
    """Stage.compile = 'default': the same loss and update as the eager step (to float tolerance: inductor fuses
    and reorders), compiled sampling gives the eager samples, and `--compile --json-out` records the mode. The
    compiled trainer also asks for Stage.attention = 'math' (the eager one runs CPU's flash kernel): the choice
    must reach the compiled code, where a context around the call would not."""
    import os
    import shutil

    from harness.sampling import SamplerConfig, sample_batch
    from harness.train import TrainContext, Trainer

    if not (shutil.which("g++") or shutil.which("c++")):
        if os.environ.get("CI") == "true":
            pytest.fail("no C++ compiler: torch.compile cannot build CPU kernels (scripts/test.sh installs g++)")
        pytest.skip("no C++ compiler for torch.compile's CPU kernels (install g++)")
    trainers = []
    for mode, attention in (("off", "auto"), ("default", "math")):
        spec = _stages(tiny_recipe, f"Stage.compile = '{mode}'", f"Stage.attention = '{attention}'")["pretrain"].spec
        trainers.append(Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu"))))
    eager, compiled = trainers
    assert compiled.net is not compiled.model and eager.net is eager.model
    for step in range(2):
        losses = [t.train_step(step)[0] for t in trainers]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    compiled_ops = _sdpa_ops(lambda: compiled.train_step(2))
    assert "aten::bmm" in compiled_ops and not any("flash" in op for op in compiled_ops), compiled_ops
    eager.train_step(2)
    for p, q in zip(eager.model.parameters(), compiled.model.parameters()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6)
    sampler, shape = SamplerConfig("ddim", 2, eta=1.0), (3, 32, 32)
    images = [sample_batch(t.sampling_net, t.diffusion, sampler, range(2), shape, 0, torch.device("cpu"))
              for t in trainers]
    assert torch.allclose(images[0], images[1], atol=1e-4)

    out = tmp_path / "bench.json"
    with contextlib.redirect_stdout(io.StringIO()) as table:
        assert cli_main(["bench", str(tiny_recipe), "--stage", "finetune", "--steps", "1", "--warmup", "1",
                         "--sample-steps", "1", "--compile", "--attention", "math", "--json-out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["compiled"] == "default" and row["attention"] == "math" and row["stage"] == "finetune"
    assert "compiled" in table.getvalue() and "attention" in table.getvalue()  # (the cell may wrap)


@pytest.mark.parametrize("name, matched, peak", [
    ("NVIDIA H100 80GB HBM3", "H100", 989e12), ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835e12), ("NVIDIA H200", "H200", 989e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835e12), ("NVIDIA GH200 480GB", "GH200", 989e12),
    ("NVIDIA A100-SXM4-80GB", "A100", 312e12), ("NVIDIA GeForce RTX 4090", None, None),
])
def test_gpu_peak_comes_from_the_data_sheet_by_device_name(name, matched, peak):
    """The most specific name wins (the report names it as the peak's source)."""
    from harness.bench import data_sheet_peak

    assert data_sheet_peak(name) == (None if matched is None else (matched, peak))


def test_sampling_net_runs_the_ema_model_in_the_stage_precision(tiny_recipe, tmp_path):
    """Only the model's forward changes precision (bf16 here, as on a GPU by default); fp32 leaves it alone."""
    from harness.compute import InPrecision
    from harness.train import TrainContext, Trainer

    spec = _stages(tiny_recipe)["finetune"].spec
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))
    assert trainer.sampling_net.module is trainer.ema and trainer.sampling_net.dtype is None  # CPU: fp32
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        plain = trainer.ema(x, t)
        assert torch.equal(trainer.sampling_net(x, t), plain)
        half = InPrecision(trainer.ema, "cpu", torch.bfloat16)(x, t)
    assert half.dtype == torch.bfloat16 and plain.dtype == torch.float32
    assert torch.allclose(half.float(), plain, atol=0.1) and not torch.equal(half.float(), plain)


def _sdpa_ops(fn) -> set[str]:
    """The attention operators `fn` runs: torch's SDPA ops, and batched matmuls (the model has none elsewhere;
    compiled plain attention shows as those)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or e.key == "aten::bmm"}


def test_stage_attention_picks_the_kernel_for_training_and_sampling(tiny_recipe, tmp_path):
    """Stage.attention = 'math' runs torch's plain attention in the step and in sampling (CPU's default is its
    flash kernel); the results agree to float32 round-off."""
    from harness.train import TrainContext, Trainer

    def trainer(*bindings):
        spec = _stages(tiny_recipe, *bindings)["finetune"].spec
        return Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))

    auto, plain = trainer(), trainer("Stage.attention = 'math'")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        assert _sdpa_ops(lambda: auto.sampling_net(x, t)) == {"aten::scaled_dot_product_attention",
                                                              "aten::_scaled_dot_product_flash_attention_for_cpu"}
        assert _sdpa_ops(lambda: plain.sampling_net(x, t)) == {"aten::scaled_dot_product_attention",
                                                               "aten::_scaled_dot_product_attention_math", "aten::bmm"}
        assert torch.allclose(auto.sampling_net(x, t), plain.sampling_net(x, t), atol=1e-5)
    losses = []
    step_ops = _sdpa_ops(lambda: losses.append(plain.train_step(0)[0]))
    assert "aten::_scaled_dot_product_attention_math" in step_ops
    assert not any("flash" in op for op in step_ops)
    loss_auto, _ = auto.train_step(0)
    (loss_plain,) = losses
    assert loss_auto == pytest.approx(loss_plain, rel=1e-5)


def test_compiled_sampling_keeps_the_attention_kernel(tiny_recipe, tmp_path):
    """With compile on, both the step's and the sampler's compiled modules wrap the attention-kernel choice
    (built lazily: nothing compiles here)."""
    from harness.compute import WithAttentionKernel
    from harness.train import TrainContext, Trainer

    spec = _stages(tiny_recipe, "Stage.compile = 'default'", "Stage.attention = 'math'")["finetune"].spec
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))
    for compiled in (trainer.net, trainer.sampling_net.module):
        assert isinstance(compiled._orig_mod, WithAttentionKernel) and compiled._orig_mod.backend == "math"
    assert trainer.sampling_net.module._orig_mod.module is trainer.ema


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_attention_kernel_that_cannot_run_here_is_refused_in_one_line(tiny_recipe, tmp_path, backend):
    from harness.train import TrainContext, Trainer

    spec = _stages(tiny_recipe, f"Stage.attention = '{backend}'")["finetune"].spec
    with pytest.raises(HarnessError, match=f"Stage.attention = '{backend}' cannot run on cpu in float32.*use 'auto'"):
        Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))


def test_evaluation_and_sample_grids_sample_with_the_sampling_net(tiny_recipe, tmp_path, monkeypatch):
    import harness.sampling
    from harness.train import TrainContext, Trainer

    spec = _stages(tiny_recipe, "finetune/Stage.eval = @EvalConfig()", "EvalConfig.num_samples = 4",
                   "EvalConfig.metrics = ('fid',)")["finetune"].spec
    calls = []
    evaluate = lambda model, diffusion, step, extra: calls.append(("eval", model, step, extra))  # noqa: E731

    def sample_images(model, diffusion, sampler, n, shape, **kwargs):
        calls.append(("grid", model))
        return torch.zeros(n, *shape)

    monkeypatch.setattr(harness.sampling, "sample_images", sample_images)
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")), evaluate)
    assert trainer.run() == "done"
    (grid,) = [c for c in calls if c[0] == "grid"]
    (evaluation,) = [c for c in calls if c[0] == "eval"]
    assert grid[1] is trainer.sampling_net and evaluation[1] is trainer.sampling_net
    assert evaluation[2] == spec.steps and evaluation[3]["sample_precision"] == "float32"
    assert evaluation[3]["images_seen"] == spec.steps * spec.batch_size  # with the cost snapshot


def test_profile_keeps_a_table_of_operators_per_row(tiny_recipe):
    """`--profile N`: N more steps under torch.profiler per row, after the timed ones, as a table of the 15
    operators with the most self time."""
    stages = _stages(tiny_recipe)
    options = BenchOptions(steps=1, warmup=0, sample_steps=1, compare_mask=True, profile_steps=1)
    report = run_bench("tiny", [stages["pretrain"]], options)
    assert list(report.profiles) == ["pretrain", "pretrain (no mask)"]
    for table in report.profiles.values():
        assert "Self CPU time total" in table
        lines = table.splitlines()
        rules = [i for i, line in enumerate(lines) if line.startswith("---")]
        assert len(rules) == 3 and rules[2] - rules[1] - 1 == 15  # header, the 15 operators, the total
    assert [len(row.step_seconds) for row in report.rows] == [1, 1]  # profiled steps are not timed
    assert report.to_json()["profiles"] == report.profiles
    with pytest.raises(Exception, match="--profile >= 0"):
        run_bench("tiny", [stages["pretrain"]], BenchOptions(profile_steps=-1))


def test_profile_table_names_the_steps_real_operators(tiny_recipe):
    """The profiled step is the training step: its matmuls and the fused AdamW are among its operators (all
    of them listed here: on a model this small, which ones make the top 15 depends on the machine's load)."""
    from harness.bench import profile_table
    from harness.train import TrainContext, Trainer

    spec = _stages(tiny_recipe)["pretrain"].spec
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=Path(run_dir), device=torch.device("cpu")))
        trainer.train_step(0)
        table = profile_table(trainer, first_step=1, steps=1, rows=1000)
    assert "aten::mm" in table and "aten::_fused_adamw_" in table and "aten::_foreach_lerp_" in table


def test_the_matmul_reference_has_the_steps_rows_with_micro_batches(tiny_recipe):
    """With gradient accumulation the step's matmuls have one micro-batch's rows: the reference must too."""
    stages = _stages(tiny_recipe, "Stage.micro_batch_size = 2")
    report = run_bench("tiny", [stages["scratch"]], BenchOptions(steps=1, warmup=0, sample_steps=1))
    (row,) = report.rows
    assert list(row.matmul_shape) == [2 * row.tokens_per_image, 64, 256]


def test_the_matmul_reference_repeats_small_matmuls_between_two_syncs(monkeypatch):
    """A small GPU matmul timed alone measures the launch and the sync: the timer repeats it between one pair of
    synchronisations until the stretch is long enough, and reports the time of one call."""
    import harness.bench as bench

    syncs, matmuls = [], []
    real = torch.matmul
    monkeypatch.setattr(bench, "_synchronize", lambda device: syncs.append(len(matmuls)))
    monkeypatch.setattr(torch, "matmul", lambda a, b: matmuls.append(1) or real(a, b))
    timer = bench.matmul_reference(8, 8, 8, torch.device("cpu"), torch.float32, min_seconds=0.01)
    syncs.clear(), matmuls.clear()
    seconds = timer()
    assert len(syncs) == 2 and len(matmuls) > 10  # one pair of syncs around many calls
    assert 0 < seconds < 0.01 / 5


def test_bench_options_override_scoped_recipe_bindings(tiny_recipe):
    """`--precision` / `--compile` / `--attention` set the benched stage itself: a scoped binding in the recipe
    (`pretrain/Stage.attention = ...`) used to win over the unscoped one the CLI added."""
    stages = _stages(tiny_recipe, "pretrain/Stage.attention = 'flash'", "pretrain/Stage.precision = 'fp32'")
    options = BenchOptions(steps=1, warmup=0, sample_steps=1, attention="math", precision="bf16")
    (row,) = run_bench("tiny", [stages["pretrain"]], options).rows
    assert (row.attention, row.precision) == ("math", "bfloat16")


def test_sampling_is_timed_at_the_batch_asked_for(tiny_recipe):
    stages = _stages(tiny_recipe)
    (row,) = run_bench("tiny", [stages["scratch"]], BenchOptions(steps=1, warmup=0, sample_steps=1)).rows
    assert row.sample_batch == 8  # CPU: the timed batch (a GPU takes EvalConfig.batch_size)
    (row,) = run_bench("tiny", [stages["scratch"]],
                       BenchOptions(steps=1, warmup=0, sample_steps=1, sample_batch=3)).rows
    assert row.sample_batch == 3


def test_with_compare_mask_each_rows_peak_leaves_out_what_the_row_before_holds(tiny_recipe, monkeypatch):
    """The unmasked twin is built while the masked trainer (weights, EMA, AdamW state, gradients) stays resident:
    its row subtracts what was held before it was built, as if it had been benched alone."""
    from harness.cost import PeakMemory

    in_use = iter([100, 100, 600])  # before any trainer; before the first; before the second (+500 held)
    monkeypatch.setattr(PeakMemory, "current", lambda self: next(in_use))
    monkeypatch.setattr(PeakMemory, "peak", lambda self: 1000)
    stages = _stages(tiny_recipe)
    options = BenchOptions(steps=1, warmup=0, sample_steps=1, compare_mask=True)
    rows = run_bench("tiny", [stages["pretrain"]], options).rows
    assert [(row.variant, row.peak_memory_bytes) for row in rows] == [("stage", 1000), ("no mask", 500)]


def test_compare_mask_with_a_dit_stage(tmp_path):
    """`harness bench --compare-mask` on a DiT stage (the tiny preset): the blocks see the visible patches alone
    (no time token: adaLN conditions them), the matmul reference has the DiT's width and MLP, and the FLOPs fall
    with the tokens kept."""
    from conftest import TINY_RECIPE

    recipe = tmp_path / "dit.gin"
    recipe.write_text(TINY_RECIPE.replace("backbones/uvit_tiny.gin", "backbones/dit_tiny.gin"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli_main(["bench", str(recipe), "--stage", "pretrain", "--steps", "2", "--warmup", "1",
                         "--sample-steps", "1", "--compare-mask", "--json"]) == 0
    report = json.loads(out.getvalue())
    masked, unmasked = report["rows"]
    assert [(r["mask"], r["tokens_per_image"]) for r in report["rows"]] == [("block2", 16), ("none", 64)]
    assert masked["matmul_shape"] == [8 * 16, 64, 256] and unmasked["matmul_shape"] == [8 * 64, 64, 256]
    assert all(r["flops_per_step"] > 0 and r["images_per_second"] > 0 for r in report["rows"])
    (comparison,) = report["comparisons"]
    assert comparison["flops_ratio"] == pytest.approx(masked["flops_per_step"] / unmasked["flops_per_step"])
    assert 0.6 * 16 / 64 < comparison["flops_ratio"] < 1.2 * 16 / 64
