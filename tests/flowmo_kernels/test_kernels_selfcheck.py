"""The Triton kernels checking themselves (flowmo_kernels.selfcheck), run in the CPU interpreter: the right kernels
pass their own checks silently in float32 and bf16, with the mixed dtypes the model calls them with (no false
alarm that would cost a GPU its fast path); a kernel with a bug inside the model is caught, warned about once and
replaced by its twin, so the model's output stays right."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace

import pytest
import torch

from flowmo_kernels import TORCH_OPS, get_ops, triton_ops
from flowmo_kernels.rope import rope_tables
from flowmo_kernels.rope_triton import qk_norm_rope_triton
from flowmo_kernels.selfcheck import FastPathChecks, FastPathWarning, checked_ops

BF16, F32 = torch.bfloat16, torch.float32


def op_calls(dtype: torch.dtype, residual: torch.dtype):
    """Each op called as the model's blocks call it under autocast to `dtype`: the residual stream in `residual`,
    projections (shift, scale, gate, q, k, the MLP's output) in `dtype`, norm weights and rotary tables float32."""
    g = torch.Generator().manual_seed(0)
    b, length, d, heads, head_dim = 2, 24, 48, 2, 12

    def rand(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    qkv = rand(b, length, 3 * heads * head_dim)
    q, k, _ = qkv.unflatten(-1, (3, heads, head_dim)).permute(2, 0, 3, 1, 4)  # strided views, as the model's
    cos, sin = rope_tables(torch.randint(0, 9, (length, 3), generator=g), (4, 4, 4))
    x = rand(b, length, d, dt=residual)
    return {
        "modulate": (x, rand(b, 1, d), rand(b, 1, d), residual),
        "modulate (no modulation)": (x, None, None, dtype),
        "gated_residual": (x, rand(b, 1, d), rand(b, length, d)),
        "qk_norm_rope": (q, k, 1 + rand(head_dim, dt=F32), 1 + rand(head_dim, dt=F32), cos, sin, dtype),
        "lfq": (0.1 * rand(80, 9, dt=residual),),
    }


@pytest.mark.parametrize("dtype,residual", [(F32, F32), (BF16, F32), (BF16, BF16)], ids=["f32", "bf16_mixed", "bf16"])
def test_the_triton_kernels_pass_their_own_checks(dtype, residual):
    checks = FastPathChecks()
    ops = get_ops("triton", "cpu", checks=checks)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        for name, args in op_calls(dtype, residual).items():
            getattr(ops, name.split(" ")[0])(*args)
    assert len(checks.verdicts) == 5 and all(checks.verdicts.values())


def sin_sign_bug(q, k, q_weight, k_weight, cos, sin, out_dtype):
    """A rotation the wrong way round: RoPE with the sine's sign flipped."""
    return qk_norm_rope_triton(q, k, q_weight, k_weight, cos, -sin, out_dtype)


@torch.no_grad()
def test_a_buggy_kernel_in_the_model_is_caught_and_its_twin_runs(monkeypatch, parity, parity_model):
    """The model's decoder with kernels='triton' whose QK-norm + RoPE has a sign bug: one warning (its head dim and
    dtypes, the error, the fallback), and the velocity still equals the upstream fixture (the twin ran); with the
    kernels right, the same decode is silent and every op the decoder calls passed its check."""
    wrong = replace(triton_ops.TRITON_OPS, qk_norm_rope=sin_sign_bug)
    monkeypatch.setattr(triton_ops, "TRITON_OPS", wrong)
    model = copy.deepcopy(parity_model)
    model.kernels = "triton"  # its verdicts, if earlier tests left any, are the right kernels': keyed apart
    with pytest.warns(FastPathWarning, match=r"kernels=triton qk_norm_rope \[head dim 32;") as record:
        velocity = model.decode(parity["zt"], parity["code_with_mask"], parity["t"])
        model.decode(parity["zt"], parity["code_with_mask"], parity["t"])
    assert len(record) == 1
    err = (velocity - parity["velocity"]).abs().max().item()
    assert err <= 1e-4 * max(1.0, parity["velocity"].abs().max().item())
    monkeypatch.undo()
    right = copy.deepcopy(parity_model)
    right.kernels, right.fast_checks = "triton", FastPathChecks()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        right.decode(parity["zt"], parity["code_with_mask"], parity["t"])
    assert {key[1] for key in right.fast_checks.verdicts} == {"modulate", "gated_residual", "qk_norm_rope"}
    assert all(right.fast_checks.verdicts.values())


def test_checked_sets_wrap_only_what_differs_from_the_twins():
    checks = FastPathChecks()
    assert get_ops("torch", "cpu", checks=checks) is TORCH_OPS
    ops = checked_ops(checks, triton_ops.TRITON_OPS, TORCH_OPS)
    assert ops.name == "triton" and ops.modulate.fused is triton_ops.TRITON_OPS.modulate
    assert get_ops("triton", "cpu", checks=checks) is ops
