"""The processes of a command (train.pretrain, train.posttrain, eval.rfid, eval.watch, tokenize, detokenize):
how they start, which device each one uses, and the collectives that put their results back together.

Under torchrun every process joins one group, NCCL on CUDA (one GPU per local rank) and Gloo on the CPU, with a
Gloo side group on CUDA for the small CPU-side agreements (stop requests, objects) that must not wait on the GPU.
A command run as plain `python -m ...` is one process: without a group (eval, tokenize), or in a group of one
where the training code needs one (`always_group`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"
GROUP_TIMEOUT = datetime.timedelta(hours=1)  # long enough for rank 0 to write a checkpoint or a shard index


@dataclass(frozen=True)
class Processes:
    """This process's place among the command's processes."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    control_group: Optional[dist.ProcessGroup] = None  # Gloo, for CPU-side agreement beside NCCL; else None
    # The variables start_processes set for a group of one, with their earlier values (None: unset), which
    # stop_processes puts back.
    env_before: tuple[tuple[str, Optional[str]], ...] = ()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return dist.is_initialized()


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """"auto": this process's GPU if there is one, else the CPU; "cpu"; "cuda" (this process's GPU); "cuda:N".
    A CUDA device is made the current one, so kernels, streams and graphs land on it."""
    if name != "auto" and name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"device {name!r}; allowed: {DEVICE_CHOICES}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}, but PyTorch sees no CUDA device; use --device cpu")
    try:
        device = torch.device(name if name not in ("auto", "cuda") else f"cuda:{local_rank % torch.cuda.device_count()}")
    except RuntimeError:
        raise ValueError(f"device {name!r}; allowed: {DEVICE_CHOICES}") from None
    if device.index is None or device.index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    torch.cuda.set_device(device)
    return device


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_processes(
    device: str = "auto", always_group: bool = False, timeout: datetime.timedelta = GROUP_TIMEOUT
) -> Processes:
    """Join torchrun's process group (NCCL on CUDA, Gloo on the CPU), or be one process: without a group, or in a
    group of one with `always_group` (the training code's collectives then run unchanged; the RANK, WORLD_SIZE,
    ... variables it sets for that stay until `stop_processes`). `timeout`: how long a collective waits for the
    slowest process (a barrier after hours of work needs long)."""
    torchrun = "RANK" in os.environ
    if not torchrun and not always_group:
        return Processes(0, 1, 0, pick_device(device, 0))
    env_before = () if torchrun else set_env(
        RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
        MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()),
    )
    try:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        chosen = pick_device(device, local_rank)
        nccl = chosen.type == "cuda"
        if not dist.is_initialized():
            dist.init_process_group(
                "nccl" if nccl else "gloo", timeout=timeout, device_id=chosen if nccl else None
            )
        control = dist.new_group(backend="gloo", timeout=timeout) if nccl else None
    except BaseException:
        restore_env(env_before)
        raise
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank, chosen, control, env_before)


def stop_processes(procs: Optional[Processes] = None) -> None:
    """Tear the group down; with `procs`, put back the variables its start set."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if procs is not None:
        restore_env(procs.env_before)


def set_env(**values: str) -> tuple[tuple[str, Optional[str]], ...]:
    """Set environment variables; returns their earlier values (None: unset) for `restore_env`."""
    before = tuple((name, os.environ.get(name)) for name in values)
    os.environ.update(values)
    return before


def restore_env(before: tuple[tuple[str, Optional[str]], ...]) -> None:
    for name, value in before:
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@contextlib.contextmanager
def processes(
    device: str = "auto", always_group: bool = False, timeout: datetime.timedelta = GROUP_TIMEOUT
) -> Iterator[Processes]:
    """`start_processes` for the length of a `with` block; the group is torn down and the environment put back
    however the block ends."""
    procs = None
    try:
        procs = start_processes(device, always_group, timeout)
        yield procs
    finally:
        stop_processes(procs)


def barrier(procs: Processes) -> None:
    if procs.grouped and procs.world_size > 1:
        dist.barrier(group=procs.control_group)


def gather_objects(value, procs: Processes) -> list:
    """Every process's picklable `value`, in rank order (CPU side: the Gloo group where there is one)."""
    if procs.world_size == 1:
        return [value]
    out = [None] * procs.world_size
    dist.all_gather_object(out, value, group=procs.control_group)
    return out


def on_rank0(fn: Callable, procs: Processes):
    """fn() run on rank 0; every process gets its result, or raises its error."""
    box = [None]
    if procs.is_main:
        try:
            box = [(True, fn())]
        except Exception as e:  # raised on every rank below, so no rank waits forever
            box = [(False, e)]
    if procs.world_size > 1:
        dist.broadcast_object_list(box, src=0, group=procs.control_group)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def min_across_ranks(value: int, procs: Processes) -> int:
    """The smallest `value` of all processes (CPU side where there is a Gloo group)."""
    if procs.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.long, device="cpu" if procs.control_group or procs.device.type == "cpu" else procs.device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=procs.control_group)
    return int(t.item())


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


def spare_cpus() -> int:
    """The CPUs this process may use beside its own: the most loader workers that keep processes <= CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cpus - 1)
