"""Token shards on disk: what `python -m flowmo_fast.tokenize` writes and `detokenize` (or a generator's data
loader, through `TokenShards`) reads.

An output folder holds
  manifest.json     checkpoint sha256, config, token spec, data set, class names ("classes", null without
                    classes), "flip", shard list, counts, images that failed
  index.jsonl       one line per row: {"row", "shard", "index" (data set row), "name", "label" if known,
                    "flip": true on mirrored rows}
  labels.npy        with classes only: each row's class, int64 [rows] (an index into the manifest's "classes")
  shard-00000.npy   the rows of shard 0: LFQ ids [n, tokens_per_image] in the smallest unsigned dtype that
                    holds the codebook, or KL latents [n, code_length, context_dim] float16
  shard-00000.json  where shard 0's rows came from and which of its images failed to decode

Shard k covers data set rows [k * shard_size, (k + 1) * shard_size); it holds those that decoded, in data set
order; with "flip" each image gives two consecutive rows, as it is and mirrored left to right. Its content
depends only on the data set, the checkpoint, shard_size and flip, never on the process count.
Each file is written atomically, the .npy before the .json: a shard is finished when its .json exists and
agrees with its .npy, so a rerun skips finished shards and redoes the rest.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Literal, Optional

import numpy as np

from flowmo_fast.formats.checkpoint import atomic_write
from flowmo_fast.llm_settings import is_llm_quantization

FORMAT = "flowmo-fast-tokens"
VERSION = 1
MANIFEST = "manifest.json"
INDEX = "index.jsonl"
LABELS = "labels.npy"
# Manifest entries (dotted, flattened) that must match for a rerun to reuse the shards already written.
IDENTITY = ("format", "version", "checkpoint.sha256", "checkpoint.which", "config", "tokens", "data.image_size",
            "data.num_images", "data.names_sha256", "classes", "flip", "shard_size")


def smallest_uint_dtype(vocab_size: int) -> np.dtype:
    """uint8 up to 2^8 ids, uint16 up to 2^16 (FlowMo-Lo 2^9, Hi 2^14), else uint32."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in 32-bit ids")


def check_tokenizable(model_config) -> None:
    """Only lfq (ids) and kl (latents) checkpoints have rows to store: refuse others from their config alone,
    before a model (or the LLM of the LLM type) is loaded."""
    q = model_config.quantization_type
    if q in ("lfq", "kl"):
        return
    why = "its code is continuous, a span of it infilled by a frozen LLM" if is_llm_quantization(q) else "no quantizer"
    raise ValueError(f"model.quantization_type={q!r} has no token ids ({why}); tokenize needs an lfq or kl checkpoint")


@dataclass(frozen=True)
class TokenSpec:
    """What one row is: "ids" (LFQ token ids, with vocab_size) or "latents" (KL posterior means, float16)."""

    kind: Literal["ids", "latents"]
    dtype: str
    row_shape: tuple[int, ...]
    vocab_size: Optional[int] = None

    @classmethod
    def for_model(cls, model) -> "TokenSpec":
        m = model.config.model
        check_tokenizable(m)
        if m.quantization_type == "lfq":
            vocab = m.token_vocab_size
            return cls("ids", smallest_uint_dtype(vocab).name, (m.token_ids_per_image,), vocab)
        return cls("latents", "float16", (m.code_length, m.context_dim))

    @classmethod
    def from_dict(cls, d: dict) -> "TokenSpec":
        return cls(d["kind"], d["dtype"], tuple(d["row_shape"]), d.get("vocab_size"))

    def to_dict(self) -> dict:
        return {**asdict(self), "row_shape": list(self.row_shape)}


def shard_ranges(num_items: int, shard_size: int) -> list[range]:
    """Data set rows of each shard: [0, s), [s, 2s), ..., the last one shorter."""
    if shard_size < 1:
        raise ValueError(f"shard size must be a positive integer, got {shard_size}")
    return [range(start, min(start + shard_size, num_items)) for start in range(0, num_items, shard_size)]


def shard_stem(k: int) -> str:
    return f"shard-{k:05d}"


def names_sha256(names) -> str:
    """Fingerprint of a data set's row order, so a rerun can tell it is reading the same images."""
    return hashlib.sha256("\n".join(names).encode()).hexdigest()


def write_text_if_changed(path: str, text: str) -> bool:
    """Atomically replace `path` with `text` unless it already holds exactly that; True if written."""
    try:
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return False
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return True


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=1) + "\n"


