"""Sampling token rows from a `TokenGenerator`: MaskGiT's iterative parallel decoding over bit groups.

All `code_length * groups` groups of an image start masked. At each of `steps` steps the generator predicts
every group; an id is drawn for each masked group (softmax at `softmax_temperature`), its confidence is
log p(id) plus Gumbel noise of a temperature annealed linearly from `temperature` to 0, and the least confident
new ids are masked again so that the masked count follows the mask schedule (arccos or cosine), reaching 0 at
the last step. Guidance (classifier-free) mixes the conditional and the null-class logits, conditional and
unconditional rows batched in one forward pass, with a scale ramped from 1 at the first step towards `cfg`
at step / steps (`cfg_schedule`: constant, linear, or MaskBit's power-cosine; a step with scale 1 runs the
conditional rows only).

Randomness: each sample has its own key, from (seed, class, index) through numpy's SeedSequence (as the
per-image streams of flowmo_fast.noise), and every draw is a counter-based hash of (key, step, stream,
group) computed on the device. A sample's draws therefore depend neither on the batch it is in nor on the
process that makes it, nor on the device; the loop has a fixed step count and no host synchronisation, so on
CUDA it is captured once per shape as a CUDA graph (`GraphedGenerator`) and replayed. There the step after the
model (guidance mix, softmax, cumsum, the draw) is one compiled kernel chain (`CompiledStep`) instead of a pass
over the [B, N, V] logits per operation; `generate` without it runs the eager step.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import numpy as np
import torch
from torch import Tensor

from flowmo_fast.fastpath import CheckedCall, Difference, FastPathChecks, capture_graph, check_replay, difference
from flowmo_fast.maskgit.model import MASK_SCHEDULES, MaskSchedule, TokenGenerator, mask_ratio, tokens_to_bits
from flowmo_fast.noise import MAX_SEED

CfgSchedule = Literal["constant", "linear", "pow_cosine"]
CFG_SCHEDULES = ("constant", "linear", "pow_cosine")
GENERATION_STREAM = 3  # beside flowmo_fast.noise's streams 0-2, so a sample key never equals an image's stream seed
_MASK32 = 0xFFFFFFFF
_BELOW_ONE = 1.0 - 2.0**-24  # the largest float32 below 1
# Of the ids a fast path draws, the share that may differ from the plain path's: a rounding difference flips the
# draws whose uniform lies within it of a CDF boundary. A wrong chain (a sign, a missing term) changes most.
ID_SHARE = 0.05


MASKBIT_STEPS = 64  # MaskBit's tuned 18-bit configuration: 64 steps for 2 x 256 = 512 groups per image
MASKBIT_GROUPS_PER_STEP = 8  # ... i.e. 8 groups revealed per step on average


def default_steps(groups_per_image: int) -> int:
    """The step count `steps=None` means: MaskBit's 64 for its 512 groups per image (FlowMo-Lo's) and for more;
    for fewer groups as many steps as keep MaskBit's 8 groups per step, ceil(groups / 8) (a 32-group demo image:
    4 steps), so the mask schedule still has several groups to reveal at each step."""
    return max(1, min(MASKBIT_STEPS, math.ceil(groups_per_image / MASKBIT_GROUPS_PER_STEP)))


@dataclass(frozen=True)
class GenerationOptions:
    """The generator's sampler settings. Hashable (a CUDA-graph capture is keyed by it).

    The defaults are MaskBit's tuned configuration for 18-bit tokens in two 9-bit groups, FlowMo-Lo's layout
    (`configs/generator/maskbit_generator_18bit.yaml`: num_steps 64, guidance_scale 5.7, guidance_annealing
    "cosine" with scale_pow 2.5, randomize_temperature 8.5, softmax_temperature 1.0, arccos schedule), in our
    guidance convention. MaskBit mixes `cond + s (cond - uncond)` with s = guidance_scale x ramp(r); we mix
    `uncond + cfg_r (cond - uncond)` with cfg_r = 1 + (cfg - 1) x ramp(r): the same logits when cfg = s + 1, so
    MaskBit's 5.7 is our cfg 6.7 (and its "no guidance", s = 0, our cfg 1). Its power-cosine ramp is
    ramp(r) = (1 - cos(pi r^power)) / 2 with r = step / steps, our `pow_cosine` with cfg_power 2.5; its Gumbel
    noise, randomize_temperature x (1 - (step + 1) / steps), our `temperature` 8.5 annealed the same way.
    MaskBit's configurations for other token sizes tune guidance between 5.7 and 7.1 and the temperature between
    7.5 and 10.5, and a generator trained on other tokens has its own best pair: tune cfg and temperature on a
    few samples per class (`python -m eval.sweep`) before a 50,000-sample run."""

    steps: Optional[int] = None  # None: `default_steps(groups per image)`, MaskBit's 64 for 512 groups
    cfg: float = 6.7  # the guidance scale the ramp rises to from 1 at step 0 (1: no guidance); MaskBit's 5.7 + 1
    cfg_schedule: CfgSchedule = "pow_cosine"
    cfg_power: float = 2.5  # pow_cosine: scale = 1 + (cfg - 1) (1 - cos(pi r^power)) / 2, r = step / steps
    temperature: float = 8.5  # Gumbel noise on the confidence, annealed linearly to 0 (MaskBit's randomize_temperature)
    softmax_temperature: float = 1.0  # of the categorical each new id is drawn from
    schedule: MaskSchedule = "arccos"  # the fraction still masked after each step

    def __post_init__(self) -> None:
        steps = self.steps
        if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"generation steps={self.steps!r}: must be a positive integer (or None: fit the image)")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg schedule {self.cfg_schedule!r}; allowed: {', '.join(CFG_SCHEDULES)}")
        if self.schedule not in MASK_SCHEDULES:
            raise ValueError(f"mask schedule {self.schedule!r}; allowed: {', '.join(MASK_SCHEDULES)}")
        if self.cfg < 0 or self.temperature < 0 or self.softmax_temperature <= 0 or self.cfg_power <= 0:
            raise ValueError(
                f"cfg={self.cfg}, temperature={self.temperature}, softmax_temperature={self.softmax_temperature}, "
                f"cfg_power={self.cfg_power}: cfg and temperature must be >= 0, the others > 0"
            )
        for name in ("cfg", "cfg_power", "temperature", "softmax_temperature"):
            object.__setattr__(self, name, float(getattr(self, name)))

    def replace(self, **changes) -> "GenerationOptions":
        return dataclasses.replace(self, **changes)

    def fitted(self, groups_per_image: int) -> "GenerationOptions":
        """These options with `steps` resolved for images of `groups_per_image` groups (None: `default_steps`)."""
        return self if self.steps is not None else self.replace(steps=default_steps(groups_per_image))

    def plan(self, groups_per_image: int) -> "GenerationPlan":
        return GenerationPlan.of(self.fitted(groups_per_image), groups_per_image)


@dataclass(frozen=True)
class GenerationPlan:
    """Per step, computed on the host once: groups still masked after it, guidance scale, Gumbel temperature."""

    masked_after: tuple[int, ...]
    cfg: tuple[float, ...]
    temperature: tuple[float, ...]

    @classmethod
    def of(cls, options: GenerationOptions, n: int) -> "GenerationPlan":
        s = options.steps
        if s > n:
            raise ValueError(f"generation steps={s} exceeds the {n} groups of an image: use at most {n} steps")
        progress = torch.arange(1, s + 1, dtype=torch.float64) / s
        target = torch.floor(n * mask_ratio(progress, options.schedule)).long().tolist()
        masked, left = [], n
        for k, want in enumerate(target):  # at least one group revealed per step, one left for each step to come
            left = max(min(want, left - 1), s - 1 - k)
            masked.append(left)
        ramp = {"constant": lambda r: 1.0, "linear": lambda r: r,
                "pow_cosine": lambda r: (1 - math.cos(math.pi * r**options.cfg_power)) / 2}[options.cfg_schedule]
        ratios = [k / s for k in range(s)]  # the ramp starts at the first step, as MaskBit's
        cfg = tuple(1.0 + (options.cfg - 1.0) * ramp(r) for r in ratios)
        temperature = tuple(options.temperature * (1.0 - (k + 1) / s) for k in range(s))
        return cls(tuple(masked), cfg, temperature)


def sample_key(seed: int, label: int, index: int) -> int:
    """The 32-bit key of sample `index` of class `label` (-1: unconditional) under `seed`."""
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"seed {seed}: must be in [0, {MAX_SEED})")
    return int(np.random.SeedSequence([seed, label + 1, index, GENERATION_STREAM]).generate_state(1)[0])


def sample_keys(seed: int, labels: list[int], indices: list[int], device=None) -> Tensor:
    """Keys [B] int64 of samples (labels[i], indices[i])."""
    return torch.tensor([sample_key(seed, c, i) for c, i in zip(labels, indices)], dtype=torch.int64, device=device)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (lowbias32-style) on int64 tensors holding values in [0, 2^32); no overflow."""
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    x = ((x >> 16) ^ x) * 0x45D9F3B & _MASK32
    return (x >> 16) ^ x


