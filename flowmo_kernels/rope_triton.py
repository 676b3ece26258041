"""Triton QK RMSNorm + RoPE: reads q or k straight from the qkv projection's strided view and writes the
contiguous [B, H, L, D] layout that scaled_dot_product_attention takes, in one pass.

Same function as `flowmo_kernels.rope.qk_norm_rope_torch`, including its roundings: the normalised row is
rounded to the input dtype, times the weight, rounded to the output dtype, then rotated in float32.
Each program handles a block of rows of the flattened (sample, head, position) grid; the weight gradient
is summed per program and added up in PyTorch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from flowmo_kernels import on_device_of
from flowmo_kernels.rope import RMS_EPS

EPS = tl.constexpr(RMS_EPS)
MAX_TILE = 4096  # elements of a [rows, D / 2] tile kept in registers
# 16 elements per thread and tile: at 4 warps (32 each) ptxas -v for sm_90a used 255 registers and spilled
# (head dim 64 and 96, forward and backward); at 8 warps 170-204 registers, no spills.
NUM_WARPS = 8


def _block_rows(half: int) -> int:
    return MAX_TILE // triton.next_power_of_2(half)


@triton.jit
def _row_offsets(rows, H, L, stride_b, stride_h, stride_l):
    """Flat rows (b, h, l) -> offsets of their first element in the strided input, and their positions l."""
    pos = rows % L
    bh = rows // L
    return (bh // H) * stride_b + (bh % H) * stride_h + pos * stride_l, pos


@triton.jit
def _load_tile(
    x_ptr, w_ptr, cos_ptr, sin_ptr, n_rows, H, L, stride_b, stride_h, stride_l,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """This program's rows (flat (b, h, l)) and masks, with their input pairs (x[2j], x[2j+1]) in float32,
    the weight's pairs and the rotation (cos, sin) of each row's position."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_mask = rows < n_rows
    pairs = tl.arange(0, BLOCK_P)
    mask = row_mask[:, None] & (pairs < HALF)[None, :]
    x_row, pos = _row_offsets(rows, H, L, stride_b, stride_h, stride_l)
    x_offs = x_row[:, None] + 2 * pairs[None, :]
    x0 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(x_ptr + x_offs + 1, mask=mask, other=0.0).to(tl.float32)
    w0 = tl.load(w_ptr + 2 * pairs, mask=pairs < HALF, other=0.0).to(tl.float32)
    w1 = tl.load(w_ptr + 2 * pairs + 1, mask=pairs < HALF, other=0.0).to(tl.float32)
    cs_offs = pos[:, None] * HALF + pairs[None, :]
    cos = tl.load(cos_ptr + cs_offs, mask=mask, other=0.0)
    sin = tl.load(sin_ptr + cs_offs, mask=mask, other=0.0)
    return rows, row_mask, pairs, mask, x0, x1, w0, w1, cos, sin


