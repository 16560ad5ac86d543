"""Each switch of docs/fidelity.md pinned to the MaskDM reference's arithmetic (jiachenlei/maskdm at 0e79a60), and
the paper recipes shown to select the reference's behaviour while every other stage keeps its id."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from harness.cli import main as cli_main
from harness.compute import dtype_name
from harness.config import RECIPES_DIR, load_recipe
from harness.data import DataConfig
from harness.diffusion import DiffusionConfig
from harness.errors import HarnessError
from harness.evaluate import EvalConfig
from harness.experiment import Stage, plan_from_gin, stage_id
from harness.masks import BlockMask
from harness.models.config import UViTConfig
from harness.sampling import SamplerConfig, image_seed, sample_batch
from harness.train import TrainContext, Trainer
from harness.update import ema_decay_at, param_groups

TINY = dict(img_size=32, patch_size=4, embed_dim=32, depth=3, num_heads=2)
PAPER_RECIPES = ("celebahq_mask90", "celebahq_mask50", "celeba64_mask_ablation", "vggface2_to_celebahq3k",
                 "finetune_from_maskdm", "lsun_church256")


# ------------------------------------------------------------------------------------------- DDIM eps handling
class _Recorder(torch.nn.Module):
    """An eps 'model' that overshoots (its x0 falls far outside [-1, 1]) and stops the sampler at its 2nd call,
    keeping the x it was given: the result of exactly one DDIM step."""

    class Stop(Exception):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, y=None):
        self.inputs.append(x.clone())
        if len(self.inputs) == 2:
            raise self.Stop
        return -2.0 * x  # eps = -2 x_t: x0 = (1 + 2 sqrt(1 - abar)) x_t / sqrt(abar), clipped almost everywhere


def _one_harness_step(sampler: SamplerConfig, diffusion, n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    model = _Recorder()
    with pytest.raises(_Recorder.Stop):
        sample_batch(model, diffusion, sampler, range(n), (3, 8, 8), seed=5, device="cpu")
    return model.inputs[0], model.inputs[1]


def _reference_ddim_step(x, time, time_next, diffusion, eta, clip=True):
    """gaussian_ddpm.py, GaussianDiffusion.model_predictions (pred_noise) and ddim_sample, line by line, with the
    reference's float32 buffers; the step's noise is the harness's (the second draw of each image's generator)."""
    abar = diffusion.alphas_cumprod.double()  # the reference registers float32 buffers computed in float64
    sqrt_recip = torch.sqrt(1.0 / abar).float()
    sqrt_recipm1 = torch.sqrt(1.0 / abar - 1).float()
    alphas_cumprod = abar.float()
    pred_noise = -2.0 * x  # model_output
    x_start = sqrt_recip[time] * x - sqrt_recipm1[time] * pred_noise  # predict_start_from_noise
    if clip:
        x_start = x_start.clamp(-1, 1)  # maybe_clip; pred_noise is left as the model gave it
    alpha, alpha_next = alphas_cumprod[time], alphas_cumprod[time_next]
    sigma = eta * ((1 - alpha / alpha_next) * (1 - alpha_next) / (1 - alpha)).sqrt()
    c = (1 - alpha_next - sigma**2).sqrt()
    gens = [torch.Generator().manual_seed(image_seed(5, i)) for i in range(len(x))]
    noise = []
    for g in gens:
        torch.randn(x.shape[1:], generator=g)  # x_T
        noise.append(torch.randn(x.shape[1:], generator=g))
    return x_start * alpha_next.sqrt() + c * pred_noise + sigma * torch.stack(noise)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddim_step_with_the_reference_setting_is_the_reference_step(schedule):
    diffusion = DiffusionConfig(schedule=schedule).build()
    sampler = SamplerConfig(kind="ddim", steps=250, eta=1.0, eps_from_clipped_x0=False)
    x_t, x_next = _one_harness_step(sampler, diffusion)
    # MaskDM's grid: linspace(-1, 999, 251).int() -> (999, 995) first
    expected = _reference_ddim_step(x_t, 999, 995, diffusion, eta=1.0)
    torch.testing.assert_close(x_next, expected, rtol=1e-5, atol=1e-5)


def test_recomputing_eps_from_the_clipped_x0_is_another_step():
    diffusion = DiffusionConfig(schedule="cosine").build()
    _, reference_like = _one_harness_step(SamplerConfig(steps=250, eps_from_clipped_x0=False), diffusion)
    x_t, harness_own = _one_harness_step(SamplerConfig(steps=250, eps_from_clipped_x0=True), diffusion)
    assert (harness_own - reference_like).abs().max() > 1e-2  # x0 was clipped: the updates differ
    # the harness's own step: eps recomputed from the clipped x0 is what the update uses
    expected = _reference_ddim_step(x_t, 999, 995, diffusion, eta=1.0)  # (with the raw eps)
    assert not torch.allclose(harness_own, expected, atol=1e-3)
    # without clipping the setting changes nothing
    _, a = _one_harness_step(SamplerConfig(steps=250, clip_x0=False, eps_from_clipped_x0=False), diffusion)
    _, b = _one_harness_step(SamplerConfig(steps=250, clip_x0=False, eps_from_clipped_x0=True), diffusion)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_x0_and_v_predictions_derive_eps_from_the_clipped_x0_either_way():
    """The reference's pred_x0 and pred_v branches recompute eps from the clipped x0 (predict_noise_from_start)."""
    for prediction in ("x0", "v"):
        diffusion = DiffusionConfig(prediction=prediction).build()
        _, a = _one_harness_step(SamplerConfig(steps=250, eps_from_clipped_x0=False), diffusion)
        _, b = _one_harness_step(SamplerConfig(steps=250, eps_from_clipped_x0=True), diffusion)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sampler_refuses_a_non_bool_eps_setting():
    with pytest.raises(HarnessError, match="eps_from_clipped_x0"):
        SamplerConfig(eps_from_clipped_x0="no")


