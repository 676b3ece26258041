"""Process group setup for commands run plain (one process) or under torchrun, and gathering rows of results."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class Processes:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str, local_rank: int) -> torch.device:
    """"auto": this process's GPU if there is one, else the CPU; "cuda" / "cpu" force it."""
    if name not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device {name!r}; allowed: auto, cuda, cpu")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but PyTorch sees no CUDA device; use --device cpu")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def setup(device: str = "auto") -> Processes:
    """Join torchrun's process group (NCCL on GPUs, Gloo on CPUs) when launched by it; else one process."""
    if "RANK" not in os.environ:
        return Processes(0, 1, pick_device(device, 0))
    chosen = pick_device(device, int(os.environ.get("LOCAL_RANK", 0)))
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if chosen.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), dist.get_world_size(), chosen)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def gather_rows(rows: Tensor, procs: Processes) -> Tensor:
    """Every process's rows [n_r, ...] (n_r may differ) -> their concatenation in rank order, on the CPU."""
    if procs.world_size == 1:
        return rows.cpu()
    local = rows.to(procs.device)
    counts = [torch.zeros((), dtype=torch.long, device=procs.device) for _ in range(procs.world_size)]
    dist.all_gather(counts, torch.tensor(len(local), device=procs.device))
    longest = max(int(c) for c in counts)
    padded = local.new_zeros((longest, *local.shape[1:]))
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(procs.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts)]).cpu()


def gather_objects(value, procs: Processes) -> list:
    """Every process's picklable `value`, in rank order."""
    if procs.world_size == 1:
        return [value]
    out = [None] * procs.world_size
    dist.all_gather_object(out, value)
    return out
