"""A class-conditional token generator for FlowMo LFQ tokens: a bidirectional transformer of the MaskGiT family.

What it sees. An image is `code_length` tokens of `context_dim` bits; each token's bits form `groups` =
`context_dim / codebook_size_for_entropy` groups of `bits` bits (FlowMo-Lo: 2 x 9 bits, ids in [0, 512);
FlowMo-Hi: 4 x 14 bits, ids in [0, 16384)). A row of token shards (`Tokenizer.code_to_ids`) is
`[code_length * groups]` ids in the tokenizer's order, code position t then group h, so `ids.view(B, T, G)` is
the generator's [token, group] view; group h holds the code's channels h, h + G, h + 2G, ... (upstream's
`b t (fg fh) -> b fg (t fh)`), bit i of an id weighing 2^i. `tokens_to_bits` / `bits_to_ids` convert.

Input: the token's +-1 bits, masked groups zeroed, through one Linear (MaskBit's choice), not embedding tables.
Why: (1) LFQ ids are not arbitrary symbols: ids that share bits are neighbours in the code the decoder reads, and
bits show that structure to the model where an embedding table must learn it from scratch; (2) it costs
context_dim x width parameters instead of groups x 2^bits x width (FlowMo-Hi: 4 x 16384 x 1024 = 67M for the L
preset); (3) masking one group of a token leaves its other groups visible, which is what per-group masking needs.
Zero is no bit value, so a masked group is unambiguous without a mask embedding.

Output: one softmax head of 2^bits classes per group (one Linear to groups x 2^bits, split), cross-entropy with
label smoothing on the masked groups only. A class token (num_classes + 1 entries: the last is the null class of
classifier-free guidance) is prepended to the sequence; in training labels are replaced by the null class with
probability `class_dropout`. Masking is per group: a mask ratio r per image drawn on the `mask_schedule`, then
ceil(r * code_length * groups) groups chosen at random. In training, dropout (`dropout`: the embedded input and each
attention and MLP output; `attention_dropout`: the attention probabilities) at MaskBit's places; 0.1 in the paper
presets, 0 by default. Every random draw of `loss` (masks, label dropout, dropout) comes from the global torch
RNG, so a trainer that saves and restores that RNG resumes exactly.

What it is built for (code_length, groups, bits, num_classes) comes from the token shards; its size and training
recipe from a preset of the trainer (`train.generator_config.PRESETS`: tiny, B 114M, L 303M parameters for
FlowMo-Lo tokens; the defaults here are tiny's). `load_generator(path)` reads a checkpoint (the layout is below).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmo_fast.fastpath import FastPathChecks, compile_checked, raise_recompile_limit
from flowmo_fast.formats.checkpoint import WHICH, CheckpointError, check_state_dict, read_checkpoint
from flowmo_fast.recompute import run_block
from flowmo_kernels.lfq import indices_to_codes, lfq_indices

MaskSchedule = Literal["cosine", "arccos"]
MASK_SCHEDULES = ("cosine", "arccos")


@dataclass(frozen=True)
class GeneratorConfig:
    """The generator: what it is built for (from the token shards), the transformer's size, and the training
    objective's settings. `num_classes=0` is an unconditional generator (labels must be None)."""

    code_length: int  # tokens per image (model.code_length of the tokenizer)
    groups: int  # bit groups per token: context_dim / codebook_size_for_entropy
    bits: int  # bits per group: codebook_size_for_entropy (a head has 2^bits classes)
    num_classes: int = 0
    width: int = 64
    depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1  # probability a label is replaced by the null class in training (CFG)
    label_smoothing: float = 0.1
    mask_schedule: MaskSchedule = "arccos"
    dropout: float = 0.0  # in training: on the embedded input, and on each attention and MLP output (residual)
    attention_dropout: float = 0.0  # in training: on the attention probabilities

    def __post_init__(self) -> None:
        for key in ("code_length", "groups", "bits", "width", "depth", "heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"model.{key}={getattr(self, key)}: must be a positive integer")
        if self.num_classes < 0:
            raise ValueError(f"model.num_classes={self.num_classes}: must be 0 (unconditional) or more")
        if self.width % self.heads:
            raise ValueError(f"model.width={self.width} must be a multiple of model.heads={self.heads}")
        if self.mask_schedule not in MASK_SCHEDULES:
            raise ValueError(f"model.mask_schedule={self.mask_schedule!r}; allowed: {', '.join(MASK_SCHEDULES)}")
        for key in ("class_dropout", "label_smoothing", "dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"model.{key}={getattr(self, key)}: must lie in [0, 1)")

    @property
    def context_dim(self) -> int:
        return self.groups * self.bits

    @property
    def vocab_size(self) -> int:
        return 2**self.bits

    @property
    def tokens_per_image(self) -> int:
        """Ids per row of token shards: code_length * groups."""
        return self.code_length * self.groups

    @property
    def null_class(self) -> int:
        return self.num_classes

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GeneratorConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown generator config keys {unknown}; allowed: {', '.join(sorted(names))}")
        return cls(**d)

# ---- ids <-> groups <-> bits, in the tokenizer's layout ----------------------------------------------------


def ids_to_groups(ids: Tensor, groups: int) -> Tensor:
    """Rows of token ids [B, code_length * groups] -> [B, code_length, groups] (position t, then group h)."""
    if ids.ndim != 2 or ids.shape[1] % groups:
        raise ValueError(f"token ids must be [B, code_length * {groups}], got {tuple(ids.shape)}")
    return ids.reshape(ids.shape[0], -1, groups)


def groups_to_ids(groups: Tensor) -> Tensor:
    """[B, code_length, groups] -> rows [B, code_length * groups]."""
    return groups.reshape(groups.shape[0], -1)


def tokens_to_bits(groups: Tensor, bits: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Group ids [...] -> +-1 bits [..., bits], bit i of an id (weight 2^i) first."""
    return indices_to_codes(groups.long(), bits, dtype)


def bits_to_ids(bits: Tensor) -> Tensor:
    """+-1 bits [..., bits] -> group ids [...] (the inverse of `tokens_to_bits`)."""
    return lfq_indices(bits)


def bits_to_code(bits: Tensor) -> Tensor:
    """Bits [B, T, groups, bits] -> the tokenizer's code [B, T, context_dim] (bit i of group h is channel
    i * groups + h): what `FlowMo.quantize` maps back to the same ids."""
    b, t, g, n = bits.shape
    return bits.transpose(2, 3).reshape(b, t, n * g)


# ---- the transformer -----------------------------------------------------------------------------------------


def train_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Dropout in training only; at p = 0 no kernel and no RNG draw, so a model without dropout trains exactly as
    before the keys existed."""
    return F.dropout(x, p) if training and p > 0 else x


class Block(nn.Module):
    """Pre-norm transformer block: bidirectional self-attention, then a GELU MLP; in training dropout on the
    attention probabilities (`attention_dropout`) and on each branch's output before it joins the residual
    (`dropout`), where MaskBit and TiTok have theirs."""

    def __init__(self, c: GeneratorConfig):
        super().__init__()
        width, self.heads = c.width, c.heads
        self.dropout, self.attention_dropout = c.dropout, c.attention_dropout
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * c.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x: Tensor) -> Tensor:  # [B, L, D] -> [B, L, D]
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        p = self.attention_dropout if self.training else 0.0
        attn = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # [B, H, L, D/H]
        x = x + train_dropout(self.proj(attn.transpose(1, 2).flatten(2)), self.dropout, self.training)
        return x + train_dropout(self.mlp(self.norm2(x)), self.dropout, self.training)


@dataclass(frozen=True)
class GeneratorLoss:
    loss: Tensor  # scalar: label-smoothed cross-entropy over the masked groups
    accuracy: Tensor  # scalar: fraction of masked groups whose most likely id is the true one


def mask_ratio(u: Tensor, schedule: MaskSchedule) -> Tensor:
    """Fraction of groups masked at progress u in [0, 1], 1 at u = 0 and 0 at u = 1: cosine cos(pi u / 2)
    (MaskGiT), arccos (2 / pi) arccos(u) (MaskBit). Training draws u ~ U[0, 1); sampling walks u = s / steps."""
    if schedule == "cosine":
        return torch.cos(u * (math.pi / 2))
    return torch.arccos(u) * (2 / math.pi)


class TokenGenerator(nn.Module):
    """`forward(bits [B, T, G, bits] with masked groups zeroed, classes [B]) -> logits [B, T, G, 2^bits]`;
    `loss(ids, labels)` for training. `activation_checkpointing` (the trainer's `trainer.activation_checkpointing`):
    each block's activations are recomputed in backward (flowmo_fast.recompute)."""

    def __init__(self, config: GeneratorConfig):
        super().__init__()
        self.config = config
        c = config
        self.bits_in = nn.Linear(c.context_dim, c.width)
        self.class_embed = nn.Embedding(c.num_classes + 1, c.width)  # the last: the null class
        self.pos_embed = nn.Parameter(torch.zeros(1, c.code_length + 1, c.width))
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.depth))
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.groups * c.vocab_size)  # one 2^bits-way head per group
        self.activation_checkpointing = False
        self.fast_checks = FastPathChecks()  # the verdicts of its compiled blocks and CUDA graphs (fastpath)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, bits: Tensor, classes: Tensor) -> Tensor:
        c = self.config
        b = bits.shape[0]
        x = self.bits_in(bits.reshape(b, c.code_length, c.context_dim))  # [B, T, D]
        x = torch.cat([self.class_embed(classes)[:, None], x], dim=1) + self.pos_embed  # [B, T + 1, D]
        x = train_dropout(x, c.dropout, self.training)
        for block in self.blocks:
            x = run_block(block, self.activation_checkpointing, x)
        logits = self.head(self.norm(x[:, 1:]))  # [B, T, G * V]
        return logits.unflatten(-1, (c.groups, c.vocab_size))

    def compile_blocks(self, **compile_kwargs) -> None:
        """torch.compile each transformer block in place (regional compile: one graph shared by the blocks), each
        compiled variant checked against the eager block on its first call (`fast_checks`)."""
        raise_recompile_limit()
        for k, block in enumerate(self.blocks):
            compile_checked(block, f"compiled generator block {k}", self.fast_checks, **compile_kwargs)

    def blocks_compiled(self) -> bool:
        return any(getattr(b, "_compiled_call_impl", None) is not None for b in self.blocks)

    def matmul_flops(self, batch: int = 1) -> int:
        """Matmul FLOPs of one forward pass over `batch` rows (a training step: about 3x)."""
        c = self.config
        t, length, d, hidden = c.code_length, c.code_length + 1, c.width, int(c.width * c.mlp_ratio)
        block = 2 * length * d * (3 * d + d + 2 * hidden) + 4 * length * length * d
        per_row = 2 * t * c.context_dim * d + c.depth * block + 2 * t * d * c.groups * c.vocab_size
        return batch * per_row

    def classes_for(self, labels: Optional[Tensor], batch: int, device: torch.device) -> Tensor:
        """Labels [B] (or None: unconditional) -> class ids [B], checked against num_classes."""
        c = self.config
        if labels is None:
            return torch.full((batch,), c.null_class, dtype=torch.long, device=device)
        if c.num_classes == 0:
            raise ValueError("this generator is unconditional (num_classes=0): give labels=None")
        if labels.shape != (batch,):
            raise ValueError(f"labels must be [{batch}], got {tuple(labels.shape)}")
        return labels.long().to(device)

    def loss(self, ids: Tensor, labels: Optional[Tensor] = None) -> GeneratorLoss:
        """ids [B, code_length * groups] of the tokenizer (`Tokenizer.code_to_ids`), labels [B] or None."""
        c = self.config
        if ids.ndim != 2 or ids.shape[1] != c.tokens_per_image:
            raise ValueError(f"token ids must be [B, {c.tokens_per_image}], got {tuple(ids.shape)}")
        b, device = ids.shape[0], ids.device
        groups = ids_to_groups(ids.long(), c.groups)  # [B, T, G]
        masked = self.random_mask(b, device)  # [B, T, G] bool
        classes = self.classes_for(labels, b, device)
        if c.num_classes and c.class_dropout > 0:
            drop = torch.rand(b, device=device) < c.class_dropout
            classes = torch.where(drop, torch.full_like(classes, c.null_class), classes)
        bits = tokens_to_bits(groups, c.bits, self.bits_in.weight.dtype) * (~masked)[..., None]
        logits = self(bits, classes).float()  # [B, T, G, V]
        per_group = F.cross_entropy(
            logits.flatten(0, 2), groups.flatten(), reduction="none", label_smoothing=c.label_smoothing
        )
        weight = masked.flatten().float()
        count = weight.sum().clamp_min(1.0)
        loss = (per_group * weight).sum() / count
        with torch.no_grad():
            hits = (logits.argmax(-1) == groups).flatten().float()
            accuracy = (hits * weight).sum() / count
        return GeneratorLoss(loss, accuracy)

    def random_mask(self, batch: int, device: torch.device) -> Tensor:
        """[B, T, G] bool: per image a ratio on the mask schedule, then that many groups (at least 1) at random."""
        c = self.config
        n = c.tokens_per_image
        ratio = mask_ratio(torch.rand(batch, device=device), c.mask_schedule)  # [B]
        count = torch.ceil(ratio * n).clamp(1, n)  # [B]
        rank = torch.rand(batch, n, device=device).argsort(-1).argsort(-1)  # a random permutation's ranks
        return (rank < count[:, None]).reshape(batch, c.code_length, c.groups)


