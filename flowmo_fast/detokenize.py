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
from typing import Optional

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from flowmo_fast.checkpoint import atomic_write, load_checkpoint
from flowmo_fast import commands
from flowmo_fast.images import to_uint8
from flowmo_fast.model import FlowMo
from flowmo_fast.checkpoint import file_sha256
from flowmo_fast.token_shards import TokenShards, TokenSpec
from flowmo_fast.noise import image_noise
from flowmo_fast.pretrained import resolve_checkpoint
from flowmo_fast.sampling import SamplingOptions, add_sampler_flags
from flowmo_fast.tokenizer import Tokenizer


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flowmo_fast.detokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="FlowMo checkpoint whose encoder made the tokens (a file, or "
                   "flowmo_lo / flowmo_hi: the published ones, by name)")
    p.add_argument("--which", default="ema", choices=("ema", "model"), help="EMA or raw weights (default: ema)")
    p.add_argument("--tokens", required=True, help="output folder of flowmo_fast.tokenize")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--batch-size", type=commands.positive_int, default=16, help="rows per sampler call (default 16)")
    p.add_argument("--limit", type=commands.positive_int, default=None, help="decode only the first N rows")
    commands.add_device_flag(p)
    add_sampler_flags(p)
    args = p.parse_args(argv)
    return args


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


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    args.ckpt = resolve_checkpoint(args.ckpt)
    shards = TokenShards(args.tokens)
    device = commands.pick_device(args.device)
    model = load_checkpoint(args.ckpt, which=args.which, device=device)
    spec = TokenSpec.for_model(model)
    if spec != shards.spec:
        raise ValueError(
            f"{args.tokens} holds {shards.spec.kind} {shards.spec.dtype} rows of shape {list(shards.spec.row_shape)}, "
            f"but {args.ckpt} makes {spec.kind} of shape {list(spec.row_shape)}: use the checkpoint that made them"
        )
    if file_sha256(args.ckpt) != shards.manifest["checkpoint"]["sha256"]:
        log(f"warning: {args.ckpt} is not the checkpoint that made these tokens "
            f"({shards.manifest['checkpoint']['path']}); fine for a fine-tuned decoder, garbage otherwise")
    sampling = SamplingOptions.from_flags(args, model.sampling())
    size = shards.manifest["data"]["image_size"]
    total = len(shards) if args.limit is None else min(args.limit, len(shards))
    todo = [r for r in range(total) if not os.path.exists(png_path(args.out, r))]
    os.makedirs(args.out, exist_ok=True)
    log(f"{total} rows of {args.tokens}: {total - len(todo)} PNGs already in {args.out}, {len(todo)} to decode "
        f"({sampling.steps} steps, cfg {sampling.cfg}, {size}x{size}, {device})")
    with tqdm(total=len(todo), unit="img", desc="detokenize", dynamic_ncols=True) as bar:
        for i in range(0, len(todo), args.batch_size):
            rows = todo[i : i + args.batch_size]
            code = rows_to_code(model, spec, np.stack([shards[r] for r in rows]))
            noise = image_noise(rows, args.seed, (3, size, size))
            images = model.sample_images(code, (size, size), sampling, noise=noise)
            for row, image in zip(rows, to_uint8(images)):
                save_png(image, png_path(args.out, row))
            bar.update(len(rows))


def cli(argv: Optional[list[str]] = None) -> None:
    """main() with bad input (missing files, mismatched checkpoint, an --out that is a file) reported in one line."""
    with commands.one_line_errors("detokenize"):
        main(argv)


if __name__ == "__main__":
    cli()
