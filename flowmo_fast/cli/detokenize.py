"""`python -m flowmo_fast.detokenize`: the command's flags, read into `flowmo_fast.detokenize.DetokenizeSettings`."""

from __future__ import annotations

import argparse
from typing import Optional

from flowmo_fast import detokenize
from flowmo_fast.cli import flags
from flowmo_fast.pretrained import resolve_checkpoint


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flowmo_fast.detokenize", description=detokenize.__doc__,
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


def settings_from(args: argparse.Namespace) -> detokenize.DetokenizeSettings:
    return detokenize.DetokenizeSettings(
        ckpt=resolve_checkpoint(args.ckpt), tokens=args.tokens, out=args.out, which=args.which,
        batch_size=args.batch_size, limit=args.limit, device=args.device,
        sampling=flags.sampling_overrides(args), seed=args.seed,
    )


def main(argv: Optional[list[str]] = None) -> None:
    detokenize.run(settings_from(parse_args(argv)))


def cli(argv: Optional[list[str]] = None) -> None:
    """main() with bad input (missing files, mismatched checkpoint, an --out that is a file) reported in one line."""
    with flags.one_line_errors("detokenize"):
        main(argv)


if __name__ == "__main__":
    cli()
