r"""Tokenize a whole data set into token shards (see `flowmo_fast.formats.token_shards` for the folder layout).

    python -m flowmo_fast.tokenize --ckpt flowmo_lo.pth --data DIR --out tokens/
    python -m flowmo_fast.tokenize --ckpt flowmo_lo.pth --data 'shards/train-{000000..000099}.tar' --out tokens/
    torchrun --nproc-per-node=8 -m flowmo_fast.tokenize --ckpt flowmo_hi.pth \
        --imagenet-tar ILSVRC2012_img_train.tar --imagenet-index imagenet_train_index_overall.json --out tokens/

With neither --data nor --imagenet-tar it encodes the sample photos bundled with scikit-image.
Only the encoder and the quantizer run (no sampling); on CUDA under bf16 autocast and torch.compile.
Images are centre crops at --image-size. LFQ checkpoints give token ids, exactly `Tokenizer.encode` of the
same images. KL checkpoints give the posterior mean of each latent in float16 (the logvar half is dropped):
the mean is deterministic, so reruns and any number of processes give the same bytes (upstream's eval path
adds exp(logvar / 2) noise to it).

Class labels: an image folder laid out as torchvision's ImageFolder (one sub-folder per class, every image in
one), WebDataset shards whose every sample has a .cls, or an ImageNet tar (synsets in the names, or the index's
"label") records each row's class (labels.npy) and the sorted class names (the manifest's "classes"; for shards
the numbers "0", "1", ...); other data sets have no classes (unconditional generation). Shards give the same
rows as a folder of the same images in the same order (rows: shard order, then member order).
--flip adds each image's mirror image as the row right after its own.

Each process (torchrun rank) encodes a disjoint set of the unfinished shards; rank 0 then writes the index
and manifest. A rerun skips finished shards and writes nothing when all are done. Images that fail to decode
are left out of the rows and listed in the manifest's "failed".
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from flowmo_fast import flags
from flowmo_fast.codec import Tokenizer
from flowmo_fast.distributed import Processes, barrier, on_rank0, processes
from flowmo_fast.fastpath import compile_checked
from flowmo_fast.flowmo.model import FlowMo, autocast_for
from flowmo_fast.formats.checkpoint import Which, file_sha256, load_checkpoint, read_config
from flowmo_fast.formats.data import ImageDataset, ImageSource, collate_images, nothing_decodes
from flowmo_fast.formats.pretrained import resolve_checkpoint
from flowmo_fast.formats.token_shards import (
    INDEX,
    MANIFEST,
    TokenSpec,
    check_resumable,
    check_tokenizable,
    finished_manifest,
    index_text,
    load_manifest,
    names_sha256,
    new_manifest,
    read_shard_record,
    row_labels,
    shard_is_done,
    shard_ranges,
    to_json,
    write_labels_if_changed,
    write_shard,
    write_text_if_changed,
)

# Ranks that finish early wait for the others at the end; encoding a shard can take long on a CPU.
BARRIER_TIMEOUT = datetime.timedelta(hours=6)


def log(message: str) -> None:
    print(f"tokenize: {message}", file=sys.stderr, flush=True)


def make_encoder(model: FlowMo, spec: TokenSpec, compile: bool, batch_size: int) -> Callable[[Tensor], np.ndarray]:
    """images [B, 3, H, W] in [-1, 1] -> numpy rows [B, *spec.row_shape] in spec.dtype.

    bf16 autocast on CUDA. Compiled, the encoder sees only full batches (short ones are zero-padded; images
    do not interact), so it compiles once."""
    device = next(model.parameters()).device
    if compile:  # checked against the eager encoder on its first call (flowmo_fast.fastpath)
        compile_checked(model.encoder, "compiled encoder", model.fast_checks, dynamic=False)
    tokenizer = Tokenizer(model) if spec.kind == "ids" else None
    context_dim = model.config.model.context_dim

    @torch.no_grad()
    def encode(images: Tensor) -> np.ndarray:
        n = images.shape[0]
        images = images.to(device, non_blocking=True)
        if compile and n < batch_size:
            images = torch.cat([images, images.new_zeros((batch_size - n, *images.shape[1:]))])
        if tokenizer is not None:
            rows = tokenizer.encode(images)
        else:
            with autocast_for(device):
                rows = model.encode(images)[..., :context_dim].half()  # KL posterior mean; logvar follows it
        return rows[:n].cpu().numpy().astype(spec.dtype, copy=False)

    return encode


def encode_rows(encode: Callable[[Tensor], np.ndarray], images: Tensor, flip: bool) -> np.ndarray:
    """images [B, 3, H, W] -> rows [B, ...]; with `flip` [2B, ...]: image b's row at 2b, its mirror image's at
    2b + 1."""
    rows = encode(images)
    if not flip:
        return rows
    mirrored = encode(images.flip(-1))
    return np.stack([rows, mirrored], axis=1).reshape(2 * len(rows), *rows.shape[1:])


def shard_batches(items: range, batch_size: int) -> list[list[int]]:
    return [list(items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def encode_shards(
    encode: Callable[[Tensor], np.ndarray],
    spec: TokenSpec,
    dataset: ImageDataset,
    shards: list[tuple[int, range]],
    out: str,
    batch_size: int,
    num_workers: int,
    pin_memory: bool,
    progress: bool,
    desc: str,
    flip: bool = False,
) -> int:
    """Encode and write each (k, rows) shard; batches never straddle shards. Returns images read.
    `flip`: each image gives two consecutive rows, as it is, then mirrored left to right (`"flip": true` in its
    source line)."""
    plan = [(k, items, shard_batches(items, batch_size)) for k, items in shards]
    batches = [batch for _, _, shard in plan for batch in shard]
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=num_workers, collate_fn=collate_images, pin_memory=pin_memory
    )
    loaded = iter(loader)
    total = sum(len(items) for _, items, _ in plan)
    with tqdm(total=total, unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        for k, items, requested in plan:
            rows, sources, failed = [], [], []
            for wanted in requested:
                batch = next(loaded)
                got = batch.rows.tolist()
                if got:
                    rows.append(encode_rows(encode, batch.images, flip))
                for i, name, label in zip(got, batch.names, batch.labels.tolist()):
                    source = {"index": i, "name": name, **({"label": label} if label >= 0 else {})}
                    sources += [source, {**source, "flip": True}] if flip else [source]
                failed.extend({"index": i, "name": dataset.names[i]} for i in sorted(set(wanted) - set(got)))
                bar.update(len(wanted))
            rows = np.concatenate(rows) if rows else np.zeros((0, *spec.row_shape), spec.dtype)
            write_shard(out, k, items, rows, sources, failed)
    return total


def prepare(out: str, planned: dict, ranges: list[range], spec: TokenSpec) -> list[int]:
    """Rank 0: check `out` belongs to this run, record the plan, and list the shards still to write."""
    os.makedirs(out, exist_ok=True)
    check_resumable(out, planned)
    for leftover in os.listdir(out):  # temporary files of writes a killed run never finished
        if leftover.startswith(".tmp-"):
            os.remove(os.path.join(out, leftover))
    if load_manifest(out) is None:
        write_text_if_changed(os.path.join(out, MANIFEST), to_json(planned))
    return [k for k, items in enumerate(ranges) if not shard_is_done(out, k, items, spec)]


def finish(out: str, planned: dict, ranges: list[range]) -> dict:
    """Rank 0, after every rank is done: the index and the final manifest, each rewritten only if it changed."""
    records = [read_shard_record(out, k) for k in range(len(ranges))]
    missing = [k for k, r in enumerate(records) if r is None]
    if missing:
        raise RuntimeError(f"shards {missing[:5]} of {out} have no record after encoding; run the command again")
    manifest = finished_manifest(planned, records)
    wrote_labels = planned["classes"] is not None and write_labels_if_changed(out, row_labels(records))
    wrote_index = write_text_if_changed(os.path.join(out, INDEX), index_text(records))
    wrote_manifest = write_text_if_changed(os.path.join(out, MANIFEST), to_json(manifest))
    if not (wrote_labels or wrote_index or wrote_manifest):
        log(f"{INDEX} and {MANIFEST} unchanged")
    return manifest


@dataclass(frozen=True)
class TokenizeSettings:
    """One tokenize run (the command's flags, `flowmo_fast.tokenize`)."""

    ckpt: str  # a checkpoint file (a published name resolved already)
    out: str  # output folder (created; reused by a rerun)
    which: Which = "ema"
    source: ImageSource = ImageSource()  # the images (default: the bundled sample photos)
    batch_size: int = 64  # images per encoder call, per process
    image_size: Optional[int] = None  # crop side; None: the checkpoint's data.image_size
    shard_size: int = 4096  # images per shard file
    num_workers: int = 0  # data loader processes per process
    device: str = "auto"
    compile: bool = True  # torch.compile the encoder on CUDA
    flip: bool = False  # also a row of each image mirrored left to right (right after the image's own)


def run(settings: TokenizeSettings) -> None:
    """Encode the images into token shards in `settings.out`, on every process of the command (torchrun)."""
    s = settings
    with processes(s.device, timeout=BARRIER_TIMEOUT) as procs:
        check_tokenizable(read_config(s.ckpt, s.which).model)  # before loading a model (or an LLM)
        model = load_checkpoint(s.ckpt, which=s.which, device=procs.device)
        spec = TokenSpec.for_model(model)
        size = s.image_size or model.config.data.image_size
        if size % model.patch_size:
            raise ValueError(f"--image-size {size} must be a multiple of the patch size {model.patch_size}")
        dataset = s.source.open(size)
        ranges = shard_ranges(len(dataset), s.shard_size)
        planned, pending = on_rank0(lambda: plan(s, model, spec, dataset, ranges), procs)
        if procs.is_main:
            classes = dataset.class_names
            mirrored = ", each image also mirrored" if s.flip else ""
            log(f"{dataset.describe()}, {f'{len(classes)} classes' if classes else 'no classes'}{mirrored} -> "
                f"{len(ranges)} shards of {s.shard_size} in {s.out}; {len(ranges) - len(pending)} already done, "
                f"{len(pending)} to encode on {procs.world_size} process(es), {procs.device}")
        encode_mine(s, model, spec, dataset, [(k, ranges[k]) for k in pending[procs.rank :: procs.world_size]], procs)
        barrier(procs)
        manifest = on_rank0(lambda: finish(s.out, planned, ranges), procs)
        if procs.is_main:
            c = manifest["counts"]
            log(f"{c['rows']} rows ({spec.kind} {spec.dtype} {list(spec.row_shape)}), {c['failed']} failed images")
            for entry in manifest["failed"][:10]:
                log(f"  could not decode row {entry['index']}: {entry['name']}")
        if manifest["counts"]["rows"] == 0:
            raise nothing_decodes(dataset.describe(), manifest["counts"]["failed"])


def plan(s: TokenizeSettings, model: FlowMo, spec: TokenSpec, dataset: ImageDataset, ranges: list[range]):
    """Rank 0: this run's manifest (what it encodes, with what, into which shards) and the shards still to write."""
    checkpoint = {"path": os.path.abspath(s.ckpt), "sha256": file_sha256(s.ckpt), "which": s.which}
    data = {"source": dataset.describe(), "image_size": dataset.size, "num_images": len(dataset),
            "names_sha256": names_sha256(dataset.names)}
    planned = new_manifest(checkpoint, model.config.to_dict(), spec, data, s.shard_size,
                           classes=dataset.class_names, flip=s.flip)
    return planned, prepare(s.out, planned, ranges, spec)


def encode_mine(
    s: TokenizeSettings, model: FlowMo, spec: TokenSpec, dataset: ImageDataset, mine: list[tuple[int, range]],
    procs: Processes,
) -> None:
    """This process's (k, rows) shards, encoded and written, with its throughput in one log line."""
    rank, world, device = procs.rank, procs.world_size, procs.device
    if not mine:  # rank 0 has none only when no shard is left
        if procs.is_main:
            log("all shards already done; nothing to encode")
        return
    encode = make_encoder(model, spec, device.type == "cuda" and s.compile, s.batch_size)
    start = time.perf_counter()
    count = encode_shards(
        encode, spec, dataset, mine, s.out, s.batch_size, s.num_workers, device.type == "cuda",
        progress=procs.is_main, desc=f"tokenize rank {rank}/{world}", flip=s.flip,
    )
    seconds = time.perf_counter() - start
    log(f"rank {rank}: {count} images in {len(mine)} shards, {seconds:.1f} s, {count / seconds:.1f} images/s")


# ---- the command: flags -> one settings object -> run ----------------------------------------------------


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m flowmo_fast.tokenize", description=__doc__,
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


def settings_from(args: argparse.Namespace) -> TokenizeSettings:
    return TokenizeSettings(
        ckpt=resolve_checkpoint(args.ckpt), out=args.out, which=args.which, source=flags.image_source(args),
        batch_size=args.batch_size, image_size=args.image_size, shard_size=args.shard_size,
        num_workers=args.num_workers, device=args.device, compile=not args.no_compile, flip=args.flip,
    )


def main(argv: Optional[list[str]] = None) -> None:
    run(settings_from(parse_args(argv)))


def cli(argv: Optional[list[str]] = None) -> None:
    """main() with bad input (missing files, wrong settings, a foreign output folder, undecodable data) reported
    in one line."""
    with flags.one_line_errors("tokenize"):
        main(argv)


if __name__ == "__main__":
    cli()
