"""Quantizers of the encoder's code: LFQ (binary codes), KL (Gaussian latents) and none.

Each takes code [B, T, F] from the encoder and returns a `QuantizerOutput`. In train mode the loss is the
weighted quantizer loss of upstream; in eval mode it is zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from flowmo_fast.config import ModelConfig
from flowmo_fast.noise import normal
from kernels import KernelOps
from kernels.lfq import indices_to_codes


@dataclass(frozen=True)
class QuantizerOutput:
    quantized: Tensor  # [B, T, context_dim]
    indices: Optional[Tensor]  # [B, n_tokens] int64 for LFQ, else None
    loss: Tensor  # scalar
    breakdown: dict  # named loss terms (empty in eval mode)


class LFQQuantizer(nn.Module):
    """Code `b t (g h) -> (b t h) g`: each of the T*h groups is one g-bit code (g = codebook_size_for_entropy)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.bits = config.codebook_size_for_entropy
        self.entropy_weight = config.entropy_loss_weight
        self.commit_weight = config.commit_loss_weight

    def to_groups(self, code: Tensor) -> Tensor:
        b, t, f = code.shape
        return code.reshape(b, t, self.bits, f // self.bits).transpose(2, 3).reshape(-1, self.bits)

    def from_groups(self, groups: Tensor, b: int, t: int) -> Tensor:
        return groups.reshape(b, t, -1, self.bits).transpose(2, 3).reshape(b, t, -1)

    def forward(self, code: Tensor, ops: KernelOps, generator: Optional[torch.Generator] = None) -> QuantizerOutput:
        b, t, _ = code.shape
        out = ops.lfq(self.to_groups(code), with_loss=self.training)
        quantized = self.from_groups(out.quantized, b, t)
        indices = out.indices.reshape(b, -1)
        if not self.training:
            return QuantizerOutput(quantized, indices, out.commitment, {})
        aux = out.per_sample_entropy - out.codebook_entropy
        loss = self.entropy_weight * aux + self.commit_weight * out.commitment
        breakdown = dict(
            per_sample_entropy=out.per_sample_entropy,
            codebook_entropy=out.codebook_entropy,
            entropy_aux_loss=aux,
            commitment=out.commitment,
        )
        return QuantizerOutput(quantized, indices, loss, breakdown)

    def codes_from_indices(self, indices: Tensor, code_length: int) -> Tensor:
        """[B, n_tokens] int64 -> quantized code [B, T, context_dim] in {-1, 1}."""
        if indices.ndim != 2 or indices.shape[1] % code_length:
            raise ValueError(
                f"token ids must be [B, n_tokens] with n_tokens a multiple of code_length={code_length}, "
                f"got {tuple(indices.shape)}"
            )
        if indices.min() < 0 or indices.max() >= 2**self.bits:
            raise ValueError(f"token ids must lie in [0, {2**self.bits}) for a {self.bits}-bit codebook")
        groups = indices_to_codes(indices.reshape(-1), self.bits)
        return self.from_groups(groups, indices.shape[0], code_length)


class KLQuantizer(nn.Module):
    """Code [B, T, 2F]: mean = first F features, logvar = clamp(last F, -30, 20); a sample is drawn always."""

    def forward(self, code: Tensor, ops: KernelOps, generator: Optional[torch.Generator] = None) -> QuantizerOutput:
        b, t, f = code.shape
        mean, logvar = code[..., : f // 2], code[..., f // 2 :].clamp(-30.0, 20.0)
        # Noise drawn in upstream's (f t) order, so a seeded global RNG gives upstream's sample.
        noise = normal((b, f // 2, t), generator, code.device, code.dtype).transpose(1, 2)
        quantized = mean + torch.exp(0.5 * logvar) * noise
        if not self.training:
            return QuantizerOutput(quantized, None, code.new_zeros((), dtype=torch.float32), {})
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).float().sum(dim=(1, 2)).mean()
        return QuantizerOutput(quantized, None, kl, dict(kl=kl))


class NoQuantizer(nn.Module):
    def forward(self, code: Tensor, ops: KernelOps, generator: Optional[torch.Generator] = None) -> QuantizerOutput:
        return QuantizerOutput(code, None, code.new_zeros((), dtype=torch.float32), {})


def build_quantizer(config: ModelConfig) -> nn.Module:
    return {"lfq": LFQQuantizer, "kl": lambda c: KLQuantizer(), "noop": lambda c: NoQuantizer()}[config.quantization_type](
        config
    )
