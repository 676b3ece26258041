"""Quantizers of the encoder's code: LFQ (binary codes), KL (Gaussian latents), none, and the LLM's infilling
(`qwen2.5-coder-0.5b[_span_P]`: no quantization, a span of the code replaced by a frozen code LLM's reading of it).

Each takes code [B, T, F] from the encoder and returns a `QuantizerOutput`. In train mode the loss is the
weighted quantizer loss of upstream; in eval mode it is zero (always zero for the LLM type).

Random draws (the KL posterior sample, the LLM's span start) come from `generator`: one `torch.Generator` for the
batch (None: the global RNG, as training uses), or a sequence of them, one per sample (an image's own stream
`row_stream` of flowmo_fast.noise, so an evaluation does not depend on batching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from flowmo_fast.config import ModelConfig
from flowmo_fast.flowmo.llm_infill import LLMInfiller, check_llm_fits, gather_span, span_starts
from flowmo_fast.llm_settings import is_llm_quantization, parse_llm_quantization
from flowmo_fast.noise import POSTERIOR_NOISE, SPAN_START, normal
from flowmo_kernels import KernelOps
from flowmo_kernels.lfq import indices_to_codes


@dataclass(frozen=True)
class QuantizerOutput:
    quantized: Tensor  # [B, T, context_dim]
    indices: Optional[Tensor]  # [B, n_tokens] int64 for LFQ, else None
    loss: Tensor  # scalar
    breakdown: dict  # named loss terms (empty in eval mode)
    per_sample: dict = field(default_factory=dict)  # name -> float32 [B], any mode (the LLM type: infill_mse)


Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def per_sample_draw(
    draw: Callable[[int, Optional[torch.Generator]], Tensor], batch: int, generator: Generators
) -> Tensor:
    """draw(k, g) -> [k, ...]: the batch in one draw from `generator` (the global RNG if None), or each sample
    from its own generator of a sequence (then sample i's draw does not depend on the batch around it)."""
    if generator is None or isinstance(generator, torch.Generator):
        return draw(batch, generator)
    if len(generator) != batch:
        raise ValueError(f"{len(generator)} generators for a batch of {batch}: give one per sample")
    return torch.cat([draw(1, g) for g in generator])


class Quantizer(nn.Module):
    """What every quantizer declares besides forward(code, ops, generator) -> QuantizerOutput."""

    row_stream = POSTERIOR_NOISE  # the per-image stream (flowmo_fast.noise) its draws take in evaluation
    per_sample_names: tuple[str, ...] = ()  # the keys of QuantizerOutput.per_sample


class LFQQuantizer(Quantizer):
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

    def forward(self, code: Tensor, ops: KernelOps, generator: Generators = None) -> QuantizerOutput:
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


class KLQuantizer(Quantizer):
    """Code [B, T, 2F]: mean = first F features, logvar = clamp(last F, -30, 20); a sample is drawn always."""

    def forward(self, code: Tensor, ops: KernelOps, generator: Generators = None) -> QuantizerOutput:
        b, t, f = code.shape
        mean, logvar = code[..., : f // 2], code[..., f // 2 :].clamp(-30.0, 20.0)
        # Noise drawn in upstream's (f t) order, so a seeded global RNG gives upstream's sample.
        noise = per_sample_draw(lambda k, g: normal((k, f // 2, t), g, code.device, code.dtype), b, generator)
        noise = noise.transpose(1, 2)
        quantized = mean + torch.exp(0.5 * logvar) * noise
        if not self.training:
            return QuantizerOutput(quantized, None, code.new_zeros((), dtype=torch.float32), {})
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).float().sum(dim=(1, 2)).mean()
        return QuantizerOutput(quantized, None, kl, dict(kl=kl))


class NoQuantizer(Quantizer):
    def forward(self, code: Tensor, ops: KernelOps, generator: Generators = None) -> QuantizerOutput:
        return QuantizerOutput(code, None, code.new_zeros((), dtype=torch.float32), {})


class LLMQuantizer(Quantizer):
    """`qwen2.5-coder-0.5b[_span_P]`: no quantization and zero loss; code[s:s+n] (n = int(P * T), s drawn per
    sample) is replaced by the frozen LLM's infilling, gradients flowing through the LLM into the code
    (flowmo_fast.flowmo.llm_infill). The LLM is loaded from `model.llm_path` unless given, and never in the state dict.

    `per_sample["infill_mse"]`: mean over the span of (infilled - the encoder's own code there)^2, per sample;
    in train mode its batch mean is logged too (`breakdown`)."""

    row_stream = SPAN_START
    per_sample_names = ("infill_mse",)

    def __init__(self, config: ModelConfig, infiller: Optional[LLMInfiller] = None):
        super().__init__()
        if infiller is None:
            infiller = LLMInfiller.from_config(config)
        elif infiller.spec != parse_llm_quantization(config.quantization_type):
            raise ValueError(
                f"the given LLM infills a fraction {infiller.spec.span_fraction} of the code but "
                f"model.quantization_type={config.quantization_type!r}: build it from the same config"
            )
        check_llm_fits(infiller.llm.config, config.context_dim, config.code_length, infiller.fim_ids)
        self.infiller = infiller

    def forward(self, code: Tensor, ops: KernelOps, generator: Generators = None) -> QuantizerOutput:
        b, t, _ = code.shape
        n = self.infiller.span_length(t)
        starts = per_sample_draw(lambda k, g: span_starts(k, t, n, g, code.device), b, generator)  # [B]
        out = self.infiller.infill(code, starts)
        own = gather_span(code, starts, n)  # [B, n, D]: the encoder's code the span replaced
        error = (out.span.detach().float() - own.detach().float()).pow(2).mean(dim=(1, 2))  # [B]
        breakdown = dict(infill_mse=error.mean()) if self.training else {}
        zero = code.new_zeros((), dtype=torch.float32)
        return QuantizerOutput(out.code, None, zero, breakdown, dict(infill_mse=error))


def build_quantizer(config: ModelConfig, infiller: Optional[LLMInfiller] = None) -> Quantizer:
    """The quantizer of `model.quantization_type`; `infiller`: an LLM already loaded for the LLM type."""
    if is_llm_quantization(config.quantization_type):
        return LLMQuantizer(config, infiller)
    return {"lfq": LFQQuantizer, "kl": lambda c: KLQuantizer(), "noop": lambda c: NoQuantizer()}[config.quantization_type](
        config
    )
