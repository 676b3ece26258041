"""The memory one training micro-batch needs per GPU, estimated from the config alone before the first step, and
the gradient accumulation (`opt.n_grad_acc`) that makes the configured batch fit a memory limit.

The estimate, per process, in bytes (P: FlowMo's parameters, P_t: those that get gradients: the dead ones never,
the encoder's not once it is frozen):
  weights      4 P (float32) + 4 x the frozen perceptual net's (LPIPS VGG-16, or post-training's ResNet-50)
  gradients    4 P_t              optimizer  8 P_t (Adam's two float32 moments)              EMA  4 P
  FSDP2        the four above divided by the processes, plus the float32 weights and gradients of the units it
               gathers at a time (two of the largest: a block, or a tower's own layers)
  activations  what autograd keeps for backward, for B images:
    B x [ sum over each trained tower's blocks of (A L + T L_kept) D    L = L_code + L_img tokens, D its width,
          + R L_img D_dec + R_code L_code D_enc + X H W                 L_kept: the tokens read out after the
          + the perceptual net's + post-training's chain ]              attention (all but in the last block)
    + under bf16 autocast, the bf16 copy of every trained weight matrix a forward keeps (2 bytes each, once per
      micro-batch: autocast's weight cache is off, flowmo_fast.autocast), and of the perceptual net's.
  With `trainer.activation_checkpointing` a tower keeps only its blocks' inputs (S L D each, S: the residual
  stream's bytes per element) and backward recomputes one block at a time, of all towers: + the largest block's
  (A + T) L D, and the copies of one block's matrices instead of all. Post-training's chain keeps each of its k
  decoder passes' input (12 bytes per pixel) and backward recomputes one pass at a time (checkpointed block by
  block with the key): one more decoder's activations (or block inputs) on top.

The constants (`SavedBytes`) are measured, not guessed: the bytes of the distinct storages autograd saves for
backward (`torch.autograd.graph.saved_tensors_hooks`, parameters left out, a batch of 2 minus a batch of 1), on the
tiny model's blocks (width 384, 16 code + 64 image tokens), eager, `model.kernels=torch` (the plain ops), in
float32 and under bf16 autocast (the CPU's autocast, which casts as CUDA's does for this network: matmuls and
attention in bf16, the norms upcast by the ops themselves); torch 2.14.1, 2026-12-07. A whole double-stream block
keeps 105 bytes per token x channel in float32 (the decoder; 88 in the encoder, whose modulation is the identity)
and 63 under bf16 autocast (50): the MLP's 4x-wide hidden activations before and after GELU, the float32 norm
inputs and outputs, q, k, v and the attention's output. Per block A (for every token) + T (for each token read out):
  float32          encoder A 40.4 T 48.0   decoder A 44.6 T 60.5   readouts R 16.2 R_code 8.0   pixels X 36
  bf16 autocast    encoder A 24.4 T 26.0   decoder A 28.6 T 34.3   readouts R 14.2 R_code 6.0   pixels X 24
  (X: both patch embeddings' inputs and the loss's difference, 3 channels each; bf16: the inputs' copies are bf16)
  LPIPS VGG-16: 2439 (float32) / 1339 (bf16) bytes per pixel; ResNet-50 at 224 px: 85.9 MB / 43.8 MB per image.
tests/train/test_memory.py measures them again, and the whole estimate against the peak memory the CPU allocator
reports over a training forward + backward (torch.profiler): within 5% eager (transients left out: FIT_FRACTION's
headroom covers them), 0-20% over with checkpointing (every block input counted as alive while the largest block
is recomputed; backward has freed some by then). On CUDA the default path runs fused Triton ops eagerly, or
compiled blocks (trainer.compile), which keep fewer tensors (Inductor recomputes cheap elementwise ops): there the
estimate is an upper bound until a GPU measures it. FlowMo-Lo at 256 px (4352 tokens, LPIPS): 6.0 GiB of
activations per image under bf16 autocast, eager; 0.64 GiB with checkpointing. The LLM of the qwen2.5-coder
quantization type is not counted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Optional

import torch

from flowmo_fast.config import HIDDEN_PER_WIDTH, Config
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.llm_settings import is_llm_quantization

GIB = 2**30
FIT_FRACTION = 0.9  # a micro-batch fits when its estimate is at most this share of the limit: the rest is for the
# CUDA context, the allocator's fragmentation, communication buffers and the transients the estimate leaves out
VGG16_PARAMETERS = 14_716_160  # lpips.LPIPS(net="vgg"): torchvision's VGG-16 convolutions + LPIPS's 1x1 heads
RESNET50_PARAMETERS = 25_557_032  # torchvision's resnet50
FSDP_BLOCKS_IN_FLIGHT = 2  # FSDP2 gathers the next block while one runs
CHAIN_BYTES_PER_PIXEL = 12  # post-training's chain keeps each decoder pass's input z: 3 channels x float32


@dataclass(frozen=True)
class BlockBytes:
    """Bytes autograd keeps per token x channel of one double-stream block: `attention` for every token (the
    modulation, q/k/v, QK-norm + RoPE, the attention), `tail` for each token of a stream read out after it (the
    output projection, the MLP, the gated residuals and the second modulation)."""

    attention: float
    tail: float

    def block(self, tokens: int, kept: int, width: int) -> float:
        return (self.attention * tokens + self.tail * kept) * width


@dataclass(frozen=True)
class SavedBytes:
    """What autograd keeps in one precision (measured: the module docstring)."""

    encoder: BlockBytes  # no timestep: identity modulation
    decoder: BlockBytes
    stream: int  # bytes per element of the residual stream: what a checkpointed block keeps of its input
    readout: float  # per image token x decoder channel: the decoder's final layer
    code_readout: float  # per code token x encoder channel: the encoder's final layer (no modulation)
    pixel: float  # per pixel: both towers' patch embeddings' inputs and the loss's difference (3 channels each)
    lpips: float  # per pixel: LPIPS VGG-16 on the prediction
    resnet: float  # per image: ResNet-50 at 224 px on the prediction (post-training's loss)
    weight_copy: int  # bytes per trained weight-matrix element a forward keeps (bf16 copies; float32: none)


FLOAT32 = SavedBytes(BlockBytes(40.4, 48.0), BlockBytes(44.6, 60.5), 4, 16.2, 8.0, 36, 2439, 85.9e6, 0)
BF16_AUTOCAST = SavedBytes(BlockBytes(24.4, 26.0), BlockBytes(28.6, 34.3), 2, 14.2, 6.0, 24, 1339, 43.8e6, 2)


@dataclass(frozen=True)
class Placement:
    """Where and how the micro-batch trains: what the estimate needs besides the config."""

    processes: int = 1  # FSDP2 (trainer.fsdp) shards the weights, gradients, optimizer state and EMA over them
    bf16: bool = True  # bf16 autocast (CUDA with trainer.enable_bfloat16); False: float32 (the CPU)
    encoder_trained: bool = True  # False once the encoder is frozen (opt.freeze_encoder, freeze_encoder_after)

    def saved_bytes(self) -> SavedBytes:
        return BF16_AUTOCAST if self.bf16 else FLOAT32


@dataclass(frozen=True)
class ParameterCounts:
    """FlowMo's parameters by what memory they take (counted on the meta device: no memory, no weights)."""

    total: int  # the state dict's: weights and EMA
    trained: int  # those that get gradients and optimizer state
    trained_matrices: int  # trained weight matrices: what bf16 autocast copies and keeps for backward
    block_matrices: int  # the trained matrices of the largest block (one recomputed at a time)
    fsdp_unit: int  # FSDP2's largest unit of parameters: a block, or a tower's own layers


