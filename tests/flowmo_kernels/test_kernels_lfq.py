"""LFQ: the Triton kernel (CPU interpreter) and the PyTorch twin against upstream's formulation in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flowmo_kernels.lfq import LFQOutput, indices_to_codes, lfq_torch
from flowmo_kernels.lfq_triton import lfq_triton

# (d, N): d = 1, 9, 14, 17; N never a multiple of the 64-row blocks, and large enough to split rows
SHAPES = [(1, 70), (9, 100), (14, 67), (17, 33)]
LOSS_NAMES = ("commitment", "per_sample_entropy", "codebook_entropy")


def upstream_lfq_f64(x: torch.Tensor) -> LFQOutput:
    """Upstream's way, in float64: a softmax over all 2^d codes (N x 2^d), temperature 0.1."""
    x = x.double()
    n, d = x.shape
    codes = indices_to_codes(torch.arange(2**d), d, torch.float64)  # [2^d, d]
    logits = 2 * x @ codes.T / 0.1
    probs = logits.softmax(-1)
    per_sample = -(probs * logits.log_softmax(-1)).sum(-1).mean()
    avg = probs.mean(0)
    codebook = -(avg * torch.log(avg + 1e-5)).sum()
    sign = torch.where(x > 0, 1.0, -1.0).double()
    quantized = x + (sign - x).detach()
    indices = ((x > 0).long() * 2 ** torch.arange(d)).sum(-1)
    return LFQOutput(quantized, indices, F.mse_loss(x, sign), per_sample, codebook)


def outputs_and_grad(fn, x: torch.Tensor, weights: torch.Tensor, loss_weights: torch.Tensor):
    """Run fn, backpropagate a random combination of every output; return (outputs, grad of x)."""
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    losses = torch.stack([getattr(out, name).double() for name in LOSS_NAMES])
    total = (out.quantized.double() * weights).sum() + (losses * loss_weights).sum()
    (grad,) = torch.autograd.grad(total, x)
    return out, grad


def assert_matches(out: LFQOutput, grad, ref: LFQOutput, ref_grad, rtol: float) -> None:
    assert torch.equal(out.quantized.double(), ref.quantized.detach())
    assert torch.equal(out.indices, ref.indices)
    for name in LOSS_NAMES:
        ours, want = getattr(out, name).double(), getattr(ref, name).detach()
        assert abs(ours - want) <= rtol * max(1.0, abs(want)), f"{name}: {ours.item()} vs {want.item()}"
    err = (grad.double() - ref_grad).abs().max()
    assert err <= rtol * ref_grad.abs().max(), f"grad: max error {err:.3g} vs max {ref_grad.abs().max():.3g}"


@pytest.fixture(params=SHAPES, ids=[f"d{d}_n{n}" for d, n in SHAPES])
def case(request):
    d, n = request.param
    g = torch.Generator().manual_seed(d * 1000 + n)
    # 40 x ~ N(0, 4^2): probabilities from near-uniform to saturated, as in a trained encoder
    x = 0.1 * torch.randn(n, d, generator=g)
    weights = torch.randn(n, d, generator=g, dtype=torch.float64)
    loss_weights = torch.randn(3, generator=g, dtype=torch.float64)
    ref, ref_grad = outputs_and_grad(upstream_lfq_f64, x.double(), weights, loss_weights)
    return x, weights, loss_weights, ref, ref_grad


def test_torch_twin_matches_upstream_formulation_in_float64(case):
    x, weights, loss_weights, ref, ref_grad = case
    out, grad = outputs_and_grad(lfq_torch, x, weights, loss_weights)
    assert_matches(out, grad, ref, ref_grad, rtol=2e-5)


def test_triton_matches_upstream_formulation_and_twin(case):
    x, weights, loss_weights, ref, ref_grad = case
    out, grad = outputs_and_grad(lfq_triton, x, weights, loss_weights)
    assert_matches(out, grad, ref, ref_grad, rtol=2e-5)
    twin, twin_grad = outputs_and_grad(lfq_torch, x, weights, loss_weights)
    assert_matches(out, grad, twin, twin_grad.double(), rtol=1e-5)


def test_saturated_bits_keep_exact_tails():
    """|40 x| up to ~200: the off-probabilities underflow in fp32; nothing may turn into nan or inf."""
    x = torch.randn(45, 6, generator=torch.Generator().manual_seed(3))
    weights = torch.ones(45, 6, dtype=torch.float64)
    loss_weights = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    ref, ref_grad = outputs_and_grad(upstream_lfq_f64, x.double(), weights, loss_weights)
    for fn in (lfq_torch, lfq_triton):
        out, grad = outputs_and_grad(fn, x, weights, loss_weights)
        assert torch.isfinite(grad).all()
        assert_matches(out, grad, ref, ref_grad, rtol=2e-5)


