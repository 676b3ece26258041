"""Lookup-free quantization (LFQ) with its entropy loss, computed exactly without any N x 2^d tensor.

Upstream (SEED-Voken's LFQ) forms logits 2 x.c over all 2^d codes c in {-1, 1}^d at temperature 0.1.
That softmax factorises into d independent Bernoullis, p_i = sigmoid(40 x_i), so
- the per-sample entropy is the sum of the per-bit binary entropies, and
- the batch-mean code distribution, with the bits split in halves A|B, is P_A^T P_B / N where
  P_A [N, 2^|A|] holds the probabilities of the codes of half A: a [2^|A|, 2^|B|] matrix, never N x 2^d.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

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


def code_probabilities(p: Tensor) -> Tensor:
    """Per-bit probabilities [N, k] -> probabilities of all 2^k codes [N, 2^k], index = sum bit_i 2^i."""
    out = torch.ones_like(p[:, :1])
    for i in range(p.shape[1]):
        pi = p[:, i : i + 1]
        out = torch.cat([out * (1 - pi), out * pi], dim=1)
    return out


def binary_entropy_from_logits(z: Tensor) -> Tensor:
    """Entropy of Bernoulli(sigmoid(z)), stable for large |z|."""
    p = torch.sigmoid(z)
    return -(p * F.logsigmoid(z) + (1 - p) * F.logsigmoid(-z))


def lfq_entropies(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [N, d] float32 -> (per-sample entropy, codebook entropy), both scalars, differentiable."""
    z = INV_TEMPERATURE_X2 * x
    per_sample = binary_entropy_from_logits(z).sum(-1).mean()
    p = torch.sigmoid(z)
    half = x.shape[1] // 2
    p_a = code_probabilities(p[:, :half])  # [N, 2^half]
    p_b = code_probabilities(p[:, half:])  # [N, 2^(d-half)]
    mean_probs = p_a.T @ p_b / x.shape[0]  # [2^half, 2^(d-half)]
    codebook = -(mean_probs * torch.log(mean_probs + CODEBOOK_EPS)).sum()
    return per_sample, codebook


def lfq_torch(x: Tensor, with_loss: bool = True) -> LFQOutput:
    """Plain PyTorch LFQ. x [N, d] (any float dtype); losses in float32, zeros when `with_loss` is False."""
    if x.ndim != 2:
        raise ValueError(f"lfq expects x of shape [N, d], got {tuple(x.shape)}")
    sign = torch.where(x > 0, 1.0, -1.0).to(x.dtype)
    quantized = x + (sign - x).detach()
    indices = lfq_indices(x)
    if not with_loss:
        zero = x.new_zeros((), dtype=torch.float32)
        return LFQOutput(quantized, indices, zero, zero, zero)
    xf = x.float()
    commitment = (xf - sign.float()).pow(2).mean()
    per_sample, codebook = lfq_entropies(xf)
    return LFQOutput(quantized, indices, commitment, per_sample, codebook)
