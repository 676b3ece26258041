"""Analytic FLOP counts of FlowMo's passes: the one count behind the MFU of training logs (train.metrics) and
the TFLOP/s and MFU of the benchmarks (bench/).

Counted: every matmul (2 FLOPs per multiply-add) of the linear layers and of attention (QK^T and AV),
exactly the work our model does: the encoder has no timestep (no time or modulation layers), and the
stream not needed after the last attention (the encoder's image stream, the decoder's code stream) is
skipped. Not counted: biases, norms, RoPE, activations, softmax (a few percent at most). Backward is
counted as twice the forward, so a training step is 3x. `FORMULA` prints the same in words. The frozen
LLM of the qwen2.5-coder-0.5b type and the perceptual network are not counted.
"""

from __future__ import annotations

from typing import Optional

from flowmo_fast.config import HIDDEN_PER_WIDTH, Config
from flowmo_fast.flowmo.mmdit import TIME_EMBED_DIM
from flowmo_fast.sampler_settings import SamplingOptions

FORMULA = """\
FLOPs per image (2 per multiply-add; matmuls only; D hidden, L = L_code + L_img tokens, L_img = HW/p^2):
  block       = 6 L D^2 (q,k,v)  +  4 L^2 D (attention)  +  18 L_s D^2 (proj + 4x MLP of each kept stream, L_s tokens)
                +  24 D^2 (two adaLN modulations; decoder only)
                the last block keeps one stream: the code stream in the encoder, the image stream in the decoder
  embed       = 2 L_img (3p^2) D + 2 L_code C_in D  (+ 2 (256 D + D^2) time MLP, decoder only)
  readout     = 2 L_s D C_out  (+ 4 D^2 adaLN, decoder only)
  reconstruct = encoder + sum over the sampler's velocities of decoder(1 pass, or 2 inside the guidance interval)
                (euler, ab2: one velocity a step; heun, midpoint: two)
  train step  = 3 x (encoder + decoder)   [backward = 2 x forward; Adam, LFQ and losses not counted]
                + 4 k x decoder with post-training's k-step chain (forward, checkpoint recompute, backward)"""


def block_flops(hidden: int, length: int, kept: int, timestep: bool) -> int:
    """Forward FLOPs of one DoubleStreamBlock for one image: `length` tokens attend, `kept` of them (the
    streams read out after the attention) go through the projection and MLP."""
    d = hidden
    return 6 * length * d * d + 4 * length * length * d + 18 * kept * d * d + (24 * d * d if timestep else 0)


def mmdit_flops(hidden: int, depth: int, code_len: int, img_len: int, patch_dim: int, context_in: int,
                out_dim: int, keep: str, timestep: bool) -> int:
    """Forward FLOPs of one `MMDiT` call for one image; `keep` is the stream read out ("img" or "txt")."""
    d = hidden
    length = code_len + img_len
    kept_last = img_len if keep == "img" else code_len
    flops = 2 * img_len * patch_dim * d + 2 * code_len * context_in * d
    if timestep:
        flops += 2 * (TIME_EMBED_DIM * d + d * d)
    for i in range(depth):
        flops += block_flops(d, length, length if i < depth - 1 else kept_last, timestep)
    flops += 2 * kept_last * d * out_dim + (4 * d * d if timestep else 0)
    return flops


def _lengths(config: Config, height: int, width: int) -> tuple[int, int, int]:
    p = config.model.patch_size
    return config.model.code_length, (height // p) * (width // p), 3 * p * p


def encoder_flops(config: Config, height: int, width: int) -> int:
    """One image through the encoder (code readout, no timestep)."""
    m = config.model
    enc_width = m.enc_mup_width if m.enc_mup_width is not None else m.mup_width
    code_dim = m.context_dim * (2 if m.quantization_type == "kl" else 1)
    code_len, img_len, patch_dim = _lengths(config, height, width)
    return mmdit_flops(HIDDEN_PER_WIDTH * enc_width, m.enc_depth, code_len, img_len, patch_dim,
                       code_dim, code_dim, keep="txt", timestep=False)


def decoder_flops(config: Config, height: int, width: int) -> int:
    """One image through one decoder pass (velocity readout)."""
    m = config.model
    code_len, img_len, patch_dim = _lengths(config, height, width)
    return mmdit_flops(HIDDEN_PER_WIDTH * m.mup_width, m.dec_depth, code_len, img_len, patch_dim,
                       m.context_dim + 1, patch_dim, keep="img", timestep=True)


def decoder_passes(sampling: SamplingOptions) -> int:
    """Decoder passes per image of the sampler (`sampler.sample`): one per velocity, two for a guided one; a
    velocity a step (euler, ab2) or two (heun, midpoint)."""
    return sampling.plan().passes


def reconstruct_flops(config: Config, height: int, width: int, sampling: SamplingOptions) -> int:
    """One image encoded, then sampled back (`FlowMo.reconstruct`)."""
    passes = decoder_passes(sampling)
    return encoder_flops(config, height, width) + passes * decoder_flops(config, height, width)


def posttrain_chain_passes(config: Config) -> int:
    """Decoder forward-pass equivalents of post-training's chain per image (`flow.posttrain_chain`, run when
    `model.posttrain_sample` and a perceptual loss is on): k passes forward, k recomputed by the checkpoints,
    2k for their backward."""
    m = config.model
    return 4 * m.posttrain_sample_k if m.posttrain_sample and config.opt.lpips_weight else 0


def train_step_flops(config: Config, height: int, width: int) -> int:
    """One image through a training step: encoder and decoder forward and backward (and post-training's
    chain when configured)."""
    decoder = decoder_flops(config, height, width)
    return 3 * (encoder_flops(config, height, width) + decoder) + posttrain_chain_passes(config) * decoder


def tflops(flops_per_image: float, images: int, seconds: float) -> float:
    return flops_per_image * images / seconds / 1e12


def mfu(tflop_per_s: float, peak_tflop_per_s: Optional[float]) -> Optional[float]:
    """Model FLOPs utilisation (fraction of the device's peak), None when the peak is unknown."""
    return tflop_per_s / peak_tflop_per_s if peak_tflop_per_s else None
