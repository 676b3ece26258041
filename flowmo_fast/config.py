"""One config object for the whole project: upstream `flowmo/configs/base.yaml`, as dataclasses.

Sections and keys (and their defaults) are exactly upstream's, so upstream dotlist overrides such as
`model.context_dim=18 model.codebook_size_for_entropy=9` work as written. Keys we add are marked "ours".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from flowmo_fast.llm_settings import (
    DEFAULT_LLM_PATH,
    LLM_QUANTIZATION,
    SPAN_FORM,
    is_llm_quantization,
    parse_fim_ids,
    parse_llm_quantization,
)
from flowmo_fast.overrides import with_overrides, with_preset
from flowmo_fast.sampler_settings import SOLVERS, SamplingConfig, parse_cfg_interval, parse_schedule


@dataclass
class DataConfig:
    batch_size: int = 16
    eval_batch_size: int = 5  # upstream's evaluator batch: refused when set (UPSTREAM_KEYS_REPLACED)
    image_size: int = 256
    num_workers: int = 8
    imagenet_train_index: str = "imagenet_train_index_overall.json"
    imagenet_train_tar: str = "ILSVRC2012_img_train.tar"
    imagenet_val_index: str = "imagenet_val_index_overall.json"
    imagenet_val_tar: str = "ILSVRC2012_img_val.tar"
    data_dir: str = ""  # ours: an image folder used instead of the ImageNet tars; "" = tars or bundled photos


@dataclass
class ModelConfig:
    enable_mup: bool = True  # attention scale 8 / head_dim (muP); False: 1 / sqrt(head_dim), as upstream's MUP_ENABLED
    patch_size: int = 4
    mup_width: int = 6  # decoder hidden size = 192 * mup_width
    enc_mup_width: Optional[int] = 4  # encoder hidden size = 192 * enc_mup_width (None: mup_width)
    fix_initial_norms: bool = True
    fix_norm_mode: str = "l2"
    quantization_type: str = "lfq"
    code_length: int = 256
    context_dim: int = 18
    codebook_size_for_entropy: int = 9
    entropy_loss_weight: float = 0.0025
    commit_loss_weight: float = 0.000625
    enc_depth: int = 8
    dec_depth: int = 16
    enable_cfg: bool = True
    ema_decay: float = 0.9999
    posttrain_sample: bool = False
    posttrain_sample_enable_cfg: bool = False
    posttrain_sample_k: int = 8
    kernels: str = "auto"  # ours: auto (CUDA: Triton, in torch.compile as flowmo_kernels.AUTO_WHEN_COMPILED) | triton | torch
    attention: str = "auto"  # ours: auto (fastest installed per shape on CUDA) | sdpa | flash_attn_3 | flash_attn_2 | xformers
    llm_path: str = DEFAULT_LLM_PATH  # ours, quantization_type qwen2.5-coder-0.5b: a HF model folder or a cached hub id
    llm_fim_ids: Optional[str] = None  # ours: "prefix,middle,suffix" ids; None: the model's tokenizer, else Qwen's

    @property
    def token_ids_per_image(self) -> int:
        """An LFQ code's token ids per image: code_length x groups of codebook_size_for_entropy bits (`Tokenizer`)."""
        return self.code_length * self.context_dim // self.codebook_size_for_entropy

    @property
    def token_vocab_size(self) -> int:
        """The values an LFQ token id takes: 2^codebook_size_for_entropy."""
        return 2**self.codebook_size_for_entropy


@dataclass
class OptConfig:
    lr: float = 1.0e-4
    n_grad_acc: int = 2
    schedule: str = "fat_lognormal"
    freeze_encoder: bool = False
    freeze_encoder_after: int = 200000
    weight_decay: float = 0.0
    log_norms: bool = True
    lpips_weight: float = 0.1
    lpips_mode: str = "vgg"
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 0  # ours: the learning rate rises linearly from 0 to opt.lr over these first steps
    lr_decay: str = "none"  # ours: none (upstream) | cosine | linear: after warm-up, down to 0 at trainer.max_steps


