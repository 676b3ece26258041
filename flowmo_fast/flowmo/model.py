"""FlowMo: a transformer encoder to a quantized code, and a flow-matching transformer decoder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from flowmo_fast.autocast import autocast_dtype, autocast_for
from flowmo_fast.config import HIDDEN_PER_WIDTH, NUM_HEADS, Config, rope_axes
from flowmo_fast.flowmo import sampler
from flowmo_fast.flowmo.attention import Attention
from flowmo_fast.flowmo.graphed_sampler import GraphedSampler, cast_matmul_weights
from flowmo_fast.flowmo.llm_infill import LLMInfiller
from flowmo_fast.flowmo.mmdit import MMDiT, MMDiTParams
from flowmo_fast.flowmo.quantizers import Generators, QuantizerOutput, build_quantizer
from flowmo_fast.noise import image_noise, normal, row_generator, uniform
from flowmo_fast.sampler_settings import SamplingOptions
from flowmo_kernels import BACKENDS, FastPathChecks, KernelOps, check_lfq_bits, get_ops

GUIDANCE_DROPOUT = 0.1  # upstream: the fraction of training samples whose code is dropped


def guidance_dropout(code_with_mask: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Training's classifier-free guidance: the whole code (mask channel included) zeroed for a random
    GUIDANCE_DROPOUT fraction of the samples."""
    b = code_with_mask.shape[0]
    keep = uniform((b,), generator, code_with_mask.device) > GUIDANCE_DROPOUT
    return code_with_mask * keep[:, None, None].to(code_with_mask.dtype)


@dataclass
class ModelOutput:
    """The training forward's results."""

    velocity: Tensor  # the decoder's velocity [B, 3, H, W]
    code: Tensor  # the encoder's code before quantization [B, T, encoder_context_dim]
    quantizer: QuantizerOutput  # quantized code, indices, loss and its breakdown
    code_with_mask: Tensor  # quantized code + mask channel [B, T, context_dim + 1], before guidance dropout


@dataclass
class RowReconstruction:
    """`reconstruct_rows_with_code`'s results."""

    images: Tensor  # reconstructions [B, 3, H, W] in [-1, 1], float32
    quantizer: QuantizerOutput  # the code they were decoded from, with its per-sample measurements


