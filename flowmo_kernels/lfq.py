"""Lookup-free quantization (LFQ) with its entropy loss, computed exactly without any N x 2^d tensor.

Upstream (SEED-Voken's LFQ) forms logits 2 x.c over all 2^d codes c in {-1, 1}^d at temperature 0.1.
That softmax factorises into d independent Bernoullis, p_i = sigmoid(40 x_i), so
- the per-sample entropy is the sum of the per-bit binary entropies, and
- the batch-mean code distribution, with the bits split in halves A|B, is P_A P_B^T / N where
  P_A [2^|A|, N] holds the probabilities of the codes of half A: a [2^|A|, 2^|B|] matrix, never N x 2^d.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from flowmo_kernels.precision import upcast

INV_TEMPERATURE_X2 = 40.0  # logits 2 x.c / temperature 0.1 -> per-bit logit 2 * 20 x_i
CODEBOOK_EPS = 1e-5


class LFQOutput(NamedTuple):
    quantized: Tensor  # [N, d] sign(x), straight-through gradient
    indices: Tensor  # [N] int64, sum_i (x_i > 0) * 2^i
    commitment: Tensor  # scalar, mean((x - sign(x))^2); gradient flows to x only
    per_sample_entropy: Tensor  # scalar, mean over N of the entropy of the code distribution
    codebook_entropy: Tensor  # scalar, entropy of the batch-mean code distribution


def lfq_indices(x: Tensor) -> Tensor:
    """[..., d] -> [...] int64: bit i is (x_i > 0), weight 2^i (upstream bit order)."""
    weights = 2 ** torch.arange(x.shape[-1], device=x.device, dtype=torch.int64)
    return ((x > 0).to(torch.int64) * weights).sum(-1)


def indices_to_codes(indices: Tensor, d: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """[...] int64 -> [..., d] in {-1, 1}: the inverse of `lfq_indices`."""
    weights = 2 ** torch.arange(d, device=indices.device, dtype=torch.int64)
    return ((indices.unsqueeze(-1) & weights) != 0).to(dtype) * 2 - 1


def code_probabilities(on: Tensor, off: Tensor) -> Tensor:
    """Per-bit probabilities on/off [k, N] -> probabilities of all 2^k codes [2^k, N], code index =
    sum bit_i 2^i. Bit i doubles the codes so far in place (rows [0, 2^i) bit i off, [2^i, 2^(i+1)) on);
    codes first, so every product runs over contiguous rows of N (the fast layout on a CPU)."""
    out = on.new_empty(2 ** on.shape[0], on.shape[1])
    out[:1] = 1
    for i, (bit_on, bit_off) in enumerate(zip(on, off)):
        torch.mul(out[: 2**i], bit_on, out=out[2**i : 2 ** (i + 1)])
        out[: 2**i] *= bit_off
    return out


def code_bits(k: int, like: Tensor) -> Tensor:
    """[2^k, 2k]: column i is 1 where bit i of the code is on, column k + i where it is off."""
    on = indices_to_codes(torch.arange(2**k, device=like.device), k, like.dtype).add_(1).div_(2)
    return torch.cat([on, 1 - on], dim=1)


def bit_gradient(grad_probs: Tensor, probs: Tensor, on: Tensor, off: Tensor) -> Tensor:
    """Gradient through `code_probabilities` to the bit logits z [k, N], given dL/dP for P [2^k, N].

    With W = dL/dP * P and dP[c]/dz_i = P[c] (bit_i(c) - sigmoid(z_i)):
    dL/dz_i = sigmoid(-z_i) sum_{c: bit_i on} W[c] - sigmoid(z_i) sum_{c: bit_i off} W[c], with no division
    by a probability that may have underflowed."""
    k = on.shape[0]
    sums = code_bits(k, on).T @ (grad_probs * probs)  # [2k, N]: sums over codes with bit i on | off
    return off * sums[:k] - on * sums[k:]


class _Entropies(torch.autograd.Function):
    """z = 40 x [N, d] -> (per-sample entropy, codebook entropy) with a hand-written backward: the same
    computation as the Triton kernel's, without autograd's graph through the 2 x 2^(d/2) code products."""

    @staticmethod
    def forward(ctx, z: Tensor) -> tuple[Tensor, Tensor]:
        # In z's own precision, never autocast's: under bf16 autocast the code products would run in bf16 and the
        # backward (which autocast does not reach) would multiply them with float32 gradients and fail.
        with torch.autocast(z.device.type, enabled=False):
            return _Entropies.entropies(ctx, z)

    @staticmethod
    def entropies(ctx, z: Tensor) -> tuple[Tensor, Tensor]:
        n, d = z.shape
        on, off = torch.sigmoid(z), torch.sigmoid(-z)  # sigmoid(-z), not 1 - sigmoid(z): exact tails
        # binary entropy -(p log p + (1-p) log(1-p)), p = sigmoid(z), written as log(1 + e^-|z|) + |z| sigmoid(-|z|)
        magnitude = z.abs()
        per_sample = (torch.log1p(torch.exp(-magnitude)) + magnitude * torch.sigmoid(-magnitude)).sum() / n
        zt, on, off = z.T.contiguous(), on.T.contiguous(), off.T.contiguous()  # [d, N]
        half = d // 2
        p_a = code_probabilities(on[:half], off[:half])  # [2^half, N]
        p_b = code_probabilities(on[half:], off[half:])  # [2^(d-half), N]
        mean_probs = p_a @ p_b.T / n  # [2^half, 2^(d-half)]
        codebook = -(mean_probs * torch.log(mean_probs + CODEBOOK_EPS)).sum()
        ctx.save_for_backward(zt, on, off, p_a, p_b, mean_probs)
        return per_sample, codebook

    @staticmethod
    def backward(ctx, grad_sample: Tensor, grad_codebook: Tensor) -> Tensor:
        zt, on, off, p_a, p_b, mean_probs = ctx.saved_tensors
        n, half = zt.shape[1], p_a.shape[0].bit_length() - 1
        grad_mean = -(torch.log(mean_probs + CODEBOOK_EPS) + mean_probs / (mean_probs + CODEBOOK_EPS))
        grad_mean = grad_mean * (grad_codebook / n)  # dL/dM / N
        grad_z = torch.cat([
            bit_gradient(grad_mean @ p_b, p_a, on[:half], off[:half]),
            bit_gradient(grad_mean.T @ p_a, p_b, on[half:], off[half:]),
        ])  # [d, N]
        grad_z -= zt * on * off * (grad_sample / n)  # d/dz of a binary entropy: -z sigmoid(z) sigmoid(-z)
        return grad_z.T


def lfq_entropies(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, d] -> (per-sample entropy, codebook entropy), both scalars, differentiable (not twice)."""
    return _Entropies.apply(INV_TEMPERATURE_X2 * x)


def lfq_torch(x: Tensor, with_loss: bool = True) -> LFQOutput:
    """Plain PyTorch LFQ. x [N, d] (any float dtype); losses in float32 (float64 for float64 x), zeros when
    `with_loss` is False."""
    if x.ndim != 2:
        raise ValueError(f"lfq expects x of shape [N, d], got {tuple(x.shape)}")
    sign = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    quantized = x + (sign - x).detach()
    indices = lfq_indices(x)
    if not with_loss:
        zero = x.new_zeros((), dtype=torch.float32)
        return LFQOutput(quantized, indices, zero, zero, zero)
    xf = upcast(x)
    commitment = (xf - upcast(sign)).pow(2).mean()
    per_sample, codebook = lfq_entropies(xf)
    return LFQOutput(quantized, indices, commitment, per_sample, codebook)