@dataclass
class TrainerConfig:
    enable_bfloat16: bool = True
    log_every: int = 100
    checkpoint_every: int = 5000
    max_steps: int = 10000000000000
    keep_every: int = 200000
    gs_checkpoint_bucket: str = ""  # upstream's upload of checkpoints to GCS: refused when set (UPSTREAM_KEYS_REPLACED)
    sample_every: int = 5000  # ours: write a PNG grid of reconstructions every N steps
    fsdp: bool = False  # ours: FSDP2 instead of DDP
    compile: Optional[bool] = None  # ours: torch.compile the transformer blocks; None: on CUDA only
    activation_checkpointing: bool = False  # ours: recompute each transformer block in backward (less memory)
    memory_gib: Optional[float] = None  # ours: GiB per process that opt.n_grad_acc is fitted to (None: the GPU's)
    max_grad_norm: Optional[float] = None  # ours: clip the gradients' global L2 norm to this; None: off (upstream)


@dataclass
class EvalConfig:
    # Upstream's evaluator settings, kept with their defaults; any other value is refused (UPSTREAM_KEYS_REPLACED).
    reconstruction: bool = True
    state_dict_key: str = "model_ema_state_dict"
    eval_dir: str = ""
    eval_baseline: str = ""
    continuous: bool = True
    force_ckpt_path: Optional[str] = None
    subsample_rate: int = 1
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


# Upstream keys flowmo-fast does not read, with what to use instead: set away from their defaults, they are
# refused. Upstream's evaluator is one script driven by the eval keys; ours are two commands with flags in their place.
UPSTREAM_KEYS_REPLACED = {
    "eval.reconstruction": "eval.rfid and eval.watch always measure reconstructions (--no-lpips leaves out LPIPS)",
    "eval.state_dict_key": "use --which ema|model (model_ema_state_dict | model_state_dict) of eval.rfid / eval.watch",
    "eval.eval_dir": "give the run folder to `python -m eval.watch RUN_DIR` (results in RUN_DIR/eval), or --out DIR "
    "to eval.rfid",
    "eval.eval_baseline": "other tokenizers (SDXL, TiTok, LlamaGen, Cosmos, Flux) are not part of flowmo-fast",
    "eval.continuous": "`python -m eval.watch RUN_DIR` follows a run (--once: only the checkpoints there now); "
    "`python -m eval.rfid --ckpt PATH` evaluates one checkpoint",
    "eval.force_ckpt_path": "use `python -m eval.rfid --ckpt PATH`",
    "eval.subsample_rate": "use --subsample N of eval.rfid / eval.watch",
    "data.eval_batch_size": "set the evaluation batch with --batch-size of eval.rfid / eval.watch (images per batch "
    "and process)",
    "trainer.gs_checkpoint_bucket": "flowmo-fast writes checkpoints under --results-dir only and uploads nothing; "
    "point --results-dir at a mounted bucket (e.g. gcsfuse) or copy RESULTS_DIR/NAME/checkpoints yourself",
}


