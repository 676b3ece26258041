"""Pre-training: `torchrun --nproc-per-node=N -m train.pretrain --experiment-name X [--preset P] [key=value ...]`
(or `python -m train.pretrain ...` for one process). Rerunning the same command resumes from the newest
checkpoint in results/X/checkpoints."""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from train import cli
from train.tokenizer import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = cli.build_parser("python -m train.pretrain", "FlowMo pre-training (diffusion autoencoder loss).")
    args, overrides = cli.parse(parser, argv)
    config = cli.make_config([], overrides, args.preset)
    return run(cli.experiment(args), config)


if __name__ == "__main__":
    sys.exit(main())
