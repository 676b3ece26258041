"""Flags every command shares, their argparse types, and reading them into the library's records: the data set
(`ImageSource`), the device, the sampler (`SamplingOverrides` and the noise seed), and a user's mistake reported
in one line."""

from __future__ import annotations

import argparse
import contextlib
from typing import Callable, Iterator

from flowmo_fast.distributed import DEVICE_CHOICES, spare_cpus
from flowmo_fast.formats.checkpoint import CheckpointError
from flowmo_fast.formats.data import ImageSource
from flowmo_fast.noise import MAX_SEED
from flowmo_fast.sampler_settings import (
    NAMED_SAMPLERS,
    SOLVERS,
    UPSTREAM,
    SamplingOverrides,
    parse_cfg_interval,
    parse_schedule,
)


def positive_int(text: str) -> int:
    """An argparse `type`: an integer >= 1, else a usage error that says so."""
    return _bounded_int(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    """An argparse `type`: an integer >= 0, else a usage error that says so."""
    return _bounded_int(text, 0, "0 or more")


def _bounded_int(text: str, lowest: int, meaning: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
    return value


def positive_float(text: str) -> float:
    """An argparse `type`: a number > 0, else a usage error that says so."""
    return _float_from(text, lambda v: v > 0, "positive")


def non_negative_float(text: str) -> float:
    """An argparse `type`: a number >= 0, else a usage error that says so."""
    return _float_from(text, lambda v: v >= 0, "0 or more")


def _float_from(text: str, allowed: Callable[[float], bool], meaning: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
    return value


def comma_list(parse: Callable, unique: bool = False) -> Callable:
    """An argparse `type`: comma-separated items, each read by `parse` (an argparse type) -> a tuple in the order
    given (`unique`: repeats dropped); none at all is a usage error."""

    def convert(text: str) -> tuple:
        items = tuple(parse(part.strip()) for part in text.split(",") if part.strip())
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: expected a comma-separated list")
        return tuple(dict.fromkeys(items)) if unique else items

    return convert


def checked(parse: Callable) -> Callable:
    """An argparse `type` from a parser that raises ValueError: the error becomes argparse's usage error."""

    def convert(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def seed(text: str) -> int:
    """An argparse `type`: a noise seed in [0, MAX_SEED)."""
    value = non_negative_int(text)
    if value >= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be in [0, {MAX_SEED}), got {value}")
    return value


def schedule(text: str) -> str:
    parse_schedule(text)
    return text


def cfg_interval(text: str):
    """--cfg-interval: 'lo,hi' -> (lo, hi); 'none' -> the string "none" (guidance at every step; kept distinct
    from an absent flag, which means the checkpoint's setting)."""
    return "none" if parse_cfg_interval(text) is None else parse_cfg_interval(text)


def default_workers() -> int:
    """Data loader processes per command process: what the machine has beside the main process (at most 8), so a
    2-core machine gets 1 and no command starts more processes than there are CPUs."""
    return min(8, spare_cpus())


@contextlib.contextmanager
def one_line_errors(command: str, also: tuple[type[Exception], ...] = ()) -> Iterator[None]:
    """A user's mistake (a missing file, an unusable checkpoint, a bad setting) ends the command with one line
    naming the problem, exit status 1, instead of a traceback. Data errors (`flowmo_fast.formats.data.DataError`) are
    ValueErrors; a path that is the wrong kind of thing (a file for a folder, a folder for a file, unwritable)
    is one too. `also`: the command's own error types for a user's mistake."""
    try:
        yield
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
            CheckpointError, ValueError, *also) as e:
        raise SystemExit(f"{command}: error: {e}") from None


def add_device_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default auto: this process's GPU, else cpu)")


def add_data_flags(parser: argparse.ArgumentParser) -> None:
    """--data (an image folder or WebDataset shards) / --imagenet-tar + --imagenet-index; neither: the bundled
    sample photos."""
    data = parser.add_argument_group("data (default: the bundled scikit-image sample photos)")
    data.add_argument("--data", metavar="DIR|SHARDS",
                      help="an image folder (searched recursively; sub-folders are classes), or WebDataset shards: a "
                           "brace pattern 'shards/train-{000000..000099}.tar', a .tar file or a folder of .tar files "
                           "(a sample's .cls is its class)")
    data.add_argument("--imagenet-tar", metavar="T", help="ImageNet tar file, with --imagenet-index")
    data.add_argument("--imagenet-index", metavar="J", help="upstream's JSON index of the tar")


def check_data_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.data and (args.imagenet_tar or args.imagenet_index):
        parser.error("give either --data DIR|SHARDS or --imagenet-tar T --imagenet-index J, not both")
    if bool(args.imagenet_tar) != bool(args.imagenet_index):
        parser.error("--imagenet-tar and --imagenet-index go together (the tar and upstream's JSON index of it)")


def image_source(args: argparse.Namespace) -> ImageSource:
    """The images `add_data_flags` names."""
    return ImageSource.from_data(args.data, tar=args.imagenet_tar, index=args.imagenet_index)


def add_sampler_flags(parser: argparse.ArgumentParser) -> None:
    """--sampler (a named setting), --steps --cfg --schedule --cfg-interval --solver (None when not given: the
    checkpoint's `eval.sampling` then applies, through `sampling_overrides`) and --seed of the per-image noise."""
    s = parser.add_argument_group(
        "sampler (defaults: the checkpoint's eval.sampling; upstream's are "
        f"{UPSTREAM.steps} {UPSTREAM.solver} steps, cfg {UPSTREAM.cfg}, {UPSTREAM.schedule}, "
        f"interval {UPSTREAM.cfg_interval})"
    )
    s.add_argument("--sampler", choices=tuple(NAMED_SAMPLERS), help="a named setting, under the flags below: "
                   + "; ".join(f"{name} = {o.given()}" for name, o in NAMED_SAMPLERS.items())
                   + " (README: Decoding cost)")
    s.add_argument("--steps", type=positive_int, help="sampler steps")
    s.add_argument("--cfg", type=float, help="guidance scale (1: no guidance)")
    s.add_argument("--schedule", type=checked(schedule), help="linear or pow_P")
    s.add_argument("--cfg-interval", type=checked(cfg_interval),
                   help="'lo,hi' EDM sigmas where guidance applies, or 'none' for every step")
    s.add_argument("--solver", choices=SOLVERS,
                   help="ODE solver: euler (upstream's, 1 pass a step), heun or midpoint (2nd order, 2 passes a "
                   "step), ab2 (2nd order, 1 pass a step, reusing the previous step's velocity)")
    s.add_argument("--seed", type=seed, default=0,
                   help=f"noise seed, 0 <= S < {MAX_SEED}: image row r draws from its own (S, r) generator")


def sampling_overrides(args: argparse.Namespace) -> SamplingOverrides:
    """The sampler settings `add_sampler_flags` read (None: not given, the checkpoint's then applies): the named
    sampler's, with the flags given over them."""
    named = NAMED_SAMPLERS[args.sampler] if args.sampler else SamplingOverrides()
    return named.then(SamplingOverrides(args.steps, args.cfg, args.schedule, args.cfg_interval, args.solver))
