"""Token shards back to images through the FlowMo sampler: one PNG per row, named by row (00000000.png, ...;
index.jsonl of the token folder maps rows to source images).

    python -m flowmo_fast.detokenize --ckpt flowmo_lo.pth --tokens tokens/ --out recon/ [--steps 25]

The sampler's noise of each row comes from (--seed, row), so a row decodes the same in any batch, and a
rerun skips the PNGs already written.
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
from flowmo_fast.config import parse_cfg_interval
from flowmo_fast.images import to_uint8
from flowmo_fast.model import FlowMo
from flowmo_fast.checkpoint import file_sha256
from flowmo_fast.token_shards import TokenShards, TokenSpec
from flowmo_fast.tokenize import pick_device
from flowmo_fast.tokenizer import Tokenizer


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flowmo_fast.detokenize", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="FlowMo checkpoint whose encoder made the tokens")
    p.add_argument("--which", default="ema", choices=("ema", "model"), help="EMA or raw weights (default: ema)")
    p.add_argument("--tokens", required=True, help="output folder of flowmo_fast.tokenize")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the checkpoint's, 25)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's, 1.5)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per sampler call (default 16)")
    p.add_argument("--limit", type=int, default=None, help="decode only the first N rows")
    p.add_argument("--seed", type=int, default=0, help="sampler noise seed (default 0)")
    p.add_argument("--device", default=None, help="default: cuda if there is one, else cpu")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    return args


def log(message: str) -> None:
    print(f"detokenize: {message}", file=sys.stderr, flush=True)


def rows_to_code(model: FlowMo, spec: TokenSpec, rows: np.ndarray) -> Tensor:
    """Stored rows -> the quantized code [B, T, context_dim] the decoder takes."""
    if spec.kind == "ids":
        return Tokenizer(model).ids_to_code(torch.from_numpy(rows.astype(np.int64)))
    device = next(model.parameters()).device
    return torch.from_numpy(rows.astype(np.float32)).to(device)


def row_noise(seed: int, rows: list[int], shape: tuple[int, ...]) -> Tensor:
    """Sampler noise [len(rows), *shape], each row's drawn from its own (seed, row) generator."""
    def one(row: int) -> Tensor:
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, row]).generate_state(1, np.uint64)[0]))
        return torch.randn(shape, generator=g)

    return torch.stack([one(r) for r in rows])


def png_path(out: str, row: int) -> str:
    return os.path.join(out, f"{row:08d}.png")


def save_png(image: np.ndarray, path: str) -> None:
    atomic_write(path, lambda f: Image.fromarray(image).save(f, format="PNG"))


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    shards = TokenShards(args.tokens)
    device = pick_device(args.device)
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
    sampling = model.config.eval.sampling
    steps = args.steps or sampling.sample_steps
    cfg = sampling.cfg if args.cfg is None else args.cfg
    size = shards.manifest["data"]["image_size"]
    total = len(shards) if args.limit is None else min(args.limit, len(shards))
    todo = [r for r in range(total) if not os.path.exists(png_path(args.out, r))]
    os.makedirs(args.out, exist_ok=True)
    log(f"{total} rows of {args.tokens}: {total - len(todo)} PNGs already in {args.out}, {len(todo)} to decode "
        f"({steps} steps, cfg {cfg}, {size}x{size}, {device})")
    with tqdm(total=len(todo), unit="img", desc="detokenize", dynamic_ncols=True) as bar:
        for i in range(0, len(todo), args.batch_size):
            rows = todo[i : i + args.batch_size]
            code = rows_to_code(model, spec, np.stack([shards[r] for r in rows]))
            images = model.sample_images(
                code, (size, size), steps=steps, cfg=cfg, schedule=sampling.schedule,
                cfg_interval=parse_cfg_interval(sampling.cfg_interval),
                noise=row_noise(args.seed, rows, (3, size, size)).to(device),
            )
            for row, image in zip(rows, to_uint8(images)):
                save_png(image, png_path(args.out, row))
            bar.update(len(rows))


def cli() -> None:
    """main() with bad input (missing files, mismatched checkpoint) reported in one line."""
    try:
        main()
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"detokenize: error: {e}") from None


if __name__ == "__main__":
    cli()
