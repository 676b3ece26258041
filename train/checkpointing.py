"""Training checkpoints: upstream's layout (`total_steps`, `model_ema_state_dict`, `model_state_dict`,
in `<experiment>/checkpoints/%08d.pth`) plus `config` and what an exact resume needs: the optimizer
(keyed by parameter name, so DDP and FSDP files are the same), every rank's RNG states, the data position
and the weight-norm targets. Rank 0 writes atomically; retention and resume follow upstream."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from flowmo_fast.checkpoint import (  # noqa: F401 (the run's checkpoint files, shared with eval.watch)
    CheckpointError, checkpoint_path, list_checkpoints, read_checkpoint, save_checkpoint, step_of,
)


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


@dataclass
class Progress:
    """Where a run stands: optimizer steps taken and samples each rank has drawn from its data stream."""

    total_steps: int = 0
    data_position: int = 0
    encoder_frozen: bool = False


def save(
    path: str,
    config,
    model_state: dict,
    ema_state: dict,
    progress: Progress,
    optimizer_state: dict,
    rng_per_rank: list,
    initial_norms: Optional[dict],
    world_size: int,
) -> None:
    """Write one checkpoint (rank 0 only; state dicts already whole and on the CPU)."""
    save_checkpoint(
        path,
        model_state,
        ema_model=ema_state,
        total_steps=progress.total_steps,
        config=config,
        extra={
            "optimizer_state_dict": optimizer_state,
            "rng_state_per_rank": rng_per_rank,
            "data_position": progress.data_position,
            "encoder_frozen": progress.encoder_frozen,
            "initial_norms": initial_norms,
            "world_size": world_size,
        },
    )


def progress_of(ckpt: dict, world_size: int, log=print) -> Progress:
    """Progress stored in a checkpoint, the data position rescaled if the number of ranks changed."""
    position = int(ckpt.get("data_position", 0))
    saved_world = int(ckpt.get("world_size", world_size))
    if saved_world != world_size:
        position = position * saved_world // world_size
        log(f"note: checkpoint written by {saved_world} ranks, resuming on {world_size}: data order and RNG streams differ")
    return Progress(int(ckpt["total_steps"]), position, bool(ckpt.get("encoder_frozen", False)))