def counter_uniform(keys: Tensor, step: int, stream: int, n: int) -> Tensor:
    """U(0, 1) float32 [B, n], open at both ends: element j of sample b is a hash of (keys[b], step, stream, j)
    only."""
    salt = _mix32(keys.new_full((), step * 8 + stream + 1))  # made on the device: no copy in a CUDA graph
    base = _mix32((keys ^ salt) & _MASK32)  # [B]
    j = torch.arange(n, device=keys.device, dtype=torch.int64)
    x = _mix32((base[:, None] + j * 0x9E3779B9) & _MASK32)  # [B, n]
    # (k + 0.5) / 2^24 for the top 24 bits k; float32 rounds the largest to 1.0 (an infinite Gumbel term, NaN at
    # temperature 0): capped at the float below 1, every other value as it was
    return (((x >> 8).float() + 0.5) / 2**24).clamp_max(_BELOW_ONE)


def model_logits(model: TokenGenerator, bits: Tensor, classes: Tensor, guided: bool) -> Tensor:
    """The model's logits [B, T, G, V] in its dtype; guided: [2B, ...], the conditional rows then the null-class
    rows, run as one batch."""
    if not guided:
        return model(bits, classes)
    null = torch.full_like(classes, model.config.null_class)
    return model(torch.cat([bits, bits]), torch.cat([classes, null]))