def parameter_counts(config: Config, encoder_trained: bool = True) -> ParameterCounts:
    """FlowMo's parameter counts for `config` (the LLM type's towers: the LLM is held out of the module tree)."""
    towers = copy.deepcopy(config)
    if is_llm_quantization(towers.model.quantization_type):
        towers.model.quantization_type = "noop"  # the same towers, without loading the LLM
    with torch.device("meta"):
        model = FlowMo(towers)
    if not encoder_trained:
        model.encoder.requires_grad_(False)
    trained = [p for p in model.parameters() if p.requires_grad]
    blocks = [b for tower in (model.encoder, model.decoder) for b in tower.double_blocks]
    own = [sum(p.numel() for n, p in t.named_parameters() if not n.startswith("double_blocks."))
           for t in (model.encoder, model.decoder)]
    return ParameterCounts(
        total=sum(p.numel() for p in model.parameters()),
        trained=sum(p.numel() for p in trained),
        trained_matrices=sum(p.numel() for p in trained if p.ndim >= 2),
        block_matrices=max(sum(p.numel() for p in b.parameters() if p.requires_grad and p.ndim >= 2) for b in blocks),
        fsdp_unit=max(*own, *(sum(p.numel() for p in b.parameters()) for b in blocks)),
    )


def gib(n: float) -> str:
    """Bytes in GiB, three significant digits."""
    return f"{n / GIB:.3g}"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process for one micro-batch."""

    micro_batch: int
    weights: int
    gradients: int
    optimizer: int
    ema: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.ema + self.activations

    def describe(self) -> str:
        parts = (("weights", self.weights), ("gradients", self.gradients), ("Adam", self.optimizer),
                 ("EMA", self.ema), ("activations", self.activations))
        return (f"{gib(self.total)} GiB for a micro-batch of {self.micro_batch} = "
                + " + ".join(f"{name} {gib(n)}" for name, n in parts))


@dataclass(frozen=True)
class TowerBytes:
    """What one image keeps in one tower's blocks: until backward reaches them, and (checkpointed) the largest
    block's activations while backward recomputes it (one block at a time, over all towers)."""

    kept: float
    recomputed: float = 0.0


