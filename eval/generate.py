r"""Generate images with a token generator (train.generator): token rows first, then (with --tokenizer) pictures.

    python -m eval.generate --generator results/NAME/checkpoints/00100000.pth --out gen/ --per-class 50 \
        --tokenizer flowmo_lo
    torchrun --nproc-per-node=8 -m eval.generate --generator CKPT --out gen/ --tokenizer flowmo_lo

Writes into --out token shards in tokenize's format (manifest.json, index.jsonl, shard-*.npy/json, the class
of each row), so `python -m flowmo_fast.detokenize --tokens OUT` decodes them too; with --tokenizer also
OUT/images/00000000.png, ... (one per row) and OUT/samples.npz (ADM's layout: `arr_0` uint8 [N, H, W, 3],
`arr_1` the class of each row for a class-conditional generator) for eval.gfid.

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
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from flowmo_fast import flags
from flowmo_fast.detokenize import DetokenizeSettings, load_matching_model, png_path, rows_to_code, save_png
from flowmo_fast.distributed import Processes, barrier, gather_objects, on_rank0, processes
from flowmo_fast.flowmo.model import autocast_for
from flowmo_fast.formats.checkpoint import atomic_write, file_sha256, list_checkpoints
from flowmo_fast.formats.images import to_uint8
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
from flowmo_fast.maskgit.model import LoadedGenerator, load_generator
from flowmo_fast.maskgit.sampling import GenerationOptions, GraphedGenerator, generate, sample_keys
from flowmo_fast.noise import image_noise
from flowmo_fast.sampler_settings import NAMED_SAMPLERS, SOLVERS, SamplingOverrides
from flowmo_fast.tokenize import finish, prepare

BARRIER_TIMEOUT = datetime.timedelta(hours=6)
IMAGES = "images"
SAMPLES = "samples.npz"
DEFAULTS = GenerationOptions()


@dataclass(frozen=True)
class GenerateSettings:
    """One eval.generate run (the command's flags)."""

    generator_ckpt: str  # a generator checkpoint file, or a run folder (its newest checkpoint)
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


def generator_path(path: str) -> str:
    """A checkpoint file as it is; a run folder (or its checkpoints folder): its newest checkpoint."""
    if not os.path.isdir(path):
        return path
    run = os.path.dirname(path.rstrip(os.sep)) if os.path.basename(path.rstrip(os.sep)) == "checkpoints" else path
    found = list_checkpoints(run)
    if not found:
        raise FileNotFoundError(f"{path} is a folder without checkpoints/<step>.pth: give a generator checkpoint file")
    return found[-1]


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
    """(labels, keys, options) -> ids: a CUDA graph per shape on CUDA (bf16 autocast), `generate` elsewhere."""
    if device.type == "cuda" and graph:
        graphed = GraphedGenerator(loaded.model)

        def sample(labels, keys, options):
            with autocast_for(device):
                return graphed(labels, keys, options)

        return sample
    return lambda labels, keys, options: generate(loaded.model, labels, keys, options)


def generate_shards(s: GenerateSettings, loaded: LoadedGenerator, plan: Plan, spec: TokenSpec,
                    shards: list[tuple[int, range]], device: torch.device, progress: bool, desc: str) -> int:
    """Make and write each (k, rows) shard, in batches of --batch-size. Returns rows made."""
    sample = make_sampler(loaded, device, s.graph)
    conditional = loaded.source.class_names is not None
    total = sum(len(items) for _, items in shards)
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for k, items in shards:
            parts = []
            for start in range(items.start, items.stop, s.batch_size):
                rows = range(start, min(start + s.batch_size, items.stop))
                labels = [plan.labels[r] for r in rows]
                keys = sample_keys(s.seed, labels, [plan.indices[r] for r in rows], device)
                label_tensor = torch.tensor(labels, device=device) if conditional else None
                parts.append(sample(label_tensor, keys, s.options).cpu().numpy().astype(spec.dtype))
                bar.update(len(rows))
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
    todo = [r for r in range(len(shards)) if not os.path.exists(png_path(images, r))][procs.rank :: procs.world_size]
    os.makedirs(images, exist_ok=True)
    if procs.is_main:
        log(f"decoding with {s.tokenizer}: {sampling.steps} {sampling.solver} steps, cfg {sampling.cfg}, {size}x{size}")
    with tqdm(total=len(todo), unit="img", desc="decode", disable=not procs.is_main, dynamic_ncols=True) as bar:
        for i in range(0, len(todo), s.decode_batch_size):
            rows = todo[i : i + s.decode_batch_size]
            code = rows_to_code(model, shards.spec, np.stack([shards[r] for r in rows]))
            noise = image_noise(rows, s.seed, (3, size, size))
            for row, image in zip(rows, to_uint8(model.sample_images(code, (size, size), sampling, noise=noise))):
                save_png(image, png_path(images, row))
            bar.update(len(rows))
    return len(todo)


def write_samples(out: str) -> str:
    """OUT/samples.npz from the PNGs, in row order: arr_0 uint8 [N, H, W, 3] (+ arr_1 labels with classes)."""
    from PIL import Image

    shards = TokenShards(out)
    pictures = np.stack([np.asarray(Image.open(png_path(os.path.join(out, IMAGES), r)).convert("RGB"))
                         for r in range(len(shards))])
    arrays = {"arr_0": pictures}
    if shards.manifest.get("classes") is not None:
        arrays["arr_1"] = np.array([source["label"] for source in shards.sources()], dtype=np.int64)
    path = os.path.join(out, SAMPLES)
    atomic_write(path, lambda f: np.savez(f, **arrays))
    return path


def run(settings: GenerateSettings) -> None:
    s = settings
    with processes(s.device, timeout=BARRIER_TIMEOUT) as procs:
        path = generator_path(s.generator_ckpt)
        loaded = load_generator(path, s.which, procs.device)
        names = loaded.source.class_names
        plan = make_plan(pick_classes(s.classes, names), s.per_class, names)
        spec = TokenSpec.from_dict(loaded.source.tokens)
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
        written = on_rank0(lambda: write_samples(s.out), procs)
        if procs.is_main:
            log(f"wrote {written}")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="generator checkpoint (train.generator), or its run folder")
    p.add_argument("--which", default="ema", choices=("ema", "model"), help="EMA or raw weights (default: ema)")
    p.add_argument("--out", required=True, help="output folder (created; reused by a rerun)")
    p.add_argument("--per-class", type=flags.positive_int, default=50, help="samples per class (default 50)")
    p.add_argument("--classes", type=lambda t: tuple(x.strip() for x in t.split(",") if x.strip()),
                   help="comma-separated class indices or names (default: every class)")
    g = p.add_argument_group(f"generator sampler (MaskGiT decoding; defaults: {DEFAULTS})")
    g.add_argument("--steps", type=flags.positive_int, default=DEFAULTS.steps, help="decoding steps")
    g.add_argument("--cfg", type=float, default=DEFAULTS.cfg, help="guidance scale the ramp rises to (1: none)")
    g.add_argument("--cfg-schedule", default=DEFAULTS.cfg_schedule, choices=("constant", "linear", "pow_cosine"))
    g.add_argument("--temperature", type=float, default=DEFAULTS.temperature,
                   help="Gumbel temperature of the confidence, annealed linearly to 0")
    g.add_argument("--seed", type=flags.seed, default=0,
                   help="sample (class, i) draws from its own (seed, class, i) stream")
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
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> GenerateSettings:
    options = DEFAULTS.replace(steps=args.steps, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                               temperature=args.temperature)
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