def mix(cond: Tensor, uncond: Tensor, cfg) -> Tensor:
    """Classifier-free guidance: uncond + cfg (cond - uncond); cfg a float or a 0-d tensor."""
    return uncond + cfg * (cond - uncond)


def guided_logits(model: TokenGenerator, bits: Tensor, classes: Tensor, cfg: float) -> Tensor:
    """Logits [B, T, G, V] float32; with cfg != 1 the conditional and null-class rows run as one batch."""
    if cfg == 1.0:
        return model_logits(model, bits, classes, guided=False).float()
    return mix(*model_logits(model, bits, classes, guided=True).float().chunk(2), cfg)


def draw(logits: Tensor, u: Tensor, softmax_temperature: float) -> tuple[Tensor, Tensor]:
    """logits [B, N, V], uniforms u [B, N] -> (ids [B, N] drawn by inverse CDF, their log-probabilities). Eagerly
    two [B, N, V] temporaries (probabilities, CDF): FlowMo-Hi's 16384-way heads make them the sampler's largest."""
    probs = torch.softmax(logits / softmax_temperature, dim=-1)  # [B, N, V]
    cdf = probs.cumsum(-1)
    ids = torch.searchsorted(cdf, u[..., None] * cdf[..., -1:]).clamp_max(logits.shape[-1] - 1)  # [B, N, 1]
    return ids[..., 0], probs.gather(-1, ids)[..., 0].clamp_min(1e-30).log()


def choose(logits: Tensor, keys: Tensor, step: int, softmax_temperature: float) -> tuple[Tensor, Tensor]:
    """logits [B, N, V] -> (ids [B, N] drawn from the step's uniforms, their log-probabilities)."""
    return draw(logits, counter_uniform(keys, step, 0, logits.shape[1]), softmax_temperature)


