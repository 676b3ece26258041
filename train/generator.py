"""Training the token generator: `torchrun --nproc-per-node=N -m train.generator --tokens DIR --experiment-name NAME
[--preset tiny|B|L] [key=value ...]` (or `python -m train.generator ...` for one process). DIR is the output of
`flowmo_fast.tokenize` (LFQ token ids; with class labels for a class-conditional generator). Rerunning the same
command resumes from the newest checkpoint in results/NAME/checkpoints.

The tokenizer trainer's parts, reused: processes and DDP / FSDP2 (train.parallel), the training step with bf16
autocast on CUDA and gradient accumulation, the AdamW warm-up + decay schedule (train.step), EMA (train.ema),
metrics, TensorBoard and the progress bar (train.metrics), checkpoints and their retention (train.train_state),
start point and RNG seeding (train.tokenizer), the step loop with its non-finite-loss watch and SIGTERM stop (train.loop:
`GeneratorSteps` is this trainer's part of it). Each step: one batch of token rows per rank,
masked-token loss (`TokenGenerator.loss`: its masks and label dropout draw from the global RNG, which the
checkpoints carry, so a stopped and resumed run equals a straight one), AdamW step, EMA every 10 steps.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from flowmo_fast.distributed import Processes
from flowmo_fast.formats.checkpoint import CheckpointError
from flowmo_fast.maskgit.model import TokenGenerator
from train import cli, parallel, train_state
from train.ema import EMA
from train.generator_config import PRESETS, GeneratorTrainingConfig, make_config
from train.generator_data import TokenBatch, TokenData, open_tokens, token_batches
from train.loop import Drawn, LogExtra, StepHooks, finished, run_steps, say
from train.metrics import MetricLogger, peak_flops
from train.start import Experiment, StartPoint, find_start, in_processes, prepare, say_size, seed_rngs
from train.step import build_optimizer, compiles
from train.train_state import Progress

DEFAULT_PRESET = "B"
TOKENS = "tokens"  # the checkpoint's record of its training tokens (flowmo_fast.maskgit.model.TokenSource)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.build_parser("python -m train.generator", "Token generator training (MaskGiT family) on token "
                              "shards.", presets=PRESETS)
    parser.add_argument("--tokens", required=True, metavar="DIR", help="a flowmo_fast.tokenize output folder")
    parser.set_defaults(preset=DEFAULT_PRESET)
    parser.epilog = (f"--preset: {DEFAULT_PRESET} (default) and L are class-conditional (the paper-scale recipe), tiny "
                     "is for tests. Any further argument of the form section.key=value overrides the config (e.g. "
                     "opt.lr=2e-4 model.depth=12 trainer.max_steps=100000); see train/generator_config.py.")
    args, overrides = cli.parse(parser, argv)
    try:
        tokens = open_tokens(args.tokens)
        config = make_config(args.preset, tokens.layout, overrides)
    except ValueError as e:  # DataError included: shards it cannot use, or settings that do not fit them
        raise SystemExit(f"error: {e}") from None
    return run(cli.experiment(args), tokens, config)


def run(experiment: Experiment, tokens: TokenData, config: GeneratorTrainingConfig) -> int:
    """Train until trainer.max_steps (or SIGTERM); returns the process exit code."""
    return in_processes(functools.partial(train, experiment, tokens, config))


class GeneratorObjective(nn.Module):
    """The generator's loss as a module (what DDP wraps): a batch -> (loss, the terms to log)."""

    def __init__(self, model: TokenGenerator):
        super().__init__()
        self.model = model

    def forward(self, batch: TokenBatch) -> tuple[Tensor, dict[str, Tensor]]:
        labels = batch.labels if self.model.config.num_classes else None  # unconditional: classes unused
        out = self.model.loss(batch.ids, labels)
        return out.loss, {"total_loss": out.loss.detach(), "masked_token_accuracy": out.accuracy}


