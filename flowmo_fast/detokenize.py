"""Token shards back to images through the FlowMo sampler: one PNG per row, named by row (00000000.png, ...;
index.jsonl of the token folder maps rows to source images).

    python -m flowmo_fast.detokenize --ckpt flowmo_lo.pth --tokens tokens/ --out recon/ [--steps 25]

The sampler's noise of each row comes from its own (--seed, row) generator (flowmo_fast.noise, as eval.rfid's),
so a row decodes the same in any batch, and a rerun skips the PNGs already written.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from flowmo_fast.checkpoint import Which, atomic_write, file_sha256, load_checkpoint
from flowmo_fast.distributed import pick_device
from flowmo_fast.images import to_uint8
from flowmo_fast.model import FlowMo
from flowmo_fast.noise import image_noise
from flowmo_fast.sampling import SamplingOverrides
from flowmo_fast.token_shards import TokenShards, TokenSpec
from flowmo_fast.tokenizer import Tokenizer


def log(message: str) -> None:
    print(f"detokenize: {message}", file=sys.stderr, flush=True)


def rows_to_code(model: FlowMo, spec: TokenSpec, rows: np.ndarray) -> Tensor:
    """Stored rows -> the quantized code [B, T, context_dim] the decoder takes."""
    if spec.kind == "ids":
        return Tokenizer(model).ids_to_code(torch.from_numpy(rows.astype(np.int64)))
    device = next(model.parameters()).device
    return torch.from_numpy(rows.astype(np.float32)).to(device)


def png_path(out: str, row: int) -> str:
    return os.path.join(out, f"{row:08d}.png")


def save_png(image: np.ndarray, path: str) -> None:
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


@dataclass(frozen=True)
class DetokenizeSettings:
    """One detokenize run (the command's flags, `flowmo_fast.cli.detokenize`)."""

    ckpt: str  # the checkpoint whose encoder made the tokens (a published name resolved already)
    tokens: str  # the output folder of flowmo_fast.tokenize
    out: str  # folder for the PNG files
    which: Which = "ema"
    batch_size: int = 16  # rows per sampler call
    limit: Optional[int] = None  # decode only the first N rows
    device: str = "auto"
    sampling: SamplingOverrides = SamplingOverrides()  # over the checkpoint's eval.sampling
    seed: int = 0  # row r's noise: its own (seed, r) generator


def load_matching_model(s: DetokenizeSettings, shards: TokenShards, device) -> FlowMo:
    """The checkpoint's model; refused if it makes other rows than the shards hold, a warning if it is not the
    checkpoint that made them."""
    model = load_checkpoint(s.ckpt, which=s.which, device=device)
    spec = TokenSpec.for_model(model)
    if spec != shards.spec:
        raise ValueError(
            f"{s.tokens} holds {shards.spec.kind} {shards.spec.dtype} rows of shape {list(shards.spec.row_shape)}, "
            f"but {s.ckpt} makes {spec.kind} of shape {list(spec.row_shape)}: use the checkpoint that made them"
        )
    if file_sha256(s.ckpt) != shards.manifest["checkpoint"]["sha256"]:
        log(f"warning: {s.ckpt} is not the checkpoint that made these tokens "
            f"({shards.manifest['checkpoint']['path']}); fine for a fine-tuned decoder, garbage otherwise")
    return model


def run(settings: DetokenizeSettings) -> None:
    """Decode the rows of `settings.tokens` not yet in `settings.out` into PNG files."""
    s = settings
    shards = TokenShards(s.tokens)
    device = pick_device(s.device)
    model = load_matching_model(s, shards, device)
    spec = shards.spec
    sampling = s.sampling.over(model.sampling())
    size = shards.manifest["data"]["image_size"]
    total = len(shards) if s.limit is None else min(s.limit, len(shards))
    todo = [r for r in range(total) if not os.path.exists(png_path(s.out, r))]
    os.makedirs(s.out, exist_ok=True)
    log(f"{total} rows of {s.tokens}: {total - len(todo)} PNGs already in {s.out}, {len(todo)} to decode "
        f"({sampling.steps} steps, cfg {sampling.cfg}, {size}x{size}, {device})")
    with tqdm(total=len(todo), unit="img", desc="detokenize", dynamic_ncols=True) as bar:
        for i in range(0, len(todo), s.batch_size):
            rows = todo[i : i + s.batch_size]
            code = rows_to_code(model, spec, np.stack([shards[r] for r in rows]))
            noise = image_noise(rows, s.seed, (3, size, size))
            images = model.sample_images(code, (size, size), sampling, noise=noise)
            for row, image in zip(rows, to_uint8(images)):
                save_png(image, png_path(s.out, row))
            bar.update(len(rows))


if __name__ == "__main__":
    from flowmo_fast.cli.detokenize import cli

    cli()
