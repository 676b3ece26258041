"""Checkpoint retention (upstream): after each save, keep every multiple of `keep_every` plus the newest two."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from flowmo_fast.config import load_config
from flowmo_fast.distributed import processes
from flowmo_fast.formats.checkpoint import checkpoint_path, list_checkpoints, step_of
from flowmo_fast.overrides import with_overrides
from train.ema import EMA
from train.generator_config import make_config
from train.generator_data import TokenLayout
from train.train_state import Progress, prune, save_step


def save_empty(run_dir: Path, step: int) -> None:
    path = Path(checkpoint_path(str(run_dir), step))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def kept(run_dir: Path) -> list[int]:
    return [step_of(p) for p in list_checkpoints(str(run_dir))]


def test_each_save_keeps_the_multiples_and_the_newest_two(tmp_path):
    """A run saving every 4 steps with keep_every=20: after each save and prune, the multiples of 20 so far
    and the two newest remain; the newest two differ from the newest one whenever the newest is no multiple."""
    saved = []
    for step in range(4, 44, 4):
        save_empty(tmp_path, step)
        saved.append(step)
        removed = prune(str(tmp_path), keep_every=20)
        expected = sorted({s for s in saved if s % 20 == 0} | set(saved[-2:]))
        assert kept(tmp_path) == expected, step
        dropped_out = saved[-3:-2]  # the one that just stopped being among the newest two
        assert [step_of(p) for p in removed] == [s for s in dropped_out if s % 20]
    assert kept(tmp_path) == [20, 36, 40]


def test_the_second_newest_survives_when_it_is_no_multiple(tmp_path):
    for step in (5, 10, 15, 20, 25, 35):
        save_empty(tmp_path, step)
    prune(str(tmp_path), keep_every=10)
    assert kept(tmp_path) == [10, 20, 25, 35]
    prune(str(tmp_path), keep_every=10)  # idempotent
    assert kept(tmp_path) == [10, 20, 25, 35]


class Trainee:
    """The smallest trainee save_step can write: a model, its EMA and its optimizer."""

    def __init__(self):
        self.model = nn.Linear(2, 2)
        self.ema = EMA(self.model, decay=0.9, every=1)
        self.optimizer = torch.optim.Adam(self.model.parameters())


RETENTION = ["trainer.checkpoint_every=1", "trainer.keep_every=3"]  # saves every step, keeps every third


@pytest.mark.parametrize("trainer", ["tokenizer", "generator"])
def test_save_step_keeps_by_keep_every_not_by_the_save_interval(trainer, tmp_path):
    """Each trainer's own config, saving every step with keep_every=3: after each save the multiples of 3 and the
    newest two remain (pruning by checkpoint_every=1 would keep everything)."""
    if trainer == "tokenizer":
        config = with_overrides(load_config(preset="tiny"), RETENTION)
    else:
        config = make_config("tiny", TokenLayout(code_length=4, context_dim=18, bits=9, num_classes=0), RETENTION)
    notes = []
    with processes("cpu", always_group=True) as procs:
        for step in range(1, 8):
            path = save_step(str(tmp_path), Trainee(), Progress(total_steps=step), procs, config, dict, notes.append)
            assert path == checkpoint_path(str(tmp_path), step) and notes[-1] == f"saved {path}"
            assert kept(tmp_path) == sorted({s for s in range(3, step + 1, 3)} | {max(step - 1, 1), step}), step
    assert kept(tmp_path) == [3, 6, 7]
