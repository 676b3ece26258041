"""Images <-> token ids with a FlowMo LFQ checkpoint."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from flowmo_fast.checkpoint import load_checkpoint
from flowmo_fast.images import ImageLike, to_model_input
from flowmo_fast.model import FlowMo, autocast_for
from flowmo_fast.sampling import SamplingOptions
from kernels.lfq import lfq_indices


class Tokenizer:
    """`encode(images) -> ids [B, n_tokens]` and `decode(ids) -> images [B, 3, H, W]` in [-1, 1].

    Token j of an image is one `codebook_size_for_entropy`-bit LFQ code; ids follow upstream's bit order
    (bit i of the code has weight 2^i) and token order (code position t, then sub-group h).
    """

    def __init__(self, model: FlowMo):
        if model.config.model.quantization_type != "lfq":
            raise ValueError(
                f"Tokenizer needs an LFQ checkpoint; this one uses quantization_type="
                f"{model.config.model.quantization_type!r}: use model.encode / model.quantize for latents"
            )
        self.model = model.eval()

    @classmethod
    def from_checkpoint(
        cls, path: str, which: str = "ema", device: Any = "cpu", overrides: Optional[Iterable[str]] = None
    ) -> "Tokenizer":
        return cls(load_checkpoint(path, which=which, device=device, overrides=overrides))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def bits(self) -> int:
        return self.model.config.model.codebook_size_for_entropy

    @property
    def vocab_size(self) -> int:
        return 2**self.bits

    @property
    def tokens_per_image(self) -> int:
        m = self.model.config.model
        return m.code_length * m.context_dim // m.codebook_size_for_entropy

    @torch.no_grad()
    def encode(self, images: ImageLike) -> Tensor:
        """Images (uint8 HWC arrays, PIL images, or float tensors in [-1, 1]) -> LongTensor [B, n_tokens]."""
        x = to_model_input(images).to(self.device)
        with autocast_for(x.device):
            return self.model.quantize(self.model.encode(x)).indices

    def code_to_ids(self, quantized: Tensor) -> Tensor:
        """Quantized code [B, T, context_dim] -> ids [B, n_tokens]."""
        return lfq_indices(self.model.quantizer.to_groups(quantized)).reshape(quantized.shape[0], -1)

    def ids_to_code(self, ids: Tensor) -> Tensor:
        """ids [B, n_tokens] -> quantized code [B, T, context_dim] in {-1, 1}."""
        ids = torch.as_tensor(ids, device=self.device)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be an integer tensor, got {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] != self.tokens_per_image:
            raise ValueError(f"token ids must be [B, {self.tokens_per_image}], got {tuple(ids.shape)}")
        return self.model.quantizer.codes_from_indices(ids.long(), self.model.code_length)

    @torch.no_grad()
    def decode(
        self,
        ids: Tensor,
        sampling: Optional[SamplingOptions] = None,
        size: Optional[Sequence[int]] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """ids [B, n_tokens] -> images [B, 3, H, W] float32 in [-1, 1]; size defaults to data.image_size, the
        sampler to the checkpoint's `eval.sampling`."""
        code = self.ids_to_code(ids)
        if size is None:
            s = self.model.config.data.image_size
            size = (s, s)
        return self.model.sample_images(code, size, sampling, generator)
