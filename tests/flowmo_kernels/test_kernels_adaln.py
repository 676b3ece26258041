"""adaLN modulation and gated residual: Triton (CPU interpreter) and PyTorch twin against float64."""

from __future__ import annotations

import pytest
import torch

from flowmo_kernels.adaln import gated_residual_torch, modulate_torch
from flowmo_kernels.adaln_triton import gated_residual_triton, modulate_triton

# (B, L, D): L odd; D a power of two and not; (2, 150, 48): a sample's rows in 2 programs of 2 tiles each
SHAPES = [(2, 150, 48), (3, 5, 33)]
DTYPES = [torch.float32, torch.bfloat16]
# max error / max |reference|: fp32 rounding; bf16 values carry 8 bits (and Triton's interpreter casts
# float32 -> bfloat16 toward zero where a GPU rounds to nearest: one more bf16 step off the twin)
REL_TOL = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def modulate_f64(x, shift, scale):
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + 1e-6)
    return y if scale is None else y * (1 + scale.double()) + shift.double()


def gated_residual_f64(x, gate, y):
    return x.double() + gate.double() * y.double()


def value_and_grads(fn, inputs, weight):
    """fn(*inputs) and the gradients of <fn(*inputs), weight> for every tensor input."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad((out.double() * weight).sum(), [t for t in leaves if t is not None])
    return out, grads


def assert_rel_close(ours, ref, rel, name):
    err = (ours.double() - ref.double()).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def check_against_f64_and_twin(triton_fn, torch_fn, f64_fn, inputs, dtype):
    out_shape = inputs[0].shape
    weight = torch.randn(out_shape, dtype=torch.float64)
    out, grads = value_and_grads(triton_fn, inputs, weight)
    twin, twin_grads = value_and_grads(torch_fn, inputs, weight)
    ref, ref_grads = value_and_grads(f64_fn, [t.double() if t is not None else None for t in inputs], weight)
    assert out.dtype == twin.dtype
    rel = REL_TOL[dtype]
    assert_rel_close(out, ref, rel, "value vs float64")
    assert_rel_close(out, twin, rel, "value vs twin")
    for i, (g, g_twin, g_ref) in enumerate(zip(grads, twin_grads, ref_grads)):
        assert g.dtype == g_twin.dtype and g.shape == g_twin.shape
        assert_rel_close(g, g_ref, rel, f"grad {i} vs float64")
        assert_rel_close(g, g_twin, rel, f"grad {i} vs twin")


def random_inputs(b, l, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, l, d, generator=g) * 2 + 0.5).to(dtype)
    shift = torch.randn(b, 1, d, generator=g).to(dtype)
    scale = (0.5 * torch.randn(b, 1, d, generator=g)).to(dtype)
    return x, shift, scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_modulate(shape, dtype):
    x, shift, scale = random_inputs(*shape, dtype, seed=1)
    check_against_f64_and_twin(modulate_triton, modulate_torch, modulate_f64, [x, shift, scale], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_modulate_identity_is_plain_layer_norm(dtype):
    x, _, _ = random_inputs(2, 11, 40, dtype, seed=2)

    def without_mod(fn):
        return lambda x: fn(x, None, None)

    fns = [without_mod(fn) for fn in (modulate_triton, modulate_torch, modulate_f64)]
    check_against_f64_and_twin(*fns, [x], dtype)


def test_modulate_out_dtype_and_strided_mod():
    """shift/scale as chunks of one adaLN output (non-contiguous views), output written in bf16."""
    x = torch.randn(2, 9, 24)
    mod = torch.randn(2, 1, 6 * 24)
    shift, scale = mod.chunk(6, dim=-1)[:2]
    out = modulate_triton(x, shift, scale, out_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, modulate_torch(x, shift, scale, out_dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gated_residual(shape, dtype):
    x, gate, _ = random_inputs(*shape, dtype, seed=3)
    y = torch.randn(shape).to(dtype)
    check_against_f64_and_twin(gated_residual_triton, gated_residual_torch, gated_residual_f64, [x, gate, y], dtype)


def test_gated_residual_mixed_dtypes_promote_like_torch():
    x = torch.randn(2, 7, 16)
    gate = torch.randn(2, 1, 16, dtype=torch.bfloat16)
    y = torch.randn(2, 7, 16, dtype=torch.bfloat16)
    out = gated_residual_triton(x, gate, y)
    assert out.dtype == gated_residual_torch(x, gate, y).dtype == torch.float32
    assert_rel_close(out, gated_residual_f64(x, gate, y), 1e-6, "mixed dtypes")


def test_gradcheck_torch_twins_float64():
    x, shift, scale = (t.double().requires_grad_() for t in random_inputs(2, 3, 5, torch.float64, seed=4))
    assert torch.autograd.gradcheck(modulate_torch, (x, shift, scale))
    gate, y = torch.randn(2, 1, 5, dtype=torch.float64, requires_grad=True), torch.randn(2, 3, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(gated_residual_torch, (x, gate, y.requires_grad_()))


def test_bad_arguments_are_named():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="shift and scale together"):
        modulate_triton(x, torch.randn(2, 1, 8), None)
    with pytest.raises(ValueError, match=r"\[B, 1, D\]"):
        modulate_triton(x, torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="y must have x's shape"):
        gated_residual_triton(x, torch.randn(2, 1, 8), torch.randn(2, 4, 8))
