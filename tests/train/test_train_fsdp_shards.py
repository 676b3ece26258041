"""Weight-norm fixing and the EMA under FSDP2 work on the local shards: the same results as on whole weights,
with one all-reduce per step for all the l2 norms (none for per-row norms: FSDP2 shards rows) instead of one
per weight. Two Gloo processes on the CPU, the model sharded as train.parallel.wrap shards it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flowmo_fast
from train.ema import EMA
from train.norms import WeightNormFixer

WORLD = 2


def shard_like_training(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for tower in (model.encoder, model.decoder):
        for block in tower.double_blocks:
            fully_shard(block)
        fully_shard(tower)
    fully_shard(model)


def scale_all(model, factor: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(factor)


def worst_relative_gap(sharded, whole) -> float:
    gaps = []
    for (_, p), (_, q) in zip(sharded, whole):
        gaps.append(((p.full_tensor() - q).abs().max() / q.abs().max()).item())
    return max(gaps)


def check_rank(rank: int, store: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        for mode in ("l2", "channel"):
            check_mode(mode)
    finally:
        dist.destroy_process_group()


def check_mode(mode: str) -> None:
    from torch.distributed.tensor.debug import CommDebugMode

    torch.manual_seed(0)
    whole = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny"))
    sharded = copy.deepcopy(whole)
    shard_like_training(sharded)
    fixers = WeightNormFixer(sharded, mode), WeightNormFixer(whole, mode)
    emas = EMA(sharded, decay=0.9), EMA(whole, decay=0.9)
    for step, factor in enumerate((1.7, 0.6)):  # the second step reuses the cached shard targets
        for model, fixer, ema in zip((sharded, whole), fixers, emas):
            scale_all(model, factor)
            with CommDebugMode() as comm:
                fixer.apply(model)
                ema.update(model, step=10 * step)
            collectives = comm.get_total_counts()
            if model is sharded:
                assert collectives == (1 if mode == "l2" else 0), dict(comm.get_comm_counts())
    # reduction order only: a norm of the local shard alone would be off by ~sqrt(2)
    assert worst_relative_gap(sharded.named_parameters(), whole.named_parameters()) < 1e-5
    assert worst_relative_gap(emas[0].tensors.items(), emas[1].tensors.items()) < 1e-5


@pytest.mark.distributed
def test_norm_fixing_and_ema_on_shards_equal_whole_weights_with_one_all_reduce(tmp_path):
    mp.spawn(check_rank, args=(str(tmp_path / "store"),), nprocs=WORLD)
