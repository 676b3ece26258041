"""WebDataset tar shards made in the tests, with webdataset's own writer; importable by name from any test
(`from shard_helpers import ...`)."""

from __future__ import annotations

import os
from pathlib import Path

import webdataset

from flowmo_fast.formats.data import ImageFolderDataset


def write_shards(folder: Path, samples: list[dict], per_shard: int, stem: str = "train") -> str:
    """Samples ({"__key__": key, suffix: bytes or int, ...}) into folder/stem-000000.tar, ..., `per_shard` each
    -> the brace pattern naming them all."""
    folder.mkdir(parents=True, exist_ok=True)
    count = (len(samples) + per_shard - 1) // per_shard
    for k in range(count):
        with webdataset.TarWriter(str(folder / f"{stem}-{k:06d}.tar")) as writer:
            for sample in samples[k * per_shard : (k + 1) * per_shard]:
                writer.write(sample)
    return str(folder / f"{stem}-{{000000..{count - 1:06d}}}.tar")


def folder_as_shards(images: Path, folder: Path, per_shard: int) -> str:
    """The images of an image folder, in its row order, as shards: each image a sample with its file's own
    bytes under its extension, and a .cls of its class (the folder's label) when it has one -> the brace pattern."""
    dataset = ImageFolderDataset(str(images), 1)
    samples = []
    for i, (name, label) in enumerate(zip(dataset.names, dataset.labels)):
        stem, ext = os.path.splitext(os.path.basename(name))
        sample = {"__key__": f"{i:06d}_{stem}", ext[1:].lower(): (images / name).read_bytes()}
        samples.append({**sample, "cls": label} if label >= 0 else sample)
    return write_shards(folder, samples, per_shard)
