"""Image conversions: user input -> model range and back, one rounding for the data sets and the tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowmo_fast.images import to_model_input, to_uint8, uint8_to_model_range


def test_every_uint8_level_maps_as_upstream_and_back():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)  # [1, 16, 16, 3]
    x = to_model_input(levels)
    want = torch.from_numpy((levels.astype(np.float64) / 127.5 - 1).astype(np.float32)).permute(0, 3, 1, 2)
    assert x.dtype == torch.float32 and x.shape == (1, 3, 16, 16)
    assert torch.equal(x, want)  # float64 arithmetic, rounded once: bit-exact with upstream's loader
    np.testing.assert_array_equal(to_uint8(x), levels)


def test_pil_numpy_and_read_only_arrays_agree():
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)
    array.setflags(write=False)
    from_pil = to_model_input(Image.fromarray(array))
    assert torch.equal(from_pil, to_model_input(array))
    assert torch.equal(from_pil[0], uint8_to_model_range(array))


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "must be uint8"),
        (np.zeros((4, 4), dtype=np.uint8), r"\[H, W, 3\]"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "floating point"),
        (torch.full((1, 3, 4, 4), 2.0), r"lie in \[-1, 1\]"),
        ([], "empty list"),
        ("image.png", "unsupported image type"),
    ],
)
def test_bad_input_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        to_model_input(bad)
