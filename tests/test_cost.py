"""Cost accounting: measured FLOPs, the CostMeter's counters, clocks, cost.json and resume."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.cost import SNAPSHOT_KEYS, CostMeter, DeviceInfo, describe_device, measure_step_flops, model_flop_formulas

COST_JSON_KEYS = {  # docs/internals.md, "Run folder files"
    "device", "device_count", "train_seconds", "eval_seconds", "device_hours", "eval_device_hours", "steps",
    "images_seen", "tokens_seen", "flops_per_step", "train_flops", "peak_memory_bytes", "images_per_second",
    "tokens_per_second", "mask", "mask_ratio",
}


class FakeClock:
    """A clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class TokenLinear(nn.Module):
    """One Linear layer on the visible tokens: its FLOPs are known exactly (2*B*T*in*out per matmul)."""

    def __init__(self, patch: int = 4, channels: int = 3, width: int = 8) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.lin = nn.Linear(patch * patch * channels, width, bias=False)

    def forward(self, x, t, y=None, mask=None):
        b, c, h, w = x.shape
        p = self.patch
        tokens = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, p * p * c)
        if mask is not None:
            tokens = tokens[~mask].reshape(b, -1, tokens.shape[-1])
        return self.lin(tokens)


class SquareLoss:
    """Stands in for GaussianDiffusion: same training_loss signature, draws its noise from `generator`."""

    def training_loss(self, model, x0, mask=None, y=None, generator=None):
        noise = torch.randn(x0.shape, generator=generator)
        return model(x0 + noise, torch.zeros(x0.shape[0]), mask=mask).pow(2).mean()


def test_flops_of_a_linear_step_are_exact_and_leave_no_trace():
    model, x0 = TokenLinear(), torch.randn(2, 3, 16, 16)  # 16 patches of 48 values, width 8
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :12] = True  # 4 visible patches per image
    rng_before = torch.random.get_rng_state()
    full = measure_step_flops(model, SquareLoss(), x0)
    masked = measure_step_flops(model, SquareLoss(), x0, mask)
    # forward 2*B*T*48*8; backward only the weight gradient (the input needs none): the same again
    assert full == 2 * (2 * 2 * 16 * 48 * 8)
    assert masked == 2 * (2 * 2 * 4 * 48 * 8)
    assert model.lin.weight.grad is None
    assert torch.equal(torch.random.get_rng_state(), rng_before)


def test_flops_scale_with_the_batch():
    model = TokenLinear()
    one = measure_step_flops(model, SquareLoss(), torch.randn(1, 3, 16, 16))
    five = measure_step_flops(model, SquareLoss(), torch.randn(5, 3, 16, 16))
    assert five == 5 * one > 0


@pytest.mark.parametrize("ratio", [0.5, 0.75])
def test_masked_uvit_flops_fall_with_the_tokens_kept(ratio):
    """The real MaskedUViT: masked-step FLOPs / unmasked-step FLOPs within 15% (relative) of the ratio of
    tokens entering the blocks. Every layer, the patch embedding included, runs on the visible tokens only;
    attention grows with tokens squared, so it pulls the ratio below the token ratio, never above it."""
    from harness.diffusion import DiffusionConfig
    from harness.masks import PatchMask
    from harness.models.config import UViTConfig

    torch.manual_seed(0)
    cfg = UViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=3, num_heads=4)
    model, diffusion = cfg.build(), DiffusionConfig().build()
    x0 = torch.randn(2, 3, 32, 32)
    mask = PatchMask(ratio=ratio).sample(2, cfg.grid)
    full = measure_step_flops(model, diffusion, x0)
    masked = measure_step_flops(model, diffusion, x0, mask)
    token_ratio = model.tokens_entering_blocks(mask) / model.tokens_entering_blocks(None)
    assert masked < full
    assert token_ratio**2 < masked / full <= token_ratio
    assert masked / full == pytest.approx(token_ratio, rel=0.15)
    # attention is counted on CPU too (the fused CPU kernel would count as zero): a deeper model costs more
    deeper = UViTConfig(img_size=32, patch_size=4, embed_dim=64, depth=5, num_heads=4).build()
    assert measure_step_flops(deeper, diffusion, x0) > full


