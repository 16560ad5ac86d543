"""What only a CUDA device can show: bf16 autocast and fp16 scaling on the GPU, the fused attention kernels that
Stage.attention picks, torch.compile with CUDA graphs, device-side batch conversion, FLOP counts that equal the
CPU's, and the bench's share of the device's peak. Skipped without CUDA (CI has none); run them on a GPU machine:

    python -m pytest -q -p no:cacheprovider tests/test_gpu.py
"""
from __future__ import annotations

import pytest
import torch

from harness.bench import BenchOptions, run_bench
from harness.config import load_recipe
from harness.errors import HarnessError
from harness.experiment import plan_from_gin

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = torch.device("cuda")
# The fused kernel each Stage.attention value must run (forward op names as torch.profiler shows them).
KERNELS = {"flash": "aten::_scaled_dot_product_flash_attention",
           "efficient": "aten::_scaled_dot_product_efficient_attention",
           "cudnn": "aten::_scaled_dot_product_cudnn_attention",
           "math": "aten::_scaled_dot_product_attention_math"}


def _spec(recipe, stage: str, *bindings: str):
    load_recipe(recipe, list(bindings))
    return {ps.name: ps for ps in plan_from_gin().stages.values()}[stage].spec


def _trainer(recipe, tmp_path, stage: str = "pretrain", *bindings: str, device: torch.device = CUDA):
    from harness.train import TrainContext, Trainer

    spec = _spec(recipe, stage, *bindings)
    return Trainer(TrainContext(spec=spec, stage_id="x", run_dir=tmp_path, device=device))


def _ops(fn) -> set[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.key for e in prof.key_averages()}


def test_bf16_step_on_the_gpu_trains_and_keeps_fp32_weights(tiny_recipe, tmp_path):
    trainer = _trainer(tiny_recipe, tmp_path)
    assert trainer.precision_name == "bfloat16" and not trainer.update.scaler.is_enabled()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    losses = [trainer.train_step(s)[0] for s in range(3)]
    assert all(0 < loss < 10 for loss in losses)
    assert all(p.dtype == torch.float32 and p.is_cuda for p in trainer.model.parameters())
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())


def test_fp16_step_on_the_gpu_uses_the_grad_scaler(tiny_recipe, tmp_path):
    trainer = _trainer(tiny_recipe, tmp_path, "pretrain", "Stage.precision = 'fp16'")
    assert trainer.update.scaler.is_enabled()
    losses = [trainer.train_step(s)[0] for s in range(3)]
    assert all(0 < loss < 10 for loss in losses)


