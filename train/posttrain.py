"""Post-training: `torchrun --nproc-per-node=N -m train.posttrain --experiment-name X --resume-from-ckpt PRETRAINED
[key=value ...]` (PRETRAINED: a checkpoint file, or flowmo_lo / flowmo_hi: the published ones, by name).
Backpropagates through a k-step sample (`model.posttrain_sample`) with the ResNet-50 logit loss, at upstream's
post-training settings (POSTTRAIN below; any of them can be overridden).

The config starts from the one stored in the starting checkpoint (flowmo-fast checkpoints carry theirs;
for upstream files the architecture is read off the weights), unless --preset is given. Training runs
until trainer.max_steps, counted from the checkpoint's step: set it above that step."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from flowmo_fast.config import Config
from flowmo_fast.formats.checkpoint import CheckpointError, read_config
from flowmo_fast.formats.pretrained import resolve_checkpoint
from train import cli, train_state
from train.tokenizer import run

# Upstream's post-training command (README): lower LR and batch, sample-level ResNet loss.
POSTTRAIN = [
    "model.posttrain_sample=true",
    "opt.lpips_mode=resnet",
    "opt.lpips_weight=0.01",
    "opt.lr=5.0e-5",
    "data.batch_size=8",
    "opt.n_grad_acc=2",
]


def config_from_checkpoint(path: str, overrides: Sequence[str]) -> Config:
    """The starting checkpoint's config (stored, or inferred from its weights) + POSTTRAIN + `overrides`;
    `path` may be a published name (flowmo_lo, flowmo_hi)."""
    try:
        return read_config(resolve_checkpoint(path), which="model", overrides=POSTTRAIN + list(overrides))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.build_parser("python -m train.posttrain", "FlowMo post-training (loss on a differentiable sample).")
    args, overrides = cli.parse(parser, argv)
    experiment = cli.experiment(args)
    if not experiment.resume_from_ckpt and not train_state.list_checkpoints(experiment.log_dir):
        parser.error("--resume-from-ckpt PATH (a pre-trained checkpoint) is required to start post-training")
    if args.preset or not args.resume_from_ckpt:
        config = cli.make_config(POSTTRAIN, overrides, args.preset)
    else:
        config = config_from_checkpoint(args.resume_from_ckpt, overrides)
    return run(experiment, config)


if __name__ == "__main__":
    sys.exit(main())
