"""A model folder as `save_pretrained` writes it and `from_pretrained` reads it, for the tokenizer and the token
generator alike: `model.safetensors` (one state dict, keys as in our checkpoints), `config.json` (what rebuilds
the model) and `README.md` (the model card). Nothing is unpickled: safetensors and JSON only.

The weights file says what it holds in its safetensors metadata: which model (`flowmo_fast.kind`: tokenizer or
generator), which weights of the training run (`flowmo_fast.which`: ema, model, or "" when the caller did not say)
and the records a checkpoint keeps beside its weights (`flowmo_fast.records`, JSON: the LLM of the LLM type).

Every file is written atomically (`atomic_write`); a file that is missing, truncated, or not what it should be is
refused in one line naming it, what is wrong and what to do.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional

import torch
from torch import Tensor

from flowmo_fast.formats.checkpoint import WHICH, CheckpointError, atomic_write

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
FILES = (CONFIG, WEIGHTS, CARD)  # what a model folder holds, in the order they are fetched and written
Kind = Literal["tokenizer", "generator"]
LOADER: dict[Kind, str] = {"tokenizer": "flowmo_fast.from_pretrained",
                           "generator": "flowmo_fast.maskgit.from_pretrained"}
KIND, WHICH_KEY, RECORDS = "flowmo_fast.kind", "flowmo_fast.which", "flowmo_fast.records"
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header
AGAIN = "download or copy it again, or save it again with save_pretrained"


@dataclass(frozen=True)
class Weights:
    """A folder's model.safetensors: its tensors and what its metadata says of them."""

    path: str
    tensors: dict[str, Tensor]
    which: Optional[str]  # "ema" | "model"; None: not recorded
    records: dict


def is_model_folder(path: str) -> bool:
    """A folder with model.safetensors (config.json alone is also what a training run's folder holds)."""
    return os.path.isfile(os.path.join(path, WEIGHTS))


def write_model_folder(folder: str, tensors: Mapping[str, Tensor], kind: Kind, which: Optional[str],
                       records: Mapping[str, Any], config: Mapping[str, Any], card: str) -> None:
    """Write the three files (weights first, the card last), each atomically. `tensors` must be float32 where
    floating: a model cast for inference (bf16 matrices on CUDA) would be saved at lower precision."""
    from safetensors.torch import save

    lowered = sorted({str(t.dtype) for t in tensors.values() if t.is_floating_point() and t.dtype != torch.float32})
    if lowered:
        raise ValueError(
            f"save_pretrained: the model's weights are {', '.join(lowered)}, not float32 (a model loaded on CUDA for "
            "inference keeps its matrices in bf16): load it on the CPU (device='cpu') and save that"
        )
    metadata = {"format": "pt", KIND: kind, WHICH_KEY: which or "", RECORDS: json.dumps(dict(records))}
    data = save({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, metadata)
    atomic_write(os.path.join(folder, WEIGHTS), lambda f: f.write(data))
    atomic_write(os.path.join(folder, CONFIG), lambda f: f.write(json.dumps(config, indent=2).encode() + b"\n"))
    atomic_write(os.path.join(folder, CARD), lambda f: f.write(card.encode()))


def require(folder: str, name: str) -> str:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: a model folder of save_pretrained holds {', '.join(FILES)}; {AGAIN}"
        )
    return path


def read_config_json(folder: str) -> dict:
    """config.json as a dict, refused in one line when missing, not JSON (truncated) or not an object."""
    path = require(folder, CONFIG)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): a truncated or damaged file; {AGAIN}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} holds a JSON {type(config).__name__}, not a config object; {AGAIN}")
    return config


def safetensors_header(path: str) -> dict:
    """The JSON header of a safetensors file, after checking the file holds every byte it announces."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > MAX_HEADER:
            raise CheckpointError(f"{path} is not a safetensors file ({size} bytes, no safetensors header): {AGAIN}")
        raw = f.read(length)
    if len(raw) < length:
        raise CheckpointError(f"{path} is truncated: {size} bytes, shorter than its own header says; {AGAIN}")
    try:
        header = json.loads(raw)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, IndexError):
        raise CheckpointError(f"{path} is not a safetensors file (its header is not safetensors JSON): "
                              f"{AGAIN}") from None
    if size < 8 + length + end:
        raise CheckpointError(f"{path} is truncated: {size} bytes of the {8 + length + end} its header announces; "
                              f"{AGAIN}")
    return header


def read_weights(folder: str, kind: Kind, which: Optional[str] = None) -> Weights:
    """model.safetensors of `folder`, refused when missing, truncated, not safetensors, of the other model, or not
    the `which` weights asked for (checked on the header, before the tensors load)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = require(folder, WEIGHTS)
    metadata = safetensors_header(path).get("__metadata__") or {}
    found = metadata.get(KIND)
    if found is not None and found != kind:
        loader = LOADER.get(found, "its own loader")
        raise CheckpointError(f"{path} holds a {found}, not a {kind}: load {folder} with {loader}")
    held = metadata.get(WHICH_KEY) or None
    held = held if held in WHICH else None
    check_which(path, held, which)
    try:
        tensors = load_file(path)
        records = json.loads(metadata.get(RECORDS) or "{}")
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}): {AGAIN}") from None
    return Weights(path, tensors, held, records if isinstance(records, dict) else {})


def check_which(path: str, held: Optional[str], which: Optional[str]) -> None:
    """A folder holds one set of weights (`held`; None: not recorded): asking for the other is refused (None asks
    for whatever it holds)."""
    if which is not None and which not in WHICH:
        raise ValueError(f"which={which!r}; allowed: {', '.join(WHICH)} (or None: what the folder holds)")
    if which is not None and held is not None and which != held:
        raise CheckpointError(
            f"{path} holds the {held} weights only (a model folder keeps one set), not {which}: "
            f"ask for which={held!r} (--which {held}), or leave which out"
        )