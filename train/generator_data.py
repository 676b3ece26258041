"""The token generator's training data: the rows of a `flowmo_fast.tokenize` output folder (LFQ token ids) and
their class labels, as one endless, resumable stream of batches per rank.

Labels are the shards' own (`TokenShards.labels`, `.class_names`): a data set without classes trains an
unconditional generator. The stream is the image loader's: `flowmo_fast.formats.data.ShardedBatchSampler` deals each rank its share of a fresh
permutation per epoch (`seed + epoch`), and `start` (the samples this rank already drew, a checkpoint's
`data_position`) continues it exactly. Rows are read from the memory-mapped shards in the training process: a
batch is a gather of a few KB, no loader workers needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch import Tensor

from flowmo_fast.formats.data import DataError, ShardedBatchSampler
from flowmo_fast.formats.token_shards import TokenShards


@dataclass(frozen=True)
class TokenBatch:
    """One batch of token rows: ids [B, tokens_per_image] int64 and labels [B] int64 (None: no classes)."""

    ids: Tensor
    labels: Optional[Tensor]

    def __len__(self) -> int:
        return self.ids.shape[0]

    def tensor_split(self, n: int) -> list["TokenBatch"]:
        """n micro-batches (as `Tensor.tensor_split`), for gradient accumulation."""
        labels = self.labels.tensor_split(n) if self.labels is not None else [None] * n
        return [TokenBatch(ids, lab) for ids, lab in zip(self.ids.tensor_split(n), labels)]

    def to(self, device: torch.device, non_blocking: bool = False) -> "TokenBatch":
        labels = self.labels.to(device, non_blocking=non_blocking) if self.labels is not None else None
        return TokenBatch(self.ids.to(device, non_blocking=non_blocking), labels)


@dataclass(frozen=True)
class TokenLayout:
    """What the token shards hold, as the generator needs it: the tokenizer's code and the data set's classes."""

    code_length: int
    context_dim: int
    bits: int  # codebook_size_for_entropy: bits per token id
    num_classes: int  # 0: the shards have no class labels


@dataclass(frozen=True)
class TokenData:
    """A tokenize output folder as the generator's trainer sees it."""

    shards: TokenShards
    labels: Optional[np.ndarray]  # [len] int64 class of each row; None: a data set without classes
    class_names: Optional[list[str]]  # label k is class_names[k]; None: no classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names) if self.class_names is not None else 0

    @property
    def tokens_per_image(self) -> int:
        return self.shards.spec.row_shape[0]

    @property
    def vocab_size(self) -> int:
        return self.shards.spec.vocab_size

    @property
    def layout(self) -> TokenLayout:
        m = self.shards.manifest["config"]["model"]  # the tokenizer's config
        return TokenLayout(m["code_length"], m["context_dim"], m["codebook_size_for_entropy"], self.num_classes)

    @property
    def record(self) -> dict:
        """What a generator checkpoint records of its training tokens (`flowmo_fast.maskgit.model.TokenSource`): the
        tokenizer checkpoint they were made with (path, sha256, which), its config, the token spec, the classes."""
        manifest = self.shards.manifest
        return {"checkpoint": dict(manifest["checkpoint"]), "config": manifest["config"],
                "tokens": manifest["tokens"], "class_names": self.class_names}

    def describe(self) -> str:
        classes = f"{self.num_classes} classes" if self.labels is not None else "no classes"
        return (f"{len(self.shards)} rows of {self.tokens_per_image} token ids (vocabulary {self.vocab_size}) in "
                f"{self.shards.folder}, {classes}")


def open_tokens(folder: str) -> TokenData:
    """The token rows of `folder`, refused in one line (a DataError) unless they are LFQ token ids."""
    try:
        shards = TokenShards(folder)
        labels, class_names = shards.labels, shards.class_names
    except (FileNotFoundError, ValueError) as e:  # no manifest, unfinished, not tokenize's format, no classes record
        raise DataError(f"--tokens {folder}: {e}") from None
    spec = shards.spec
    if spec.kind != "ids":
        raise DataError(
            f"--tokens {folder} holds {spec.kind} (rows {spec.dtype} {list(spec.row_shape)}: a KL checkpoint's "
            "continuous code), not token ids: the generator predicts discrete tokens; tokenize with an LFQ "
            "checkpoint (flowmo_lo, flowmo_hi)"
        )
    if len(shards) == 0:
        raise DataError(f"--tokens {folder} holds no rows (every image failed to decode): tokenize other images")
    data = TokenData(shards, labels, class_names)
    layout = data.layout
    if (data.tokens_per_image, data.vocab_size) != (layout.code_length * layout.context_dim // layout.bits, 2**layout.bits):
        raise DataError(
            f"--tokens {folder}: rows of {data.tokens_per_image} ids below {data.vocab_size} do not fit the "
            f"tokenizer config in its manifest (code_length {layout.code_length}, context_dim {layout.context_dim}, "
            f"codebook_size_for_entropy {layout.bits}): rerun tokenize into a new folder"
        )
    return data


def token_batches(data: TokenData, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                  start: int = 0) -> Iterator[TokenBatch]:
    """This rank's endless stream of batches of `batch_size` rows, after the first `start` samples of it."""
    sampler = ShardedBatchSampler(data.shards, batch_size, rank, world_size, seed, shuffle=True, start=start)
    for keys in sampler:
        rows = np.array([row for row, _ in keys], dtype=np.int64)  # (row, crop seed): tokens need no crop
        ids = torch.from_numpy(np.stack([data.shards[r] for r in rows]).astype(np.int64))  # [B, T]
        labels = torch.from_numpy(data.labels[rows]) if data.labels is not None else None
        yield TokenBatch(ids, labels)
