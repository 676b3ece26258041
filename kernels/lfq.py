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
import torch.nn.functional as F
from torch import Tensor

from kernels.precision import upcast

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


def code_probabilities(bit_probs: Tensor) -> Tensor:
    """Per-bit (off, on) probabilities [k, 2, N] -> probabilities of all 2^k codes [2^k, N], code index =
    sum bit_i 2^i. One broadcast product per bit, bit i doubling the codes so far; codes first, so every
    product runs over contiguous rows of N (the fast layout on a CPU)."""
    out = bit_probs.new_ones(1, bit_probs.shape[-1])
    for bit in bit_probs:  # [2, N]
        out = (bit[:, None, :] * out[None, :, :]).flatten(0, 1)  # [2, 2^i, N] -> index bit_i 2^i + rest
    return out


def lfq_entropies(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, d] -> (per-sample entropy, codebook entropy), both scalars, differentiable.

    A bit is off with probability sigmoid(-z), not 1 - sigmoid(z): that keeps the tiny probabilities of
    unlikely codes (as upstream's softmax does) instead of rounding them to 0.
    """
    z = INV_TEMPERATURE_X2 * x
    on, off = torch.sigmoid(z), torch.sigmoid(-z)
    per_sample = -(on * F.logsigmoid(z) + off * F.logsigmoid(-z)).sum(-1).mean()  # sum of binary entropies
    bit_probs = torch.stack([off.T, on.T], dim=1)  # [d, 2, N]
    half = x.shape[1] // 2
    p_a = code_probabilities(bit_probs[:half])  # [2^half, N]
    p_b = code_probabilities(bit_probs[half:])  # [2^(d-half), N]
    mean_probs = p_a @ p_b.T / x.shape[0]  # [2^half, 2^(d-half)]
    codebook = -(mean_probs * torch.log(mean_probs + CODEBOOK_EPS)).sum()
    return per_sample, codebook


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