@dataclass
class Config:
    global_seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    opt: OptConfig = field(default_factory=OptConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRESETS: dict[str, list[str]] = {
    # The published checkpoints (overrides as in ../shared/reference/checkpoint_manifests.json).
    "flowmo_lo": ["model.context_dim=18", "model.codebook_size_for_entropy=9"],
    "flowmo_hi": ["model.context_dim=56", "model.codebook_size_for_entropy=14"],
    "flowmo_hi_kl": ["model.context_dim=768", "model.quantization_type=kl", "model.code_length=128"],
    # Small enough for CPU tests (and the base of the README demo's preset); same architecture.
    "tiny": [
        "data.image_size=32",
        "data.batch_size=8",
        "data.num_workers=0",
        "model.mup_width=2",
        "model.enc_mup_width=2",
        "model.code_length=16",
        "model.context_dim=18",
        "model.codebook_size_for_entropy=9",
        "model.enc_depth=2",
        "model.dec_depth=2",
        "model.ema_decay=0.99",  # short runs: an EMA of 0.9999 would still be near its random init
        "opt.lr=3.0e-4",
        "opt.lpips_weight=0.0",
        "trainer.enable_bfloat16=False",
        "trainer.log_every=10",
        "trainer.checkpoint_every=100",
        "trainer.sample_every=100",
        "eval.sampling.sample_steps=10",
    ],
}
# The README's main job: the tiny model made cheaper per step (one block per tower, 8 px patches: 16 image
# tokens) and trained to convergence in a few CPU minutes (larger batch, warm-up then cosine decay of a higher
# learning rate): 21.3 dB PSNR on the bundled photos in under 4 minutes of a 2-core CPU; the plain tiny settings
# reached 13.8 dB in 300 steps (~6 minutes).
PRESETS["demo"] = PRESETS["tiny"] + [
    "data.batch_size=16",
    "model.enc_depth=1",
    "model.dec_depth=1",
    "model.patch_size=8",
    "opt.n_grad_acc=1",
    "opt.lr=2.0e-3",
    "opt.warmup_steps=50",
    "opt.lr_decay=cosine",
    "trainer.max_steps=800",
    "trainer.checkpoint_every=200",
    "trainer.sample_every=200",
]

ALLOWED = {
    "model.quantization_type": ("lfq", "kl", "noop", LLM_QUANTIZATION, SPAN_FORM),
    "model.fix_norm_mode": ("l2", "channel"),
    "model.kernels": ("auto", "triton", "torch"),
    "model.attention": ("auto", "sdpa", "flash_attn_3", "flash_attn_2", "xformers"),
    "opt.schedule": ("lognormal", "fat_lognormal", "uniform"),
    "opt.lpips_mode": ("vgg", "resnet"),
    "opt.lr_decay": ("none", "cosine", "linear"),
    "eval.sampling.mode": ("rf",),
    "eval.sampling.solver": SOLVERS,
}

# RoPE axes per unit of width, and the model's fixed head count and per-width hidden size.
ROPE_AXES_PER_WIDTH = (2, 7, 7)
HIDDEN_PER_WIDTH = 192
NUM_HEADS = 12


def load_config(overrides: Optional[Iterable[str]] = None, preset: Optional[str] = None) -> Config:
    """Defaults, then the preset's dotlist, then `overrides` (dotlist, e.g. "model.context_dim=56"):
    `flowmo_fast.overrides`, the one mechanism of every command."""
    config = with_overrides(with_preset(Config(), PRESETS, preset), overrides or [])
    validate(config)
    return config


def config_from_dict(d: dict, overrides: Iterable[str] = ()) -> Config:
    """Rebuild a Config stored with `Config.to_dict()` (e.g. in our checkpoints), then apply `overrides`."""
    stored = [f"{k}={v!r}" for k, v in _flatten(d) if k not in UPSTREAM_KEYS_REPLACED]  # never read
    config = with_overrides(Config(), [*stored, *overrides])
    validate(config)
    return config


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def rope_axes(width: int) -> tuple[int, int, int]:
    return tuple(a * width for a in ROPE_AXES_PER_WIDTH)


def setting(config: Config, key: str) -> Any:
    """The value of a dotted key, e.g. setting(config, "eval.sampling.cfg")."""
    node = config
    for part in key.split("."):
        node = getattr(node, part)
    return node


def validate(config: Config) -> None:
    """Raise ValueError naming the key and the allowed values for any impossible setting."""
    for key, allowed in ALLOWED.items():
        value = setting(config, key)
        if key == "model.quantization_type" and is_llm_quantization(value):
            continue  # qwen2.5-coder-0.5b[_span_P]: check_llm_settings below
        if value not in allowed:
            raise ValueError(f"{key}={value!r}; allowed: {', '.join(allowed)}")
    m, d = config.model, config.data
    if is_llm_quantization(m.quantization_type):
        check_llm_settings(m)
    for key, value in (
        ("model.mup_width", m.mup_width),
        ("model.enc_mup_width", m.enc_mup_width if m.enc_mup_width is not None else m.mup_width),
        ("model.patch_size", m.patch_size),
        ("model.code_length", m.code_length),
        ("model.context_dim", m.context_dim),
        ("model.enc_depth", m.enc_depth),
        ("model.dec_depth", m.dec_depth),
        ("data.image_size", d.image_size),
        ("data.batch_size", d.batch_size),
        ("opt.n_grad_acc", config.opt.n_grad_acc),
        ("eval.sampling.sample_steps", config.eval.sampling.sample_steps),
    ):
        if value < 1:
            raise ValueError(f"{key}={value}: must be a positive integer")
    for key, width in (("model.mup_width", m.mup_width), ("model.enc_mup_width", m.enc_mup_width)):
        if width is not None and any(a % 2 for a in rope_axes(width)):
            raise ValueError(
                f"{key}={width}: RoPE axes {rope_axes(width)} must all be even; allowed: even widths (2, 4, 6, ...)"
            )
    if m.quantization_type == "lfq":
        g = m.codebook_size_for_entropy
        if not 1 <= g <= 30 or m.context_dim % g:
            divisors = [k for k in range(1, min(m.context_dim, 30) + 1) if m.context_dim % k == 0]
            raise ValueError(
                f"model.codebook_size_for_entropy={g} must divide model.context_dim={m.context_dim}; "
                f"allowed: {divisors}"
            )
    if m.quantization_type == "kl" and m.context_dim < 1:
        raise ValueError("model.context_dim must be positive for kl")
    if d.image_size % m.patch_size:
        raise ValueError(
            f"data.image_size={d.image_size} is not divisible by model.patch_size={m.patch_size}; "
            f"allowed: multiples of {m.patch_size}"
        )
    if d.batch_size % config.opt.n_grad_acc:
        raise ValueError(
            f"data.batch_size={d.batch_size} is not divisible by opt.n_grad_acc={config.opt.n_grad_acc}; "
            f"allowed: multiples of {config.opt.n_grad_acc}"
        )
    check_lr_schedule(config)
    check_memory_limit(config.trainer.memory_gib)
    check_grad_clipping(config)
    parse_schedule(config.eval.sampling.schedule)
    parse_cfg_interval(config.eval.sampling.cfg_interval)
    check_upstream_keys(config)


def check_lr_schedule(config: Config) -> None:
    """opt.warmup_steps >= 0; a decay needs the step it ends at (trainer.max_steps, left at upstream's 'forever')."""
    opt = config.opt
    if opt.warmup_steps < 0:
        raise ValueError(f"opt.warmup_steps={opt.warmup_steps}: must be 0 (no warm-up) or a positive number of steps")
    if opt.lr_decay != "none" and config.trainer.max_steps >= TrainerConfig.max_steps:
        raise ValueError(
            f"opt.lr_decay={opt.lr_decay} decays the learning rate to 0 at trainer.max_steps, which is unset: "
            "set trainer.max_steps=N (or opt.lr_decay=none)"
        )


def check_memory_limit(memory_gib: Optional[float]) -> None:
    """trainer.memory_gib: unset, or a positive number of GiB."""
    if memory_gib is not None and not memory_gib > 0:
        raise ValueError(f"trainer.memory_gib={memory_gib}: must be a positive number of GiB (2^30 bytes) per process, "
                         "or unset (null: the GPU's own)")


def check_grad_clipping(config: Config) -> None:
    """trainer.max_grad_norm: None (no clipping) or a positive norm (both trainers)."""
    norm = config.trainer.max_grad_norm
    if norm is not None and not norm > 0:
        raise ValueError(f"trainer.max_grad_norm={norm}: must be a positive number (clip to it), or None (no clipping)")


def check_upstream_keys(config: Config) -> None:
    """Upstream's keys that flowmo-fast does not read (UPSTREAM_KEYS_REPLACED), away from their defaults, are
    refused with what replaced them."""
    defaults = Config()
    for key, replacement in UPSTREAM_KEYS_REPLACED.items():
        value = setting(config, key)
        if value != setting(defaults, key):
            raise ValueError(
                f"{key}={value!r}: flowmo-fast does not read upstream's setting {key}; {replacement}. "
                f"Remove {key} from the overrides."
            )


def check_llm_settings(model_config: ModelConfig) -> None:
    """What `config.validate` can check without the LLM: the type's form, a span of at least one token,
    `model.llm_fim_ids` and a non-empty `model.llm_path`."""
    spec = parse_llm_quantization(model_config.quantization_type)
    if spec.span_length(model_config.code_length) < 1:
        raise ValueError(
            f"model.code_length={model_config.code_length} with span fraction {spec.span_fraction} infills "
            f"int({spec.span_fraction} * {model_config.code_length}) = 0 tokens: raise model.code_length or P "
            f"in {SPAN_FORM}"
        )
    parse_fim_ids(model_config.llm_fim_ids)
    if not model_config.llm_path:
        raise ValueError(f"model.llm_path is empty: give a model folder or a hub id such as {DEFAULT_LLM_PATH}")