def test_attention_flops_are_counted_on_cpu():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))  # elementwise: costs no counted FLOPs, needs a backward

        def forward(self, x, t, y=None, mask=None):
            q = (self.scale * x).flatten(2).transpose(1, 2).unsqueeze(1)  # [B, 1, HW, C]
            return nn.functional.scaled_dot_product_attention(q, q, q)

    x0 = torch.randn(2, 3, 4, 4)

    class Loss:
        def training_loss(self, model, x0, mask=None, y=None, generator=None):
            return model(x0, None).sum()

    # two [16 x 3] @ [3 x 16]-sized products forward (2*B*L*L*C each), twice as much backward
    assert measure_step_flops(Attn(), Loss(), x0) == 3 * 2 * (2 * 2 * 16 * 16 * 3)


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_fused_attention_counts_the_model_flops_of_the_math_path(kernel):
    """On CUDA the step runs fused attention kernels whose backward recomputes the scores; through
    FlopCounterMode with the harness's mapping, the fused kernels must count what the math path (CPU) counts, so
    that a stage's FLOPs do not depend on the device. The fused ops run here on meta tensors (shapes only)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = 2, 4, 33, 16
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as math_path:
        nn.functional.scaled_dot_product_attention(q, k, v).sum().backward()

    aten, meta = torch.ops.aten, (lambda *shape: torch.empty(*shape, device="meta"))
    q, k, v, out, lse = meta(b, h, s, d), meta(b, h, s, d), meta(b, h, s, d), meta(b, h, s, d), meta(b, h, s)
    seed = offset = torch.empty((), dtype=torch.int64, device="meta")

    def fused_step(mapping: dict) -> int:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            if kernel == "flash":
                aten._scaled_dot_product_flash_attention(q, k, v)
                aten._scaled_dot_product_flash_attention_backward(out, q, k, v, out, lse, None, None, s, s, 0.0,
                                                                  False, seed, offset)
            else:
                aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
                aten._scaled_dot_product_efficient_attention_backward(out, q, k, v, None, out, lse, seed, offset,
                                                                      0.0, [True, True, True, False])
        return counter.get_total_flops()

    assert fused_step(model_flop_formulas()) == math_path.get_total_flops() == 3 * 2 * (2 * b * h * s * s * d)
    assert fused_step({}) == math_path.get_total_flops() * 7 // 6  # torch's own count adds the recompute


def test_cudnn_attention_backward_is_mapped_too():
    """The cuDNN kernel (the one an H100 ran) shares the backward formula: mapped, and scaled by 4/5."""
    from torch.utils.flop_counter import flop_registry

    backward = torch.ops.aten._scaled_dot_product_cudnn_attention_backward
    q = torch.empty(2, 4, 33, 16, device="meta")
    assert model_flop_formulas()[backward](q, q, q, q) == flop_registry[backward](q, q, q, q) * 4 // 5 > 0


def test_meter_counts_steps_images_tokens_flops():
    meter = CostMeter(DeviceInfo("cpu", "test", 2), flops_per_step=1000, tokens_per_image=17, mask="block4",
                      mask_ratio=0.75)
    meter.step(8)
    meter.step(8, steps=3)
    meter.step(4, tokens_per_image=65)
    out = meter.to_json()
    assert out["steps"] == 5
    assert out["images_seen"] == 36
    assert out["tokens_seen"] == 32 * 17 + 4 * 65
    assert out["train_flops"] == 5000 and out["flops_per_step"] == 1000
    assert set(out) >= COST_JSON_KEYS
    assert (out["mask"], out["mask_ratio"], out["device_count"]) == ("block4", 0.75, 2)
    assert out["device_hours_unit"] == "core-hours"
    assert set(meter.snapshot()) == set(SNAPSHOT_KEYS)


def test_meter_clocks_keep_evaluation_out_of_training_time():
    clock = FakeClock()
    meter = CostMeter(DeviceInfo("cpu", "fake", 4), clock=clock)
    with meter.training():
        clock.now += 30
        meter.step(10)
        with meter.evaluating():
            clock.now += 600
        clock.now += 60
        mid = meter.snapshot()
        assert mid["train_seconds"] == pytest.approx(90)  # the running clock counts in a snapshot
        clock.now += 10
    with meter.evaluating():  # evaluation outside a training block
        clock.now += 5
    out = meter.to_json()
    assert out["train_seconds"] == pytest.approx(100)
    assert out["eval_seconds"] == pytest.approx(605)
    assert out["device_hours"] == pytest.approx(100 * 4 / 3600)
    assert out["eval_device_hours"] == pytest.approx(605 * 4 / 3600)
    assert out["images_per_second"] == pytest.approx(10 / 100)
    assert out["peak_memory_bytes"] > 1_000_000  # this process's max RSS
    with pytest.raises(RuntimeError):
        with meter.training():
            with meter.training():
                pass


def test_meter_resumes_from_its_state_dict(tmp_path):
    clock = FakeClock()
    first = CostMeter(DeviceInfo("cpu", "a", 2), flops_per_step=7, tokens_per_image=3, clock=clock)
    with first.training():
        first.step(4, steps=10)
        clock.now += 36
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint would carry

    # resumed on a machine with 4 cores: earlier hours stay at 2 cores, later seconds count 4
    second = CostMeter(DeviceInfo("cpu", "b", 4), flops_per_step=7, tokens_per_image=3, clock=clock)
    second.load_state_dict(state)
    with second.training():
        second.step(4, steps=5)
        clock.now += 9
    second.write(tmp_path / "cost.json")
    out = json.loads((tmp_path / "cost.json").read_text())
    assert out["steps"] == 15 and out["images_seen"] == 60 and out["tokens_seen"] == 180
    assert out["train_flops"] == 105
    assert out["train_seconds"] == pytest.approx(45)
    assert out["device_hours"] == pytest.approx((36 * 2 + 9 * 4) / 3600)
    assert list(tmp_path.iterdir()) == [tmp_path / "cost.json"]  # no temp file left behind


def test_describe_device_on_cpu_counts_threads():
    info = describe_device("cpu")
    assert info.kind == "cpu" and info.count == torch.get_num_threads()
    assert describe_device("cpu", 3).count == 3 * torch.get_num_threads()  # 3 ranks


def test_a_stages_peak_memory_is_its_own_not_the_processes():
    """Inline runs train stages one after another in one process: a stage's peak must not be an earlier
    stage's (nor an earlier evaluation's). On Linux the peak resident set is reset when the meter is made."""
    import pathlib

    from harness.cost import CostMeter

    if not pathlib.Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak resident set")
    big = torch.ones(100 * 2**20)  # 400 MB, touched, then freed
    del big
    meter = CostMeter.for_device("cpu")
    with meter.training():
        torch.ones(2**20).sum()
    meter.update_peak_memory()
    rss = next(int(line.split()[1]) * 1024 for line in pathlib.Path("/proc/self/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    assert meter.peak_memory_bytes < rss + 100 * 2**20
