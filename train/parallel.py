"""Training's side of several processes: DDP / FSDP2 wrapping, gradient sync control, whole tensors from shards
and a process's own shard of them, summing logged numbers, and agreeing to stop. The processes themselves start in flowmo_fast.distributed."""

from __future__ import annotations

import contextlib
import inspect
import signal
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flowmo_fast.distributed import Processes, min_across_ranks
from flowmo_fast.flowmo.model import FlowMo


def local_shard(t: Tensor) -> Tensor:
    """The part of `t` this process holds: a DTensor's local shard (in-place ops on it write through), else `t`.
    FSDP2 keeps parameters as DTensor shards; per-tensor work on them (norms, EMA) runs on the local shards,
    without a DTensor dispatch (and, for a norm, a collective) per tensor."""
    return t.to_local() if hasattr(t, "device_mesh") else t


_DDP_OPTIONS = inspect.signature(DistributedDataParallel.__init__).parameters


def wrap(objective: nn.Module, model: FlowMo, config, procs: Processes,
         units: Optional[Sequence[nn.Module]] = None) -> nn.Module:
    """DDP over the whole objective (default; no wrapper for a lone process), or FSDP2 `fully_shard` per unit,
    then the model (`trainer.fsdp=true`; parameters stay float32, bf16 comes from autocast as with DDP).
    `units`: the modules sharded one by one, inner first (default FlowMo's: each transformer block of a tower,
    then the tower). Parameters that get no gradient must already be frozen."""
    if not config.trainer.fsdp:
        if procs.world_size == 1:
            return objective  # nothing to synchronize
        # FlowMo's buffers are constants and the perceptual nets' are frozen: no per-forward buffer sync.
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers"
        return DistributedDataParallel(
            objective,
            device_ids=[procs.device.index] if procs.device.type == "cuda" else None,
            find_unused_parameters=False,
            gradient_as_bucket_view=True,
            **{no_buffer_sync: False},
        )
    from torch.distributed.fsdp import fully_shard

    if units is None:
        units = [unit for tower in (model.encoder, model.decoder) for unit in (*tower.double_blocks, tower)]
    for unit in units:
        fully_shard(unit)
    fully_shard(model)
    return objective


def gradient_sync(wrapped: nn.Module, model: FlowMo, enabled: bool):
    """Context for one micro-batch: gradients are reduced across ranks only when `enabled` (the last one)."""
    if isinstance(wrapped, DistributedDataParallel):
        return contextlib.nullcontext() if enabled else wrapped.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def full_tensor(t: Tensor) -> Tensor:
    """A (possibly sharded DTensor) tensor as a whole, detached tensor; collective for DTensors."""
    if hasattr(t, "full_tensor"):
        t = t.full_tensor()
    return t.detach()


def full_state_dict(tensors: dict[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """Whole tensors on the CPU (every rank must call: FSDP gathers); returned where `keep`, else {}."""
    out = {}
    for name, t in tensors.items():
        t = full_tensor(t)
        if keep:
            out[name] = t.cpu()
    return out


def sum_across_ranks(values: dict[str, Tensor], device: torch.device) -> dict[str, float]:
    """Sum named scalars over ranks (one all-reduce)."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().to(device) for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked.tolist()))


class StopRequest:
    """While active (a context), SIGTERM sets a flag; `agreed()` is true on every rank as soon as any rank got
    the signal, so all ranks stop after the same step (one small CPU all-reduce per call)."""

    def __init__(self, procs: Processes):
        self.procs = procs
        self.received = False
        self.previous = None

    def __enter__(self) -> "StopRequest":
        self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGTERM, self.previous)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def agreed(self) -> bool:
        if self.procs.world_size == 1:
            return self.received
        return min_across_ranks(0 if self.received else 1, self.procs) == 0
