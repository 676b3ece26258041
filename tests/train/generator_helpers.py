"""Token folders for the generator trainer's tests, written with flowmo_fast.formats.token_shards' own writer (the format
`flowmo_fast.tokenize` writes), so no tokenizer has to run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from flowmo_fast.config import load_config
from flowmo_fast.formats.token_shards import (
    INDEX,
    MANIFEST,
    TokenSpec,
    finished_manifest,
    index_text,
    new_manifest,
    read_shard_record,
    row_labels,
    shard_ranges,
    to_json,
    write_labels_if_changed,
    write_shard,
)

# The `tiny` tokenizer: 16 code positions of 18 bits = 32 tokens of 9 bits (FlowMo-Lo's grouping).
TINY_TOKENIZER = load_config(preset="tiny")
TOKENS_PER_IMAGE = 32
VOCAB = 512
TOKENIZER_SHA = "5e" * 32


def write_token_folder(folder: Path, rows: np.ndarray, labels: Optional[Sequence[int]] = None,
                       shard_size: int = 16, spec: Optional[TokenSpec] = None, sha256: str = TOKENIZER_SHA) -> Path:
    """A finished tokenize output folder holding `rows` (with `labels`: a class per row, classes named "c0",
    "c1", ...), made with a tokenizer whose file has the hash `sha256`."""
    spec = spec or TokenSpec("ids", "uint16", (TOKENS_PER_IMAGE,), VOCAB)
    os.makedirs(folder, exist_ok=True)
    checkpoint = {"path": "/models/tiny.pth", "sha256": sha256, "which": "ema"}
    data = {"source": "test rows", "image_size": 32, "num_images": len(rows), "names_sha256": "0" * 64}
    classes = [f"c{k}" for k in range(int(max(labels)) + 1)] if labels is not None else None
    planned = new_manifest(checkpoint, TINY_TOKENIZER.to_dict(), spec, data, shard_size, classes)
    ranges = shard_ranges(len(rows), shard_size)
    for k, items in enumerate(ranges):
        sources = [{"index": i, "name": f"img_{i}.png", **({"label": int(labels[i])} if labels is not None else {})}
                   for i in items]
        write_shard(str(folder), k, items, np.asarray(rows[items.start:items.stop], dtype=spec.dtype), sources, [])
    records = [read_shard_record(str(folder), k) for k in range(len(ranges))]
    if labels is not None:
        write_labels_if_changed(str(folder), row_labels(records))
    (Path(folder) / INDEX).write_text(index_text(records))
    (Path(folder) / MANIFEST).write_text(to_json(finished_manifest(planned, records)))
    return Path(folder)


def pattern_rows(n: int, classes: int = 2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n rows of a known answer: class c's rows are one fixed random pattern, with 1 token in 8 noise."""
    rng = np.random.default_rng(seed)
    patterns = rng.integers(0, VOCAB, (classes, TOKENS_PER_IMAGE))
    labels = np.arange(n) % classes
    rows = patterns[labels].copy()
    noise = rng.random(rows.shape) < 1 / 8
    rows[noise] = rng.integers(0, VOCAB, int(noise.sum()))
    return rows, labels
