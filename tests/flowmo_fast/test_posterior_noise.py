"""The KL posterior sample of an evaluation (`reconstruct_rows`) comes from the image's own posterior stream, not
from the stream its sampler noise comes from: with a zero mean and a zero log-variance the quantized code is
exactly that stream's N(0, 1) draw (upstream's (f t) order), and not the sampler's numbers."""

from __future__ import annotations

import torch

import flowmo_fast
from flowmo_fast.noise import IMAGE_NOISE, POSTERIOR_NOISE, image_noise, row_seed

SEED, ROWS = 3, [5, 2]


def stream_draw(row: int, stream: int, features: int, length: int) -> torch.Tensor:
    """The first N(0, 1) numbers of (SEED, row, stream), drawn [features, length] and read [length, features]."""
    g = torch.Generator().manual_seed(row_seed(SEED, row, stream))
    return torch.randn((features, length), generator=g).T


@torch.no_grad()
def test_kl_posterior_sample_is_the_rows_posterior_stream_not_its_sampler_noise():
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.quantization_type=kl"], preset="tiny")).eval()
    for p in model.encoder.final_layer_txt.parameters():  # a code of zeros: mean 0, log-variance 0
        p.zero_()
    images = torch.rand((len(ROWS), 3, 32, 32)) * 2 - 1
    assert torch.equal(model.encode(images), torch.zeros(len(ROWS), model.code_length, model.encoder_context_dim))
    one_step = model.sampling().replace(steps=1)
    out = model.reconstruct_rows_with_code(images, ROWS, SEED, one_step).quantizer.quantized
    t, f = model.code_length, model.config.model.context_dim
    for i, row in enumerate(ROWS):
        assert torch.equal(out[i], stream_draw(row, POSTERIOR_NOISE, f, t)), row
        sampler = image_noise([row], SEED, (3, 32, 32)).flatten()
        assert not torch.allclose(out[i].T.flatten(), sampler[: f * t], atol=0.1)
        assert not torch.allclose(out[i], stream_draw(row, IMAGE_NOISE, f, t), atol=0.1)
    # a row's draw does not depend on the batch around it
    alone = model.reconstruct_rows_with_code(images[1:], ROWS[1:], SEED, one_step).quantizer.quantized
    assert torch.equal(alone[0], out[1])
