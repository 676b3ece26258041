"""How any trainer starts (the tokenizer's, train.tokenizer, and the token generator's, train.generator): the
experiment it runs (`Experiment`, from the command's flags), its processes, the experiment folder, where training
starts (`StartPoint`: this experiment's newest checkpoint, another checkpoint's weights, or scratch), the RNG
seeds, and the size line."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from flowmo_fast.distributed import Processes, processes
from flowmo_fast.formats.checkpoint import CheckpointError, read_checkpoint
from flowmo_fast.formats.data import DataError
from flowmo_fast.formats.pretrained import resolve_checkpoint
from train import train_state
from train.loop import NonFiniteLoss, say
from train.memory import DoesNotFit
from train.train_state import Progress


@dataclass(frozen=True)
class Experiment:
    """Which run a training command continues or starts (its flags): the folder results_dir/experiment_name, and
    the checkpoint whose weights and step count start a new run ("" : none)."""

    results_dir: str = "results"
    experiment_name: str = "my_experiment"
    resume_from_ckpt: str = ""  # a file, or flowmo_lo / flowmo_hi; this experiment's own checkpoints take precedence

    @property
    def log_dir(self) -> str:
        return os.path.join(self.results_dir, self.experiment_name)


def in_processes(train: Callable[[Processes], int]) -> int:
    """`train(procs)` in the command's processes (a group, even of one: the collectives run unchanged); a
    non-finite loss (exit 1) or a missing or unusable input (exit 2) ends it with one line. Any trainer's."""
    with processes(always_group=True) as procs:
        try:
            return train(procs)
        except NonFiniteLoss as e:
            say(procs, f"error: {e}")
            return 1
        except (FileNotFoundError, CheckpointError, DataError, DoesNotFit) as e:  # an input it cannot use: say which
            say(procs, f"error: {e}")
            return 2


@dataclass
class StartPoint:
    """Where training starts: a checkpoint (its path and contents) or nothing, and the progress to continue."""

    path: str  # "" from scratch
    ckpt: Optional[dict]
    progress: Progress
    resuming: bool  # exact resume from this experiment's own checkpoint (optimizer, EMA, RNG, data position)


def find_start(experiment: Experiment, procs: Processes) -> StartPoint:
    """This experiment's newest checkpoint (exact resume), else --resume-from-ckpt's weights and step count
    (upstream: fresh optimizer and EMA), else from scratch."""
    newest = train_state.newest_readable(experiment.log_dir, lambda m: say(procs, m))
    if newest is not None:
        path, ckpt = newest
        progress = train_state.progress_of(ckpt, procs.world_size, lambda m: say(procs, m))
        say(procs, f"resuming from {path} (step {progress.total_steps})")
        return StartPoint(path, ckpt, progress, resuming=True)
    if experiment.resume_from_ckpt:
        path = resolve_checkpoint(experiment.resume_from_ckpt)  # a published name -> its file in the Hugging Face cache
        ckpt = read_checkpoint(path)
        progress = Progress(total_steps=train_state.steps_of(ckpt))
        say(procs, f"starting from the weights of {path} (step {progress.total_steps})")
        return StartPoint(path, ckpt, progress, resuming=False)
    return StartPoint("", None, Progress(), resuming=False)


def prepare(experiment: Experiment, config, procs: Processes) -> str:
    """The experiment folder (created; rank 0 writes `config.to_dict()`, any trainer's config, as config.json)
    and CUDA settings; returns the folder."""
    log_dir = experiment.log_dir
    os.makedirs(log_dir, exist_ok=True)
    if procs.device.type == "cuda":
        torch.set_float32_matmul_precision("medium")
        torch.backends.cudnn.benchmark = True
    save_config(log_dir, config, procs)
    say(procs, f"{procs.world_size} process(es) on {procs.device.type}; experiment folder {log_dir}")
    return log_dir


def save_config(log_dir: str, config, procs: Processes) -> None:
    """Rank 0 writes the config the run trains with (`config.to_dict()`, any trainer's) as log_dir/config.json."""
    if procs.is_main:
        with open(os.path.join(log_dir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2)


def say_size(procs: Processes, name: str, model: torch.nn.Module, config) -> None:
    """The trained model's parameter count and how it is spread over the processes. Any trainer's."""
    n_params = sum(p.numel() for p in model.parameters())
    layout = "FSDP2" if config.trainer.fsdp else "DDP" if procs.world_size > 1 else "one process"
    say(procs, f"{name}: {n_params / 1e6:.2f}M parameters; {layout}")


def seed_rngs(global_seed: int, procs: Processes, start: StartPoint) -> None:
    """Upstream's per-rank seed (from the config's `global_seed`); a resumed run continues every rank's streams
    where they stopped."""
    seed = global_seed * procs.world_size + procs.rank
    torch.manual_seed(seed)
    np.random.seed(seed)
    if start.resuming:
        train_state.load_rng(start.ckpt, procs)
