"""Images <-> token ids with a FlowMo LFQ checkpoint."""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch
from torch import Tensor

from flowmo_fast.flowmo.model import FlowMo, autocast_for
from flowmo_fast.formats.images import ImageLike, to_model_input
from flowmo_fast.formats.pretrained import from_pretrained
from flowmo_fast.sampler_settings import SamplingOptions
from flowmo_kernels.lfq import lfq_indices


class Tokenizer:
    """`encode(images) -> ids [B, n_tokens]` and `decode(ids) -> images [B, 3, S, S]` in [-1, 1], S = `image_size`.

    `encode` takes any picture (arrays, PIL images, files, lists of mixed sizes: see `to_model_input`) and fits it
    to the model's size as the data sets' evaluation crops do, or float tensors in [-1, 1] as they are.

    Token j of an image is one `codebook_size_for_entropy`-bit LFQ code; ids follow upstream's bit order
    (bit i of the code has weight 2^i) and token order (code position t, then sub-group h).
    """

    def __init__(self, model: FlowMo):
        if model.config.model.quantization_type != "lfq":
            raise ValueError(
                f"Tokenizer needs an LFQ checkpoint; this one uses quantization_type="
                f"{model.config.model.quantization_type!r}, which has no token ids: use model.encode / "
                f"model.quantize for latents"
            )
        self.model = model.eval()

    @classmethod
    def from_checkpoint(
        cls, name_or_path: str, which: Optional[str] = None, device: Any = "cpu",
        overrides: Optional[Iterable[str]] = None,
    ) -> "Tokenizer":
        """A published checkpoint by name ("flowmo_lo", "flowmo_hi"), a checkpoint file, a model folder of
        save_pretrained or a Hugging Face repository holding one (`from_pretrained`; which=None: a checkpoint's
        EMA weights, the weights a folder holds)."""
        return cls(from_pretrained(name_or_path, which=which, device=device, overrides=overrides))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        """The side of the square images the model was trained on: what `encode` fits pictures to."""
        return self.model.config.data.image_size

    @property
    def bits(self) -> int:
        return self.model.config.model.codebook_size_for_entropy

    @property
    def vocab_size(self) -> int:
        return self.model.config.model.token_vocab_size

    @property
    def tokens_per_image(self) -> int:
        return self.model.config.model.token_ids_per_image

    @torch.no_grad()
    def encode(self, images: ImageLike, resize: bool = True) -> Tensor:
        """Pictures -> LongTensor [B, n_tokens]. Pictures (uint8 or 16-bit arrays of any size, gray, RGB or RGBA;
        PIL images of any mode; image file paths; a list of these, sizes may differ) become RGB and are resized
        (shorter side) and centre-cropped to `image_size` x `image_size`, exactly as the data sets' evaluation
        crops; with resize=False they must already be that size. Float tensors [B, 3, H, W] in [-1, 1] are
        encoded as they are (any multiple of the patch size)."""
        x = to_model_input(images, self.image_size, resize).to(self.device)
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
        """ids [B, n_tokens] -> images [B, 3, H, W] float32 in [-1, 1]: the size the model makes, `image_size`
        square, unless `size` (H, W) says otherwise (not the pictures' original sizes); the sampler defaults to
        the checkpoint's `eval.sampling`."""
        code = self.ids_to_code(ids)
        if size is None:
            size = (self.image_size, self.image_size)
        return self.model.sample_images(code, size, sampling, generator)
