"""Command line of the training commands: upstream's flags, `--preset`, and dotlist config overrides
(`model.context_dim=18 ...`), read into an `Experiment` and a config at each command's `main`."""

from __future__ import annotations

import argparse
from typing import Iterable, Optional, Sequence

from flowmo_fast.config import PRESETS, Config, load_config
from train.start import Experiment

# Upstream's launcher (SLURM) flags: accepted so upstream command lines run unchanged, otherwise unused.
UPSTREAM_LAUNCHER_FLAGS = {
    "--account": str, "--num-tasks-per-node": int, "--slurm-partition": str, "--nodelist": str, "--exclude": str,
    "--mem-per-task-gb": int, "--cpus-per-task": int, "--eval-num-tasks-per-node": int,
    "--eval-slurm-partition": str, "--eval-nodelist": str, "--eval-exclude": str, "--eval-mem-per-task-gb": int,
    "--eval-cpus-per-task": int, "--nodes": int, "--slurm-qos": str, "--eval-slurm-qos": str, "--modes": str,
}


def build_parser(prog: str, description: str, presets: Iterable[str] = PRESETS) -> argparse.ArgumentParser:
    """The training commands' flags; `presets`: the names --preset accepts (default: the tokenizer's)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Any further argument of the form section.key=value overrides the config "
        "(e.g. model.context_dim=18 trainer.max_steps=1300000); see flowmo_fast/config.py for the keys.",
    )
    parser.add_argument("--results-dir", default="results", help="parent folder of experiments (default: results)")
    parser.add_argument("--experiment-name", default="my_experiment", help="folder under --results-dir for logs and checkpoints")
    parser.add_argument("--resume-from-ckpt", default="", help="start from this checkpoint's weights and step count: "
                        "a file, or flowmo_lo / flowmo_hi (the published ones, by name); a checkpoint already in the "
                        "experiment folder takes precedence")
    parser.add_argument("--preset", choices=sorted(presets), default=None, help="a named config to start from")
    launcher = parser.add_argument_group("upstream launcher flags (accepted, unused)")
    for flag, kind in UPSTREAM_LAUNCHER_FLAGS.items():
        launcher.add_argument(flag, type=kind, help=argparse.SUPPRESS)
    return parser


def parse(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> tuple[argparse.Namespace, list[str]]:
    """-> (flags, dotlist overrides); anything else is an error that says what is accepted."""
    args, rest = parser.parse_known_args(argv)
    for item in rest:
        if item.startswith("-") or "=" not in item:
            parser.error(f"unrecognized argument {item!r}: flags are listed by --help; config overrides look like section.key=value")
    return args, rest


def experiment(args: argparse.Namespace) -> Experiment:
    """The run the flags name (--results-dir, --experiment-name, --resume-from-ckpt)."""
    return Experiment(args.results_dir, args.experiment_name, args.resume_from_ckpt)


def make_config(base: Sequence[str], overrides: Sequence[str], preset: Optional[str]) -> Config:
    """Config = defaults, then `preset`, then `base` (command defaults), then the user's overrides."""
    try:
        return load_config(list(base) + list(overrides), preset=preset)
    except ValueError as e:
        raise SystemExit(f"error: bad config: {e}") from None