def write_shard(folder: str, k: int, items: range, rows: np.ndarray, sources: list[dict], failed: list[dict]) -> None:
    """Shard k: its rows (.npy), then its record (.json) that marks it finished."""
    if rows.shape[0] != len(sources):
        raise ValueError(f"shard {k}: {rows.shape[0]} rows but {len(sources)} sources")
    stem = os.path.join(folder, shard_stem(k))
    atomic_write(stem + ".npy", lambda f: np.save(f, rows))
    record = {"shard": k, "items": [items.start, items.stop], "rows": sources, "failed": failed}
    atomic_write(stem + ".json", lambda f: f.write(to_json(record).encode("utf-8")))


def read_shard_record(folder: str, k: int) -> Optional[dict]:
    """Shard k's record, or None if it is missing or unreadable (an interrupted or foreign write)."""
    try:
        with open(os.path.join(folder, shard_stem(k) + ".json"), encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def open_shard_rows(folder: str, k: int) -> np.ndarray:
    """Shard k's rows, memory-mapped."""
    return np.load(os.path.join(folder, shard_stem(k) + ".npy"), mmap_mode="r")


def shard_is_done(folder: str, k: int, items: range, spec: TokenSpec) -> bool:
    """Shard k has a record for exactly `items` and an .npy whose dtype and shape agree with it."""
    record = read_shard_record(folder, k)
    if record is None or record.get("items") != [items.start, items.stop]:
        return False
    try:
        rows = open_shard_rows(folder, k)
    except (OSError, ValueError):
        return False
    return rows.dtype == np.dtype(spec.dtype) and rows.shape == (len(record["rows"]), *spec.row_shape)


def new_manifest(
    checkpoint: dict, config: dict, spec: TokenSpec, data: dict, shard_size: int,
    classes: Optional[list[str]] = None, flip: bool = False,
) -> dict:
    """The manifest of a run not yet finished: what it encodes, with what, into which shards; `classes`: the
    class names of a class-labelled data set (None: no classes); `flip`: a mirrored row after each image's."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "complete": False,
        "checkpoint": checkpoint,
        "config": config,
        "tokens": spec.to_dict(),
        "data": data,
        "classes": classes,
        "flip": flip,
        "shard_size": shard_size,
    }


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
    return out


def identity_differences(existing: dict, planned: dict) -> list[str]:
    """'key: there -> now' for each IDENTITY entry (flattened) on which two manifests disagree."""
    old, new = _flatten(existing), _flatten(planned)
    keys = sorted(k for k in old.keys() | new.keys() if any(k == p or k.startswith(p + ".") for p in IDENTITY))
    return [f"{k}: {old.get(k)!r} there, {new.get(k)!r} now" for k in keys if old.get(k) != new.get(k)]


def load_manifest(folder: str) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): delete it to start this folder over") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} manifest: pick an output folder of its own")
    return manifest


def check_resumable(folder: str, planned: dict) -> None:
    """Raise if `folder` already holds tokens of a different run (checkpoint, data, image size, shard size)."""
    existing = load_manifest(folder)
    if existing is None:
        leftovers = sorted(f for f in os.listdir(folder) if f.startswith("shard-")) if os.path.isdir(folder) else []
        if leftovers:
            raise ValueError(
                f"{folder} holds {len(leftovers)} shard files ({leftovers[0]}, ...) but no {MANIFEST}: "
                "use an empty output folder, or delete these files"
            )
        return
    differences = identity_differences(existing, planned)
    if differences:
        shown = "; ".join(differences[:5]) + ("; ..." if len(differences) > 5 else "")
        raise ValueError(
            f"{folder} holds tokens of another run ({shown}). Use a new output folder, or delete {folder} "
            "to start over."
        )


def finished_manifest(planned: dict, records: list[dict]) -> dict:
    """The manifest once every shard has a record (in shard order): shard list, counts, failed images."""
    shards, failed, first_row = [], [], 0
    for record in records:
        n = len(record["rows"])
        shards.append({"file": shard_stem(record["shard"]) + ".npy", "items": record["items"], "rows": n,
                       "first_row": first_row})
        failed.extend(record["failed"])
        first_row += n
    counts = {"images": planned["data"]["num_images"], "rows": first_row, "failed": len(failed), "shards": len(shards)}
    return {**planned, "complete": True, "counts": counts, "shards": shards, "failed": failed}


def row_labels(records: list[dict]) -> np.ndarray:
    """Each row's class, int64 [rows], from the shard records (in shard order) of a class-labelled data set."""
    sources = [source for record in records for source in record["rows"]]
    missing = [s["name"] for s in sources if "label" not in s]
    if missing:
        raise ValueError(f"{len(missing)} rows have no class ({missing[0]}, ...) in a data set said to have classes")
    return np.array([s["label"] for s in sources], dtype=np.int64)


def write_labels_if_changed(folder: str, labels: np.ndarray) -> bool:
    """labels.npy, atomically, unless it already holds exactly `labels`; True if written."""
    path = os.path.join(folder, LABELS)
    try:
        if np.array_equal(np.load(path), labels):
            return False
    except (OSError, ValueError):
        pass
    atomic_write(path, lambda f: np.save(f, labels))
    return True


def index_text(records: list[dict]) -> str:
    """index.jsonl: one line per row, in row order."""
    lines, row = [], 0
    for record in records:
        shard = shard_stem(record["shard"]) + ".npy"
        for source in record["rows"]:
            lines.append(json.dumps({"row": row, "shard": shard, **source}))
            row += 1
    return "".join(line + "\n" for line in lines)


class TokenShards:
    """A finished tokenize output folder: `len()` rows, `shards[row]` -> one row, `read(start, stop)` -> rows
    as one numpy array, `sources()` -> the index lines; shards stay memory-mapped."""

    def __init__(self, folder: str):
        manifest = load_manifest(folder)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST} in {folder}: is it the --out folder of flowmo_fast.tokenize?")
        if not manifest.get("complete"):
            raise ValueError(
                f"{folder} is unfinished (tokenize stopped before the end): run the same tokenize command again"
            )
        self.folder = folder
        self.manifest = manifest
        self.spec = TokenSpec.from_dict(manifest["tokens"])
        self.shards = []
        for entry in manifest["shards"]:
            rows = np.load(os.path.join(folder, entry["file"]), mmap_mode="r")
            if rows.shape != (entry["rows"], *self.spec.row_shape) or rows.dtype != np.dtype(self.spec.dtype):
                raise ValueError(
                    f"{entry['file']} in {folder} holds {rows.dtype} {rows.shape}; the manifest says "
                    f"{self.spec.dtype} {(entry['rows'], *self.spec.row_shape)}: rerun tokenize on a fresh folder"
                )
            self.shards.append(rows)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, row: int) -> np.ndarray:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {len(self)} rows")
        k = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.shards[k][row - self.starts[k]]

    def read(self, start: int = 0, stop: Optional[int] = None) -> np.ndarray:
        """Rows [start, stop) -> [n, *row_shape] in the stored dtype."""
        stop = len(self) if stop is None else min(stop, len(self))
        parts = []
        for k, rows in enumerate(self.shards):
            lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
            if lo < hi:
                parts.append(rows[lo - self.starts[k] : hi - self.starts[k]])
        if not parts:
            return np.zeros((0, *self.spec.row_shape), dtype=self.spec.dtype)
        return np.concatenate(parts)

    @property
    def flip(self) -> bool:
        """Whether each image gave two consecutive rows, as it is and mirrored left to right."""
        return bool(self.manifest.get("flip", False))

    @property
    def class_names(self) -> Optional[list[str]]:
        """The data set's class names (label k is class_names[k]); None when it has no classes."""
        if "classes" not in self.manifest:
            raise ValueError(
                f"{self.folder} was written by a tokenize that did not record classes: tokenize into a new folder"
            )
        return self.manifest["classes"]

    @functools.cached_property
    def labels(self) -> Optional[np.ndarray]:
        """Each row's class, int64 [len(self)] (values < len(class_names)); None when the data set has no classes."""
        names = self.class_names
        if names is None:
            return None
        path = os.path.join(self.folder, LABELS)
        try:
            labels = np.load(path)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} ({e}): run the same tokenize command again to rewrite it") from e
        in_range = len(labels) == 0 or (labels.min() >= 0 and labels.max() < len(names))
        if labels.shape != (len(self),) or labels.dtype != np.int64 or not in_range:
            raise ValueError(
                f"{path} holds {labels.dtype} {labels.shape}, not {len(self)} int64 classes below {len(names)}: "
                "run the same tokenize command again to rewrite it"
            )
        return labels

    def sources(self) -> list[dict]:
        with open(os.path.join(self.folder, INDEX), encoding="utf-8") as f:
            return [json.loads(line) for line in f]