# ------------------------------------------------------------------------------------------------------ EMA
def _ema_pytorch_decay(k: int, beta: float, update_after_step=100, inv_gamma=1.0, power=2 / 3, min_value=0.0):
    """The decay of ema-pytorch's k-th update() call (0-based, update_every = 1), 0.0 for its copies, written from
    ema_pytorch.py (0.8.3): `update` increments `step` and then copies while not initted or step <= after;
    `get_current_decay` uses epoch = step - update_after_step - 1 on the incremented counter."""
    if k == 0 or k <= update_after_step:  # initialisation, then copy_params_from_model_to_ema
        return 0.0
    counter = k + 1
    epoch = max(counter - update_after_step - 1, 0)
    if epoch <= 0:
        return 0.0
    return min(max(1 - (1 + epoch / inv_gamma) ** -power, min_value), beta)


@pytest.mark.parametrize("step", [0, 99, 100, 101, 10_000, 31_721, 31_722, 40_000])
def test_ema_warmup_follows_ema_pytorch(step):
    expected = _ema_pytorch_decay(step, 0.999)
    assert ema_decay_at(step, 0.999, True, "ema_pytorch") == pytest.approx(expected, rel=0, abs=1e-15)


def test_ema_pytorch_values_at_the_issue_steps():
    assert [ema_decay_at(s, 0.999, True, "ema_pytorch") for s in (0, 99, 100)] == [0.0, 0.0, 0.0]
    assert ema_decay_at(10_000, 0.999, True, "ema_pytorch") == pytest.approx(1 - 9901 ** (-2 / 3))
    assert ema_decay_at(40_000, 0.999, True, "ema_pytorch") == 0.999  # capped at the decay
    # the harness's own rule, unchanged
    assert ema_decay_at(0, 0.999) == pytest.approx(0.1)
    assert ema_decay_at(10_000, 0.999) == 0.999 and ema_decay_at(10_000, 0.9999) == pytest.approx(10001 / 10010)
    assert ema_decay_at(5, 0.999, warmup=False, rule="ema_pytorch") == 0.999


