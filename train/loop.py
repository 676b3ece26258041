"""The step loop both trainers run (the tokenizer's, `train.tokenizer`, and the token generator's, `train.generator`):
draw a batch, one optimizer step, EMA, then on their steps the log, the trainer's samples and a checkpoint,
until trainer.max_steps or an agreed SIGTERM. What differs between the trainers comes in as `StepHooks`."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
from torch import nn

from flowmo_fast.distributed import Processes, min_across_ranks
from train import parallel
from train.ema import EMA
from train.metrics import MetricLogger
from train.step import set_learning_rate, train_step
from train.train_state import Progress


class NonFiniteLoss(RuntimeError):
    pass


def say(procs: Processes, message: str) -> None:
    """A line on rank 0's stdout."""
    if procs.is_main:
        print(message, flush=True)


class NonFiniteWatch:
    """Remembers, on the device (no sync per step), the first step (counted from 1) whose loss was NaN or inf."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        self.first = torch.where((self.first < 0) & ~torch.isfinite(loss), step, self.first)

    def check(self, procs: Processes, last_good: str) -> None:
        """Raise on every rank if any rank saw a non-finite loss."""
        first = int(self.first.item())
        first = min_across_ranks(first if first >= 0 else 2**62, procs)
        if first < 2**62:
            raise NonFiniteLoss(
                f"the loss became NaN or inf at step {first}; stopping without saving. "
                f"Last good checkpoint: {last_good or 'none yet'}. Lower opt.lr (or check the data) and rerun "
                "the same command to resume from it."
            )


class Trainee(Protocol):
    """What the loop steps (both trainers' `Trainee`); read each step: a trainer may swap `wrapped` and `optimizer`."""

    model: nn.Module
    objective: nn.Module  # the loss as a module: train() each step
    wrapped: nn.Module  # the objective under DDP (or itself)
    ema: EMA
    optimizer: torch.optim.Optimizer


@dataclass(frozen=True)
class Drawn:
    """The step's batch (anything `train_step` splits into micro-batches and moves with `.to`) and how many
    samples this rank drew from its data stream for it (the data position advances by that)."""

    batch: Any
    samples: int


@dataclass(frozen=True)
class LogExtra:
    """What a trainer adds to a log line: named scalars, and the images skipped so far on this rank (None: its
    data cannot fail to decode)."""

    scalars: dict[str, float] = field(default_factory=dict)
    skipped_images: Optional[int] = None


class StepHooks:
    """A trainer's part of the loop; the defaults do nothing. Every method runs on every rank."""

    def before_step(self) -> None:
        """Before the batch is drawn (the tokenizer: freeze the encoder when due)."""

    def next_batch(self) -> Drawn:
        raise NotImplementedError

    def after_optimizer_step(self) -> None:
        """After the optimizer step, before EMA (the tokenizer: reset the weight norms)."""

    def log_extra(self) -> LogExtra:
        """On a log step: the trainer's own scalars (may be collective)."""
        return LogExtra()

    def sample(self, step: int, final: bool) -> None:
        """After the log, before the checkpoint (the tokenizer: its progress grid when due)."""

    def save(self) -> str:
        """Write a checkpoint of the current step; returns its path."""
        raise NotImplementedError


def finished(progress: Progress, config, procs: Processes) -> bool:
    """Whether the run is already at trainer.max_steps (then says so: nothing to do)."""
    max_steps = config.trainer.max_steps
    if progress.total_steps < max_steps:
        return False
    say(procs, f"nothing to do: already at step {progress.total_steps} >= trainer.max_steps={max_steps}; "
        "set trainer.max_steps higher to train further")
    return True


def run_steps(trainee: Trainee, config, procs: Processes, progress: Progress, metrics: MetricLogger,
              hooks: StepHooks, last_good: str) -> None:
    """Train from `progress` to config.trainer.max_steps (or until SIGTERM), then close `metrics`.
    `last_good`: the checkpoint the run started from ("" none), named if the loss goes non-finite."""
    trainer, watch = config.trainer, NonFiniteWatch(procs.device)
    say(procs, f"training from step {progress.total_steps} to {trainer.max_steps}")
    with parallel.StopRequest(procs) as stop, contextlib.closing(metrics):
        while progress.total_steps < trainer.max_steps:
            hooks.before_step()
            drawn = hooks.next_batch()
            progress.data_position += drawn.samples
            trainee.objective.train()
            set_learning_rate(trainee.optimizer, config, progress.total_steps)
            terms = train_step(trainee.wrapped, trainee.model, drawn.batch.to(procs.device, non_blocking=True),
                               trainee.optimizer, config, procs.device)
            hooks.after_optimizer_step()
            trainee.ema.update(trainee.model, progress.total_steps)
            progress.total_steps += 1
            step = progress.total_steps  # steps done; the log, checkpoints and messages count this way
            watch.observe(terms.total_loss, step)
            metrics.add(terms.logged)
            stopping = stop.agreed()
            final = step == trainer.max_steps or stopping
            if step % trainer.log_every == 0 or final:
                watch.check(procs, last_good)
                extra = hooks.log_extra()
                metrics.log(step, extra.scalars, extra.skipped_images)
            hooks.sample(step, final)
            if step % trainer.checkpoint_every == 0 or final:
                watch.check(procs, last_good)
                last_good = hooks.save()
            if stopping:
                say(procs, f"stopped by SIGTERM after step {step}; rerun the same command to resume")
                break
    say(procs, f"done at step {progress.total_steps}; newest checkpoint {last_good}")
