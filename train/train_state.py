"""Training checkpoints: the one module that writes and reads the keys of a training checkpoint.

A file holds upstream's layout (`total_steps`, `model_state_dict`, `model_ema_state_dict`, in
`<experiment>/checkpoints/%08d.pth`) plus the run's `config` and what an exact resume needs: the optimizer (keyed
by parameter name, so DDP and FSDP files are the same), every rank's RNG states, the data position, the
weight-norm targets, and the trainer's own records (FlowMo: the LLM of the LLM type; the token generator: its
tokens). Every rank takes part in `save` (FSDP gathers whole tensors); rank 0 writes atomically.

Any trainer uses it: a trainee is whatever has a `model`, its `ema` and `optimizer` (and, optionally, weight
`norms`); a config is whatever has `to_dict()`. Starting from a checkpoint: `progress_of` (before the data and
model exist: the data position, a frozen encoder), `load_model` (the weights, before wrapping), `restore` (EMA,
norms, optimizer of an exact resume), `load_rng` (last, after seeding: this rank's random streams).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Protocol

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict

from flowmo_fast.distributed import Processes, gather_objects
from flowmo_fast.formats.checkpoint import (  # noqa: F401 (the run's checkpoint files, shared with eval.watch)
    WHICH,
    CheckpointError,
    atomic_save,
    check_state_dict,
    checkpoint_path,
    list_checkpoints,
    read_checkpoint,
    select_state_dict,
    step_of,
)
from train import parallel
from train.ema import EMA

OPTIMIZER = "optimizer_state_dict"
RNG = "rng_state_per_rank"
NORMS = "initial_norms"
WORLD_SIZE = "world_size"
CONFIG = "config"
WHOLE_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


class Trainee(Protocol):
    """What a checkpoint holds of a trainer (FlowMo's `train.tokenizer.Trainee`, the token generator's): the model,
    its EMA and optimizer; a `norms` attribute (WeightNormFixer or None) is saved when present."""

    model: nn.Module
    ema: EMA
    optimizer: torch.optim.Optimizer


class Config(Protocol):
    def to_dict(self) -> dict: ...


class Retention(Protocol):
    keep_every: int


class TrainerConfig(Config, Protocol):
    trainer: Retention  # keep_every: upstream's retention (`prune`)


@dataclass
class Progress:
    """Where a run stands: optimizer steps taken and samples each rank has drawn from its data stream."""

    total_steps: int = 0
    data_position: int = 0
    encoder_frozen: bool = False

    def state_dict(self) -> dict:
        return {"total_steps": self.total_steps, "data_position": self.data_position,
                "encoder_frozen": self.encoder_frozen}


def progress_of(ckpt: Mapping, world_size: int, log=print) -> Progress:
    """Progress stored in a checkpoint, the data position rescaled if the number of ranks changed (upstream's
    files: their step count, the data from its start)."""
    stored = Progress(**{k: ckpt[k] for k in Progress().state_dict() if k in ckpt})
    position, saved_world = int(stored.data_position), int(ckpt.get(WORLD_SIZE, world_size))
    if saved_world != world_size:
        position = position * saved_world // world_size
        log(f"note: checkpoint written by {saved_world} ranks, resuming on {world_size}: data order and RNG streams differ")
    return Progress(int(stored.total_steps), position, bool(stored.encoder_frozen))


def steps_of(ckpt: Mapping) -> int:
    """The optimizer steps a checkpoint's run had taken (a start from its weights counts on from there)."""
    return int(ckpt.get("total_steps", 0))


def save(
    path: str, trainee: Trainee, progress: Progress, procs: Processes, config: Config,
    records: Callable[[], Mapping[str, Any]] = dict,
) -> None:
    """Write one training checkpoint. Every rank calls it (FSDP gathers the whole tensors, every rank's RNG
    states are gathered); rank 0 writes `path` atomically. `records()`: the trainer's own entries (rank 0)."""
    keep = procs.is_main
    ckpt = {
        WHICH["model"]: parallel.full_state_dict(trainee.model.state_dict(), keep),
        WHICH["ema"]: parallel.full_state_dict(trainee.ema.tensors, keep),
        OPTIMIZER: get_optimizer_state_dict(trainee.model, trainee.optimizer, options=WHOLE_ON_CPU),
        RNG: gather_objects(capture_rng(), procs),
    }
    if not keep:
        return
    norms = getattr(trainee, "norms", None)
    ckpt.update(progress.state_dict())
    ckpt[NORMS] = norms.state_dict() if norms is not None else None
    ckpt[WORLD_SIZE] = procs.world_size
    ckpt[CONFIG] = config.to_dict()
    ckpt.update(records())
    atomic_save(ckpt, path)


def save_step(
    log_dir: str, trainee: Trainee, progress: Progress, procs: Processes, config: TrainerConfig,
    records: Callable[[], Mapping[str, Any]], note: Callable[[str], None],
) -> str:
    """The run's checkpoint of this step (`save`: every rank calls it), then, on rank 0, upstream's retention
    (`config.trainer.keep_every`) and a "saved PATH" line through `note`. Returns the path."""
    path = checkpoint_path(log_dir, progress.total_steps)
    save(path, trainee, progress, procs, config, records)
    if procs.is_main:
        prune(log_dir, config.trainer.keep_every)
        note(f"saved {path}")
    return path


def load_model(model: nn.Module, ckpt: Mapping, path: str) -> None:
    """A checkpoint's weights (checked against the model) into the model, before it is wrapped or sharded."""
    state = select_state_dict(ckpt, "model", path)
    check_state_dict(model, state, path)
    model.load_state_dict(state)


def restore(trainee: Trainee, ckpt: Mapping, path: str) -> None:
    """An exact resume's EMA, weight-norm targets and optimizer state (upstream's files have no optimizer)."""
    trainee.ema.load(select_state_dict(ckpt, "ema", path))
    norms = getattr(trainee, "norms", None)
    if norms is not None and ckpt.get(NORMS):
        norms.load_state_dict(ckpt[NORMS])
    if OPTIMIZER in ckpt:
        set_optimizer_state_dict(
            trainee.model, trainee.optimizer, ckpt[OPTIMIZER], options=StateDictOptions(full_state_dict=True)
        )


def load_rng(ckpt: Mapping, procs: Processes) -> None:
    """This rank's RNG streams where the checkpoint's run stopped (when saved by as many ranks)."""
    states = ckpt.get(RNG, [])
    if len(states) == procs.world_size:
        restore_rng(states[procs.rank])


def prune(log_dir: str, keep_every: int) -> list[str]:
    """Upstream retention: keep the newest two and every multiple of `keep_every`; returns the removed."""
    removed = []
    for path in list_checkpoints(log_dir)[:-2]:
        if step_of(path) % keep_every:
            os.remove(path)
            removed.append(path)
    return removed


def newest_readable(log_dir: str, log=print) -> Optional[tuple[str, dict]]:
    """(path, contents) of the newest checkpoint that loads; unreadable ones are reported and passed over."""
    for path in reversed(list_checkpoints(log_dir)):
        try:
            return path, read_checkpoint(path)
        except CheckpointError as e:
            log(f"warning: skipping unreadable checkpoint: {e}")
    return None


def capture_rng() -> dict:
    """This process's RNG states (torch CPU and CUDA, numpy, python), as tensors and plain values."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [name, torch.from_numpy(key.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    name, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
