"""The data position counts the samples drawn, not the images that decoded: with one undecodable image in every
batch, a checkpoint's position is steps x batch size, and a run resumed from it continues exactly as a straight
run (a position short by the skipped images would replay samples and change the weights)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from train_helpers import pretrain_tiny_in_process

BATCH = 4  # the whole folder: every batch draws all four files, one of which does not decode


def image_folder(root):
    root.mkdir()
    for i in range(3):
        pixels = np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        (root / f"img_{i}.png").write_bytes(buffer.getvalue())
    (root / "img_3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def train_to(results, name: str, steps: int, data, capsys) -> dict:
    return pretrain_tiny_in_process(results, name, steps, data, BATCH, capsys, ("skipped an image that does not decode: img_3.png",))


def test_position_counts_drawn_samples_and_a_resume_continues_exactly(lone_process, tmp_path, capsys):
    data = image_folder(tmp_path / "images")
    straight = train_to(tmp_path, "straight", 3, data, capsys)
    assert straight["data_position"] == 3 * BATCH
    first = train_to(tmp_path, "resumed", 1, data, capsys)
    assert first["data_position"] == BATCH
    resumed = train_to(tmp_path, "resumed", 3, data, capsys)  # the same command, further: resumes at step 1
    assert resumed["data_position"] == 3 * BATCH
    for name, value in straight["model_state_dict"].items():
        assert torch.equal(resumed["model_state_dict"][name], value), name
