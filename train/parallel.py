"""Processes and devices: the process group (torchrun or a lone process), DDP / FSDP2 wrapping, gradient
sync control, and the few collectives the loop needs (agreeing to stop, averaging logged numbers)."""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import signal
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from flowmo_fast.model import FlowMo

_DDP_OPTIONS = inspect.signature(DistributedDataParallel.__init__).parameters


@dataclass
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Optional[dist.ProcessGroup]  # Gloo group for CPU-side agreement (no device sync)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> Distributed:
    """Join torchrun's process group, or make a one-process group when run as plain `python -m`.

    NCCL on CUDA (one GPU per local rank), Gloo on CPU."""
    if "RANK" not in os.environ:  # a lone process: same code path as torchrun with one worker
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), device_id=device if backend == "nccl" else None)
    control = dist.new_group(backend="gloo") if backend == "nccl" else None
    return Distributed(dist.get_rank(), dist.get_world_size(), local_rank, device, control)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(objective: nn.Module, model: FlowMo, config, env: Distributed) -> nn.Module:
    """DDP over the whole objective (default; no wrapper for a lone process), or FSDP2 `fully_shard` per
    transformer block, then per encoder/decoder and the model (`trainer.fsdp=true`; parameters stay float32,
    bf16 comes from autocast as with DDP). Parameters that get no gradient must already be frozen."""
    if not config.trainer.fsdp:
        if env.world_size == 1:
            return objective  # nothing to synchronize
        # FlowMo's buffers are constants and the perceptual nets' are frozen: no per-forward buffer sync.
        no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_OPTIONS else "broadcast_buffers"
        return DistributedDataParallel(
            objective,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=False,
            gradient_as_bucket_view=True,
            **{no_buffer_sync: False},
        )
    from torch.distributed.fsdp import fully_shard

    for tower in (model.encoder, model.decoder):
        for block in tower.double_blocks:
            fully_shard(block)
        fully_shard(tower)
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


def all_gather_objects(obj) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def sum_across_ranks(values: dict[str, Tensor], device: torch.device) -> dict[str, float]:
    """Sum named scalars over ranks (one all-reduce)."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().float().to(device) for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked.tolist()))


def min_across_ranks(value: int, env: Distributed) -> int:
    t = torch.tensor([value], dtype=torch.long, device="cpu" if env.control_group else env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=env.control_group)
    return int(t.item())


class StopRequest:
    """While active (a context), SIGTERM sets a flag; `agreed()` is true on every rank as soon as any rank got
    the signal, so all ranks stop after the same step (one small CPU all-reduce per call)."""

    def __init__(self, env: Distributed):
        self.env = env
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
        if self.env.world_size == 1:
            return self.received
        return min_across_ranks(0 if self.received else 1, self.env) == 0
