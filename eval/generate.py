r"""Generate images with a token generator (train.generator): token rows first, then (with --tokenizer) pictures.

    python -m eval.generate --generator results/NAME/checkpoints/00100000.pth --out gen/ --per-class 50 \
        --tokenizer flowmo_lo
    torchrun --nproc-per-node=8 -m eval.generate --generator CKPT --out gen/ --tokenizer flowmo_lo

Writes into --out token shards in tokenize's format (manifest.json, index.jsonl, shard-*.npy/json, the class
of each row), so `python -m flowmo_fast.detokenize --tokens OUT` decodes them too; with --tokenizer also
OUT/images/00000000.png, ... (one per row) and OUT/samples.npz for eval.gfid and ADM's evaluator, in ADM's layout
and order: `arr_0` uint8 [N, H, W, 3] in a shuffled order (seeded by --seed), `arr_1` the class of each of those
images for a class-conditional generator, `rows` the row (PNG) each one is. Shuffled, because ADM's evaluator
scores the Inception Score over consecutive 5,000-image splits as stored: rows in class order would give each
split a tenth of the classes and an IS far too low. The file is written one image at a time (50,000 images of
256 px are 9.8 GB: never held in memory).

The sampler's defaults are MaskBit's tuned 18-bit configuration in our guidance convention (flowmo_fast.maskgit.
sampling.GenerationOptions: its guidance 5.7 is our --cfg 6.7); without --steps the step count fits the image
(64 for 512 groups and more, ceil(groups / 8) for fewer), said in the log. Every batch of a process has the
same size (a short last batch is padded with copies of its last sample, dropped after), so a CUDA graph or a
compiled kernel made for the first batch serves every call, generation and decoding alike.

Rows are --per-class samples of each class of --classes (default: every class), class by class; an
unconditional generator makes --per-class samples in all. Sample (class, index) draws from its own stream of
(--seed, class, index) (flowmo_fast.maskgit.sampling), so the rows do not depend on --batch-size or on the process
count; its picture's sampler noise is row r's own (--seed, r) stream, as detokenize's. Each process (torchrun
rank) makes a disjoint set of the unfinished shards, then decodes a disjoint set of the missing PNGs; a rerun
skips what is done, and refuses a folder made with other settings.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import os
import sys
import time
import zipfile
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from flowmo_fast import flags
from flowmo_fast.detokenize import (
    DetokenizeSettings,
    decode_rows,
    load_matching_model,
    padded,
    png_path,
    rows_to_decode,
)
from flowmo_fast.distributed import Processes, barrier, gather_objects, on_rank0, processes
from flowmo_fast.flowmo.model import autocast_for
from flowmo_fast.formats.checkpoint import atomic_write, file_sha256
from flowmo_fast.formats.pretrained import resolve_checkpoint
from flowmo_fast.formats.token_shards import (
    TokenShards,
    TokenSpec,
    load_manifest,
    names_sha256,
    new_manifest,
    shard_ranges,
    write_shard,
)
from flowmo_fast.maskgit.model import MASK_SCHEDULES, LoadedGenerator
from flowmo_fast.maskgit.pretrained import from_pretrained
from flowmo_fast.maskgit.sampling import (
    CFG_SCHEDULES,
    MASKBIT_GROUPS_PER_STEP,
    MASKBIT_STEPS,
    GenerationOptions,
    GraphedGenerator,
    generate,
    sample_keys,
)
from flowmo_fast.sampler_settings import NAMED_SAMPLERS, SOLVERS, SamplingOverrides
from flowmo_fast.tokenize import finish, prepare

BARRIER_TIMEOUT = datetime.timedelta(hours=6)
IMAGES = "images"
SAMPLES = "samples.npz"
DEFAULTS = GenerationOptions()
ORDER_STREAM = 5  # the shuffle of samples.npz: np.random.default_rng([seed, ORDER_STREAM]), beside the noise streams


@dataclass(frozen=True)
class GenerateSettings:
    """One eval.generate run (the command's flags)."""

    generator_ckpt: str  # a checkpoint file, a run folder (its newest checkpoint), a model folder or hub id
    out: str
    which: str = "ema"
    per_class: int = 50
    classes: Optional[tuple[str, ...]] = None  # indices or class names; None: every class
    options: GenerationOptions = DEFAULTS
    seed: int = 0
    batch_size: int = 64  # samples per generator call, per process
    shard_size: int = 4096
    tokenizer: Optional[str] = None  # decode into PNGs and samples.npz with this FlowMo checkpoint
    decode: SamplingOverrides = SamplingOverrides()  # over the tokenizer's own eval.sampling
    decode_batch_size: int = 16
    device: str = "auto"
    graph: bool = True  # on CUDA: replay the sampling loop from a CUDA graph


@dataclass(frozen=True)
class Plan:
    """What the rows are: row r is sample `indices[r]` of class `labels[r]` (-1: unconditional)."""

    labels: tuple[int, ...]
    indices: tuple[int, ...]
    names: tuple[str, ...]


def log(message: str) -> None:
    print(f"generate: {message}", file=sys.stderr, flush=True)


def pick_classes(wanted: Optional[Sequence[str]], names: Optional[list]) -> list[int]:
    """--classes (indices or names) -> class indices; every class when not given; [-1] for no classes."""
    if names is None:
        if wanted:
            raise ValueError("--classes: this generator is unconditional (trained without classes); leave it out")
        return [-1]
    if not wanted:
        return list(range(len(names)))
    picked = []
    for item in wanted:
        if item in names:
            picked.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            picked.append(int(item))
        else:
            raise ValueError(f"--classes: {item!r} is neither a class name nor an index below {len(names)} "
                             f"(classes: {', '.join(map(str, names[:5]))}{', ...' if len(names) > 5 else ''})")
    return picked


def make_plan(classes: list[int], per_class: int, names: Optional[list]) -> Plan:
    rows = [(c, i) for c in classes for i in range(per_class)]
    label_name = (lambda c: "sample") if names is None else (lambda c: str(names[c]))
    return Plan(tuple(c for c, _ in rows), tuple(i for _, i in rows),
                tuple(f"{label_name(c)}/{i:06d}" for c, i in rows))


def planned_manifest(s: GenerateSettings, loaded: LoadedGenerator, path: str, plan: Plan, spec: TokenSpec) -> dict:
    """tokenize's manifest of these rows (the tokenizer's record, so detokenize checks it), plus how they were made."""
    src = loaded.source
    data = {"source": f"generated by {os.path.abspath(path)}", "image_size": src.tokenizer_config["data"]["image_size"],
            "num_images": len(plan.names), "names_sha256": names_sha256(plan.names)}
    manifest = new_manifest(src.checkpoint, src.tokenizer_config, spec, data, s.shard_size)
    manifest["classes"] = src.class_names  # the generator's classes: row labels index them, as tokenize's
    manifest["generation"] = {
        "generator": {"path": os.path.abspath(path), "sha256": file_sha256(path), "which": s.which,
                      "total_steps": loaded.total_steps},
        "options": dataclasses.asdict(s.options), "seed": s.seed, "per_class": s.per_class,
        "classes": sorted(set(plan.labels)),
    }
    return manifest


def check_same_generation(out: str, planned: dict) -> None:
    existing = load_manifest(out) if os.path.isdir(out) else None
    if existing is not None and existing.get("generation") != planned["generation"]:
        raise ValueError(f"{out} holds samples made with other settings or another generator checkpoint: use a "
                         "new --out, or delete it to start over")


def make_sampler(loaded: LoadedGenerator, device: torch.device, graph: bool):
    """(labels, keys, options) -> ids, under the same autocast on every path (bf16 on CUDA, none elsewhere): a
    CUDA graph per shape on CUDA unless `graph` is off, eager `generate` otherwise."""
    if device.type == "cuda" and graph:
        run = GraphedGenerator(loaded.model)
    else:
        run = functools.partial(generate, loaded.model)

    def sample(labels, keys, options):
        with autocast_for(device):
            return run(labels, keys, options)

    return sample


def generate_shards(s: GenerateSettings, loaded: LoadedGenerator, plan: Plan, spec: TokenSpec,
                    shards: list[tuple[int, range]], device: torch.device, progress: bool, desc: str) -> int:
    """Make and write each (k, rows) shard, in batches of --batch-size (every call at one size: a short batch is
    padded, the padding's rows dropped; a sample depends only on its key). Returns rows made."""
    sample = make_sampler(loaded, device, s.graph)
    conditional = loaded.source.class_names is not None
    total = sum(len(items) for _, items in shards)
    size = min(s.batch_size, total)
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for k, items in shards:
            parts = []
            for start in range(items.start, items.stop, s.batch_size):
                rows = padded(list(range(start, min(start + s.batch_size, items.stop))), size)
                count = min(s.batch_size, items.stop - start)
                labels = [plan.labels[r] for r in rows]
                keys = sample_keys(s.seed, labels, [plan.indices[r] for r in rows], device)
                label_tensor = torch.tensor(labels, device=device) if conditional else None
                parts.append(sample(label_tensor, keys, s.options)[:count].cpu().numpy().astype(spec.dtype))
                bar.update(count)
            sources = [{"index": r, "name": plan.names[r], **({"label": plan.labels[r]} if conditional else {})}
                       for r in items]
            write_shard(s.out, k, items, np.concatenate(parts), sources, [])
    return total


def decode_images(s: GenerateSettings, procs: Processes) -> int:
    """This process's share of the PNGs not yet written, through the tokenizer's sampler; returns how many."""
    images = os.path.join(s.out, IMAGES)
    shards = TokenShards(s.out)
    detok = DetokenizeSettings(ckpt=s.tokenizer, tokens=s.out, out=images, batch_size=s.decode_batch_size,
                               device=s.device, sampling=s.decode, seed=s.seed)
    model = load_matching_model(detok, shards, procs.device)
    sampling = s.decode.over(model.sampling())
    size = shards.manifest["data"]["image_size"]
    todo = rows_to_decode(len(shards), images, procs.rank, procs.world_size)
    os.makedirs(images, exist_ok=True)
    if procs.is_main:
        log(f"decoding with {s.tokenizer}: {sampling.steps} {sampling.solver} steps, cfg {sampling.cfg}, {size}x{size}")
    with tqdm(total=len(todo), unit="img", desc="decode", disable=not procs.is_main, dynamic_ncols=True) as bar:
        decode_rows(model, shards, todo, images, sampling, s.seed, s.decode_batch_size, bar)
    return len(todo)


def sample_order(count: int, seed: int) -> np.ndarray:
    """The order of samples.npz: position p holds row order[p] (a permutation of range(count) seeded by --seed)."""
    return np.random.default_rng([seed, ORDER_STREAM]).permutation(count)


def write_samples(out: str, seed: int) -> str:
    """OUT/samples.npz from the PNGs in `sample_order`: arr_0 uint8 [N, H, W, 3], arr_1 their labels (with classes),
    rows their rows. Streamed into the zip one image at a time: memory holds one picture, not N."""
    from PIL import Image

    shards = TokenShards(out)
    order = sample_order(len(shards), seed)
    read = lambda r: np.asarray(Image.open(png_path(os.path.join(out, IMAGES), int(r))).convert("RGB"))  # noqa: E731
    shape = read(order[0]).shape
    arrays = {"rows": order.astype(np.int64)}
    if shards.manifest.get("classes") is not None:
        arrays["arr_1"] = np.array([source["label"] for source in shards.sources()], dtype=np.int64)[order]

    def write(f) -> None:
        with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as z:  # np.savez's layout
            with z.open("arr_0.npy", "w", force_zip64=True) as member:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": (len(order), *shape)}
                np.lib.format.write_array_header_1_0(member, header)
                for r in order:
                    picture = read(r)
                    if picture.shape != shape:
                        raise ValueError(f"{png_path(os.path.join(out, IMAGES), int(r))} is {picture.shape[:2]}, the "
                                         f"others {shape[:2]}: delete it and rerun to decode it again")
                    member.write(memoryview(np.ascontiguousarray(picture)).cast("B"))  # no copy
                    del picture  # before the next one is read: one picture in memory at a time
            for key, array in arrays.items():
                with z.open(f"{key}.npy", "w") as member:
                    np.lib.format.write_array(member, array)

    path = os.path.join(out, SAMPLES)
    atomic_write(path, write)
    return path


def fit_steps(s: GenerateSettings, groups: int, announce: bool) -> GenerateSettings:
    """The settings with the sampler's step count resolved for images of `groups` groups (no --steps: the
    default rule, said in the log)."""
    fitted = s.options.fitted(groups)
    if s.options.steps is None and announce:
        log(f"{fitted.steps} decoding steps for {groups} groups per image (no --steps: MaskBit's {MASKBIT_STEPS} "
            f"for {MASKBIT_STEPS * MASKBIT_GROUPS_PER_STEP} groups and more; for fewer, ceil(groups / "
            f"{MASKBIT_GROUPS_PER_STEP}): its {MASKBIT_GROUPS_PER_STEP} groups per step)")
    return dataclasses.replace(s, options=fitted)


def run(settings: GenerateSettings) -> None:
    s = settings
    with processes(s.device, timeout=BARRIER_TIMEOUT) as procs:
        loaded = from_pretrained(s.generator_ckpt, s.which, procs.device)  # a file, run, model folder or hub id
        path = loaded.path
        names = loaded.source.class_names
        plan = make_plan(pick_classes(s.classes, names), s.per_class, names)
        spec = TokenSpec.from_dict(loaded.source.tokens)
        s = fit_steps(s, loaded.model.config.tokens_per_image, procs.is_main)
        s.options.plan(loaded.model.config.tokens_per_image)  # refuse impossible settings before any work
        ranges = shard_ranges(len(plan.names), s.shard_size)

        def start() -> tuple[dict, list[int]]:
            planned = planned_manifest(s, loaded, path, plan, spec)
            check_same_generation(s.out, planned)
            return planned, prepare(s.out, planned, ranges, spec)

        planned, pending = on_rank0(start, procs)
        if procs.is_main:
            log(f"{len(plan.names)} samples -> {len(ranges)} shards in {s.out}; {len(ranges) - len(pending)} done, "
                f"{len(pending)} to make on {procs.world_size} process(es), {procs.device}; {s.options}")
        mine = [(k, ranges[k]) for k in pending[procs.rank :: procs.world_size]]
        if mine:
            began = time.perf_counter()
            count = generate_shards(s, loaded, plan, spec, mine, procs.device, procs.is_main,
                                    f"generate rank {procs.rank}/{procs.world_size}")
            seconds = time.perf_counter() - began
            log(f"rank {procs.rank}: {count} samples in {seconds:.1f} s, {count / seconds:.1f} samples/s")
        barrier(procs)
        on_rank0(lambda: finish(s.out, planned, ranges), procs)
        if s.tokenizer is None:
            return
        decoded = sum(gather_objects(decode_images(s, procs), procs))  # also waits for every rank's PNGs
        if decoded == 0 and os.path.exists(os.path.join(s.out, SAMPLES)):
            if procs.is_main:
                log(f"every image already decoded; {SAMPLES} unchanged")
            return
        written = on_rank0(lambda: write_samples(s.out, s.seed), procs)
        if procs.is_main:
            log(f"wrote {written}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    """The command's flags (eval.sweep takes them as its parent parser, add_help=False)."""
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="generator checkpoint (train.generator), its run folder, a "
                   "model folder of save_pretrained, or a Hugging Face repository user/repo holding one")
    p.add_argument("--which", default="ema", choices=("ema", "model"), help="EMA or raw weights (default: ema)")
    p.add_argument("--out", required=True, help="output folder (created; reused by a rerun)")
    p.add_argument("--per-class", type=flags.positive_int, default=50, help="samples per class (default 50)")
    p.add_argument("--classes", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
                   help="comma-separated class indices or names (default: every class)")
    g = add_generation_flags(p)
    g.add_argument("--seed", type=flags.seed, default=0,
                   help="sample (class, i) draws from its own (seed, class, i) stream; also orders samples.npz")
    p.add_argument("--batch-size", type=flags.positive_int, default=64, help="samples per generator call, per process")
    p.add_argument("--shard-size", type=flags.positive_int, default=4096, help="rows per shard file (default 4096)")
    d = p.add_argument_group("decoding (with --tokenizer; defaults: the tokenizer checkpoint's eval.sampling)")
    d.add_argument("--tokenizer", help="FlowMo checkpoint (file, or flowmo_lo / flowmo_hi) to decode the rows with")
    d.add_argument("--decode-steps", type=flags.positive_int, help="FlowMo sampler steps")
    d.add_argument("--decode-cfg", type=float, help="FlowMo sampler guidance scale")
    d.add_argument("--decode-solver", choices=SOLVERS, help="FlowMo sampler ODE solver (as eval.rfid's --solver)")
    d.add_argument("--decode-sampler", choices=tuple(NAMED_SAMPLERS),
                   help="a named FlowMo sampler (as eval.rfid's --sampler), under the two flags above")
    d.add_argument("--decode-batch-size", type=flags.positive_int, default=16, help="images per decoder call")
    flags.add_device_flag(p)
    p.add_argument("--no-graph", action="store_true", help="on CUDA, run the sampling loop eagerly (no CUDA graph)")
    return p


def add_generation_flags(p: argparse.ArgumentParser):
    """A flag for every `GenerationOptions` field (dest: the field's name), each with its default; returns the
    group."""
    g = p.add_argument_group(
        "generator sampler (MaskGiT decoding); defaults: MaskBit's tuned 18-bit configuration "
        "(configs/generator/maskbit_generator_18bit.yaml) in our guidance convention uncond + cfg (cond - uncond), "
        "so its guidance_scale 5.7 (cond + s (cond - uncond)) is --cfg 6.7")
    table = {
        "steps": dict(type=flags.positive_int, help=f"decoding steps (default: fit the image: {MASKBIT_STEPS} for "
                      f"{MASKBIT_STEPS * MASKBIT_GROUPS_PER_STEP} groups per image and more, ceil(groups / "
                      f"{MASKBIT_GROUPS_PER_STEP}) for fewer)"),
        "cfg": dict(type=float, help="guidance scale the ramp rises to from 1 at step 0; 1: none (default %(default)s, "
                    "MaskBit's 5.7 + 1)"),
        "cfg_schedule": dict(choices=CFG_SCHEDULES, help="the guidance ramp (default %(default)s, MaskBit's "
                             "power-cosine: 1 + (cfg - 1) (1 - cos(pi r^power)) / 2 at r = step / steps)"),
        "cfg_power": dict(type=flags.positive_float, help="power of the pow_cosine ramp (default %(default)s, "
                          "MaskBit's scale_pow)"),
        "temperature": dict(type=float, help="Gumbel temperature of the confidence, annealed linearly to 0 "
                            "(default %(default)s, MaskBit's randomize_temperature)"),
        "softmax_temperature": dict(type=flags.positive_float, help="temperature of the softmax each new id is "
                                    "drawn from (default %(default)s)"),
        "schedule": dict(flag="--mask-schedule", choices=MASK_SCHEDULES, help="the fraction still masked after "
                         "each step (default %(default)s, MaskBit's)"),
    }
    for field in dataclasses.fields(GenerationOptions):
        spec = dict(table[field.name])  # a field without a flag fails here: every setting has one
        flag = spec.pop("flag", "--" + field.name.replace("_", "-"))
        g.add_argument(flag, dest=field.name, default=getattr(DEFAULTS, field.name), **spec)
    return g


def generation_options(args: argparse.Namespace) -> GenerationOptions:
    """The `GenerationOptions` of the flags `add_generation_flags` added (the defaults for any a parser dropped:
    eval.sweep replaces --cfg and --temperature with its grid)."""
    names = [f.name for f in dataclasses.fields(GenerationOptions) if hasattr(args, f.name)]
    return DEFAULTS.replace(**{name: getattr(args, name) for name in names})


def settings_from(args: argparse.Namespace) -> GenerateSettings:
    options = generation_options(args)
    return GenerateSettings(
        generator_ckpt=args.generator, out=args.out, which=args.which, per_class=args.per_class, classes=args.classes,
        options=options, seed=args.seed, batch_size=args.batch_size, shard_size=args.shard_size,
        tokenizer=resolve_checkpoint(args.tokenizer) if args.tokenizer else None,
        decode=decode_overrides(args),
        decode_batch_size=args.decode_batch_size, device=args.device, graph=not args.no_graph,
    )


def decode_overrides(args: argparse.Namespace) -> SamplingOverrides:
    """--decode-sampler's settings with --decode-steps, --decode-cfg, --decode-solver over them."""
    named = NAMED_SAMPLERS[args.decode_sampler] if args.decode_sampler else SamplingOverrides()
    return named.then(SamplingOverrides(steps=args.decode_steps, cfg=args.decode_cfg, solver=args.decode_solver))


def main(argv: Optional[list[str]] = None) -> None:
    run(settings_from(parse_args(argv)))


def cli(argv: Optional[list[str]] = None) -> None:
    """main() with a user's mistake (missing or unusable checkpoint, unknown class, impossible setting, a folder
    of other samples) reported in one line."""
    with flags.one_line_errors("generate"):
        main(argv)


if __name__ == "__main__":
    cli()