# One sampling step after the bits are set: (model, bits, classes, cfg, keys, step, softmax temperature) -> (ids
# [B, N], log-probabilities [B, N]).
SamplingStep = Callable[[TokenGenerator, Tensor, Tensor, float, Tensor, int, float], tuple[Tensor, Tensor]]


def eager_step(model: TokenGenerator, bits: Tensor, classes: Tensor, cfg: float, keys: Tensor, step: int,
               softmax_temperature: float) -> tuple[Tensor, Tensor]:
    """The step as separate operations: the guided float32 logits [B, N, V], then `choose`."""
    return choose(guided_logits(model, bits, classes, cfg).flatten(1, 2), keys, step, softmax_temperature)


def mixed_choice(raw: Tensor, cfg: Optional[Tensor], u: Tensor, softmax_temperature: float) -> tuple[Tensor, Tensor]:
    """The step after the model as one function: raw logits [2B, N, V] (conditional rows, then null-class rows;
    [B, N, V] and cfg None unguided) in the model's dtype, cfg a 0-d tensor (no recompile per step), u [B, N]."""
    logits = raw.float()
    if cfg is not None:
        logits = mix(*logits.chunk(2), cfg)
    return draw(logits, u, softmax_temperature)


def draws_difference(got: tuple[Tensor, Tensor], want: tuple[Tensor, Tensor]) -> Difference:
    """Two steps' (ids, log-probabilities): the share of ids that differ, the log-probabilities' relative L2
    where the ids agree."""
    (ids, logp), (want_ids, want_logp) = got, want
    same = ids == want_ids
    return Difference(difference(torch.where(same, logp, want_logp), want_logp).rel_l2, float((~same).float().mean()))


class CompiledStep:
    """The step's guidance mix, softmax, cumsum and draw compiled into one kernel chain (`mixed_choice` under
    torch.compile), instead of eager passes over the [B, N, V] logits (FlowMo-Hi's 16384-way heads at batch 64:
    4.3 GB each). Each compiled variant checks itself against `mixed_choice` run eagerly on its first call."""

    def __init__(self, checks: FastPathChecks, **compile_kwargs):
        compiled = torch.compile(mixed_choice, dynamic=False, **compile_kwargs)
        self.chain = CheckedCall("compiled generator sampling step", compiled, mixed_choice, checks,
                                 compare=draws_difference, share=ID_SHARE)

    def __call__(self, model: TokenGenerator, bits: Tensor, classes: Tensor, cfg: float, keys: Tensor, step: int,
                 softmax_temperature: float) -> tuple[Tensor, Tensor]:
        raw = model_logits(model, bits, classes, guided=cfg != 1.0).flatten(1, 2)  # [B or 2B, N, V]
        scale = torch.full((), cfg, dtype=torch.float32, device=raw.device) if cfg != 1.0 else None
        return self.chain(raw, scale, counter_uniform(keys, step, 0, raw.shape[1]), softmax_temperature)


@torch.no_grad()
def generate(model: TokenGenerator, labels: Optional[Tensor], keys: Tensor, options: GenerationOptions,
             sampling_step: SamplingStep = eager_step) -> Tensor:
    """Token rows [B, code_length * groups] (the tokenizer's ids) for class `labels` [B] (None: unconditional)
    and sample `keys` [B] (`sample_keys`). Fixed step count, tensor ops only: no host sync in the loop.
    `sampling_step`: the eager step, or a `CompiledStep`."""
    c = model.config
    b, n = keys.shape[0], c.tokens_per_image
    options = options.fitted(n)
    plan = options.plan(n)
    classes = model.classes_for(labels, b, keys.device)
    guide = labels is not None
    ids = torch.zeros(b, n, dtype=torch.long, device=keys.device)
    masked = torch.ones(b, n, dtype=torch.bool, device=keys.device)
    for step in range(options.steps):
        bits = tokens_to_bits(ids.view(b, c.code_length, c.groups), c.bits, model.bits_in.weight.dtype)
        bits = bits * (~masked).view(b, c.code_length, c.groups, 1)
        cfg = plan.cfg[step] if guide else 1.0
        sampled, logp = sampling_step(model, bits, classes, cfg, keys, step, options.softmax_temperature)
        ids = torch.where(masked, sampled, ids)
        keep = plan.masked_after[step]
        if keep == 0:
            masked = torch.zeros_like(masked)
            continue
        u = counter_uniform(keys, step, 1, n)
        confidence = logp + plan.temperature[step] * -torch.log(-torch.log(u))  # Gumbel noise
        confidence = torch.where(masked, confidence, torch.full_like(confidence, math.inf))
        least = confidence.topk(keep, dim=-1, largest=False).indices  # [B, keep]
        masked = torch.zeros_like(masked).scatter_(1, least, True)
    return ids