def test_ema_warmup_equals_the_ema_pytorch_package_when_installed():
    ema_pytorch = pytest.importorskip("ema_pytorch")
    net = torch.nn.Linear(1, 1, bias=False)
    ema = ema_pytorch.EMA(net, beta=0.999, update_every=1)  # MaskDM's call (main.py)
    ema.update()  # call 0 initialises (a copy)
    for k in range(1, 101):  # calls 1..100 copy the weights: ema_decay_at says 0.0
        net.weight.data.fill_(float(k))
        ema.update()
        assert ema.ema_model.weight.item() == float(k) and ema_decay_at(k, 0.999, True, "ema_pytorch") == 0.0
    net.weight.data.fill_(200.0)
    ema.update()  # call 101: the first moving average
    decay = ema_decay_at(101, 0.999, True, "ema_pytorch")
    assert ema.ema_model.weight.item() == pytest.approx(decay * 100 + (1 - decay) * 200, rel=1e-6)
    for k in (150, 10_000, 40_000):
        ema.step.fill_(k + 1)  # what `update` has made of the counter when its k-th call asks for the decay
        assert ema.get_current_decay() == pytest.approx(ema_decay_at(k, 0.999, True, "ema_pytorch"), abs=1e-7)


def _trainer(tmp_path: Path, **stage) -> Trainer:
    spec = Stage(name="s", steps=stage.pop("steps", 4), batch_size=4, model=UViTConfig(**TINY),
                 data=DataConfig(source="shapes", num_images=16), num_sample_images=0, log_every=1, **stage)
    return Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cpu")))


def test_ema_pytorch_rule_copies_the_weights_during_its_first_steps(tmp_path):
    trainer = _trainer(tmp_path, ema_warmup_rule="ema_pytorch")
    for step in range(3):
        trainer.train_step(step)
    for (name, p), e in zip(trainer.model.named_parameters(), trainer.ema.parameters()):
        torch.testing.assert_close(e, p, rtol=0, atol=0, msg=name)
    ratio = _trainer(tmp_path / "ratio")
    for step in range(3):
        ratio.train_step(step)
    assert any(not torch.equal(e, p) for e, p in zip(ratio.ema.parameters(), ratio.model.parameters()))


# --------------------------------------------------------------------------------------------- weight decay
def test_reference_weight_decay_puts_every_parameter_in_one_decayed_group(tmp_path):
    trainer = _trainer(tmp_path, weight_decay_exempt="none")
    (group,) = trainer.update.optimizer.param_groups  # main.py: AdamW(diffusion_model.parameters(), weight_decay=wd)
    assert group["weight_decay"] == 0.03
    assert {id(p) for p in group["params"]} == {id(p) for p in trainer.model.parameters()}
    decayed, exempt = param_groups(trainer.model, 0.03)  # the harness's own grouping
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    assert exempt["weight_decay"] == 0.0 and {names[id(p)] for p in exempt["params"]} >= {"pos_embed"}
    assert all(p.ndim >= 2 for p in decayed["params"])
    with pytest.raises(HarnessError, match="weight_decay_exempt"):
        Stage(name="s", weight_decay_exempt="biases")


# ---------------------------------------------------------------------------------------- sampling precision
def _forward_dtype(net: torch.nn.Module, model: torch.nn.Module) -> torch.dtype:
    seen = []
    handle = model.decoder_pred.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.no_grad():
        net(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long))
    handle.remove()
    return seen[0]


