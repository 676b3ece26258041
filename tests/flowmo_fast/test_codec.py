"""Tokenizer: images <-> token ids, accepted inputs, and clear rejections."""

import numpy as np
import pytest
import torch
from PIL import Image

from flowmo_fast import Tokenizer
from flowmo_fast.sampler_settings import UPSTREAM


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return Tokenizer.from_checkpoint(tiny_checkpoint)


def test_encode_shape_and_vocabulary(tokenizer):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    ids = tokenizer.encode(images)
    assert ids.dtype == torch.int64 and ids.shape == (3, tokenizer.tokens_per_image) == (3, 32)
    assert ids.min() >= 0 and ids.max() < tokenizer.vocab_size == 512


def test_ids_equal_the_models_lfq_indices(tokenizer):
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        code = tokenizer.model.encode(images)
        out = tokenizer.model.quantize(code)
        quantized, indices = out.quantized, out.indices
    assert torch.equal(tokenizer.encode(images), indices)
    # upstream bit order: bit i of group (t, h) is sign of feature i * fh + h of code token t, weight 2^i
    fh = 18 // 9
    bits = (code[0, 0, 0::fh] > 0).long()
    assert indices[0, 0] == (bits * 2 ** torch.arange(9)).sum()


def test_ids_code_ids_round_trip_is_exact(tokenizer):
    ids = torch.randint(0, 512, (4, 32), generator=torch.Generator().manual_seed(0))
    code = tokenizer.ids_to_code(ids)
    assert code.shape == (4, 16, 18) and set(code.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(tokenizer.code_to_ids(code), ids)


def test_accepts_uint8_arrays_pil_and_float_tensors_alike(tokenizer):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    tensor = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1
    ref = tokenizer.encode(tensor)
    assert torch.equal(tokenizer.encode(arrays), ref)
    assert torch.equal(tokenizer.encode([Image.fromarray(a) for a in arrays]), ref)
    assert torch.equal(tokenizer.encode(arrays[0]), ref[:1])  # a single HWC image
    assert torch.equal(tokenizer.encode(Image.fromarray(arrays[0]).convert("RGBA")), ref[:1])


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((2, 32, 32, 3), dtype=np.float32), "numpy images must be uint8"),
        (np.zeros((2, 3, 32, 32), dtype=np.uint8), r"\[B, H, W, C\] with C = 1, 3 or 4 \(channels last\)"),
        (torch.zeros(2, 32, 32, 3), r"tensor images must be \[B, 3, H, W\]"),
        (torch.full((1, 3, 32, 32), 255.0), r"must lie in \[-1, 1\], got values in \[255, 255\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "must be floating point"),
        ({"image": 1}, "image 0 is a dict"),
        (torch.zeros(1, 3, 30, 30), "multiples of the patch size 4"),
    ],
)
def test_rejects_bad_images_with_a_clear_error(tokenizer, bad, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.encode(bad)


def test_pictures_of_any_size_are_fitted_to_the_models(tokenizer):
    chelsea = np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8)  # skimage chelsea's shape
    ids = tokenizer.encode(chelsea)
    assert ids.shape == (1, 32)
    with pytest.raises(ValueError, match=r"image 0 is 451x300 \(width x height\), but resize=False needs 32x32"):
        tokenizer.encode(chelsea, resize=False)
    square = chelsea[:32, :32]
    assert torch.equal(tokenizer.encode(square, resize=False), tokenizer.encode(square))


def test_the_same_picture_in_any_form_gives_the_same_ids(tokenizer, tmp_path):
    rng = np.random.default_rng(1)
    picture = (np.linspace(0, 255, 60)[None, :, None] * rng.uniform(0.3, 1, (45, 1, 3))).astype(np.uint8)
    picture = np.clip(picture + rng.integers(0, 30, picture.shape), 0, 255).astype(np.uint8)  # 45 x 60 RGB
    Image.fromarray(picture).save(tmp_path / "p.png")
    opaque = np.concatenate([picture, np.full((45, 60, 1), 255, np.uint8)], -1)
    want = tokenizer.encode(picture)
    for form in (Image.fromarray(picture), str(tmp_path / "p.png"), tmp_path / "p.png", opaque, [picture]):
        assert torch.equal(tokenizer.encode(form), want), type(form)
    other = np.random.default_rng(2).integers(0, 256, (70, 33), dtype=np.uint8)  # gray, another size
    mixed = tokenizer.encode([picture, Image.fromarray(other), tmp_path / "p.png"])
    assert torch.equal(mixed, torch.cat([want, tokenizer.encode(other), want]))


def test_a_picture_file_gives_the_ids_of_the_evaluation_data(tokenizer, tmp_path):
    from flowmo_fast.formats.data import ImageFolderDataset

    picture = np.random.default_rng(3).integers(0, 256, (50, 77, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "p.png")
    image = ImageFolderDataset(str(tmp_path), tokenizer.image_size)[0]["image"]
    assert torch.equal(tokenizer.encode(tmp_path / "p.png"), tokenizer.encode(image[None]))


def test_rejects_bad_ids(tokenizer):
    with pytest.raises(ValueError, match=r"must be \[B, 32\]"):
        tokenizer.decode(torch.zeros(1, 31, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, 512\)"):
        tokenizer.decode(torch.full((1, 32), 512))
    with pytest.raises(ValueError, match="integer tensor"):
        tokenizer.decode(torch.zeros(1, 32))


def test_decode_is_reproducible_with_a_generator(tokenizer):
    ids = tokenizer.encode(torch.rand(2, 3, 32, 32) * 2 - 1)
    a = tokenizer.decode(ids, UPSTREAM.replace(steps=3), generator=torch.Generator().manual_seed(1))
    b = tokenizer.decode(ids, UPSTREAM.replace(steps=3), generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 3, tokenizer.image_size, tokenizer.image_size) == (2, 3, 32, 32)
    assert a.dtype == torch.float32 and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert tokenizer.decode(ids, UPSTREAM.replace(steps=2), size=(16, 24)).shape == (2, 3, 16, 24)


def test_kl_checkpoints_are_refused(tmp_path):
    import flowmo_fast

    model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.quantization_type=kl"], preset="tiny"))
    with pytest.raises(ValueError, match="needs an LFQ checkpoint"):
        Tokenizer(model)
