"""Triton adaLN modulation (LayerNorm + (1 + scale) * x + shift) and gated residual (x + gate * y).

Same functions as `flowmo_kernels.adaln`. x [B, L, D] is read once per row; per-sample shift, scale and gate
[B, 1, D] stay in registers. Each program owns a chunk of rows of one sample, so the gradients of the
per-sample vectors are sums over the chunk, written per program and added up in PyTorch (deterministic,
no atomics).
Offsets into [B, L, D] are int64: B * L * D may pass 2^31.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from flowmo_kernels import on_device_of, triton_interpreting
from flowmo_kernels.adaln import LN_EPS

EPS = tl.constexpr(LN_EPS)
MAX_TILE = 4096  # elements of a [rows, D] tile kept in registers
# Rows of a sample split into chunks until about this many programs run; the CPU interpreter pays per op
# (not per element), so there few programs, each looping over several tiles, run fastest.
TARGET_PROGRAMS = 4 if triton_interpreting() else 1024


def _row_tiling(b: int, l: int, d: int) -> tuple[int, int, int]:
    """(rows per tile, rows per program, chunks per sample) for x [b, l, d]."""
    block_d = triton.next_power_of_2(d)
    block_l = max(1, min(triton.next_power_of_2(l), MAX_TILE // block_d))
    chunks = max(1, min(triton.cdiv(l, block_l), TARGET_PROGRAMS // max(b, 1)))
    rows_per_program = triton.cdiv(triton.cdiv(l, chunks), block_l) * block_l
    return block_l, rows_per_program, triton.cdiv(l, rows_per_program)


def _per_sample(v: Tensor, b: int, d: int) -> Tensor:
    """[B, 1, D] (any strides) -> contiguous [B, D]."""
    if v.shape != (b, 1, d):
        raise ValueError(f"per-sample shift/scale/gate must be [B, 1, D] = [{b}, 1, {d}], got {tuple(v.shape)}")
    return v.reshape(b, d).contiguous()


@triton.jit
def _row_tile(b, l0, L, D, cols, col_mask, BLOCK_L: tl.constexpr):
    """Rows l0 .. l0 + BLOCK_L of sample b in a contiguous [B, L, D] tensor: (flat row ids, row mask,
    element mask, int64 element offsets)."""
    rows = b * L + l0 + tl.arange(0, BLOCK_L)
    row_mask = l0 + tl.arange(0, BLOCK_L) < L
    mask = row_mask[:, None] & col_mask[None, :]
    return rows, row_mask, mask, rows.to(tl.int64)[:, None] * D + cols[None, :]


# ---------------------------------------------------------------------------------------------- modulate


@triton.jit
def _modulate_fwd_kernel(
    x_ptr, shift_ptr, scale_ptr, y_ptr, mean_ptr, rstd_ptr, L, D, rows_per_program,
    HAS_MOD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_MOD:
        scale = 1.0 + tl.load(scale_ptr + b * D + cols, mask=col_mask, other=0.0).to(tl.float32)
        shift = tl.load(shift_ptr + b * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    start = chunk * rows_per_program
    for l0 in range(start, tl.minimum(start + rows_per_program, L), BLOCK_L):
        rows, row_mask, mask, offs = _row_tile(b, l0, L, D, cols, col_mask, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        centred = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=1) / D + EPS)
        y = centred * rstd[:, None]
        if HAS_MOD:
            y = y * scale[None, :] + shift[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit
def _modulate_bwd_kernel(
    x_ptr, scale_ptr, mean_ptr, rstd_ptr, grad_y_ptr, grad_x_ptr, grad_shift_ptr, grad_scale_ptr,
    L, D, rows_per_program,
    HAS_MOD: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    if HAS_MOD:
        scale = 1.0 + tl.load(scale_ptr + b * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
    grad_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = chunk * rows_per_program
    for l0 in range(start, tl.minimum(start + rows_per_program, L), BLOCK_L):
        rows, row_mask, mask, offs = _row_tile(b, l0, L, D, cols, col_mask, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        grad_y = tl.load(grad_y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_MOD:
            grad_shift += tl.sum(grad_y, axis=0)
            grad_scale += tl.sum(grad_y * x_hat, axis=0)
            grad_y = grad_y * scale[None, :]
        # LayerNorm backward: rstd * (g - mean(g) - x_hat * mean(g * x_hat))
        c_mean = tl.sum(grad_y, axis=1) / D
        c_proj = tl.sum(grad_y * x_hat, axis=1) / D
        grad_x = (grad_y - c_mean[:, None] - x_hat * c_proj[:, None]) * rstd[:, None]
        tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)
    if HAS_MOD:
        partial = (b * tl.num_programs(0) + chunk) * D + cols
        tl.store(grad_shift_ptr + partial, grad_shift, mask=col_mask)
        tl.store(grad_scale_ptr + partial, grad_scale, mask=col_mask)


@torch.library.custom_op("flowmo::modulate", mutates_args=())
def modulate_op(
    x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], out_dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """x [B, L, D] contiguous; shift, scale [B, D] contiguous or None -> y [B, L, D], mean and rstd [B * L]."""
    b, l, d = x.shape
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    mean = torch.empty(b * l, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block_l, rows_per_program, chunks = _row_tiling(b, l, d)
    with on_device_of(x):
        _modulate_fwd_kernel[(chunks, b)](
            x, shift, scale, y, mean, rstd, l, d, rows_per_program,
            HAS_MOD=scale is not None, BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d),
        )
    return y, mean, rstd


@modulate_op.register_fake
def _(x, shift, scale, out_dtype):
    n = x.shape[0] * x.shape[1]
    stats = [x.new_empty(n, dtype=torch.float32) for _ in range(2)]
    return x.new_empty(x.shape, dtype=out_dtype), *stats


@torch.library.custom_op("flowmo::modulate_backward", mutates_args=())
def modulate_backward_op(
    x: Tensor, scale: Optional[Tensor], mean: Tensor, rstd: Tensor, grad_y: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """-> grad_x [B, L, D], grad_shift and grad_scale [B, D] float32 (empty without modulation)."""
    b, l, d = x.shape
    block_l, rows_per_program, chunks = _row_tiling(b, l, d)
    has_mod = scale is not None
    grad_x = torch.empty_like(x)
    # per-program sums of the shift and scale gradients
    grad_shift, grad_scale = (x.new_empty((b, chunks, d), dtype=torch.float32) if has_mod else None for _ in range(2))
    with on_device_of(x):
        _modulate_bwd_kernel[(chunks, b)](
            x, scale, mean, rstd, grad_y, grad_x, grad_shift, grad_scale, l, d, rows_per_program,
            HAS_MOD=has_mod, BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d),
        )
    if not has_mod:
        return grad_x, x.new_empty(0, dtype=torch.float32), x.new_empty(0, dtype=torch.float32)
    return grad_x, grad_shift.sum(1), grad_scale.sum(1)


@modulate_backward_op.register_fake
def _(x, scale, mean, rstd, grad_y):
    shape = (x.shape[0], x.shape[2]) if scale is not None else (0,)
    return torch.empty_like(x), x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


def _modulate_setup(ctx, inputs, output):
    x, shift, scale, _ = inputs
    ctx.mod_dtypes = (shift.dtype, scale.dtype) if scale is not None else None
    ctx.save_for_backward(x, scale, output[1], output[2])


def _modulate_backward(ctx, grad_y, grad_mean, grad_rstd):
    x, scale, mean, rstd = ctx.saved_tensors
    grad_x, grad_shift, grad_scale = modulate_backward_op(x, scale, mean, rstd, grad_y.contiguous())
    if ctx.mod_dtypes is None:
        return grad_x, None, None, None
    return grad_x, grad_shift.to(ctx.mod_dtypes[0]), grad_scale.to(ctx.mod_dtypes[1]), None


modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def modulate_triton(
    x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """Same contract as `flowmo_kernels.adaln.modulate_torch`: x [B, L, D]; shift, scale [B, 1, D] or both None."""
    if (shift is None) != (scale is None):
        raise ValueError("modulate takes shift and scale together (both tensors or both None)")
    b, l, d = x.shape
    if scale is not None:
        shift, scale = _per_sample(shift, b, d), _per_sample(scale, b, d)
    y, _, _ = modulate_op(x.contiguous(), shift, scale, out_dtype or torch.float32)
    return y


# ------------------------------------------------------------------------------------- gated residual


def _result_dtype(x: Tensor, gate: Tensor, y: Tensor) -> torch.dtype:
    """The dtype PyTorch gives x + gate * y."""
    return torch.promote_types(x.dtype, torch.promote_types(gate.dtype, y.dtype))


@triton.jit
def _gated_residual_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, out_ptr, L, D, rows_per_program, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    gate = tl.load(gate_ptr + b * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    start = chunk * rows_per_program
    for l0 in range(start, tl.minimum(start + rows_per_program, L), BLOCK_L):
        _, _, mask, offs = _row_tile(b, l0, L, D, cols, col_mask, BLOCK_L)
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x + gate[None, :] * y).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_bwd_kernel(
    gate_ptr, y_ptr, grad_out_ptr, grad_y_ptr, grad_gate_ptr, L, D, rows_per_program,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    gate = tl.load(gate_ptr + b * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    grad_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
    start = chunk * rows_per_program
    for l0 in range(start, tl.minimum(start + rows_per_program, L), BLOCK_L):
        _, _, mask, offs = _row_tile(b, l0, L, D, cols, col_mask, BLOCK_L)
        g = tl.load(grad_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        grad_gate += tl.sum(g * y, axis=0)
        tl.store(grad_y_ptr + offs, (g * gate[None, :]).to(grad_y_ptr.dtype.element_ty), mask=mask)
    tl.store(grad_gate_ptr + (b * tl.num_programs(0) + chunk) * D + cols, grad_gate, mask=col_mask)


@torch.library.custom_op("flowmo::gated_residual", mutates_args=())
def gated_residual_op(x: Tensor, gate: Tensor, y: Tensor) -> Tensor:
    """x, y [B, L, D] contiguous, gate [B, D] contiguous -> x + gate * y, computed in float32."""
    b, l, d = x.shape
    out = x.new_empty(x.shape, dtype=_result_dtype(x, gate, y))
    block_l, rows_per_program, chunks = _row_tiling(b, l, d)
    with on_device_of(x):
        _gated_residual_fwd_kernel[(chunks, b)](
            x, gate, y, out, l, d, rows_per_program, BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d)
        )
    return out


@gated_residual_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape, dtype=_result_dtype(x, gate, y))


@torch.library.custom_op("flowmo::gated_residual_backward", mutates_args=())
def gated_residual_backward_op(gate: Tensor, y: Tensor, grad_out: Tensor) -> tuple[Tensor, Tensor]:
    """-> grad_y [B, L, D] (y's dtype), grad_gate [B, D] float32."""
    b, l, d = y.shape
    block_l, rows_per_program, chunks = _row_tiling(b, l, d)
    grad_y = torch.empty_like(y)
    grad_gate = torch.empty(b, chunks, d, dtype=torch.float32, device=y.device)
    with on_device_of(y):
        _gated_residual_bwd_kernel[(chunks, b)](
            gate, y, grad_out, grad_y, grad_gate, l, d, rows_per_program,
            BLOCK_L=block_l, BLOCK_D=triton.next_power_of_2(d),
        )
    return grad_y, grad_gate.sum(1)


@gated_residual_backward_op.register_fake
def _(gate, y, grad_out):
    return torch.empty_like(y), y.new_empty((y.shape[0], y.shape[2]), dtype=torch.float32)


def _gated_residual_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.x_dtype = x.dtype
    ctx.gate_dtype = gate.dtype
    ctx.save_for_backward(gate, y)


def _gated_residual_backward(ctx, grad_out):
    gate, y = ctx.saved_tensors
    grad_y, grad_gate = gated_residual_backward_op(gate, y, grad_out.contiguous())
    return grad_out.to(ctx.x_dtype), grad_gate.to(ctx.gate_dtype), grad_y


gated_residual_op.register_autograd(_gated_residual_backward, setup_context=_gated_residual_setup)


def gated_residual_triton(x: Tensor, gate: Optional[Tensor], y: Tensor) -> Tensor:
    """Same contract as `flowmo_kernels.adaln.gated_residual_torch`: x + gate * y; gate [B, 1, D] or None."""
    if gate is None:
        return x + y
    b, l, d = x.shape
    if y.shape != x.shape:
        raise ValueError(f"gated residual: y must have x's shape {tuple(x.shape)}, got {tuple(y.shape)}")
    return gated_residual_op(x.contiguous(), _per_sample(gate, b, d), y.contiguous())
