"""Pre-training on WebDataset shards (data.data_dir = a brace pattern): the trainer reads them, skips and names a
sample that does not decode, and a run resumed from its checkpoint continues exactly as a straight run (the rows
are indexed in a fixed order, so the data position names the same samples and random crops again)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from shard_helpers import write_shards
from train_helpers import pretrain_tiny_in_process

BATCH = 4  # of 5 samples: batches run across epochs (a new shuffle each)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def train_to(results, name: str, steps: int, data, capsys) -> dict:
    return pretrain_tiny_in_process(results, name, steps, data, BATCH, capsys, ("training data: 5 images in 2 WebDataset shard(s)", "skipped an image that does not decode: train-000001.tar/s3.png"))


def test_training_on_shards_resumes_exactly(lone_process, tmp_path, capsys):
    samples = [{"__key__": f"s{i}", "png": png(i), "cls": i % 2} for i in range(5)]
    samples[3]["png"] = b"\x89PNG\r\n\x1a\n truncated"
    data = write_shards(tmp_path / "shards", samples, per_shard=3)
    straight = train_to(tmp_path, "straight", 3, data, capsys)
    assert straight["data_position"] == 3 * BATCH
    train_to(tmp_path, "resumed", 1, data, capsys)
    resumed = train_to(tmp_path, "resumed", 3, data, capsys)  # the same command, further: resumes at step 1
    assert resumed["data_position"] == 3 * BATCH
    for name, value in straight["model_state_dict"].items():
        assert torch.equal(resumed["model_state_dict"][name], value), name
