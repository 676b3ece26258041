"""train.train_state with a trainer that is not FlowMo's: any model with its EMA and optimizer, any config with
to_dict(), the trainer's own records; save then load_model + restore + load_rng gives the same state back."""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn

from flowmo_fast.distributed import processes
from flowmo_fast.formats.checkpoint import read_checkpoint
from train import train_state
from train.ema import EMA
from train.train_state import Progress


class Settings:
    def to_dict(self) -> dict:
        return {"width": 3}


class Trainee:
    """The smallest trainee: a model, its EMA and its optimizer (no weight norms)."""

    def __init__(self, seed: int):
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
        self.ema = EMA(self.model, decay=0.9, every=1)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)

    def step(self, i: int) -> None:
        self.optimizer.zero_grad()
        self.model(torch.randn(5, 3)).square().mean().backward()
        self.optimizer.step()
        self.ema.update(self.model, i)


def test_a_trainer_of_its_own_saves_and_restores_every_part(tmp_path):
    path = str(tmp_path / "00000003.pth")
    with processes("cpu", always_group=True) as procs:
        trained = Trainee(seed=0)
        for i in range(3):
            trained.step(i)
        progress = Progress(total_steps=3, data_position=15)
        train_state.save(path, trained, progress, procs, Settings(), records=lambda: {"tokens": {"sha256": "x"}})
        after_save = (torch.randn(4), np.random.rand(), random.random())  # the streams a resumed run continues

        ckpt = read_checkpoint(path)
        assert ckpt["config"] == {"width": 3} and ckpt["tokens"] == {"sha256": "x"}
        assert train_state.progress_of(ckpt, procs.world_size) == progress
        fresh = Trainee(seed=1)
        train_state.load_model(fresh.model, ckpt, path)
        train_state.restore(fresh, ckpt, path)
        train_state.load_rng(ckpt, procs)
        again = (torch.randn(4), np.random.rand(), random.random())
        assert torch.equal(again[0], after_save[0]) and again[1:] == after_save[1:]

    for a, b in zip(trained.model.state_dict().values(), fresh.model.state_dict().values()):
        assert torch.equal(a, b)
    for name, avg in trained.ema.tensors.items():
        assert torch.equal(avg, fresh.ema.tensors[name])
    # The optimizer's moments came back: one more identical step on both gives identical weights.
    torch.manual_seed(7)
    trained.step(3)
    torch.manual_seed(7)
    fresh.step(3)
    for a, b in zip(trained.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
