"""Parity with the upstream FlowMo code: every stage of the tiny FlowMo-Lo fixture (CPU, float32)."""

import pytest
import torch

from flowmo_fast.flowmo import flow
from flowmo_fast.sampler_settings import UPSTREAM, SamplingOptions


def assert_close(ours, ref, name, floor=1.0):
    """max abs error <= 1e-4 * max(floor, |ref|) (the project's parity tolerance). Loss scalars pass floor=0:
    relative to their own size, since a small loss (the quantizer's is -0.006) would otherwise get percents."""
    tol = 1e-4 * max(floor, ref.abs().max().item())
    err = (ours - ref).abs().max().item()
    assert err <= tol, f"{name}: max abs error {err:.3g} > {tol:.3g}"


@torch.no_grad()
def test_encode(parity, parity_model):
    assert_close(parity_model.encode(parity["images"]), parity["code_prequant"], "code")


@torch.no_grad()
def test_quantize_train_mode_and_loss_breakdown(parity, parity_model):
    parity_model.train()
    try:
        out = parity_model.quantize(parity["code_prequant"])
    finally:
        parity_model.eval()
    assert_close(out.quantized, parity["train_quantized"], "quantized")
    assert torch.equal(out.indices.flatten(), parity["train_indices"])
    assert_close(out.loss, parity["train_quantizer_loss"], "quantizer loss", floor=0)
    for key in ("per_sample_entropy", "codebook_entropy", "entropy_aux_loss", "commitment"):
        assert_close(out.breakdown[key], parity[f"lfq_{key}"], key, floor=0)


@torch.no_grad()
def test_quantize_eval_mode(parity, parity_model):
    out = parity_model.quantize(parity["code_prequant"])
    quantized, indices, loss = out.quantized, out.indices, out.loss
    assert_close(quantized, parity["eval_quantized"], "quantized")
    assert torch.equal(indices.flatten(), parity["eval_indices"])
    assert loss.item() == 0.0


@torch.no_grad()
def test_velocity(parity, parity_model):
    v = parity_model.decode(parity["zt"], parity["code_with_mask"], parity["t"])
    assert_close(v, parity["velocity"], "velocity")


@torch.no_grad()
def test_diffusion_loss_with_injected_times_and_noise(parity, parity_model):
    out = flow.rectified_flow_loss(
        parity_model, parity["images"], t=parity["t"], noise=parity["z1"], enable_cfg=False
    )
    assert_close(out.diffusion_loss, parity["diffusion_loss"], "diffusion loss")
    assert_close(out.model.velocity, parity["velocity"], "velocity")
    assert out.loss.item() == pytest.approx(out.diffusion_loss.item())  # eval mode: quantizer loss 0


@torch.no_grad()
def test_sampler_pow_schedule_with_guidance(parity, parity_model):
    code = parity["code_with_mask"]
    options = SamplingOptions(steps=25, cfg=1.5, schedule="pow_0.25", cfg_interval=(0.17, 1.02))
    out = flow.sample(parity_model, parity["sampler_noise"], code, code * 0, options)
    assert_close(out, parity["sample_pow025_cfg"], "sample pow_0.25 cfg 1.5")


@torch.no_grad()
def test_sampler_linear_schedule_without_guidance(parity, parity_model):
    options = SamplingOptions(steps=10, cfg=1.0, schedule="linear", cfg_interval=(0.17, 1.02))
    out = flow.sample(parity_model, parity["sampler_noise"], parity["code_with_mask"], None, options)
    assert_close(out, parity["sample_linear10_nocfg"], "sample linear 10")


@torch.no_grad()
def test_reconstruct_uses_the_same_sampler(parity, parity_model):
    """reconstruct = encode, quantize, sample from seeded noise, clip: equals the fixture's sample, clipped."""
    images = parity["images"]
    g = torch.Generator().manual_seed(123)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(123))
    out = parity_model.reconstruct(images, UPSTREAM, generator=g)
    quantized = parity_model.quantize(parity_model.encode(images)).quantized
    code = parity_model.with_mask(quantized)
    ref = flow.sample(parity_model, noise, code, code * 0, UPSTREAM).clamp(-1, 1)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert_close(out, ref, "reconstruct")
    assert out.min() >= -1 and out.max() <= 1