# ---- checkpoints ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenSource:
    """What the generator was trained on, as its checkpoint records it: the token shards' tokenizer (the
    manifest's "checkpoint" record: path, sha256, which), that tokenizer's config dict, the token spec dict
    and the class names (None: unconditional)."""

    checkpoint: dict
    tokenizer_config: dict
    tokens: dict
    class_names: Optional[list]

    def to_record(self) -> dict:
        """The checkpoint's "tokens" record (what `generator_records` reads back)."""
        return {"checkpoint": self.checkpoint, "config": self.tokenizer_config, "tokens": self.tokens,
                "class_names": self.class_names}


@dataclass(frozen=True)
class LoadedGenerator:
    model: TokenGenerator
    source: TokenSource
    total_steps: int
    path: str = ""  # the file the weights came from: a checkpoint, or a model folder's model.safetensors


def load_generator(path: str, which: str = "ema", device: Any = "cpu") -> LoadedGenerator:
    """A generator checkpoint in eval mode. The layout (what `train.generator` writes):

        {"total_steps": int,
         "model_ema_state_dict": ..., "model_state_dict": ...,   # TokenGenerator state dicts
         "config": {"model": GeneratorConfig.to_dict(), ...other sections...},
         "tokens": {"checkpoint": manifest["checkpoint"], "config": manifest["config"],
                    "tokens": manifest["tokens"], "class_names": [...] or None}}
    """
    path = os.fspath(path)
    return generator_from_checkpoint(read_checkpoint(path), path, which, device)