def test_fp32_sample_precision_samples_in_float32_under_a_bf16_stage(tmp_path):
    sampler = SamplerConfig(steps=2)
    ev = dict(num_samples=4, kid_subset_size=2, sampler=sampler)
    fp32 = _trainer(tmp_path, precision="bf16", eval=EvalConfig(**ev, sample_precision="fp32"))
    assert fp32.precision_name == "bfloat16"  # training stays in the stage's autocast
    assert _forward_dtype(fp32.sampling_net, fp32.ema) == torch.float32 and dtype_name(fp32.sample_dtype) == "float32"
    stage = _trainer(tmp_path, precision="bf16", eval=EvalConfig(**ev))
    assert _forward_dtype(stage.sampling_net, stage.ema) == torch.bfloat16
    rows = []
    fp32.evaluate = lambda net, diffusion, step, extra: rows.append(extra)
    fp32._evaluate()
    assert rows[0]["sample_precision"] == "float32"  # the eval row says so
    with pytest.raises(HarnessError, match="sample_precision"):
        EvalConfig(sample_precision="fp16")


# ------------------------------------------------------------------------------------- fp16 with loss scaling
class _StopAfter:
    def __init__(self, n: int) -> None:
        self.calls, self.n = 0, n

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls > self.n


def test_fp16_trains_with_a_grad_scaler_and_resumes_identically(tmp_path):
    from harness.checkpoint import load_checkpoint, newest_valid_checkpoint

    settings = dict(precision="fp16", steps=6, checkpoint_every=3)
    straight = _trainer(tmp_path / "straight", **settings)
    assert straight.update.scaler.is_enabled() and straight.precision_name == "float16"
    before = [p.detach().clone() for p in straight.model.parameters()]
    assert straight.run() == "done"
    assert any(not torch.equal(a, b) for a, b in zip(before, straight.model.parameters()))

    first = _trainer(tmp_path / "resumed", **settings)
    first.ctx.stop_event = _StopAfter(3)
    assert first.run() == "preempted"
    assert _trainer(tmp_path / "resumed", **settings).run() == "done"

    a = load_checkpoint(newest_valid_checkpoint(tmp_path / "straight" / "checkpoints"))
    b = load_checkpoint(newest_valid_checkpoint(tmp_path / "resumed" / "checkpoints"))
    assert a["step"] == b["step"] == 6
    assert a["scaler"]["scale"] > 0 and a["scaler"] == b["scaler"]  # the scaler's state travels with the weights
    for key in ("model", "ema"):
        for name, tensor in a[key].items():
            torch.testing.assert_close(b[key][name], tensor, rtol=0, atol=0, msg=f"{key}.{name}")
    for pid, slot in a["optimizer"]["state"].items():
        for name, tensor in slot.items():
            torch.testing.assert_close(b["optimizer"]["state"][pid][name], tensor, rtol=0, atol=0)


def test_auto_fp16_is_float32_on_a_cpu(tmp_path):
    trainer = _trainer(tmp_path, precision="auto_fp16")
    assert trainer.precision_name == "float32" and not trainer.update.scaler.is_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (not yet run on a GPU)")
def test_auto_fp16_is_fp16_with_a_grad_scaler_on_a_gpu(tmp_path):
    spec = Stage(name="s", steps=3, batch_size=4, model=UViTConfig(**TINY), precision="auto_fp16",
                 data=DataConfig(source="shapes", num_images=16), num_sample_images=0)
    trainer = Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=torch.device("cuda")))
    assert trainer.precision_name == "float16" and trainer.update.scaler.is_enabled()
    losses = [trainer.train_step(step)[0] for step in range(3)]
    assert all(math.isfinite(loss) for loss in losses) and trainer.update.scaler.get_scale() > 0


# ---------------------------------------------------------------------------------------------- split lists
@pytest.fixture
def celeba_like(tmp_path: Path) -> tuple[Path, Path]:
    from PIL import Image

    root = tmp_path / "celeba"
    root.mkdir()
    for i in range(1, 11):
        Image.new("RGB", (8, 8), (20 * i, 0, 0)).save(root / f"{i:06d}.png")
    partition = tmp_path / "list_eval_partition.txt"  # CelebA's format: jpg names, 0 train / 1 val / 2 test
    partition.write_text("".join(f"{i:06d}.jpg {0 if i <= 6 else 1 if i <= 8 else 2}\n" for i in range(1, 11)))
    return root, partition


