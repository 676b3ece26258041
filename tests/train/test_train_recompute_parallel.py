"""Activation checkpointing (`trainer.activation_checkpointing`) composes with train.parallel's wrapping: under DDP
and under FSDP2 (each block its own unit, the checkpoint around it: FSDP2's hooks run inside the checkpoint and
again in the recompute), the reduced gradients equal those without checkpointing. Two Gloo processes on the CPU,
each with its own images; tolerance as tests/flowmo_fast/test_recompute.py (1e-6 of each tensor's largest entry)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flowmo_fast
from flowmo_fast.distributed import Processes
from train import parallel
from train.objective import FlowMoObjective

WORLD = 2
TOLERANCE = 1e-6


def gradients(wrapped, model, images: torch.Tensor, rank: int, checkpointed: bool) -> dict[str, torch.Tensor]:
    model.activation_checkpointing = checkpointed
    model.zero_grad(set_to_none=True)
    torch.manual_seed(10 + rank)  # the same times, noise and guidance dropout both ways
    loss, _ = wrapped(images)
    loss.backward()
    return {n: parallel.full_tensor(p.grad).clone() for n, p in model.named_parameters() if p.grad is not None}


def worst_gap(a: dict, b: dict) -> float:
    assert a.keys() == b.keys() and len(a) > 10
    return max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)).item() for k in a)


def check_rank(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        procs = Processes(rank, WORLD, rank, torch.device("cpu"))
        torch.manual_seed(0)
        whole = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny", overrides=["model.enc_depth=1"]))
        images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(rank)) * 2 - 1
        for fsdp in (False, True):
            model = copy.deepcopy(whole)
            config = flowmo_fast.load_config(preset="tiny", overrides=[f"trainer.fsdp={fsdp}"])
            objective = FlowMoObjective(model, None)
            wrapped = parallel.wrap(objective, model, config, procs)
            plain = gradients(wrapped, model, images, rank, checkpointed=False)
            checkpointed = gradients(wrapped, model, images, rank, checkpointed=True)
            assert worst_gap(plain, checkpointed) <= TOLERANCE, f"fsdp={fsdp}"
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_checkpointed_blocks_give_the_same_reduced_gradients_under_ddp_and_fsdp2(tmp_path):
    mp.spawn(check_rank, args=(str(tmp_path / "store"),), nprocs=WORLD)
