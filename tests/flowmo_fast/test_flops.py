"""The analytic FLOP counts of flowmo_fast/flowmo/flops.py (training logs and benchmarks) equal what PyTorch's FLOP
counter sees in the model."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import flowmo_fast
from flowmo_fast.flowmo import flops, flow
from flowmo_fast.sampler_settings import UPSTREAM
from train.metrics import flowmo_flops_per_step
from train.objective import FlowMoObjective

BATCH, SIZE = 2, 32


def matmul_attention(q, k, v, scale):
    """Attention as plain matmuls: the FLOP counter does not see the CPU SDPA kernel."""
    return ((q @ k.transpose(-1, -2)) * scale).softmax(-1) @ v


def counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def build(quantization: str, *overrides: str) -> flowmo_fast.FlowMo:
    """Tiny model with an encoder wider than its decoder, so the two widths cannot be confused."""
    torch.manual_seed(0)
    config = flowmo_fast.load_config(
        [f"model.quantization_type={quantization}", "model.enc_mup_width=4", *overrides], preset="tiny"
    )
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


class SumOfSquares(torch.nn.Module):
    """A perceptual loss with no matmul: the chain's FLOPs are all the decoder's."""

    def forward(self, prediction, target):
        return (prediction - target).square().mean()


def test_posttrain_step_flops_count_the_checkpointed_chain(images):
    """Post-training's k-step chain through the decoder: k forwards, k recomputed in backward, 2k backward."""
    model = build("lfq", "model.posttrain_sample=True", "model.posttrain_sample_k=3", "opt.lpips_weight=0.5").train()
    objective = FlowMoObjective(model, SumOfSquares())
    n = counted(lambda: objective(images)[0].backward())
    expected = BATCH * flops.train_step_flops(model.config, SIZE, SIZE)
    assert expected - BATCH * 3 * (flops.encoder_flops(model.config, SIZE, SIZE)
                                   + flops.decoder_flops(model.config, SIZE, SIZE)) == BATCH * 12 * flops.decoder_flops(
        model.config, SIZE, SIZE)
    assert n == pytest.approx(expected, rel=0.02)


def test_training_logs_use_the_same_count():
    """train.metrics's MFU count is this module's, for all micro-batches of a step."""
    config = flowmo_fast.load_config(["opt.n_grad_acc=2"], preset="tiny")
    size = config.data.image_size
    assert flowmo_flops_per_step(config, micro_batch=3) == 2 * 3 * flops.train_step_flops(config, size, size)
