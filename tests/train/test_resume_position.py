"""Resuming on another number of processes: each rank's data position is rescaled so that all ranks together
continue after the samples the saved run drew in all (never skipping any; at most one replayed per rank)."""

from __future__ import annotations

import pytest

from train.train_state import progress_of


def saved(position: int, world_size: int) -> dict:
    return {"total_steps": 30, "data_position": position, "world_size": world_size}


@pytest.mark.parametrize(
    "position, saved_world, world, expected",
    [
        (120, 2, 4, 60),  # more ranks: each has drawn fewer
        (120, 4, 2, 240),  # fewer ranks: each has drawn more
        (120, 2, 1, 240),
        (120, 1, 8, 15),
        (121, 2, 3, 80),  # 242 drawn in all; 3 x 80 = 240 (2 replayed, none skipped)
        (120, 2, 2, 120),
    ],
)
def test_position_is_rescaled_to_the_samples_drawn_by_all_ranks(position, saved_world, world, expected):
    notes = []
    progress = progress_of(saved(position, saved_world), world, notes.append)
    assert progress.data_position == expected
    assert progress.total_steps == 30
    drawn = position * saved_world
    assert drawn - world < progress.data_position * world <= drawn  # no sample skipped, < 1 per rank replayed
    assert bool(notes) == (saved_world != world)  # a world-size change is said


def test_there_and_back_returns_to_the_same_position():
    two_to_four = progress_of(saved(120, 2), 4, lambda m: None).data_position
    back = progress_of(saved(two_to_four, 4), 2, lambda m: None).data_position
    assert (two_to_four, back) == (60, 120)
