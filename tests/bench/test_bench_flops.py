"""The analytic FLOP counts of bench/flops.py equal what PyTorch's FLOP counter sees in the model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flowmo_fast
from bench import flops
from flowmo_fast import flow
from flowmo_fast.sampling import UPSTREAM

BATCH, SIZE = 2, 32


def matmul_attention(q, k, v, scale):
    """Attention as plain matmuls: the FLOP counter does not see the CPU SDPA kernel."""
    return ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build(quantization: str) -> flowmo_fast.FlowMo:
    """Tiny model with an encoder wider than its decoder, so the two widths cannot be confused."""
    torch.manual_seed(0)
    config = flowmo_fast.load_config([f"model.quantization_type={quantization}", "model.enc_mup_width=4"], preset="tiny")
    model = flowmo_fast.FlowMo(config).eval()
    model.attention = matmul_attention
    return model


@pytest.fixture()
def model():
    return build("lfq")


@pytest.fixture()
def images():
    return torch.rand(BATCH, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


@pytest.mark.parametrize("quantization", ["lfq", "kl"])  # a KL encoder emits twice the code channels
def test_encoder_flops_match_the_counter(quantization, images):
    model = build(quantization)
    with torch.no_grad():
        n = counted(lambda: model.encode(images))
    assert n == BATCH * flops.encoder_flops(model.config, SIZE, SIZE)


def test_decoder_flops_match_the_counter(model, images):
    code = torch.randn(BATCH, model.code_length, model.config.model.context_dim + 1)
    with torch.no_grad():
        n = counted(lambda: model.decode(images, code, torch.rand(BATCH)))
    assert n == BATCH * flops.decoder_flops(model.config, SIZE, SIZE)


def test_reconstruct_flops_count_the_guided_passes(model, images):
    steps = 5  # pow_0.25 with the default interval guides one of these steps
    assert flops.decoder_passes(UPSTREAM.replace(steps=steps)) == steps + 1
    assert flops.decoder_passes(UPSTREAM.replace(steps=steps, cfg=1.0)) == steps
    with torch.no_grad():
        n = counted(lambda: model.reconstruct(images, UPSTREAM.replace(steps=steps)))
    assert n == BATCH * flops.reconstruct_flops(model.config, SIZE, SIZE, UPSTREAM.replace(steps=steps))


def test_train_step_flops_are_three_forwards(model, images):
    model.train()
    n = counted(lambda: flow.rectified_flow_loss(model, images).loss.backward())
    expected = BATCH * flops.train_step_flops(model.config, SIZE, SIZE)
    # Backward skips input gradients of the first layers and adds the LFQ entropy matmul: within 2%.
    assert n == pytest.approx(expected, rel=0.02)