def test_bfloat16_input():
    x = (0.1 * torch.randn(70, 9, generator=torch.Generator().manual_seed(5))).bfloat16()
    weights = torch.randn(70, 9, dtype=torch.float64)
    loss_weights = torch.tensor([0.5, 2.0, -1.5], dtype=torch.float64)
    out, grad = outputs_and_grad(lfq_triton, x, weights, loss_weights)
    twin, twin_grad = outputs_and_grad(lfq_torch, x, weights, loss_weights)
    ref, ref_grad = outputs_and_grad(upstream_lfq_f64, x.double(), weights, loss_weights)
    assert out.quantized.dtype == grad.dtype == torch.bfloat16
    assert out.codebook_entropy.dtype == torch.float32
    for name in LOSS_NAMES:  # losses are computed in float32 from the bf16 values
        torch.testing.assert_close(getattr(out, name).double(), getattr(ref, name), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, twin_grad, rtol=1e-2, atol=1e-2 * twin_grad.abs().max().item())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())


def test_torch_twin_under_autocast_equals_float32():
    """The plain LFQ inside bf16 autocast (training on CUDA with model.kernels=torch, or after a Triton op fell back
    to it): the losses and gradients of float32, not bf16 code products (and a backward that runs at all)."""
    x = torch.randn(96, 9, generator=torch.Generator().manual_seed(3))

    def losses_and_grad(autocast: bool):
        leaf = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = lfq_torch(leaf)
        total = out.commitment + out.per_sample_entropy - out.codebook_entropy
        total.backward()
        return torch.stack([out.commitment, out.per_sample_entropy, out.codebook_entropy]), leaf.grad

    (plain, plain_grad), (mixed, mixed_grad) = losses_and_grad(False), losses_and_grad(True)
    assert torch.equal(mixed, plain) and torch.equal(mixed_grad, plain_grad)


@pytest.mark.parametrize("fn", [lfq_torch, lfq_triton], ids=["torch", "triton"])
def test_without_loss_only_the_straight_through_gradient(fn):
    x = torch.randn(20, 9, requires_grad=True)
    out = fn(x, with_loss=False)
    assert all(getattr(out, name).item() == 0.0 for name in LOSS_NAMES)
    w = torch.randn(20, 9)
    (grad,) = torch.autograd.grad((out.quantized * w).sum() + out.commitment, x)
    assert torch.equal(grad, w)


def test_gradcheck_torch_twin_float64():
    x = (0.05 * torch.randn(7, 5, dtype=torch.float64) + 0.02).requires_grad_()

    def losses(x):  # not `quantized`: its straight-through gradient is a convention, not a derivative
        out = lfq_torch(x)
        return out.commitment, out.per_sample_entropy, out.codebook_entropy

    assert torch.autograd.gradcheck(losses, (x,))


@pytest.mark.parametrize("fn", [lfq_torch, lfq_triton], ids=["torch", "triton"])
def test_loss_breakdown_equals_upstream_fixture(fn, parity, parity_model):
    x = parity_model.quantizer.to_groups(parity["code_prequant"])
    out = fn(x)
    assert torch.equal(out.quantized, parity_model.quantizer.to_groups(parity["train_quantized"]))
    assert torch.equal(out.indices, parity["train_indices"])
    for name in LOSS_NAMES:
        ours, want = getattr(out, name), parity[f"lfq_{name}"]
        assert abs(ours - want) <= 1e-6 * max(1.0, abs(want)), f"{name}: {ours.item()} vs upstream {want.item()}"
    aux = out.per_sample_entropy - out.codebook_entropy
    assert abs(aux - parity["lfq_entropy_aux_loss"]) <= 1e-6 * abs(parity["lfq_entropy_aux_loss"])


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, d\]"):
        lfq_triton(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="at most 20 bits per group"):
        lfq_triton(torch.randn(2, 21))


@pytest.mark.parametrize("d", [9, 14])
def test_triton_with_the_gpu_tiling_matches_the_twin(monkeypatch, d):
    """The GPU's smaller backward tiles (several own and other code blocks per program, 8 warps: no register
    spills on sm_90a) give the same results; the interpreter otherwise runs one big tile per half."""
    from flowmo_kernels import lfq_triton as module

    monkeypatch.setattr(module, "TILING", module.GPU_TILING)
    assert (1 << (d - d // 2)) > module.GPU_TILING.other_codes  # the inner loop runs over several blocks
    g = torch.Generator().manual_seed(d)
    x = 0.1 * torch.randn(70, d, generator=g)
    weights, loss_weights = torch.randn(70, d, generator=g, dtype=torch.float64), torch.randn(3, generator=g).double()
    out, grad = outputs_and_grad(lfq_triton, x, weights, loss_weights)
    ref, ref_grad = outputs_and_grad(lfq_torch, x, weights, loss_weights)
    assert_matches(out, grad, ref, ref_grad, rtol=1e-5)
