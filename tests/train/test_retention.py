"""Checkpoint retention (upstream): after each save, keep every multiple of `keep_every` plus the newest two."""

from __future__ import annotations

from pathlib import Path

from flowmo_fast.formats.checkpoint import checkpoint_path, list_checkpoints, step_of
from train.train_state import prune


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