def generator_from_checkpoint(ckpt: Mapping, path: str, which: str = "ema", device: Any = "cpu") -> LoadedGenerator:
    """`load_generator` of a checkpoint already read (`ckpt`, from `path`)."""
    sections = ckpt.get("config")
    config, source = generator_records(sections.get("model") if isinstance(sections, Mapping) else None,
                                       ckpt.get("tokens"), path, f"{path} is not a token generator checkpoint (no "
                                       "generator config and token record): give a checkpoint of train.generator "
                                       "(results/NAME/checkpoints/*.pth)")
    key = WHICH[which] if which in WHICH else None
    if key is None or key not in ckpt:
        raise CheckpointError(f"{path} has no {key or which!r} weights; a generator checkpoint holds "
                              f"{', '.join(WHICH.values())}")
    model = generator_from_state(config, ckpt[key], path, device)
    return LoadedGenerator(model, source, int(ckpt.get("total_steps", 0)), path)


def generator_from_state(config: GeneratorConfig, state_dict: Mapping[str, Tensor], path: str,
                         device: Any) -> TokenGenerator:
    """The generator of `config` with `state_dict` (keys and shapes checked), float32, eval mode, on `device`."""
    with torch.device("meta"):
        model = TokenGenerator(config)
    check_state_dict(model, state_dict, path)
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.to(device=device, dtype=torch.float32).eval()


def generator_records(model: Any, tokens: Any, path: str, not_a_generator: str) -> tuple[GeneratorConfig, TokenSource]:
    """The generator's config and token record, as a checkpoint or a model folder's config.json holds them; what
    holds no generator config (a mapping with `groups`) and token record is refused with `not_a_generator`."""
    if not (isinstance(model, Mapping) and "groups" in model and isinstance(tokens, Mapping)):
        raise CheckpointError(not_a_generator)
    try:
        config = GeneratorConfig.from_dict(model)
        source = TokenSource(dict(tokens["checkpoint"]), dict(tokens["config"]), dict(tokens["tokens"]),
                             tokens.get("class_names"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable generator records ({type(e).__name__}: {e})") from e
    return config, source
