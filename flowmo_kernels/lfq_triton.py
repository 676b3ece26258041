"""Triton LFQ: sign codes, indices, commitment and both entropies, never allocating N x 2^d.

Same function as `flowmo_kernels.lfq.lfq_torch` (see there for the factorisation). The bits split in halves
A|B (|A| = d // 2); P_A [N, 2^|A|] and P_B are built tile by tile in registers, never stored.

Forward:
- a row pass writes sign(x), the indices, each bit's on/off probabilities sigmoid(+-40 x) (exact in the
  tails) and per-block sums of the commitment and of the per-bit entropies;
- a codebook pass sums P_A^T P_B over the rows (split over programs): the batch-mean distribution M
  [2^|A|, 2^|B|], whose entropy is the codebook entropy.
Backward, one pass per half (here A; B is the same with the roles swapped), with G = dH/dM:
  U = P_B G^T / N = dH/dP_A (a tile matmul), W = U * P_A, and since dP_A[c]/dz_i = P_A[c] (bit_i(c) - p_i),
  dH/dz_i = sigmoid(-z_i) sum_{c: bit_i on} W[c] - sigmoid(z_i) sum_{c: bit_i off} W[c]
(no division by a probability that may underflow), plus the elementwise gradients of the commitment,
the per-sample entropy and the straight-through sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from flowmo_kernels import check_lfq_bits, on_device_of, triton_interpreting
from flowmo_kernels.lfq import CODEBOOK_EPS, INV_TEMPERATURE_X2, LFQOutput

DOT_MIN = 16  # tl.dot needs every side >= 16; also the (padded) number of bits of a half
LOGIT_SCALE = tl.constexpr(INV_TEMPERATURE_X2)
EPS = tl.constexpr(CODEBOOK_EPS)


@dataclass(frozen=True)
class Tiling:
    rows: int  # rows per program in the row pass and the backward
    code_rows: int  # rows per step of the codebook pass
    max_codes: int  # codes per tile side in the codebook pass, at most
    programs: int  # the codebook pass splits the rows until about this many programs run
    own_codes: int  # the backward's tile of its own half's codes, at most
    other_codes: int  # the backward's tile of the other half's codes (the inner dot's K), at most
    dot_warps: int  # warps of the codebook pass and the backward (their fp32 dots)


# The fp32 dots run on FMA units with each thread holding whole K rows of an operand. ptxas -v for sm_90a: the
# backward at 64 x 64 code tiles and 4 warps spilled ~35 KB (d=14, a 5.4 KB stack frame), at own 32 x other 16
# and 8 warps it uses 202 registers and no stack; the codebook pass spilled at d=18 with 4 warps, not with 8.
GPU_TILING = Tiling(rows=64, code_rows=32, max_codes=64, programs=512, own_codes=32, other_codes=16, dot_warps=8)
# The CPU interpreter runs every tile op through numpy with a large fixed cost per op: fewer, bigger tiles.
INTERPRETER_TILING = Tiling(
    rows=64, code_rows=32, max_codes=128, programs=8, own_codes=128, other_codes=128, dot_warps=4
)
# Decided at import, as `triton.jit` decides there whether the kernels below compile or are interpreted.
TILING = INTERPRETER_TILING if triton_interpreting() else GPU_TILING


@triton.jit
def _code_probs(on_ptr, off_ptr, rows, row_mask, first_bit, D: tl.constexpr, N_BITS: tl.constexpr, codes, code_mask):
    """[rows, codes]: probability of each code of the bits first_bit .. first_bit + N_BITS - 1, per row."""
    probs = tl.where(row_mask[:, None] & code_mask[None, :], 1.0, 0.0)
    offs = rows * D + first_bit
    for i in tl.static_range(N_BITS):
        p_on = tl.load(on_ptr + offs + i, mask=row_mask, other=0.0)
        p_off = tl.load(off_ptr + offs + i, mask=row_mask, other=0.0)
        on = ((codes >> i) & 1)[None, :] == 1
        probs *= tl.where(on, p_on[:, None], p_off[:, None])
    return probs


@triton.jit
def _lfq_rows_fwd_kernel(
    x_ptr, sign_ptr, index_ptr, probs_ptr, sums_ptr, N,
    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    mask = (rows < N)[:, None] & (cols < D)[None, :]
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    on = x > 0
    sign = tl.where(on, 1.0, -1.0)
    tl.store(sign_ptr + offs, sign.to(sign_ptr.dtype.element_ty), mask=mask)
    weights = tl.full([BLOCK_D], 1, tl.int64) << cols.to(tl.int64)
    tl.store(index_ptr + rows, tl.sum(tl.where(on & mask, weights[None, :], 0), axis=1), mask=rows < N)
    # bit probabilities sigmoid(+-z) from e = exp(-|z|), which never overflows
    z = x * LOGIT_SCALE
    e = tl.exp(-tl.abs(z))
    likely = 1.0 / (1.0 + e)
    unlikely = e * likely
    tl.store(probs_ptr + offs, tl.where(z >= 0, likely, unlikely), mask=mask)
    tl.store(probs_ptr + N * D + offs, tl.where(z >= 0, unlikely, likely), mask=mask)
    # binary entropy = log1p(e) + |z| sigmoid(-|z|); log1p(e) ~ e - e^2 / 2 for tiny e (error < e^3 / 3)
    log1p_e = tl.where(e < 1e-4, e * (1.0 - 0.5 * e), tl.log(1.0 + e))
    entropy = tl.where(mask, log1p_e + tl.abs(z) * unlikely, 0.0)
    commit = tl.where(mask, (x - sign) * (x - sign), 0.0)
    tl.store(sums_ptr + pid * 2, tl.sum(tl.sum(commit, axis=1), axis=0))
    tl.store(sums_ptr + pid * 2 + 1, tl.sum(tl.sum(entropy, axis=1), axis=0))


@triton.jit
def _lfq_codebook_fwd_kernel(
    probs_ptr, partial_ptr, N, rows_per_split,
    D: tl.constexpr, A_BITS: tl.constexpr, B_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):
    """partial[split] = sum over this split's rows of P_A^T P_B, one [BLOCK_A, BLOCK_B] tile per program."""
    n_a: tl.constexpr = 1 << A_BITS
    n_b: tl.constexpr = 1 << B_BITS
    tiles_b: tl.constexpr = (n_b + BLOCK_B - 1) // BLOCK_B
    tile = tl.program_id(0)
    split = tl.program_id(1)
    a_codes = (tile // tiles_b) * BLOCK_A + tl.arange(0, BLOCK_A)
    b_codes = (tile % tiles_b) * BLOCK_B + tl.arange(0, BLOCK_B)
    a_mask = a_codes < n_a
    b_mask = b_codes < n_b
    off_ptr = probs_ptr + N * D
    acc = tl.zeros([BLOCK_A, BLOCK_B], dtype=tl.float32)
    start = split * rows_per_split
    for row0 in range(start, tl.minimum(start + rows_per_split, N), BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        p_a = _code_probs(probs_ptr, off_ptr, rows, row_mask, 0, D, A_BITS, a_codes, a_mask)
        p_b = _code_probs(probs_ptr, off_ptr, rows, row_mask, A_BITS, D, B_BITS, b_codes, b_mask)
        acc += tl.dot(tl.trans(p_a), p_b, input_precision="ieee")
    offs = split * n_a * n_b + a_codes[:, None] * n_b + b_codes[None, :]
    tl.store(partial_ptr + offs, acc, mask=a_mask[:, None] & b_mask[None, :])


@triton.jit
def _lfq_half_bwd_kernel(
    x_ptr, probs_ptr, mean_probs_ptr, grad_sign_ptr, loss_grads_ptr, grad_x_ptr, N,
    stride_m_own, stride_m_other,
    D: tl.constexpr, OWN_FIRST: tl.constexpr, OWN_BITS: tl.constexpr,
    OTHER_FIRST: tl.constexpr, OTHER_BITS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_OWN: tl.constexpr, BLOCK_OTHER: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grad_x for the columns OWN_FIRST .. OWN_FIRST + OWN_BITS - 1 of BLOCK_N rows."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    bits = tl.arange(0, BLOCK_K)
    off_ptr = probs_ptr + N * D
    w_on = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # sum of W over own codes with bit k on
    w_off = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for own0 in range(0, 1 << OWN_BITS, BLOCK_OWN):
        own_codes = own0 + tl.arange(0, BLOCK_OWN)
        own_mask = own_codes < (1 << OWN_BITS)
        grad_own = tl.zeros([BLOCK_N, BLOCK_OWN], dtype=tl.float32)  # N dH/dP_own
        for other0 in range(0, 1 << OTHER_BITS, BLOCK_OTHER):
            other_codes = other0 + tl.arange(0, BLOCK_OTHER)
            other_mask = other_codes < (1 << OTHER_BITS)
            p_other = _code_probs(
                probs_ptr, off_ptr, rows, row_mask, OTHER_FIRST, D, OTHER_BITS, other_codes, other_mask
            )
            m_mask = own_mask[:, None] & other_mask[None, :]
            m_offs = own_codes[:, None] * stride_m_own + other_codes[None, :] * stride_m_other
            m = tl.load(mean_probs_ptr + m_offs, mask=m_mask, other=0.0)
            g = tl.where(m_mask, -(tl.log(m + EPS) + m / (m + EPS)), 0.0)  # dH/dM
            grad_own += tl.dot(p_other, tl.trans(g), input_precision="ieee")
        w = grad_own * _code_probs(probs_ptr, off_ptr, rows, row_mask, OWN_FIRST, D, OWN_BITS, own_codes, own_mask)
        bit_on = (own_codes[:, None] >> bits[None, :]) & 1  # [BLOCK_OWN, BLOCK_K]
        valid = own_mask[:, None] & (bits < OWN_BITS)[None, :]
        w_on += tl.dot(w, tl.where(valid & (bit_on == 1), 1.0, 0.0), input_precision="ieee")
        w_off += tl.dot(w, tl.where(valid & (bit_on == 0), 1.0, 0.0), input_precision="ieee")
    mask = row_mask[:, None] & (bits < OWN_BITS)[None, :]
    offs = rows[:, None] * D + OWN_FIRST + bits[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p_on = tl.load(probs_ptr + offs, mask=mask, other=0.0)
    p_off = tl.load(off_ptr + offs, mask=mask, other=0.0)
    sign = tl.where(x > 0, 1.0, -1.0)
    g_commit = tl.load(loss_grads_ptr)
    g_sample = tl.load(loss_grads_ptr + 1)
    g_codebook = tl.load(loss_grads_ptr + 2)
    grad_x = tl.load(grad_sign_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # straight-through
    grad_x += g_commit * 2.0 * (x - sign) / (N * D)
    grad_x += g_sample * LOGIT_SCALE * (-(x * LOGIT_SCALE) * p_on * p_off) / N  # dH_bit/dz = -z p (1 - p)
    grad_x += g_codebook * LOGIT_SCALE * (p_off * w_on - p_on * w_off) / N
    tl.store(grad_x_ptr + offs, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


def _half_bits(d: int) -> tuple[int, int]:
    return d // 2, d - d // 2


def _code_block(bits: int, limit: int) -> int:
    return min(limit, max(DOT_MIN, 1 << bits))


def _rows_pass(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    n, d = x.shape
    blocks = triton.cdiv(n, TILING.rows)
    sign = torch.empty_like(x)
    indices = torch.empty(n, dtype=torch.int64, device=x.device)
    bit_probs = torch.empty(2, n, d, dtype=torch.float32, device=x.device)  # [on | off, N, d]
    sums = torch.empty(blocks, 2, dtype=torch.float32, device=x.device)
    with on_device_of(x):
        _lfq_rows_fwd_kernel[(blocks,)](
            x, sign, indices, bit_probs, sums, n, D=d, BLOCK_N=TILING.rows, BLOCK_D=triton.next_power_of_2(d)
        )
    return sign, indices, bit_probs, sums[:, 0].sum() / (n * d), sums[:, 1].sum() / n


def _mean_probs(bit_probs: Tensor) -> Tensor:
    """Batch-mean code distribution [2^|A|, 2^|B|] from the bit probabilities [2, N, d]."""
    _, n, d = bit_probs.shape
    a_bits, b_bits = _half_bits(d)
    block_a, block_b = _code_block(a_bits, TILING.max_codes), _code_block(b_bits, TILING.max_codes)
    tiles = triton.cdiv(1 << a_bits, block_a) * triton.cdiv(1 << b_bits, block_b)
    splits = max(1, min(triton.cdiv(n, TILING.code_rows), TILING.programs // tiles))
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), TILING.code_rows) * TILING.code_rows
    splits = triton.cdiv(n, rows_per_split)
    partial = torch.empty(splits, 1 << a_bits, 1 << b_bits, dtype=torch.float32, device=bit_probs.device)
    with on_device_of(bit_probs):
        _lfq_codebook_fwd_kernel[(tiles, splits)](
            bit_probs, partial, n, rows_per_split,
            D=d, A_BITS=a_bits, B_BITS=b_bits, BLOCK_N=TILING.code_rows, BLOCK_A=block_a, BLOCK_B=block_b,
            num_warps=TILING.dot_warps,
        )
    return partial.sum(0) / n


@torch.library.custom_op("flowmo::lfq", mutates_args=())
def lfq_op(x: Tensor, with_loss: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x [N, d] contiguous -> sign, indices, commitment, per-sample entropy, codebook entropy, and for the
    backward the bit probabilities [2, N, d] and the batch-mean code distribution (empty without loss)."""
    sign, indices, bit_probs, commitment, per_sample = _rows_pass(x)
    if not with_loss:
        zero = x.new_zeros((), dtype=torch.float32)
        return sign, indices, zero, zero.clone(), zero.clone(), bit_probs, x.new_empty(0, dtype=torch.float32)
    mean_probs = _mean_probs(bit_probs)
    codebook = -(mean_probs * torch.log(mean_probs + CODEBOOK_EPS)).sum()
    return sign, indices, commitment, per_sample, codebook, bit_probs, mean_probs


@lfq_op.register_fake
def _(x: Tensor, with_loss: bool):
    n, d = x.shape
    a_bits, b_bits = _half_bits(d)
    mean_shape = (1 << a_bits, 1 << b_bits) if with_loss else (0,)
    scalars = [x.new_empty((), dtype=torch.float32) for _ in range(3)]
    return (
        torch.empty_like(x), x.new_empty(n, dtype=torch.int64), *scalars,
        x.new_empty((2, n, d), dtype=torch.float32), x.new_empty(mean_shape, dtype=torch.float32),
    )


@torch.library.custom_op("flowmo::lfq_backward", mutates_args=())
def lfq_backward_op(x: Tensor, bit_probs: Tensor, mean_probs: Tensor, grad_sign: Tensor, loss_grads: Tensor) -> Tensor:
    """grad_x [N, d]; loss_grads [3] = upstream grads of commitment, per-sample and codebook entropy."""
    n, d = x.shape
    a_bits, b_bits = _half_bits(d)
    n_b = 1 << b_bits
    grad_x = torch.empty_like(x)
    # (own first bit, own bits, other first bit, other bits, M stride along own codes, along other codes)
    halves = ((0, a_bits, a_bits, b_bits, n_b, 1), (a_bits, b_bits, 0, a_bits, 1, n_b))
    for own_first, own_bits, other_first, other_bits, stride_own, stride_other in halves:
        if own_bits == 0:  # d = 1: half A is empty
            continue
        with on_device_of(x):
            _lfq_half_bwd_kernel[(triton.cdiv(n, TILING.rows),)](
                x, bit_probs, mean_probs, grad_sign, loss_grads, grad_x, n, stride_own, stride_other,
                D=d, OWN_FIRST=own_first, OWN_BITS=own_bits, OTHER_FIRST=other_first, OTHER_BITS=other_bits,
                BLOCK_N=TILING.rows, BLOCK_OWN=_code_block(own_bits, TILING.own_codes),
                BLOCK_OTHER=_code_block(other_bits, TILING.other_codes), BLOCK_K=DOT_MIN,
                num_warps=TILING.dot_warps,
            )
    return grad_x


@lfq_backward_op.register_fake
def _(x: Tensor, bit_probs: Tensor, mean_probs: Tensor, grad_sign: Tensor, loss_grads: Tensor):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    x, with_loss = inputs
    ctx.with_loss = with_loss
    ctx.save_for_backward(x, output[5], output[6])


def _backward(ctx, grad_sign, grad_indices, grad_commit, grad_sample, grad_codebook, grad_bit_probs, grad_mean):
    if not ctx.with_loss:  # the losses are constants: only the straight-through gradient
        return grad_sign, None
    x, bit_probs, mean_probs = ctx.saved_tensors
    loss_grads = torch.stack([grad_commit, grad_sample, grad_codebook]).float()
    return lfq_backward_op(x, bit_probs, mean_probs, grad_sign.contiguous(), loss_grads), None


lfq_op.register_autograd(_backward, setup_context=_setup_context)


def lfq_triton(x: Tensor, with_loss: bool = True) -> LFQOutput:
    """Triton LFQ, same contract as `flowmo_kernels.lfq.lfq_torch`. x [N, d] float32 or bfloat16,
    d <= flowmo_kernels.TRITON_LFQ_MAX_BITS."""
    if x.ndim != 2:
        raise ValueError(f"lfq expects x of shape [N, d], got {tuple(x.shape)}")
    check_lfq_bits("triton", x.shape[1])
    sign, indices, commitment, per_sample, codebook, _, _ = lfq_op(x.contiguous(), with_loss)
    return LFQOutput(sign, indices, commitment, per_sample, codebook)
