"""`python -m flowmo_fast.tokenize`: the command's flags, read into `flowmo_fast.tokenize.TokenizeSettings`."""

from __future__ import annotations

import argparse
from typing import Optional

from flowmo_fast import tokenize
from flowmo_fast.cli import flags
from flowmo_fast.pretrained import resolve_checkpoint


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flowmo_fast.tokenize", description=tokenize.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ckpt", required=True, help="FlowMo checkpoint: flowmo_lo / flowmo_hi (published, by name) or a file")
    p.add_argument("--which", default="ema", choices=("ema", "model"), help="EMA or raw weights (default: ema)")
    flags.add_data_flags(p)
    p.add_argument("--out", required=True, help="output folder (created; reused by a rerun)")
    p.add_argument("--batch-size", type=flags.positive_int, default=64, help="images per encoder call, per process (default 64)")
    p.add_argument("--image-size", type=flags.positive_int, default=None, help="crop side (default: the checkpoint's, 256)")
    p.add_argument("--shard-size", type=flags.positive_int, default=4096, help="images per shard file (default 4096)")
    p.add_argument("--num-workers", type=flags.non_negative_int, default=flags.default_workers(),
                   help="data loader processes per rank (default: the CPUs beside this one, at most 8)")
    flags.add_device_flag(p)
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile of the encoder on CUDA")
    p.add_argument("--flip", action="store_true",
                   help="also encode each image mirrored left to right: two consecutive rows per image")
    args = p.parse_args(argv)
    flags.check_data_flags(p, args)
    return args


def settings_from(args: argparse.Namespace) -> tokenize.TokenizeSettings:
    return tokenize.TokenizeSettings(
        ckpt=resolve_checkpoint(args.ckpt), out=args.out, which=args.which, source=flags.image_source(args),
        batch_size=args.batch_size, image_size=args.image_size, shard_size=args.shard_size,
        num_workers=args.num_workers, device=args.device, compile=not args.no_compile, flip=args.flip,
    )


def main(argv: Optional[list[str]] = None) -> None:
    tokenize.run(settings_from(parse_args(argv)))


def cli(argv: Optional[list[str]] = None) -> None:
    """main() with bad input (missing files, wrong settings, a foreign output folder, undecodable data) reported
    in one line."""
    with flags.one_line_errors("tokenize"):
        main(argv)


if __name__ == "__main__":
    cli()