def test_split_lists_select_the_right_images(celeba_like, tmp_path):
    root, partition = celeba_like
    config = lambda **kw: DataConfig(source="folder", root=str(root), resolution=8, **kw)  # noqa: E731
    assert config(split_file=str(partition), split="train").names() == [f"{i:06d}.png" for i in range(1, 7)]
    assert config(split_file=str(partition), split="val").names() == ["000007.png", "000008.png"]
    assert config(split_file=str(partition), split="2").names() == ["000009.png", "000010.png"]
    dataset = config(split_file=str(partition), split="test").build()
    assert len(dataset) == 2 and int(dataset.uint8_batch([0])[0, 0, 0, 0]) == 180  # image 9 itself
    subset = config(split_file=str(partition), split="train", subset=3, subset_seed=1).names()
    assert len(subset) == 3 and set(subset) <= {f"{i:06d}.png" for i in range(1, 7)}
    plain = tmp_path / "keep.txt"
    plain.write_text("000002.jpg\n000005\n")
    assert config(split_file=str(plain)).names() == ["000002.png", "000005.png"]
    # the split is part of the data's identity (FID statistics), unsplit data keeps its content id
    ids = {config().content_id(), config(split_file=str(partition), split="train").content_id(),
           config(split_file=str(partition), split="val").content_id()}
    assert len(ids) == 3


def test_split_list_mistakes_are_explained(celeba_like, tmp_path):
    root, partition = celeba_like
    config = lambda **kw: DataConfig(source="folder", root=str(root), resolution=8, **kw)  # noqa: E731
    with pytest.raises(HarnessError, match="list_eval_partition.txt and set DataConfig.split_file"):
        config(split_file=str(tmp_path / "missing.txt"), split="train").check()
    with pytest.raises(HarnessError, match="choose one with DataConfig.split"):
        config(split_file=str(partition)).names()
    with pytest.raises(HarnessError, match="needs DataConfig.split_file"):
        config(split="train")
    with pytest.raises(HarnessError, match="no images in partition '7'"):
        config(split_file=str(partition), split="7").names()
    (root / "000003.png").unlink()
    with pytest.raises(HarnessError, match="1 of the 6 images .* are not in"):
        config(split_file=str(partition), split="train").names()
    # the embedded sources ignore split lists, as they ignore `root` (a recipe's binding reaches them in fallbacks)
    assert len(DataConfig(source="shapes", num_images=5, split_file=str(partition), split="train").names()) == 5


# ------------------------------------------------------------------------------------------------ stage ids
def _explicit_stages() -> tuple[Stage, Stage]:
    model = UViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=5, num_heads=4)
    data = DataConfig(source="shapes", resolution=32)
    ev = EvalConfig(num_samples=250, kid_subset_size=100, sampler=SamplerConfig(kind="ddim", steps=25, eta=1.0))
    pre = Stage(name="pretrain", steps=100, ema_decay=0.999, model=model, data=data, diffusion=DiffusionConfig(),
                mask=BlockMask(ratio=0.9, block_size=2))
    fin = Stage(name="finetune", steps=50, ema_decay=0.999, model=model, data=data, diffusion=DiffusionConfig(),
                eval=ev)
    return pre, fin


OLD_QUICKSTART = """
include 'data/shapes32.gin'
include 'backbones/uvit_tiny.gin'
include 'schedules/cosine.gin'
include 'masks/block2.gin'
include 'eval/quick_cpu.gin'
MASK_RATIO = 0.9
Stage.batch_size = 32
Stage.lr = 1e-3
Stage.ema_decay = 0.999
Stage.log_every = 100
Stage.checkpoint_every = 500
Stage.eval = @EvalConfig()
pretrain/Stage.mask = @BlockMask()
pretrain/Stage.steps = 1000
pretrain/Stage.eval = None
finetune/Stage.steps = 500
finetune/Stage.warmup_steps = 50
scratch/Stage.steps = 1500
scratch/EvalConfig.steps = (750,)
Experiment.name = 'quickstart'
Experiment.arms = {'scratch': [@scratch/Stage()], 'two_stage': [@pretrain/Stage(), @finetune/Stage()]}
"""