@dataclass
class Trainee:
    """The generator and everything that updates it."""

    model: TokenGenerator
    objective: GeneratorObjective
    wrapped: nn.Module  # the objective under DDP (or itself: one process, FSDP)
    ema: EMA
    optimizer: torch.optim.Optimizer


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices (and embeddings) decay, biases and norm scales do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def build_trainee(config: GeneratorTrainingConfig, procs: Processes, start: StartPoint) -> Trainee:
    """Same initial weights on every rank, the start point's weights, regional compile (CUDA), the objective
    wrapped for several processes, EMA and optimizer (their states on resume)."""
    torch.manual_seed(config.global_seed)
    model = TokenGenerator(config.model).to(procs.device)
    if start.ckpt is not None:
        train_state.load_model(model, start.ckpt, start.path)
    if compiles(config, procs.device):
        model.compile_blocks()
    model.activation_checkpointing = config.trainer.activation_checkpointing
    objective = GeneratorObjective(model)
    wrapped = parallel.wrap(objective, model, config, procs, units=list(model.blocks))
    optimizer = build_optimizer(model, config, weight_decay_groups(model, config.opt.weight_decay))
    trainee = Trainee(model, objective, wrapped, EMA(model, config.trainer.ema_decay), optimizer)
    if start.resuming:
        train_state.restore(trainee, start.ckpt, start.path)
    say_size(procs, "TokenGenerator", model, config)
    return trainee


def build_metrics(config: GeneratorTrainingConfig, procs: Processes, log_dir: str, progress: Progress,
                  model: TokenGenerator) -> MetricLogger:
    """Logs to stdout and TensorBoard (rows per second: images); MFU where the device's peak is known, from the
    generator's matmul FLOPs (a training step: forward + backward, 3x the forward)."""
    flops = None
    if peak_flops(procs.device):
        flops = 3 * model.matmul_flops(config.data.batch_size)
        say(procs, f"TokenGenerator forward + backward: {flops / 1e12:.3g} TFLOP per step per rank")
    rows_per_step = config.data.batch_size * procs.world_size
    return MetricLogger(procs, log_dir, config.trainer.max_steps, progress.total_steps, rows_per_step, flops)


def check_tokens(start: StartPoint, tokens: TokenData) -> None:
    """A run continues (or starts from another run's weights) only on tokens of the same tokenizer: the
    checkpoint's record names it."""
    record = (start.ckpt or {}).get(TOKENS)
    if record is None:
        return
    was, now = record["checkpoint"]["sha256"], tokens.record["checkpoint"]["sha256"]
    if was != now:
        fix = "or a new --experiment-name" if start.resuming else "or start without --resume-from-ckpt"
        raise CheckpointError(
            f"{start.path} was trained on tokens of the tokenizer {record['checkpoint'].get('path')} (sha256 "
            f"{was[:12]}), but --tokens {tokens.shards.folder} holds tokens of {tokens.record['checkpoint'].get('path')} "
            f"(sha256 {now[:12]}): give tokens of the tokenizer it was trained on, {fix}"
        )


@dataclass
class GeneratorSteps(StepHooks):
    """The generator's part of the step loop: batches of token rows, the learning rate logged."""

    config: GeneratorTrainingConfig
    tokens: TokenData
    procs: Processes
    log_dir: str
    progress: Progress
    batches: Iterator[TokenBatch]
    trainee: Trainee
    metrics: MetricLogger

    def next_batch(self) -> Drawn:
        batch = next(self.batches)
        return Drawn(batch, len(batch))

    def log_extra(self) -> LogExtra:
        return LogExtra({"lr": self.trainee.optimizer.param_groups[0]["lr"]})

    def save(self) -> str:
        records = lambda: {TOKENS: self.tokens.record}  # noqa: E731
        return train_state.save_step(self.log_dir, self.trainee, self.progress, self.procs, self.config, records,
                                       self.metrics.write)


def train(experiment: Experiment, tokens: TokenData, config: GeneratorTrainingConfig, procs: Processes) -> int:
    log_dir = prepare(experiment, config, procs)
    start = find_start(experiment, procs)
    progress = start.progress
    if finished(progress, config, procs):
        return 0
    check_tokens(start, tokens)
    say(procs, f"training data: {tokens.describe()}")
    batches = token_batches(tokens, config.data.batch_size, procs.rank, procs.world_size, config.global_seed,
                            progress.data_position)
    trainee = build_trainee(config, procs, start)
    metrics = build_metrics(config, procs, log_dir, progress, trainee.model)
    seed_rngs(config.global_seed, procs, start)
    hooks = GeneratorSteps(config, tokens, procs, log_dir, progress, batches, trainee, metrics)
    run_steps(trainee, config, procs, progress, metrics, hooks, start.path if start.resuming else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