class FlowMo(nn.Module):
    def __init__(self, config: Config, infiller: Optional[LLMInfiller] = None):
        """`infiller`: for `model.quantization_type=qwen2.5-coder-0.5b[_span_P]`, an LLM already loaded (else
        it is loaded from `model.llm_path`); it is never part of the state dict."""
        super().__init__()
        m = config.model
        self.config = config
        self.code_length = m.code_length
        self.patch_size = m.patch_size
        self.encoder_context_dim = m.context_dim * (2 if m.quantization_type == "kl" else 1)
        enc_width = m.enc_mup_width if m.enc_mup_width is not None else m.mup_width

        def params(width: int, context_dim: int, depth: int) -> MMDiTParams:
            return MMDiTParams(
                patch_size=m.patch_size,
                context_dim=context_dim,
                hidden_size=HIDDEN_PER_WIDTH * width,
                num_heads=NUM_HEADS,
                depth=depth,
                axes_dim=rope_axes(width),
                mup=m.enable_mup,
            )

        self.encoder = MMDiT(params(enc_width, self.encoder_context_dim, m.enc_depth))
        self.decoder = MMDiT(params(m.mup_width, m.context_dim + 1, m.dec_depth))  # +1: the mask channel
        self.quantizer = build_quantizer(m, infiller)
        self.kernels = m.kernels
        self.attention = Attention(m.attention)
        self.cuda_graphs = True  # sample_images on CUDA replays a captured graph (flowmo_fast.flowmo.graphed_sampler)
        self._graphed_sampler = None
        # the verdicts of this model's fast paths (Triton ops, compiled blocks, CUDA graphs): flowmo_fast.fastpath
        self.fast_checks = FastPathChecks()
        for name in self.dead_parameter_names():  # loaded and saved, never used: no gradient, DDP-safe
            self.get_parameter(name).requires_grad_(False)

    def dead_parameter_names(self) -> list[str]:
        """Parameters that cannot influence any output: the encoder's time and modulation weights (it runs
        without a timestep), its image stream after the last attention, and the decoder's code stream
        after its last attention. They stay in the state dict for checkpoint compatibility."""
        enc_last = f"encoder.double_blocks.{len(self.encoder.double_blocks) - 1}"
        dec_last = f"decoder.double_blocks.{len(self.decoder.double_blocks) - 1}"
        dead_prefixes = (
            "encoder.time_in.",
            "encoder.final_layer_img.",
            "encoder.final_layer_txt.adaLN_modulation.",
            f"{enc_last}.img_attn.proj.",
            f"{enc_last}.img_mlp.",
            "decoder.final_layer_txt.",
            f"{dec_last}.txt_attn.proj.",
            f"{dec_last}.txt_mlp.",
        )
        return [
            n for n, _ in self.named_parameters()
            if n.startswith(dead_prefixes) or (n.startswith("encoder.") and "_mod.lin." in n)
        ]

    @property
    def kernels(self) -> str:
        return self._kernels

    @kernels.setter
    def kernels(self, name: str) -> None:
        if name not in BACKENDS:
            raise ValueError(f"kernels={name!r}; allowed: {', '.join(BACKENDS)}")
        check_lfq_bits(name, self.lfq_bits)  # before the first forward, on any device
        self._kernels = name

    @property
    def activation_checkpointing(self) -> bool:
        """Whether both towers recompute each block's activations in backward (`trainer.activation_checkpointing`;
        the same gradients, less memory, one more forward of every block). Post-training's chain, which already
        checkpoints each decoder pass, then checkpoints the blocks inside those passes too."""
        return self.encoder.activation_checkpointing and self.decoder.activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, enabled: bool) -> None:
        self.encoder.activation_checkpointing = self.decoder.activation_checkpointing = bool(enabled)

    @property
    def lfq_bits(self) -> int:
        """Bits per LFQ code group (0 for the other quantizers): decides which LFQ `kernels=auto` can run."""
        m = self.config.model
        return m.codebook_size_for_entropy if m.quantization_type == "lfq" else 0

    def cast_for_inference(self) -> "FlowMo":
        """For inference only (evaluation, tokenize, detokenize, the sampler): the encoder's and decoder's matrix
        weights cast once, in place, to the dtype `autocast_for` runs them in on their device (bf16 on CUDA;
        nothing elsewhere), instead of at every pass. Under `autocast_for` the outputs are bit for bit the same
        (autocast casts to the same values); the rest (norm scales) stays float32. `.float()` undoes it."""
        dtype = autocast_dtype(next(self.parameters()).device)
        if dtype is not None:
            cast_matmul_weights((self.encoder, self.decoder), dtype)
        return self

    def ops(self, device: torch.device) -> KernelOps:
        """The kernels of `model.kernels` on `device`, each fused op checked against its twin on first use."""
        return get_ops(self._kernels, device, self.lfq_bits, self.fast_checks)

    def check_images(self, images: Tensor, name: str = "images") -> None:
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
            raise ValueError(f"{name} must be a float tensor [B, 3, H, W] in [-1, 1], got {shape}")
        if not images.is_floating_point():
            raise ValueError(f"{name} must be floating point in [-1, 1], got {images.dtype}")
        h, w = images.shape[-2:]
        p = self.patch_size
        if h % p or w % p:
            raise ValueError(f"{name} height and width must be multiples of the patch size {p}, got {h}x{w}")

    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> code [B, code_length, encoder_context_dim], before quantization."""
        self.check_images(images)
        empty = images.new_zeros((images.shape[0], self.code_length, self.encoder_context_dim))
        return self.encoder(images, empty, None, self.ops(images.device), self.attention, output="txt")

    def quantize(self, code: Tensor, generator: Generators = None) -> QuantizerOutput:
        """code [B, T, F] -> quantized [B, T, context_dim], indices [B, n_tokens] (LFQ) or None, loss, breakdown.

        Random draws (KL posterior sample, LLM span starts) from `generator`, or one generator per sample, or
        the global RNG (None)."""
        expected = (self.code_length, self.encoder_context_dim)
        if code.ndim != 3 or tuple(code.shape[1:]) != expected:
            raise ValueError(f"code must be [B, {expected[0]}, {expected[1]}], got {tuple(code.shape)}")
        return self.quantizer(code, self.ops(code.device), generator=generator)

    def decode(self, noised_images: Tensor, code_with_mask: Tensor, timesteps: Tensor) -> Tensor:
        """Velocity [B, 3, H, W] at noised images [B, 3, H, W], code [B, T, context_dim + 1], times [B]."""
        return self.decoder(
            noised_images, code_with_mask, timesteps, self.ops(noised_images.device), self.attention, output="img"
        )

    @staticmethod
    def with_mask(quantized: Tensor) -> Tensor:
        """Append the ones channel that tells the decoder a code is present (zeroed for guidance)."""
        return torch.cat([quantized, torch.ones_like(quantized[..., :1])], dim=-1)

    def forward(
        self,
        images: Tensor,
        noised_images: Tensor,
        timesteps: Tensor,
        enable_cfg: bool = True,
        generator: Optional[torch.Generator] = None,
    ) -> ModelOutput:
        """Training forward: encode, quantize, drop the whole code for 10% of samples, decode the velocity."""
        code = self.encode(images)
        quantized = self.quantize(code, generator)
        code_with_mask = self.with_mask(quantized.quantized)
        decoder_code = code_with_mask
        if self.config.model.enable_cfg and enable_cfg:
            decoder_code = guidance_dropout(code_with_mask, generator)
        velocity = self.decode(noised_images, decoder_code, timesteps)
        return ModelOutput(velocity, code, quantized, code_with_mask)

    def sampling(self, options: Optional[SamplingOptions] = None) -> SamplingOptions:
        """`options`, or this model's own `eval.sampling` settings when None."""
        return options if options is not None else SamplingOptions.from_config(self.config.eval.sampling)

    @torch.no_grad()
    def sample_images(
        self,
        quantized: Tensor,
        size: Sequence[int],
        sampling: Optional[SamplingOptions] = None,
        generator: Optional[torch.Generator] = None,
        noise: Optional[Tensor] = None,
    ) -> Tensor:
        """Quantized code [B, T, context_dim] -> images [B, 3, H, W] in [-1, 1] (float32) via the sampler.

        `sampling`: default the model's `eval.sampling`. Noise: `noise` [B, 3, H, W], else drawn from `generator`
        on its own device (a CPU generator gives the same images on any device), else from the global RNG."""
        options = self.sampling(sampling)
        b, (h, w) = quantized.shape[0], size
        with autocast_for(quantized.device):
            code = self.with_mask(quantized)
            if noise is None:
                noise = normal((b, 3, h, w), generator, quantized.device)
            null_code = code * 0.0 if options.guidance else None
            if quantized.device.type == "cuda" and self.cuda_graphs:
                if self._graphed_sampler is None:
                    self._graphed_sampler = GraphedSampler(self)
                out = self._graphed_sampler(noise.to(quantized.device), code, null_code, options)
            else:
                out = sampler.sample(self, noise.to(quantized.device), code, null_code, options)
        return out.clamp(-1, 1).float()

    @torch.no_grad()
    def reconstruct(
        self,
        images: Tensor,
        sampling: Optional[SamplingOptions] = None,
        generator: Optional[torch.Generator] = None,
    ) -> Tensor:
        """images [B, 3, H, W] in [-1, 1] -> reconstructions, same shape, in [-1, 1]. The quantizer's draws (KL
        posterior sample, LLM span starts), then the sampler noise, come from `generator` (None: the global RNG)."""
        self.check_images(images)
        with autocast_for(images.device):
            quantized = self.quantize(self.encode(images), generator).quantized
        return self.sample_images(quantized, images.shape[-2:], sampling, generator)

    @torch.no_grad()
    def reconstruct_rows(
        self, images: Tensor, rows: Sequence[int], seed: int = 0, sampling: Optional[SamplingOptions] = None
    ) -> Tensor:
        """Like `reconstruct`, with each image's random draws (sampler noise, KL posterior sample, LLM span start)
        from its own generators, seeded by (seed, its row in the data set): a reconstruction does not depend on
        batching or on the number of processes (flowmo_fast.noise)."""
        return self.reconstruct_rows_with_code(images, rows, seed, sampling).images

    @torch.no_grad()
    def reconstruct_rows_with_code(
        self, images: Tensor, rows: Sequence[int], seed: int = 0, sampling: Optional[SamplingOptions] = None
    ) -> RowReconstruction:
        """`reconstruct_rows`, also returning the quantizer's output (e.g. per-sample `infill_mse`)."""
        self.check_images(images)
        if len(rows) != images.shape[0]:
            raise ValueError(f"{len(rows)} rows for {images.shape[0]} images: give one data-set row per image")
        generators = [row_generator(seed, row, self.quantizer.row_stream) for row in rows]
        with autocast_for(images.device):
            quantized = self.quantize(self.encode(images), generators)
        noise = image_noise(rows, seed, images.shape[1:])
        reconstructions = self.sample_images(quantized.quantized, images.shape[-2:], sampling, noise=noise)
        return RowReconstruction(reconstructions, quantized)
