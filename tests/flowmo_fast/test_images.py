"""Image conversions: user input -> model range and back, one rounding for the data sets and the tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from flowmo_fast.formats.data import ImageFolderDataset
from flowmo_fast.formats.images import to_model_input, to_uint8, uint8_to_model_range


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
        (np.zeros((4, 4, 2), dtype=np.uint8), r"\[H, W\], \[H, W, C\] or \[B, H, W, C\] with C = 1, 3 or 4"),
        (np.zeros((2, 3, 5, 5), dtype=np.uint8), r"\(channels last\), got \(3, 5, 5\)"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.uint8), "floating point"),
        (torch.full((1, 3, 4, 4), 2.0), r"lie in \[-1, 1\]"),
        ([], "empty list"),
        ([torch.zeros(3, 4, 4)], "image 0 is a Tensor"),
        ([np.zeros((4, 4), np.uint8), np.zeros((6, 6), np.uint8)], "must share a size; .* give size="),
    ],
)
def test_bad_input_names_the_problem(bad, match):
    with pytest.raises(ValueError, match=match):
        to_model_input(bad)


def photo(h: int = 45, w: int = 70, seed: int = 0) -> np.ndarray:
    """A non-square uint8 RGB picture with smooth structure (so resizing matters) plus noise."""
    y, x = np.mgrid[0:h, 0:w]
    smooth = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (h + w)], -1)
    noise = np.random.default_rng(seed).integers(0, 40, (h, w, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def test_pictures_are_fitted_exactly_as_the_data_sets_evaluation_crops(tmp_path):
    Image.fromarray(photo()).save(tmp_path / "p.png")
    want = ImageFolderDataset(str(tmp_path), size=16)[0]["image"]  # RGB, shorter side 16, centre crop
    assert torch.equal(to_model_input(str(tmp_path / "p.png"), 16), want[None])
    assert torch.equal(to_model_input(photo(), 16), want[None])


def test_every_form_of_a_picture_gives_the_same_input(tmp_path):
    rgb = photo()
    Image.fromarray(rgb).save(tmp_path / "p.png")
    rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], -1)  # opaque alpha
    forms = [rgb, Image.fromarray(rgb), str(tmp_path / "p.png"), tmp_path / "p.png", rgba, Image.fromarray(rgba),
             rgb[None], [rgb]]
    want = to_model_input(rgb, 16)
    assert want.shape == (1, 3, 16, 16)
    for form in forms:
        assert torch.equal(to_model_input(form, 16), want), type(form)


def test_gray_palette_and_16_bit_pictures_become_rgb(tmp_path):
    gray = photo()[..., 0]
    as_rgb = to_model_input(np.repeat(gray[..., None], 3, -1), 16)
    wide = gray.astype(np.uint16) * 256 + 100  # 16 bits whose top 8 are `gray`
    Image.fromarray(wide).save(tmp_path / "wide.png")
    with Image.open(tmp_path / "wide.png") as sixteen:
        assert sixteen.mode.startswith("I")
    for form in (gray, gray[..., None], Image.fromarray(gray), wide, Image.fromarray(wide), tmp_path / "wide.png"):
        assert torch.equal(to_model_input(form, 16), as_rgb), getattr(form, "mode", getattr(form, "dtype", form))
    palette = Image.fromarray(photo()).quantize(16)
    assert torch.equal(to_model_input(palette, 16), to_model_input(np.asarray(palette.convert("RGB")), 16))


def test_a_list_of_mixed_sizes_is_fitted_picture_by_picture(tmp_path):
    Image.fromarray(photo(30, 30, seed=2)).save(tmp_path / "square.png")
    pictures = [photo(45, 70), Image.fromarray(photo(80, 20, seed=1)), tmp_path / "square.png"]
    batch = to_model_input(pictures, 16)
    assert batch.shape == (3, 3, 16, 16)
    for i, picture in enumerate(pictures):
        assert torch.equal(batch[i : i + 1], to_model_input(picture, 16))


def test_without_resizing_a_picture_must_have_the_size(tmp_path):
    square = photo(16, 16)
    assert torch.equal(to_model_input(square, 16, resize=False), to_model_input(square))
    with pytest.raises(ValueError, match=r"image 1 is 70x45 \(width x height\), but resize=False needs 16x16"):
        to_model_input([square, photo(45, 70)], 16, resize=False)


def test_files_that_are_not_images_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        to_model_input(tmp_path / "missing.png", 16)
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="notes.png is not an image file PIL can read"):
        to_model_input(str(tmp_path / "notes.png"), 16)


def test_float_tensors_pass_unchanged_at_any_size():
    x = torch.rand(2, 3, 20, 12) * 2 - 1
    assert torch.equal(to_model_input(x, 16), x)
