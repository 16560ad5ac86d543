"""Fuzzing with hypothesis: `--gin` overrides and image files of random bytes may be rejected, but only ever with
a HarnessError (one line for the CLI), never with a crash of another type. Example counts stay small."""
from __future__ import annotations

import string
import zlib
from pathlib import Path

import pytest
from conftest import TINY_RECIPE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.config import load_recipe
from harness.data import DataConfig
from harness.datasets import load_rgb
from harness.errors import HarnessError
from harness.experiment import plan_from_gin

FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "tiny.gin"
    path.write_text(TINY_RECIPE)
    return path


def accepts_or_refuses(recipe: Path, bindings: list[str]) -> None:
    """Parse and plan; a refusal must be a HarnessError with a one-line message."""
    try:
        load_recipe(recipe, bindings)
        plan_from_gin()
    except HarnessError as err:
        assert str(err).strip(), "an empty error message"


# ------------------------------------------------------------------------------------------ gin overrides

TARGETS = st.sampled_from([
    "Stage.steps", "scratch/Stage.steps", "Stage.batch_size", "pretrain/Stage.lr", "Stage.betas", "Stage.name",
    "Stage.seed", "Stage.micro_batch_size", "Stage.grad_clip", "Stage.nan_policy", "Stage.precision",
    "Stage.keep_checkpoints", "Stage.ema_warmup", "Stage.init_checkpoint", "finetune/Stage.init_from",
    "Experiment.name", "Experiment.arms", "MASK_RATIO", "DataConfig.source", "DataConfig.resolution",
    "DataConfig.subset", "DataConfig.num_images", "Stagee.steps", "Stage.stepz", "a/b/c.d", "MISSING_MACRO",
])
PY_LITERALS = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner)
    | st.dictionaries(st.text(string.ascii_letters, min_size=1, max_size=5), inner, max_size=2),
    max_leaves=6,
).map(repr)
GIN_VALUES = st.sampled_from([
    "@scratch/Stage()", "@Stage", "@BlockMask()", "@NoMask()", "%MASK_RATIO", "%NOPE", "{'a': [@scratch/Stage()]}",
    "{'../up': [@scratch/Stage()]}", "[@pretrain/Stage(), 3]", "@DataConfig()", "(", "'unterminated", "1e400",
])
BINDINGS = st.builds(lambda t, op, v: f"{t}{op}{v}", TARGETS, st.sampled_from([" = ", "=", " := ", " "]),
                     PY_LITERALS | GIN_VALUES)
GARBAGE = st.text(alphabet=string.printable + "é@%/'\"", max_size=40)


@FUZZ
@given(bindings=st.lists(BINDINGS | GARBAGE, min_size=1, max_size=3))
def test_gin_overrides_only_ever_fail_with_harness_error(recipe, bindings):
    accepts_or_refuses(recipe, bindings)


# ------------------------------------------------------------------------------------------ image loader


def _chunk(kind: bytes, data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


# Random bytes, and random bytes behind a real PNG signature and header, which gets them past the format
# sniffing and into the decoder (where PIL raises its own zoo of exceptions).
PNG_LIKE = st.builds(
    lambda width, height, mode, body: (b"\x89PNG\r\n\x1a\n"
                                       + _chunk(b"IHDR", width.to_bytes(4, "big") + height.to_bytes(4, "big")
                                                + bytes([8, mode, 0, 0, 0])) + body),
    st.integers(0, 70), st.integers(0, 70), st.sampled_from([0, 2, 3, 4, 6, 7]),
    st.binary(max_size=200).map(lambda b: _chunk(b"IDAT", b)) | st.binary(max_size=200)
    | st.binary(max_size=300).map(lambda b: _chunk(b"IDAT", zlib.compress(b))),
)
FILE_BYTES = st.binary(max_size=300) | PNG_LIKE


@FUZZ
@given(data=FILE_BYTES)
def test_image_loader_only_ever_fails_with_harness_error(tmp_path, data):
    path = tmp_path / "fuzzed.png"
    path.write_bytes(data)
    try:
        image = load_rgb(path)
    except HarnessError as err:
        assert "fuzzed.png" in str(err)  # the message names the file to delete or replace
    else:
        assert image.mode == "RGB"


@FUZZ
@given(data=FILE_BYTES)
def test_folder_dataset_only_ever_fails_with_harness_error(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("images")
    (root / "a.png").write_bytes(data)
    try:  # as training reads it: headers checked at build, pixels decoded per batch
        dataset = DataConfig(source="folder", root=str(root), resolution=8, center_crop=False).build()
        batch = dataset.get_batch([0])
    except HarnessError as err:
        assert "a.png" in str(err)
    else:
        assert tuple(batch.shape) == (1, 3, 8, 8)