@triton.jit
def _norm_rope_fwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr, rstd_ptr, n_rows, H, L, stride_b, stride_h, stride_l,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    rows, row_mask, pairs, mask, x0, x1, w0, w1, cos, sin = _load_tile(
        x_ptr, w_ptr, cos_ptr, sin_ptr, n_rows, H, L, stride_b, stride_h, stride_l, HALF, BLOCK_R, BLOCK_P
    )
    rstd = 1.0 / tl.sqrt((tl.sum(x0 * x0, axis=1) + tl.sum(x1 * x1, axis=1)) / (2 * HALF) + EPS)
    x_ty = x_ptr.dtype.element_ty
    out_ty = out_ptr.dtype.element_ty
    n0 = ((x0 * rstd[:, None]).to(x_ty).to(tl.float32) * w0[None, :]).to(out_ty).to(tl.float32)
    n1 = ((x1 * rstd[:, None]).to(x_ty).to(tl.float32) * w1[None, :]).to(out_ty).to(tl.float32)
    out_offs = rows[:, None] * (2 * HALF) + 2 * pairs[None, :]
    tl.store(out_ptr + out_offs, (cos * n0 - sin * n1).to(out_ty), mask=mask)
    tl.store(out_ptr + out_offs + 1, (sin * n0 + cos * n1).to(out_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _norm_rope_bwd_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, rstd_ptr, grad_out_ptr, grad_x_ptr, grad_w_ptr,
    n_rows, H, L, stride_b, stride_h, stride_l,
    HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    rows, row_mask, pairs, mask, x0, x1, w0, w1, cos, sin = _load_tile(
        x_ptr, w_ptr, cos_ptr, sin_ptr, n_rows, H, L, stride_b, stride_h, stride_l, HALF, BLOCK_R, BLOCK_P
    )
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    g_offs = rows[:, None] * (2 * HALF) + 2 * pairs[None, :]
    g0 = tl.load(grad_out_ptr + g_offs, mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(grad_out_ptr + g_offs + 1, mask=mask, other=0.0).to(tl.float32)
    # the rotation's transpose, then the weight
    gn0 = cos * g0 + sin * g1
    gn1 = cos * g1 - sin * g0
    x_ty = x_ptr.dtype.element_ty
    y0 = x0 * rstd[:, None]
    y1 = x1 * rstd[:, None]
    partial = tl.program_id(0) * (2 * HALF) + 2 * pairs
    tl.store(grad_w_ptr + partial, tl.sum(gn0 * y0.to(x_ty).to(tl.float32), axis=0), mask=pairs < HALF)
    tl.store(grad_w_ptr + partial + 1, tl.sum(gn1 * y1.to(x_ty).to(tl.float32), axis=0), mask=pairs < HALF)
    gy0 = gn0 * w0[None, :]
    gy1 = gn1 * w1[None, :]
    # RMSNorm backward: rstd * (g - y * mean(g * y))
    proj = (tl.sum(gy0 * y0, axis=1) + tl.sum(gy1 * y1, axis=1)) / (2 * HALF)
    tl.store(grad_x_ptr + g_offs, ((gy0 - y0 * proj[:, None]) * rstd[:, None]).to(x_ty), mask=mask)
    tl.store(grad_x_ptr + g_offs + 1, ((gy1 - y1 * proj[:, None]) * rstd[:, None]).to(x_ty), mask=mask)


def _check(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor) -> None:
    if x.ndim != 4 or x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"q/k must be [B, H, L, D] with D even and unit stride in D, got {tuple(x.shape)}")
    b, h, l, d = x.shape
    if weight.shape != (d,) or cos.shape != (l, d // 2) or sin.shape != (l, d // 2):
        raise ValueError(
            f"qk_norm_rope: weight must be [{d}] and cos, sin [{l}, {d // 2}]; got {tuple(weight.shape)}, "
            f"{tuple(cos.shape)}, {tuple(sin.shape)}"
        )


@torch.library.custom_op("flowmo::norm_rope", mutates_args=())
def norm_rope_op(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """x [B, H, L, D] (any strides, unit stride in D); weight [D]; cos, sin [L, D/2] float32 contiguous
    -> RoPE(RMSNorm(x) * weight) [B, H, L, D] contiguous, and rstd [B * H * L]."""
    b, h, l, d = x.shape
    out = torch.empty((b, h, l, d), dtype=out_dtype, device=x.device)
    rstd = torch.empty(b * h * l, dtype=torch.float32, device=x.device)
    block_r = _block_rows(d // 2)
    with on_device_of(x):
        _norm_rope_fwd_kernel[(triton.cdiv(b * h * l, block_r),)](
            x, weight, cos, sin, out, rstd, b * h * l, h, l, x.stride(0), x.stride(1), x.stride(2),
            HALF=d // 2, BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(d // 2), num_warps=NUM_WARPS,
        )
    return out, rstd


@norm_rope_op.register_fake
def _(x, weight, cos, sin, out_dtype):
    b, h, l, d = x.shape
    return x.new_empty((b, h, l, d), dtype=out_dtype), x.new_empty(b * h * l, dtype=torch.float32)


@torch.library.custom_op("flowmo::norm_rope_backward", mutates_args=())
def norm_rope_backward_op(
    x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, rstd: Tensor, grad_out: Tensor
) -> tuple[Tensor, Tensor]:
    """-> grad_x [B, H, L, D] contiguous (x's dtype), grad_weight [D] float32."""
    b, h, l, d = x.shape
    block_r = _block_rows(d // 2)
    programs = triton.cdiv(b * h * l, block_r)
    grad_x = torch.empty((b, h, l, d), dtype=x.dtype, device=x.device)
    grad_w = torch.empty(programs, d, dtype=torch.float32, device=x.device)
    with on_device_of(x):
        _norm_rope_bwd_kernel[(programs,)](
            x, weight, cos, sin, rstd, grad_out, grad_x, grad_w, b * h * l, h, l,
            x.stride(0), x.stride(1), x.stride(2),
            HALF=d // 2, BLOCK_R=block_r, BLOCK_P=triton.next_power_of_2(d // 2), num_warps=NUM_WARPS,
        )
    return grad_x, grad_w.sum(0)


@norm_rope_backward_op.register_fake
def _(x, weight, cos, sin, rstd, grad_out):
    return x.new_empty(x.shape), x.new_empty(x.shape[-1:], dtype=torch.float32)


def _setup(ctx, inputs, output):
    x, weight, cos, sin, _ = inputs
    ctx.save_for_backward(x, weight, cos, sin, output[1])


def _backward(ctx, grad_out, grad_rstd):
    x, weight, cos, sin, rstd = ctx.saved_tensors
    grad_x, grad_w = norm_rope_backward_op(x, weight, cos, sin, rstd, grad_out.contiguous())
    return grad_x, grad_w.to(weight.dtype), None, None, None


norm_rope_op.register_autograd(_backward, setup_context=_setup)


def norm_rope_triton(x: Tensor, weight: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype) -> Tensor:
    """RoPE(RMSNorm(x) * weight) for one of q, k [B, H, L, D]; cos, sin [L, D/2]. Rotary tables get no gradient."""
    _check(x, weight, cos, sin)
    return norm_rope_op(x, weight, cos.float().contiguous(), sin.float().contiguous(), out_dtype)[0]


def qk_norm_rope_triton(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Same contract as `flowmo_kernels.rope.qk_norm_rope_torch`."""
    return norm_rope_triton(q, q_weight, cos, sin, out_dtype), norm_rope_triton(k, k_weight, cos, sin, out_dtype)