@dataclass
class _Captured:
    graph: "torch.cuda.CUDAGraph"
    labels: Optional[Tensor]
    keys: Tensor
    out: Tensor
    warm_up: Optional[Tensor]  # the warm-up's ids, until the first replay is checked against them


class GraphedGenerator:
    """`generate` replayed from one CUDA graph per (device, batch, conditional or not, options, autocast).

    The first call for a key compiles the blocks and the sampling step's chain (unless compile=False or done
    already), runs once on a side stream (warm-up), then captures; later calls copy labels and keys into the
    static buffers on the model's device (labels and keys may come from anywhere: they are moved there first,
    never inside the capture) and replay. Moving the weights drops every capture. Outputs equal eager
    `generate`'s up to the compiled kernels' rounding (without compile: the same kernels in the same order). The
    first replay of each capture is checked against its warm-up (`model.fast_checks`); a key that differs runs
    `generate` from then on."""

    def __init__(self, model: TokenGenerator, compile: bool = True):
        self.model = model
        self.compile = compile
        self.step: SamplingStep = CompiledStep(model.fast_checks) if compile else eager_step
        self.captured: dict[tuple, _Captured] = {}
        self.weights: tuple = ()

    def __call__(self, labels: Optional[Tensor], keys: Tensor, options: GenerationOptions) -> Tensor:
        weights = tuple(p.data_ptr() for p in self.model.parameters())
        if weights != self.weights:
            self.captured.clear()
            self.weights = weights
        device = next(self.model.parameters()).device
        keys = keys.to(device)
        labels = labels.to(device, torch.long) if labels is not None else None
        autocast = torch.is_autocast_enabled("cuda")
        key = (device, keys.shape[0], labels is not None, options, autocast)
        checks = self.model.fast_checks
        if checks.verdict(("CUDA graph generator", key)) is False:
            return generate(self.model, labels, keys, options, self.step)
        if key not in self.captured:
            self.captured[key] = self._capture(labels, keys, options, autocast)
        entry = self.captured[key]
        entry.keys.copy_(keys)
        if labels is not None:
            entry.labels.copy_(labels)
        entry.graph.replay()
        warm_up, entry.warm_up = entry.warm_up, None
        if warm_up is not None and checks.enabled():  # the first replay: on the inputs the warm-up ran on
            steps = options.fitted(self.model.config.tokens_per_image).steps
            what = f"CUDA graph of the token generator (batch {keys.shape[0]}, {steps} steps)"
            if not check_replay(checks, ("CUDA graph generator", key), what, entry.out, warm_up, autocast, ID_SHARE):
                del self.captured[key]
                return warm_up
        return entry.out.clone()

    def _capture(self, labels, keys, options: GenerationOptions, autocast: bool) -> _Captured:
        if self.compile and not self.model.blocks_compiled():
            self.model.compile_blocks(dynamic=False)
        static_keys = keys.clone()
        static_labels = labels.clone() if labels is not None else None
        run = lambda: generate(self.model, static_labels, static_keys, options, self.step)  # noqa: E731
        capture = capture_graph(run, keys.device, autocast)
        return _Captured(capture.graph, static_labels, static_keys, capture.out, capture.warm_up)
