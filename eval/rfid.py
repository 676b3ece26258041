"""`python -m eval.rfid --ckpt flowmo_hi.pth`: reconstruct a data set with a FlowMo checkpoint and report rFID,
PSNR, SSIM and LPIPS (AlexNet, VGG) as upstream's evaluate.py measures them (eval/metrics.py says exactly how,
and where we differ: per-image PSNR).

Also runs as `torchrun --nproc-per-node=N -m eval.rfid ...`: batches are dealt to the processes round-robin,
results are gathered and put back in data-set order, so every process count gives the same numbers. Each
image's sampler noise (and KL posterior sample, or LLM span start) comes from its own generator, seeded by (--seed,
the image's row in the data set), so a reconstruction does not depend on batching or on the number of processes.
Checkpoints of model.quantization_type=qwen2.5-coder-0.5b[_span_P] also report infill_mse.

Writes into --out: metrics.json (metrics, image count, checkpoint sha256, config, sampler settings, speed),
grid.png (originals on top, reconstructions below) and, with --save-reconstructions, one PNG per image.

The evaluation of one model (`measure_model`) and the flags that choose the images, the sampler and the metric
networks (`add_evaluation_flags`) are shared with eval.watch, which evaluates every checkpoint of a run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Protocol, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from eval import metrics, weights
from flowmo_fast import flags, load_checkpoint
from flowmo_fast.distributed import Processes, gather_objects, gather_rows, processes
from flowmo_fast.formats.checkpoint import Which, atomic_write, file_sha256, read_checkpoint
from flowmo_fast.formats.data import ImageDataset, ImageSource, collate_images, nothing_decodes
from flowmo_fast.formats.images import GRID_IMAGES, image_grid, to_uint8
from flowmo_fast.formats.pretrained import resolve_checkpoint
from flowmo_fast.sampler_settings import SamplingOptions, SamplingOverrides


@dataclass(frozen=True)
class MetricInfo:
    definition: str
    higher_is_better: bool  # which way is better, for choosing a best checkpoint (eval.watch --select)


METRICS = {
    "rfid": MetricInfo(
        "FID between the 2048-d pool features of pytorch-fid's FID Inception on originals and reconstructions", False
    ),
    "psnr": MetricInfo(
        "mean over images of each image's PSNR on 8-bit pixels (upstream: every image counts its batch's PSNR)", True
    ),
    "ssim": MetricInfo(
        "mean over images; scikit-image structural_similarity defaults (7x7 uniform window), 8-bit pixels", True
    ),
    "lpips_alex": MetricInfo("mean over images; lpips package v0.1, AlexNet", False),
    "lpips_vgg": MetricInfo("mean over images; lpips package v0.1, VGG16", False),
    "infill_mse": MetricInfo(
        "qwen2.5-coder-0.5b types only: mean over images of the mean squared error between the LLM's infilled "
        "span and the encoder's own code there", False
    ),
}
METRIC_DEFINITIONS = {name: info.definition for name, info in METRICS.items()}


@dataclass(frozen=True)
class MetricWeights:
    """Where the metric networks' weights are: files given (None: the environment variable, else the torch hub
    cache, downloading if missing); `lpips`: measure LPIPS (AlexNet and VGG weights needed)."""

    inception: Optional[str] = None
    lpips_alex: Optional[str] = None
    lpips_vgg: Optional[str] = None
    lpips: bool = True


@dataclass(frozen=True)
class EvaluationSettings:
    """How one model is evaluated (eval.rfid and eval.watch): weights, images, sampler, metric networks."""

    which: Which = "ema"
    source: ImageSource = ImageSource()  # the data set (default: the bundled sample photos)
    subsample: int = 1  # every N-th image
    max_images: Optional[int] = None  # at most the first K kept images
    batch_size: int = 16  # images per batch and process
    workers: int = 0  # data loader processes per process
    sampling: SamplingOverrides = SamplingOverrides()  # over the checkpoint's eval.sampling
    seed: int = 0  # image row r's noise: its own (seed, r) generator
    weights: MetricWeights = MetricWeights()


@dataclass(frozen=True)
class RfidSettings:
    """One eval.rfid run."""

    ckpt: str  # a checkpoint file (a published name resolved already)
    out: str  # folder for metrics.json, grid.png and the reconstructions
    evaluation: EvaluationSettings = EvaluationSettings()
    save_reconstructions: bool = False
    device: str = "auto"


def add_image_flags(parser: argparse.ArgumentParser) -> None:
    """Which images of the data set, and how many at once."""
    data = parser.add_argument_group("which images, how many at once")
    data.add_argument("--subsample", type=flags.positive_int, default=1, metavar="N",
                      help="keep every N-th image (upstream's eval.subsample_rate)")
    data.add_argument("--max-images", type=flags.positive_int, metavar="K", help="stop after the first K kept images")
    data.add_argument("--batch-size", type=flags.positive_int, default=16, help="images per batch and process")
    data.add_argument("--workers", type=flags.non_negative_int, default=flags.default_workers(),
                      help="data loader processes per process (default: the CPUs beside this one, at most 8)")


def add_metric_weight_flags(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("metric network weights (default: torch hub cache, downloading if missing)")
    w.add_argument(weights.INCEPTION.flag, metavar="PATH", help=f"pt_inception-2015-12-05-6726825d.pth (or ${weights.INCEPTION.env})")
    w.add_argument(weights.LPIPS_ALEX.flag, metavar="PATH", help=f"torchvision alexnet-owt-7be5be79.pth (or ${weights.LPIPS_ALEX.env})")
    w.add_argument(weights.LPIPS_VGG.flag, metavar="PATH", help=f"torchvision vgg16-397923af.pth (or ${weights.LPIPS_VGG.env})")
    w.add_argument("--no-lpips", action="store_true", help="skip LPIPS (no AlexNet / VGG weights needed)")


def add_evaluation_flags(parser: argparse.ArgumentParser) -> None:
    """What eval.rfid and eval.watch share: --which, the data set, the images, the sampler and the metric weights."""
    parser.add_argument("--which", choices=("ema", "model"), default="ema", help="which weights of the checkpoint")
    flags.add_data_flags(parser)
    add_image_flags(parser)
    flags.add_sampler_flags(parser)
    add_metric_weight_flags(parser)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.rfid",
        description="rFID, PSNR, SSIM and LPIPS of a FlowMo checkpoint's reconstructions (also under torchrun).",
    )
    p.add_argument("--ckpt", required=True, help="upstream or flowmo-fast checkpoint file (config inferred from it), "
                   "or flowmo_lo / flowmo_hi: the published ones, by name")
    add_evaluation_flags(p)
    o = p.add_argument_group("output")
    o.add_argument("--out", metavar="DIR", help="default: eval_results/<checkpoint name>")
    o.add_argument("--save-reconstructions", action="store_true", help="also write every reconstruction as a PNG")
    flags.add_device_flag(o)
    args = p.parse_args(argv)
    flags.check_data_flags(p, args)
    args.out = args.out or os.path.join("eval_results", os.path.splitext(os.path.basename(args.ckpt))[0])
    return args


def evaluation_settings(args: argparse.Namespace) -> EvaluationSettings:
    """The settings `add_evaluation_flags` read."""
    return EvaluationSettings(
        which=args.which, source=flags.image_source(args), subsample=args.subsample, max_images=args.max_images,
        batch_size=args.batch_size, workers=args.workers, sampling=flags.sampling_overrides(args), seed=args.seed,
        weights=MetricWeights(args.inception_weights, args.lpips_alex_weights, args.lpips_vgg_weights,
                              lpips=not args.no_lpips),
    )


def metric_weight_files(
    given: MetricWeights, inception: bool = True
) -> list[tuple[str, weights.WeightsFile, Optional[str]]]:
    """(network, its weight file's spec, the path a flag gave or None) of every metric network asked for: the
    Inception (rFID, unless `inception` is False) and, with LPIPS, its two nets."""
    files = [("inception", weights.INCEPTION, given.inception)] if inception else []
    if given.lpips:
        files += [("alex", weights.LPIPS_ALEX, given.lpips_alex), ("vgg", weights.LPIPS_VGG, given.lpips_vgg)]
    return files


def locate_weights(given: MetricWeights) -> dict[str, str]:
    """Paths of the metric networks' weight files; raises WeightsUnavailable before any real work."""
    return {name: weights.locate(spec, explicit) for name, spec, explicit in metric_weight_files(given)}


def build_metrics(paths: dict[str, str], device: torch.device) -> metrics.ReconstructionMetrics:
    """The metric networks whose weight files `paths` has (without "inception": no features, no rFID)."""
    inception = metrics.InceptionPool3(paths["inception"]) if "inception" in paths else None
    lpips_nets = {net: metrics.build_lpips(net, paths[net]) for net in metrics.LPIPS_NETS if net in paths}
    return metrics.ReconstructionMetrics(inception, lpips_nets).to(device).eval()


def kept_rows(num_rows: int, s: EvaluationSettings) -> list[int]:
    """The data-set rows evaluated: every `subsample`-th, at most `max_images`."""
    return list(range(0, num_rows, s.subsample))[: s.max_images]


def batches_of_rank(num_rows: int, s: EvaluationSettings, procs: Processes) -> list[list[int]]:
    """The kept rows cut into batches; process r takes batches r, r + W, ..."""
    rows = kept_rows(num_rows, s)
    batches = [rows[i : i + s.batch_size] for i in range(0, len(rows), s.batch_size)]
    return batches[procs.rank :: procs.world_size]


def save_pngs(folder: str, rows: Sequence[int], names: Sequence[str], images: Tensor) -> None:
    from PIL import Image

    for row, name, pixels in zip(rows, names, to_uint8(images)):
        stem = os.path.splitext(os.path.basename(name))[0]
        Image.fromarray(pixels).save(os.path.join(folder, f"{row:06d}_{stem}.png"))


def write_json(obj, path: str) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def summarize(gathered: Gathered) -> dict[str, Optional[float]]:
    """Means of the per-image metrics and the rFID (None with fewer than two images; left out without an
    Inception, whose features are then empty)."""
    x, r = gathered.features_originals, gathered.features_reconstructions
    no_inception = len(x) == 0 and len(gathered.per_image["psnr"]) > 0
    out = {} if no_inception else {"rfid": metrics.fid(x.numpy(), r.numpy()) if len(x) >= 2 else None}
    out.update({name: float(values.mean()) for name, values in gathered.per_image.items()})
    return out


def metrics_line(m: dict[str, Optional[float]]) -> str:
    """'rFID 1.2345  PSNR 20.123  SSIM 0.5000  LPIPS-vgg 0.1234' (any further named metric as name value)."""
    parts = [f"rFID {m['rfid']:.4f}" if m.get("rfid") is not None else "rFID n/a (<2 images)"] if "rfid" in m else []
    parts += [f"PSNR {m['psnr']:.3f}", f"SSIM {m['ssim']:.4f}"]
    parts += [f"LPIPS-{k[6:]} {v:.4f}" for k, v in m.items() if k.startswith("lpips_")]
    others = [k for k in m if k not in ("rfid", "psnr", "ssim") and not k.startswith("lpips_")]
    parts += [f"{k} {m[k]:.4g}" if m[k] is not None else f"{k} n/a" for k in others]
    return "  ".join(parts)


def summary_line(result: dict) -> str:
    return (
        metrics_line(result["metrics"])
        + f"  | {result['num_images']} images, {result['images_per_second']:.2f} img/s, {result['wall_time_s']:.1f}s"
    )


def sampler_record(sampling: SamplingOptions, seed: int) -> dict:
    return {**sampling.to_dict(), "seed": seed}


def data_record(dataset: ImageDataset, s: EvaluationSettings, image_size: int) -> dict:
    return {"dataset": dataset.describe(), "subsample": s.subsample, "max_images": s.max_images, "image_size": image_size}


class PerImage(Protocol):
    """More per-image values of each batch, from its rows and reconstructions (eval.decode_curve's distance to
    a reference solution), beside the metrics; `names`: the values it gives."""

    names: Sequence[str]

    def __call__(self, rows: list[int], reconstructions: Tensor) -> dict[str, Tensor]: ...  # name -> float64 [B]


@dataclass
class Collected:
    """What one process measured, in the order it measured it."""

    rows: list = field(default_factory=list)  # data-set rows
    values: dict = field(default_factory=dict)  # metric name -> list of float64 [B]
    features_x: list = field(default_factory=list)  # Inception features of originals, [B, 2048] each
    features_r: list = field(default_factory=list)  # ... of reconstructions
    skipped: list = field(default_factory=list)  # names of undecodable images
    grid: list = field(default_factory=list)  # (originals, reconstructions) of the first batches, main process


@dataclass
class Measured:
    """One model's evaluation, as the main process gets it."""

    metrics: dict[str, Optional[float]]  # metric name -> value (rfid None with fewer than two images)
    num_images: int
    skipped: list[str]  # names of undecodable images
    grid: list  # (originals, reconstructions) of the first images
    loop_seconds: float  # reconstructing, measuring, gathering

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.loop_seconds


def reconstruct_and_measure(
    model, measure, loader, sampling: SamplingOptions, seed: int, procs: Processes, total: int,
    recon_dir: Optional[str] = None, desc: str = "reconstructing", also: Optional[PerImage] = None,
) -> Collected:
    names = (*measure.names, *model.quantizer.per_sample_names, *(also.names if also is not None else ()))
    got = Collected(values={name: [] for name in names})
    psnr_sum = 0.0
    bar = tqdm(total=total, unit="img", desc=desc, disable=not procs.is_main, dynamic_ncols=True)
    for batch in loader:
        got.skipped += batch.skipped_names
        bar.update(batch.skipped)
        if len(batch.images) == 0:
            continue
        images = batch.images.to(procs.device, non_blocking=True)
        rows = batch.rows.tolist()
        out = model.reconstruct_rows_with_code(images, rows, seed, sampling)
        reconstructions = out.images
        measured = measure(images, reconstructions)
        values = {**measured.per_image, **{name: v.double().cpu() for name, v in out.quantizer.per_sample.items()}}
        if also is not None:  # ^ infill_mse of the LLM type
            values.update(also(rows, reconstructions))
        got.rows += rows
        if measured.features_originals is not None:
            got.features_x.append(measured.features_originals)
            got.features_r.append(measured.features_reconstructions)
        for name, v in values.items():
            got.values[name].append(v)
        if recon_dir is not None:
            save_pngs(recon_dir, rows, batch.names, reconstructions)
        if procs.is_main and sum(len(g[0]) for g in got.grid) < GRID_IMAGES:
            got.grid.append((images.cpu(), reconstructions.cpu()))
        psnr_sum += float(values["psnr"].sum())
        bar.update(len(images))
        bar.set_postfix(psnr=f"{psnr_sum / len(got.rows):.2f}")
    bar.close()
    return got


class Gathered(NamedTuple):
    """Every process's results, sorted by data-set row."""

    per_image: dict[str, Tensor]  # metric name -> float64 [N]
    features_originals: Tensor  # [N, FEATURE_DIM] ([0, FEATURE_DIM] without an Inception)
    features_reconstructions: Tensor  # [N, FEATURE_DIM]
    skipped: list[str]  # names of undecodable images


def gather_in_row_order(got: Collected, procs: Processes) -> Gathered:
    """All processes' results, sorted by data-set row."""

    def gathered(parts: list, empty: Tensor) -> Tensor:
        return gather_rows(torch.cat(parts) if parts else empty, procs)

    order = torch.argsort(gathered([torch.tensor(got.rows, dtype=torch.long)], torch.zeros(0, dtype=torch.long)))
    no_features = torch.zeros((0, metrics.FEATURE_DIM))
    features_x, features_r = (gathered(parts, no_features) for parts in (got.features_x, got.features_r))
    if len(features_x):  # none without an Inception (eval.decode_curve)
        features_x, features_r = features_x[order], features_r[order]
    values = {n: gathered(v, torch.zeros(0, dtype=torch.float64))[order] for n, v in got.values.items()}
    skipped = sum(gather_objects(got.skipped, procs), [])
    return Gathered(values, features_x, features_r, skipped)


def measure_model(
    model, sampling: SamplingOptions, dataset: ImageDataset, measure: metrics.ReconstructionMetrics,
    s: EvaluationSettings, procs: Processes, recon_dir: Optional[str] = None, desc: str = "reconstructing",
    also: Optional[PerImage] = None,
) -> Optional[Measured]:
    """Reconstruct the rows of `dataset` that `s` keeps (subsample, max_images) with `model` and `sampling`,
    each image's noise from (seed, its row), and measure them with `measure` (and `also`). Every process takes
    its batches; the main process gets the result (None elsewhere). `recon_dir`: also save every reconstruction."""
    batches = batches_of_rank(len(dataset), s, procs)
    loader = DataLoader(
        dataset, batch_sampler=batches, num_workers=s.workers, collate_fn=collate_images,
        pin_memory=procs.device.type == "cuda",
    )
    loop_start = time.perf_counter()
    total = sum(map(len, batches))
    got = reconstruct_and_measure(model, measure, loader, sampling, s.seed, procs, total, recon_dir, desc, also)
    gathered = gather_in_row_order(got, procs)
    loop_seconds = time.perf_counter() - loop_start
    if not procs.is_main:
        return None
    count = len(gathered.per_image["psnr"])
    if count == 0:
        raise nothing_decodes(dataset.describe(), len(gathered.skipped))
    return Measured(summarize(gathered), count, gathered.skipped, got.grid, loop_seconds)


def evaluate(settings: RfidSettings, procs: Processes) -> Optional[dict]:
    """The whole evaluation; returns the result record on the main process (None elsewhere)."""
    start = time.perf_counter()
    run, s = settings, settings.evaluation
    paths = locate_weights(s.weights)  # fail here, before any sampling, when a weight file is unavailable
    measure = build_metrics(paths, procs.device)  # ... or unusable
    model = load_checkpoint(run.ckpt, which=s.which, device=procs.device)
    size = model.config.data.image_size
    sampling = s.sampling.over(model.sampling())
    dataset = s.source.open(size)
    recon_dir = os.path.join(run.out, "reconstructions") if run.save_reconstructions else None
    os.makedirs(recon_dir or run.out, exist_ok=True)
    if procs.is_main:
        print(
            f"eval.rfid: {run.ckpt} ({s.which}), {dataset.describe()}, evaluating {len(kept_rows(len(dataset), s))} "
            f"at {size}px on {procs.world_size} x {procs.device}; sampler {sampling.to_dict()}, seed {s.seed}",
            flush=True,
        )
    measured = measure_model(model, sampling, dataset, measure, s, procs, recon_dir)
    if measured is None:
        return None
    if measured.grid:
        rows = [torch.cat(part)[:GRID_IMAGES] for part in zip(*measured.grid)]  # originals, reconstructions
        image_grid(rows).save(os.path.join(run.out, "grid.png"))
    result = {
        **result_record(run, measured, paths, model.config),
        "sampler": sampler_record(sampling, s.seed),
        "data": data_record(dataset, s, size),
        "processes": procs.world_size,
        "device": str(procs.device),
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(result, os.path.join(run.out, "metrics.json"))
    return result


def result_record(run: RfidSettings, measured: Measured, paths: dict[str, str], config) -> dict:
    """What metrics.json says of the measurement, the checkpoint, the metric networks and the settings."""
    ckpt = read_checkpoint(run.ckpt)
    return {
        "metrics": measured.metrics,
        "num_images": measured.num_images,
        "skipped_images": {"count": len(measured.skipped), "names": measured.skipped[:20]},
        "checkpoint": {
            "path": os.path.abspath(run.ckpt),
            "sha256": file_sha256(run.ckpt),
            "which": run.evaluation.which,
            "total_steps": int(ckpt["total_steps"]) if "total_steps" in ckpt else None,
        },
        "metric_weights": {name: os.path.abspath(path) for name, path in paths.items()},
        "inception_weights_sha256": file_sha256(paths["inception"]),
        "config": config.to_dict(),
        "metric_definitions": METRIC_DEFINITIONS,
        "batch_size": run.evaluation.batch_size,
        "images_per_second": measured.images_per_second,
        "loop_time_s": measured.loop_seconds,
    }


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    with flags.one_line_errors("eval.rfid", also=(weights.WeightsUnavailable,)):
        settings = RfidSettings(
            ckpt=resolve_checkpoint(args.ckpt),  # a published name -> its file in the Hugging Face cache
            out=args.out, evaluation=evaluation_settings(args), save_reconstructions=args.save_reconstructions,
            device=args.device,
        )
        with processes(settings.device) as procs:
            result = evaluate(settings, procs)
    if result is not None:
        print(f"{summary_line(result)} -> {os.path.join(settings.out, 'metrics.json')}", flush=True)
    return result


if __name__ == "__main__":
    main()