def tower_bytes(per: BlockBytes, width: int, depth: int, tokens: int, kept_last: int, stream: int,
                checkpointed: bool) -> TowerBytes:
    """Every block's activations, or (checkpointed) every block's input and one block recomputed at a time."""
    full, last = per.block(tokens, tokens, width), per.block(tokens, kept_last, width)
    if not checkpointed:
        return TowerBytes((depth - 1) * full + last)
    return TowerBytes(depth * stream * tokens * width, full if depth > 1 else last)


def activations_per_image(config: Config, placement: Placement) -> float:
    """Bytes one image of a micro-batch keeps for backward (the module docstring's bracket)."""
    m, size, saved = config.model, config.data.image_size, placement.saved_bytes()
    checkpointed = config.trainer.activation_checkpointing
    image_tokens = (size // m.patch_size) ** 2
    tokens = m.code_length + image_tokens
    enc_width = HIDDEN_PER_WIDTH * (m.enc_mup_width if m.enc_mup_width is not None else m.mup_width)
    dec_width = HIDDEN_PER_WIDTH * m.mup_width
    decoder = tower_bytes(saved.decoder, dec_width, m.dec_depth, tokens, image_tokens, saved.stream, checkpointed)
    readout = TowerBytes(saved.readout * image_tokens * dec_width)
    towers = [decoder, readout]
    if placement.encoder_trained:
        towers.append(tower_bytes(saved.encoder, enc_width, m.enc_depth, tokens, m.code_length, saved.stream,
                                  checkpointed))
        towers.append(TowerBytes(saved.code_readout * m.code_length * enc_width))
    if m.posttrain_sample and config.opt.lpips_weight:  # the chain (it feeds the perceptual loss only): its k
        # passes' inputs, and one pass (with its readout) recomputed at a time in backward
        towers += [decoder, readout, TowerBytes(m.posttrain_sample_k * CHAIN_BYTES_PER_PIXEL * size * size)]
    total = sum(t.kept for t in towers) + max(t.recomputed for t in towers) + saved.pixel * size * size
    if config.opt.lpips_weight:
        total += saved.lpips * size * size if config.opt.lpips_mode == "vgg" else saved.resnet
    return total


def perceptual_parameters(config: Config) -> int:
    if not config.opt.lpips_weight:
        return 0
    return VGG16_PARAMETERS if config.opt.lpips_mode == "vgg" else RESNET50_PARAMETERS


@dataclass(frozen=True)
class MemoryModel:
    """A config's memory per process as a function of the micro-batch: fixed parts + micro-batch x per image."""

    weights: int
    gradients: int
    optimizer: int
    ema: int
    weight_copies: int  # bf16 copies of the weight matrices a forward keeps (once per micro-batch)
    per_image: float  # activations of one image

    def at(self, micro_batch: int) -> MemoryEstimate:
        activations = self.weight_copies + int(micro_batch * self.per_image)
        return MemoryEstimate(micro_batch, self.weights, self.gradients, self.optimizer, self.ema, activations)

    def largest_fitting(self, limit_bytes: int) -> int:
        """The largest micro-batch whose estimate fits `limit_bytes` (`fits`); 0 when not even 1 does."""
        fixed = self.at(0).total
        return max(0, int((FIT_FRACTION * limit_bytes - fixed) // self.per_image))


def memory_model(config: Config, placement: Placement = Placement()) -> MemoryModel:
    """What training `config` needs per process (the module docstring), for any micro-batch."""
    counts = parameter_counts(config, placement.encoder_trained)
    perceptual = perceptual_parameters(config)
    shards = placement.processes if config.trainer.fsdp else 1
    gathered = 8 * FSDP_BLOCKS_IN_FLIGHT * counts.fsdp_unit if shards > 1 else 0  # weights + gradients, float32
    copied = counts.block_matrices if config.trainer.activation_checkpointing else counts.trained_matrices
    return MemoryModel(
        weights=4 * counts.total // shards + 4 * perceptual + gathered,
        gradients=4 * counts.trained // shards,
        optimizer=8 * counts.trained // shards,
        ema=4 * counts.total // shards,
        weight_copies=placement.saved_bytes().weight_copy * (copied + perceptual),
        per_image=activations_per_image(config, placement),
    )


def estimate_memory(config: Config, micro_batch: int, placement: Placement = Placement()) -> MemoryEstimate:
    """What training `config` with micro-batches of `micro_batch` images needs per process."""
    return memory_model(config, placement).at(micro_batch)


def fits(estimate: MemoryEstimate, limit_bytes: int) -> bool:
    return estimate.total <= FIT_FRACTION * limit_bytes


def largest_micro_batch(config: Config, limit_bytes: int, placement: Placement = Placement()) -> int:
    """The largest micro-batch whose estimate fits `limit_bytes`; 0 when not even 1 does (what
    bench/gpu_report.py can size its train rows by)."""
    return memory_model(config, placement).largest_fitting(limit_bytes)


class DoesNotFit(ValueError):
    """Not even a micro-batch of 1 fits the memory limit."""


@dataclass(frozen=True)
class GradAccFit:
    """The gradient accumulation chosen for a memory limit, and the estimate of its micro-batch."""

    n_grad_acc: int
    estimate: MemoryEstimate


def fit_grad_acc(config: Config, limit_bytes: int, placement: Placement = Placement()) -> GradAccFit:
    """The least opt.n_grad_acc, from the configured one up, that divides data.batch_size and whose micro-batch
    fits `limit_bytes`; DoesNotFit (one line: what would make it fit) when none does."""
    model, batch = memory_model(config, placement), config.data.batch_size
    largest = model.largest_fitting(limit_bytes)
    for n in range(config.opt.n_grad_acc, batch + 1):
        if batch % n == 0 and batch // n <= largest:
            return GradAccFit(n, model.at(batch // n))
    hint = "" if config.trainer.activation_checkpointing else "trainer.activation_checkpointing=true, "
    raise DoesNotFit(
        f"not even a micro-batch of 1 fits in {gib(limit_bytes)} GiB per process (estimated "
        f"{model.at(1).describe()}; a micro-batch fits in at most {FIT_FRACTION:.0%} of the limit): try {hint}"
        "trainer.fsdp=true on several GPUs, a smaller data.image_size, or a GPU with more memory"
    )


def device_memory(device: torch.device) -> Optional[int]:
    """Bytes this process can use on `device`: CUDA's free memory plus what this process already holds; None off
    CUDA (no limit reported)."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)