def test_the_gpu_computes_what_the_cpu_computes(tiny_recipe, tmp_path, monkeypatch):
    """fp32 on both (TF32 off): the same batch values (uint8 moved, converted on the device from one CPU table),
    the same initial weights and forward, and the same measured FLOPs (model FLOPs: the fused kernels' backward
    recompute is left out). The noise, time steps and masks differ: each device's generator draws its own."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    cpu = _trainer(tiny_recipe, tmp_path / "cpu", "pretrain", "Stage.precision = 'fp32'",
                   device=torch.device("cpu"))
    gpu = _trainer(tiny_recipe, tmp_path / "gpu", "pretrain", "Stage.precision = 'fp32'")
    idx = list(range(8))
    x_cpu, x_gpu = cpu.dataset.get_batch(idx), gpu.dataset.get_batch(idx, device=CUDA)
    assert x_gpu.is_cuda and torch.equal(x_gpu.cpu(), x_cpu)
    t = torch.tensor([0, 10, 100, 200, 400, 600, 800, 999])
    with torch.no_grad():
        torch.testing.assert_close(gpu.model(x_gpu, t.to(CUDA)).cpu(), cpu.model(x_cpu, t), rtol=1e-4, atol=1e-5)
    assert gpu.step_flops() == cpu.step_flops()


@pytest.mark.parametrize("backend", ["flash", "efficient", "cudnn", "math"])
def test_stage_attention_runs_the_chosen_kernel_in_bf16(tiny_recipe, tmp_path, backend):
    try:
        trainer = _trainer(tiny_recipe, tmp_path, "finetune", f"Stage.attention = '{backend}'")
    except HarnessError as err:  # said before any step, in one line; only acceptable for cuDNN on old stacks
        assert backend == "cudnn" and "cannot run on cuda" in str(err), err
        pytest.skip(str(err))
    ops = _ops(lambda: trainer.train_step(0))
    assert KERNELS[backend] in ops, sorted(op for op in ops if "attention" in op)
    assert not any(KERNELS[other] in ops for other in KERNELS if other != backend)
    x, t = torch.randn(2, 3, 32, 32, device=CUDA), torch.tensor([5, 500], device=CUDA)
    with torch.no_grad():
        assert KERNELS[backend] in _ops(lambda: trainer.sampling_net(x, t))


def test_flash_attention_in_fp32_is_refused_before_training(tiny_recipe, tmp_path):
    with pytest.raises(HarnessError, match="Stage.attention = 'flash' cannot run on cuda in float32"):
        _trainer(tiny_recipe, tmp_path, "finetune", "Stage.attention = 'flash'", "Stage.precision = 'fp32'")


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_gpu_step_follows_the_eager_one(tiny_recipe, tmp_path, mode):
    """bf16, so the tolerance is loose; CUDA graphs (reduce-overhead) must survive several steps and sampling."""
    eager = _trainer(tiny_recipe, tmp_path / "eager", "pretrain")
    compiled = _trainer(tiny_recipe, tmp_path / "compiled", "pretrain", f"Stage.compile = '{mode}'")
    for step in range(4):
        assert compiled.train_step(step)[0] == pytest.approx(eager.train_step(step)[0], rel=5e-2)
    x, t = torch.randn(2, 3, 32, 32, device=CUDA), torch.tensor([5, 500], device=CUDA)
    with torch.no_grad():
        for _ in range(3):
            out = compiled.sampling_net(x, t)
        torch.testing.assert_close(out.float(), eager.sampling_net(x, t).float(), rtol=0.1, atol=0.1)


def test_bench_on_the_gpu_reports_a_share_of_the_peak(tiny_recipe):
    load_recipe(tiny_recipe, [])
    stages = [ps for ps in plan_from_gin().stages.values() if ps.name == "pretrain"]
    report = run_bench(str(tiny_recipe), stages, BenchOptions(steps=2, warmup=1, sample_steps=1, device="cuda",
                                                              compare_mask=True))
    assert report.peak_flops and report.peak_flops > 1e13 and report.large_matmul_flops > 1e12
    masked, unmasked = report.rows
    assert masked.precision == unmasked.precision == "bfloat16"
    for row in report.rows:
        assert row.peak_fraction == pytest.approx(row.achieved_flops_per_second / report.peak_flops)
        assert row.peak_memory_kind and row.peak_memory_bytes > 0
    assert report.comparisons[0].flops_ratio < 0.6  # 75% of the patches dropped


def test_the_masked_forward_and_loss_never_wait_for_the_gpu(tiny_recipe, tmp_path):
    """Masks and their visible indices come from the CPU (Trainer.draw) and travel with the pixels through pinned
    memory, so drawing the batch and the masked forward and loss queue their work without a host sync (a
    `nonzero` on the GPU, or a copy from pageable memory, would block the host at every step)."""
    trainer = _trainer(tiny_recipe, tmp_path)
    trainer.draw(0)  # the first draw puts the pixel table on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # drawing the batch too: pinned, non-blocking copies
        x0, t, noise, visible = trainer.draw(1)
        assert visible.dtype == torch.long and visible.is_cuda
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = trainer.diffusion.loss_at(trainer.model, x0, t, noise, mask=visible)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert 0 < loss.item() < 10