def test_stages_that_leave_the_new_settings_at_their_defaults_keep_their_ids(tmp_path):
    # ids computed before the fidelity switches existed (commit 6edafc3)
    pre, fin = _explicit_stages()
    pre_id = stage_id(pre.describe(), None)
    assert (pre_id, stage_id(fin.describe(), pre_id)) == ("adb2308025a9bead", "8dc44c7d12b63282")
    # the quickstart recipe of that commit (the quickstart has changed since, on purpose)
    recipe = tmp_path / "old_quickstart.gin"
    recipe.write_text(OLD_QUICKSTART)
    plan = plan_from_gin(load_recipe(str(recipe)))
    assert {ps.dir for ps in plan.stages.values()} == {
        "scratch/scratch-a5c738df", "two_stage/pretrain-94127813", "two_stage/finetune-4b7c9842"}
    # ... and a stage that uses one does move
    moved = Stage(name="pretrain", steps=100, ema_decay=0.999, model=pre.model, data=pre.data, mask=pre.mask,
                  diffusion=DiffusionConfig(), ema_warmup_rule="ema_pytorch")
    assert stage_id(moved.describe(), None) != pre_id


# ------------------------------------------------------------------------------------------ the paper recipes
@pytest.mark.parametrize("recipe", PAPER_RECIPES)
def test_paper_recipes_select_the_reference_behaviour(recipe):
    plan = plan_from_gin(load_recipe(recipe))
    for ps in plan.stages.values():
        spec = ps.spec
        assert (spec.precision, spec.weight_decay_exempt, spec.ema_warmup, spec.ema_warmup_rule) == (
            "auto_fp16", "none", True, "ema_pytorch"), ps.name
        if spec.eval is not None:
            assert spec.eval.sample_precision == "fp32" and spec.eval.sampler.eps_from_clipped_x0 is False
        if spec.model.embed_dim == 768:  # the CelebA-HQ / church network: linear head, 102.4M
            assert spec.model.decoder_depth == 0 and spec.model.num_params() == 102_417_456
        if recipe == "celeba64_mask_ablation":
            assert (spec.data.split, Path(spec.data.split_file).name) == ("train", "list_eval_partition.txt")


def test_lsun_church_recipe_follows_church256_base_yml():
    specs = {ps.name: ps.spec for ps in plan_from_gin(load_recipe("lsun_church256")).stages.values()}
    for name in ("scratch", "finetune"):
        s = specs[name]
        assert (s.batch_size, s.lr, s.warmup_steps, s.grad_clip, s.ema_decay, s.weight_decay, s.betas) == (
            64, 1e-4, 5000, 1.0, 0.9999, 0.03, (0.99, 0.99)), name
        assert s.diffusion.schedule == "linear" and s.data.hflip and s.mask.name == "none"
    assert specs["pretrain"].mask.name == "block4"


def test_dry_run_shows_the_linear_head_model(tmp_path, capsys):
    assert cli_main(["run", str(RECIPES_DIR / "celebahq_mask90.gin"), "--dry-run",
                     "--results-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "768w 13L 12h p4 256px, 102.4M" in out and "+dec" not in out


def test_decoder_backbone_file_keeps_the_decoder_for_checkpoints_that_need_it():
    plan = plan_from_gin(load_recipe("finetune_from_maskdm", ["include 'backbones/uvit_celebahq256_decoder.gin'"]))
    for ps in plan.stages.values():
        assert ps.spec.model.decoder_depth == 4 and round(ps.spec.model.num_params() / 1e6, 1) == 104.3


def test_ema_decay_defaults_to_maskdms_value():
    default = {f.name: f.default for f in dataclasses.fields(Stage)}["ema_decay"]
    assert default == 0.999 and math.isclose(ema_decay_at(10**6, default), 0.999)
