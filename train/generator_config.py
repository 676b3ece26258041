"""The token generator trainer's config: sections `data`, `model`, `opt`, `trainer` as the tokenizer's, set with the
same dotlist overrides (`opt.lr=2e-4 trainer.max_steps=1000 model.depth=12`).

Keys that mean what the tokenizer's keys mean keep their names (`data.batch_size` per process, `opt.lr`,
`opt.n_grad_acc`, `opt.warmup_steps`, `opt.lr_decay`, `trainer.max_steps`, `trainer.checkpoint_every`, ...).
`model` is the generator itself (`flowmo_fast.maskgit.model.GeneratorConfig`): its token layout (`code_length`,
`groups`, `bits`) and its classes (`num_classes`) come from the token shards, its size from the preset (a dotlist
like every other key: `model.width=1024 model.depth=24 model.heads=16` is L's).
The EMA decay, the tokenizer's `model.ema_decay`, is `trainer.ema_decay` here: the model section holds the
generator's own settings only (what its checkpoint needs to rebuild it).

Presets: `tiny` (tests, CPU examples: classes if the shards have them), `B` and `L` (the paper-scale recipe:
MaskBit's optimizer settings, 32 rows per process x 8 GPUs; class-conditional: the shards must have labels).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Sequence

from flowmo_fast.config import ALLOWED, TrainerConfig, check_grad_clipping, check_lr_schedule
from flowmo_fast.maskgit.model import GeneratorConfig
from flowmo_fast.overrides import with_overrides, with_preset
from train.generator_data import TokenLayout


@dataclass
class GeneratorDataConfig:
    batch_size: int = 32  # token rows per process and optimizer step


@dataclass
class GeneratorOptConfig:
    lr: float = 1.0e-4
    n_grad_acc: int = 1
    weight_decay: float = 0.045  # AdamW's, on matrices only (not on biases and norms)
    beta1: float = 0.9
    beta2: float = 0.96
    warmup_steps: int = 5000
    lr_decay: str = "cosine"  # none | cosine | linear: after warm-up, down to 0 at trainer.max_steps
    log_norms: bool = True


@dataclass
class GeneratorTrainerConfig:
    enable_bfloat16: bool = True
    log_every: int = 100
    checkpoint_every: int = 10000
    max_steps: int = TrainerConfig.max_steps  # "forever": set it (a preset does) for the decay to end
    keep_every: int = 100000
    fsdp: bool = False
    compile: Optional[bool] = None  # torch.compile each transformer block; None: on CUDA only
    ema_decay: float = 0.9999
    activation_checkpointing: bool = False  # recompute each transformer block in backward (less memory)
    max_grad_norm: Optional[float] = 1.0  # clip the gradients' global L2 norm to this (MaskBit's 1.0); None: off


@dataclass
class GeneratorTrainingConfig:
    model: GeneratorConfig
    global_seed: int = 0
    data: GeneratorDataConfig = field(default_factory=GeneratorDataConfig)
    opt: GeneratorOptConfig = field(default_factory=GeneratorOptConfig)
    trainer: GeneratorTrainerConfig = field(default_factory=GeneratorTrainerConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Presets: named dotlists (flowmo_fast.overrides, as the tokenizer's): the generator's size and the recipe that goes
# with it. Parameters for FlowMo-Lo tokens (2 x 512-way heads, 1000 classes): B 114M, L 303M (MaskBit's generator is
# 1024 wide x 24 deep).
PAPER_RECIPE = [
    "model.dropout=0.1",  # MaskBit's and TiTok's 0.1: a 300-epoch run on fixed token rows overfits without it
    "model.attention_dropout=0.1",
    "data.batch_size=32",  # x 8 GPUs = 256 rows per step, as MaskBit
    "opt.lr=1.0e-4",
    "opt.warmup_steps=5000",
    "trainer.max_steps=1500000",  # 300 epochs of ImageNet's 1.28M rows at 256 per step (the paper's 300 epochs)
    "trainer.checkpoint_every=10000",
]
PRESETS: dict[str, list[str]] = {
    "tiny": [
        "model.width=64",
        "model.depth=2",
        "model.heads=4",
        "data.batch_size=16",
        "opt.lr=1.0e-3",
        "opt.weight_decay=0.0",
        "opt.warmup_steps=10",
        "trainer.max_steps=200",
        "trainer.log_every=10",
        "trainer.checkpoint_every=100",
        "trainer.enable_bfloat16=False",
        "trainer.ema_decay=0.99",
    ],
    "B": ["model.width=768", "model.depth=16", "model.heads=12", *PAPER_RECIPE],
    "L": ["model.width=1024", "model.depth=24", "model.heads=16", *PAPER_RECIPE],
}
CLASS_CONDITIONAL = ("B", "L")  # presets that need class labels (model.num_classes=0 trains without them)
MODEL_FROM_SHARDS = ("code_length", "groups", "bits")


def make_config(preset: str, layout: TokenLayout, overrides: Sequence[str]) -> GeneratorTrainingConfig:
    """Defaults, then the preset (model size and recipe), then the overrides; the model built for `layout`.
    Raises ValueError naming the key for an impossible setting."""
    if layout.bits < 1 or layout.context_dim % layout.bits:
        raise ValueError(f"codebook_size_for_entropy={layout.bits} must divide context_dim={layout.context_dim}")
    built_for = GeneratorConfig(layout.code_length, layout.context_dim // layout.bits, layout.bits, layout.num_classes)
    config = with_overrides(with_preset(GeneratorTrainingConfig(built_for), PRESETS, preset), overrides)
    validate(config, layout)
    chosen = any(item.split("=", 1)[0].strip().lstrip("+") == "model.num_classes" for item in overrides)
    if preset in CLASS_CONDITIONAL and not layout.num_classes and not chosen:
        raise ValueError(
            f"the token shards have no class labels, but preset {preset} is class-conditional: tokenize a data set "
            "with classes (ImageNet, or a folder with one sub-folder per class), or add model.num_classes=0 to "
            "train unconditionally"
        )
    return config


def preset_model(preset: str, layout: TokenLayout, overrides: Sequence[str] = ()) -> GeneratorConfig:
    """The generator preset `preset` builds for tokens of `layout` (its `model` section)."""
    return make_config(preset, layout, overrides).model


def validate(config: GeneratorTrainingConfig, layout: TokenLayout) -> None:
    opt, model = config.opt, config.model
    if opt.lr_decay not in ALLOWED["opt.lr_decay"]:
        raise ValueError(f"opt.lr_decay={opt.lr_decay!r}; allowed: {', '.join(ALLOWED['opt.lr_decay'])}")
    for key, value in (("data.batch_size", config.data.batch_size), ("opt.n_grad_acc", opt.n_grad_acc),
                       ("trainer.log_every", config.trainer.log_every),
                       ("trainer.checkpoint_every", config.trainer.checkpoint_every)):
        if value < 1:
            raise ValueError(f"{key}={value}: must be a positive integer")
    if config.data.batch_size % opt.n_grad_acc:
        raise ValueError(f"data.batch_size={config.data.batch_size} is not divisible by opt.n_grad_acc={opt.n_grad_acc}")
    check_lr_schedule(config)
    check_grad_clipping(config)
    shards = dict(code_length=layout.code_length, groups=layout.context_dim // layout.bits, bits=layout.bits)
    for key in MODEL_FROM_SHARDS:
        if getattr(model, key) != shards[key]:
            raise ValueError(f"model.{key}={getattr(model, key)}, but the token shards have {key} {shards[key]}: "
                             f"leave model.{key} out (it is read from the shards)")
    if model.num_classes and not layout.num_classes:
        raise ValueError(f"model.num_classes={model.num_classes}, but the token shards have no class labels: "
                         "leave model.num_classes out, or tokenize a data set with classes")
    if model.num_classes and model.num_classes != layout.num_classes:
        raise ValueError(f"model.num_classes={model.num_classes}, but the token shards have {layout.num_classes} classes: "
                         f"leave model.num_classes out (it is read from the shards), or set 0 (unconditional)")
