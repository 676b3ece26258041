"""One training step (what `train.pretrain` / `train.posttrain` / `train.generator` run each step, and what
bench/gpu_report.py times): the optimizer, the compile switch `trainer.compile`, gradient clipping
(`trainer.max_grad_norm`) and the step itself."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from flowmo_fast.config import Config
from flowmo_fast.flowmo.graphed_sampler import compile_blocks
from flowmo_fast.flowmo.model import FlowMo, autocast_for
from train import parallel


def compiles(config: Config, device: torch.device) -> bool:
    """`trainer.compile`: true / false, or unset (None): on for CUDA, off elsewhere (CPU compiles are slow to
    build and gain little)."""
    setting = config.trainer.compile
    return torch.device(device).type == "cuda" if setting is None else setting


def compile_for_training(model: FlowMo, config: Config, device: torch.device, backend: Optional[str] = None) -> bool:
    """Compile each transformer block in place when `compiles(config, device)` (regional compile, as upstream's
    training; post-training's checkpointed chain then runs the compiled blocks inside its checkpoints, where
    compiled code must sit). Returns whether it compiled. `backend`: torch.compile's (default inductor)."""
    if not compiles(config, device):
        return False
    compile_blocks(model, **({"backend": backend} if backend else {}))
    return True


def build_optimizer(model: FlowMo, config: Config, groups: Optional[list[dict]] = None) -> torch.optim.Optimizer:
    """Adam (AdamW when opt.weight_decay > 0) over the trainable parameters: encoder group, decoder group, or
    the parameter `groups` given (dicts; a group's own "weight_decay" wins). The fused implementation: one kernel
    over all tensors, same update rule (on CPU 3.6x faster than the per-tensor loop, which took a fifth of the
    demo's step: bench/RESULTS.md, optimizer step)."""
    if groups is None:
        groups = [{"params": [p for p in tower.parameters() if p.requires_grad]} for tower in (model.encoder, model.decoder)]
    opt = config.opt
    cls = torch.optim.AdamW if opt.weight_decay else torch.optim.Adam
    return cls([g for g in groups if g["params"]], lr=opt.lr, betas=(opt.beta1, opt.beta2), weight_decay=opt.weight_decay,
               fused=True)


def learning_rate(config: Config, step: int) -> float:
    """The learning rate of the optimizer step after `step` steps: opt.lr (upstream), or opt.lr after a linear
    warm-up over opt.warmup_steps, then (opt.lr_decay) a cosine or linear decay to 0 at trainer.max_steps.
    A function of the step alone, so a resumed run continues the schedule exactly."""
    opt = config.opt
    if step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.lr_decay == "none":
        return opt.lr
    span = config.trainer.max_steps - opt.warmup_steps  # > 0 here: step < max_steps
    left = max(0.0, 1.0 - (step - opt.warmup_steps) / span)  # 1 at the first step after warm-up, 1/span at the last
    return opt.lr * (left if opt.lr_decay == "linear" else 0.5 * (1.0 - math.cos(math.pi * left)))


def set_learning_rate(optimizer: torch.optim.Optimizer, config: Config, step: int) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(config, step)


def total_norm(tensors) -> torch.Tensor:
    return parallel.full_tensor(torch.nn.utils.get_total_norm(list(tensors)))


@dataclass(frozen=True)
class StepTerms:
    """One optimizer step's numbers, means over its micro-batches (detached, on the device: no host sync)."""

    total_loss: torch.Tensor  # scalar: the loss the step minimized (what the non-finite watch reads)
    logged: dict[str, torch.Tensor]  # the objective's named terms, with opt.log_norms the norms: what the log shows


def train_step(wrapped, model, images, optimizer, config: Config, device) -> StepTerms:
    """One optimizer step on one batch (anything `tensor_split` cuts into `opt.n_grad_acc` micro-batches);
    `wrapped(chunk)` -> (loss, named terms). With trainer.max_grad_norm the accumulated gradients are clipped to
    that global norm before the optimizer step, and `debug/original_grad_norm` is their norm before clipping."""
    optimizer.zero_grad(set_to_none=True)
    n = config.opt.n_grad_acc
    total, terms = None, {}
    for i, chunk in enumerate(images.tensor_split(n)):
        with parallel.gradient_sync(wrapped, model, enabled=i == n - 1):
            with autocast_for(device, config.trainer.enable_bfloat16):
                loss, chunk_terms = wrapped(chunk)
            (loss / n).backward()
        part = loss.detach().float() / n
        total = part if total is None else total + part
        for k, v in chunk_terms.items():
            terms[k] = terms[k] + v / n if k in terms else v / n
    clip = config.trainer.max_grad_norm
    needed = clip is not None or config.opt.log_norms  # not a per-step list of parameters when nothing reads it
    trained = [p for p in model.parameters() if p.grad is not None] if needed else []
    if clip is not None:  # torch's clipping returns the norm before it: logged with or without opt.log_norms
        # (FSDP2: DTensor gradients, one reduction; on the device, no host sync)
        terms["debug/original_grad_norm"] = parallel.full_tensor(torch.nn.utils.clip_grad_norm_(trained, clip))
    elif config.opt.log_norms:
        terms["debug/original_grad_norm"] = total_norm(p.grad for p in trained)
    if config.opt.log_norms:
        terms["debug/param_norm"] = total_norm(trained)
    optimizer.step()
    return StepTerms(total, terms)
