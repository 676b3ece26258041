"""Token shards back to images through the FlowMo sampler: one PNG per row, named by row (00000000.png, ...;
index.jsonl of the token folder maps rows to source images).

    python -m flowmo_fast.detokenize --ckpt flowmo_lo.pth --tokens tokens/ --out recon/ [--steps 25]

The sampler's noise of each row comes from its own (--seed, row) generator (flowmo_fast.noise, as eval.rfid's),
so a row decodes the same in any batch, and a rerun skips the PNGs already written.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from flowmo_fast import flags
from flowmo_fast.codec import Tokenizer
from flowmo_fast.distributed import pick_device
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.formats.checkpoint import Which, atomic_write, file_sha256, load_checkpoint
from flowmo_fast.formats.images import to_uint8
from flowmo_fast.formats.pretrained import resolve_checkpoint
from flowmo_fast.formats.token_shards import TokenShards, TokenSpec
from flowmo_fast.noise import image_noise
from flowmo_fast.sampler_settings import SamplingOptions, SamplingOverrides


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
    """One detokenize run (the command's flags, `flowmo_fast.detokenize`)."""

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


def rows_to_decode(total: int, out: str, rank: int = 0, world_size: int = 1) -> list[int]:
    """The rows of process `rank`'s share (r = rank mod world_size, fixed by the row alone: what the others have
    written already cannot shift it) whose PNG is not in `out` yet."""
    return [r for r in range(rank, total, world_size) if not os.path.exists(png_path(out, r))]


def padded(items: list, size: int) -> list:
    """`items` filled up to `size` with copies of its last one: a short last batch at the size of the others."""
    return items + items[-1:] * (size - len(items))


def decode_rows(model: FlowMo, shards: TokenShards, rows: list[int], out: str, sampling: SamplingOptions,
                seed: int, batch_size: int, bar: tqdm) -> None:
    """Token rows `rows` of `shards` as PNGs in `out`, `batch_size` at a time through the model's sampler (each
    row's noise its own (seed, row) stream); a short last batch is padded to the others' size, so the sampler
    meets one batch size (on CUDA one captured graph and one compiled variant, not another for the last call)."""
    size = shards.manifest["data"]["image_size"]
    batch = min(batch_size, len(rows))
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        filled = padded(chunk, batch)
        code = rows_to_code(model, shards.spec, np.stack([shards[r] for r in filled]))
        noise = image_noise(filled, seed, (3, size, size))
        images = model.sample_images(code, (size, size), sampling, noise=noise)[: len(chunk)]
        for row, image in zip(chunk, to_uint8(images)):
            save_png(image, png_path(out, row))
        bar.update(len(chunk))


def run(settings: DetokenizeSettings) -> None:
    """Decode the rows of `settings.tokens` not yet in `settings.out` into PNG files."""
    s = settings
    shards = TokenShards(s.tokens)
    device = pick_device(s.device)
    model = load_matching_model(s, shards, device)
    sampling = s.sampling.over(model.sampling())
    size = shards.manifest["data"]["image_size"]
    total = len(shards) if s.limit is None else min(s.limit, len(shards))
    todo = rows_to_decode(total, s.out)
    os.makedirs(s.out, exist_ok=True)
    log(f"{total} rows of {s.tokens}: {total - len(todo)} PNGs already in {s.out}, {len(todo)} to decode "
        f"({sampling.steps} {sampling.solver} steps, cfg {sampling.cfg}, {size}x{size}, {device})")
    with tqdm(total=len(todo), unit="img", desc="detokenize", dynamic_ncols=True) as bar:
        decode_rows(model, shards, todo, s.out, sampling, s.seed, s.batch_size, bar)


# ---- the command: flags -> one settings object -> run ----------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flowmo_fast.detokenize", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="FlowMo checkpoint whose encoder made the tokens (a file, or "
                   "flowmo_lo / flowmo_hi: the published ones, by name)")
    p.add_argument("--which", default="ema", choices=("ema", "model"), help="EMA or raw weights (default: ema)")
    p.add_argument("--tokens", required=True, help="output folder of flowmo_fast.tokenize")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--batch-size", type=flags.positive_int, default=16, help="rows per sampler call (default 16)")
    p.add_argument("--limit", type=flags.positive_int, default=None, help="decode only the first N rows")
    flags.add_device_flag(p)
    flags.add_sampler_flags(p)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> DetokenizeSettings:
    return DetokenizeSettings(
        ckpt=resolve_checkpoint(args.ckpt), tokens=args.tokens, out=args.out, which=args.which,
        batch_size=args.batch_size, limit=args.limit, device=args.device,
        sampling=flags.sampling_overrides(args), seed=args.seed,
    )


def main(argv: Optional[list[str]] = None) -> None:
    run(settings_from(parse_args(argv)))


def cli(argv: Optional[list[str]] = None) -> None:
    """main() with bad input (missing files, mismatched checkpoint, an --out that is a file) reported in one line."""
    with flags.one_line_errors("detokenize"):
        main(argv)


if __name__ == "__main__":
    cli()
