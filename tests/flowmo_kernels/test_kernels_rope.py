"""QK RMSNorm + RoPE: Triton (CPU interpreter) and PyTorch twin against a float64 complex-number rotation."""

from __future__ import annotations

import pytest
import torch

from flowmo_kernels.rope import qk_norm_rope_torch, rope_tables
from flowmo_kernels.rope_triton import qk_norm_rope_triton

# (B, H, L, axes): head dim = sum(axes); 18 = 9 pairs, not a power of two; L = 300 spans two position blocks
CASES = [(2, 3, 13, (4, 6, 6)), (1, 2, 300, (2, 8, 8))]
# max error / max |reference|: fp32 rounding; bf16 values carry 8 bits, rounded up to three times on the way
# (Triton's interpreter casts float32 -> bfloat16 toward zero where a GPU rounds to nearest)
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def norm_rope_f64(x, weight, cos, sin):
    """RMSNorm(x) * weight, each pair (x[2j], x[2j+1]) taken as a complex number times e^(i angle_j)."""
    x = x.double()
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight.double()
    rotated = torch.view_as_complex(y.unflatten(-1, (-1, 2)).contiguous()) * torch.complex(cos.double(), sin.double())
    return torch.view_as_real(rotated).flatten(-2)


def qk_f64(q, k, q_weight, k_weight, cos, sin, out_dtype):
    return norm_rope_f64(q, q_weight, cos, sin), norm_rope_f64(k, k_weight, cos, sin)


def inputs(b, h, l, axes, dtype, seed):
    """qkv as the attention layer makes it ([B, L, 3 * H * D], viewed as q, k [B, H, L, D] strided), weights, tables."""
    g = torch.Generator().manual_seed(seed)
    d = sum(axes)
    qkv = (2 * torch.randn(b, l, 3 * h * d, generator=g)).to(dtype)
    q_weight = 1 + 0.2 * torch.randn(d, generator=g)
    k_weight = 1 + 0.2 * torch.randn(d, generator=g)
    ids = torch.randint(0, 40, (l, 3), generator=g)
    return qkv, q_weight, k_weight, *rope_tables(ids, axes)


def run(fn, qkv, q_weight, k_weight, cos, sin, out_dtype, weights):
    """(q, k) and the gradients of <(q, k), weights> for qkv and both norm weights."""
    leaves = [t.detach().clone().requires_grad_() for t in (qkv, q_weight, k_weight)]
    b, l, _ = qkv.shape
    q, k, _ = leaves[0].unflatten(-1, (3, weights[0].shape[1], -1)).permute(2, 0, 3, 1, 4)
    q_out, k_out = fn(q, k, leaves[1], leaves[2], cos, sin, out_dtype)
    total = (q_out.double() * weights[0]).sum() + (k_out.double() * weights[1]).sum()
    return (q_out, k_out), torch.autograd.grad(total, leaves)


def assert_rel_close(ours, ref, rel, name):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[2]}_D{sum(c[3])}")
def test_qk_norm_rope(case, dtype):
    b, h, l, axes = case
    qkv, q_weight, k_weight, cos, sin = inputs(b, h, l, axes, dtype, seed=l)
    weights = [torch.randn(b, h, l, sum(axes), dtype=torch.float64) for _ in range(2)]
    outs, grads = run(qk_norm_rope_triton, qkv, q_weight, k_weight, cos, sin, dtype, weights)
    twin, twin_grads = run(qk_norm_rope_torch, qkv, q_weight, k_weight, cos, sin, dtype, weights)
    ref, ref_grads = run(qk_f64, qkv.double(), q_weight, k_weight, cos, sin, torch.float64, weights)
    rel = REL_TOL[dtype]
    for name, out, out_twin, out_ref in zip("qk", outs, twin, ref):
        assert out.dtype == dtype and out.is_contiguous()  # the layout SDPA takes
        assert_rel_close(out, out_ref, rel, f"{name} vs float64")
        assert_rel_close(out, out_twin, rel, f"{name} vs twin")
    for name, g, g_twin, g_ref in zip(("qkv", "q_weight", "k_weight"), grads, twin_grads, ref_grads):
        assert g.dtype == g_twin.dtype
        assert_rel_close(g, g_ref, rel, f"grad {name} vs float64")
        assert_rel_close(g, g_twin, rel, f"grad {name} vs twin")


def test_gradcheck_torch_twin_float64():
    q = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    cos, sin = rope_tables(torch.arange(9).reshape(3, 3), (2, 2, 4))
    assert torch.autograd.gradcheck(
        lambda q, k, w: qk_norm_rope_torch(q, k, w, w, cos, sin, torch.float64), (q, k, weight)
    )


def test_bad_shapes_are_named():
    q = torch.randn(1, 2, 3, 8)
    cos, sin = torch.zeros(3, 4), torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"weight must be \[8\] and cos, sin \[3, 4\]"):
        qk_norm_rope_triton(q, q, torch.ones(8), torch.ones(8), cos[:2], sin[:2], torch.float32)
    with pytest.raises(ValueError, match="D even"):
        qk_norm_rope_triton(q[..., :7], q[..., :7], torch.ones(7), torch.ones(7), cos, sin, torch.float32)
