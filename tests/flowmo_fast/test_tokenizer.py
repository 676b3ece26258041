"""Tokenizer: images <-> token ids, accepted inputs, and clear rejections."""

import numpy as np
import pytest
import torch
from PIL import Image

from flowmo_fast import Tokenizer
from flowmo_fast.sampling import UPSTREAM


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
        (np.zeros((2, 3, 32, 32), dtype=np.uint8), r"must be \[H, W, 3\] or \[B, H, W, 3\]"),
        (torch.zeros(2, 32, 32, 3), r"tensor images must be \[B, 3, H, W\]"),
        (torch.full((1, 3, 32, 32), 255.0), r"must lie in \[-1, 1\], got values in \[255, 255\]"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), "must be floating point"),
        ("image.png", "unsupported image type str"),
        ([np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16, 3), np.uint8)], "must share a size"),
        (torch.zeros(1, 3, 30, 30), "multiples of the patch size 4"),
    ],
)
def test_rejects_bad_images_with_a_clear_error(tokenizer, bad, message):
    with pytest.raises(ValueError, match=message):
        tokenizer.encode(bad)


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
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.float32 and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert tokenizer.decode(ids, UPSTREAM.replace(steps=2), size=(16, 24)).shape == (2, 3, 16, 24)


def test_kl_checkpoints_are_refused(tmp_path):
    import flowmo_fast

    model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.quantization_type=kl"], preset="tiny"))
    with pytest.raises(ValueError, match="needs an LFQ checkpoint"):
        Tokenizer(model)
