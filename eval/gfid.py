"""`python -m eval.gfid --samples DIR_OR_NPZ --reference REF`: FID, sFID, Inception Score, precision and recall of
generated images (eval.fidelity says how each is computed, with torch-fidelity's Inception).

REF is an ADM reference batch (`VIRTUAL_imagenet256_labeled.npz`: its `mu` / `sigma` give FID, its `mu_s` /
`sigma_s` sFID, the Inception features of its `arr_0` images precision and recall; a statistic the file lacks
comes from its images), a folder of images, or the ImageNet tar with upstream's index (`--reference-index`),
whose images give every statistic; a folder's or the tar's images are centre-cropped to the samples' side. The
reference's statistics (pool features, spatial mean and covariance, the file's own) are cached by the reference's
content hash, the side, and the Inception weights, in --cache-dir, so only the samples are run through the
network next time.

Writes a JSON result (--out, default gfid.json beside the samples): the metrics, the sample count, the
reference's identity (kind, path, sha256, images, where its FID statistics came from), the evaluator (torch-fidelity
version, network, weight file sha256) and the settings; and prints the same in one line.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch_fidelity
from tqdm import tqdm

from eval import weights
from eval.fidelity import (
    EVALUATOR,
    NEIGHBOURS,
    SPATIAL_DIM,
    Features,
    FidelityInception,
    extract,
    inception_score,
    precision_recall,
    statistics_of,
)
from eval.image_sets import ImageSet, NpzImages, Reference, open_samples
from eval.metrics import fid, fid_to_moments
from flowmo_fast import flags
from flowmo_fast.distributed import pick_device
from flowmo_fast.formats.checkpoint import atomic_write, file_sha256


@dataclass(frozen=True)
class GfidSettings:
    """One evaluation (the command's flags)."""

    samples: str  # folder of images, or npz with arr_0 uint8 [N, H, W, 3]
    reference: str  # ADM reference npz, image folder, or ImageNet tar
    reference_index: Optional[str] = None  # upstream's JSON index, with a tar
    out: Optional[str] = None  # the JSON result; None: gfid.json beside the samples
    cache_dir: Optional[str] = None  # reference statistics; None: $XDG_CACHE_HOME/flowmo_fast/gfid
    batch_size: int = 50  # images per Inception call
    num_workers: int = 0  # image decoding processes
    device: str = "auto"
    inception_weights: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth; None: eval.weights' search
    neighbours: int = NEIGHBOURS  # k of precision / recall

    def out_path(self) -> str:
        folder = self.samples if os.path.isdir(self.samples) else os.path.dirname(os.path.abspath(self.samples))
        return self.out or os.path.join(folder, "gfid.json")

    def cache_folder(self) -> str:
        cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return self.cache_dir or os.path.join(cache_home, "flowmo_fast", "gfid")


Moments = tuple[np.ndarray, np.ndarray]  # (mean [D], covariance [D, D]) float64
STATISTICS_VERSION = 2  # of the cache files: 2 added the spatial moments (sFID)


@dataclass(frozen=True)
class ReferenceStatistics:
    """What the samples are measured against: the pool features of the reference's images, the spatial moments
    (sFID), and an ADM reference batch's own moments where it has them (computed by ADM's evaluator over the whole
    training set: `mu` / `sigma` replace the images' for FID, `mu_s` / `sigma_s` are `spatial`)."""

    pool: torch.Tensor  # [N, 2048] float32
    spatial: Moments  # (mu_s [2023], sigma_s [2023, 2023]): the file's, or of the images' spatial features
    given: Optional[Moments] = None  # (mu [2048], sigma [2048, 2048]) of the file
    spatial_given: bool = False  # whether `spatial` is the file's mu_s / sigma_s

    def describe(self, path: str) -> str:
        """Where the FID statistics come from."""
        return f"mu / sigma of {os.path.basename(path)}" if self.given else f"{len(self.pool)} images of the reference"

    def describe_spatial(self, path: str) -> str:
        """Where the sFID statistics come from."""
        return f"mu_s / sigma_s of {os.path.basename(path)}" if self.spatial_given else \
            f"{len(self.pool)} images of the reference"

    def fid(self, samples: torch.Tensor) -> float:
        """FID of sample pool features [n, 2048] against these statistics."""
        if self.given is None:  # both sides' features: eval.metrics.fid (fast and exact for n <= 2048 as well)
            return fid(self.pool.double().numpy(), samples.double().numpy())
        return fid_to_moments(samples.double().numpy(), *self.given)

    def sfid(self, samples: torch.Tensor) -> float:
        """sFID of sample spatial features [n, 2023] against the spatial moments (ADM's: moments on both sides)."""
        return fid_to_moments(samples.double().numpy(), *self.spatial)


def file_moments(images: NpzImages, mean_key: str, cov_key: str, dim: int) -> Optional[Moments]:
    """An ADM batch's own moments under (mean_key, cov_key), float64, checked against the features' size; None
    when the file lacks them."""
    mean, cov = images.array(mean_key), images.array(cov_key)
    if mean is None or cov is None:
        return None
    if mean.shape != (dim,) or cov.shape != (dim, dim):
        raise ValueError(f"{images.path}: {mean_key} / {cov_key} have shapes {mean.shape} / {cov.shape}, expected "
                         f"({dim},) / ({dim}, {dim}) as ADM's evaluator writes them: not a reference batch of this "
                         "Inception network; use ADM's file, or a folder of the reference images")
    return mean.astype(np.float64), cov.astype(np.float64)


def check_count(count: int, settings: GfidSettings, what: str, skipped: int = 0) -> None:
    """FID needs two images (a covariance), precision / recall k + 1."""
    needed = max(2, settings.neighbours + 1)
    if count < needed:
        failed = f" ({skipped} did not decode)" if skipped else ""
        raise ValueError(f"{what}: {count} images{failed}; FID, precision and recall with --neighbours "
                         f"{settings.neighbours} need at least {needed}: give more images")


def features_of(images: ImageSet, net: FidelityInception, settings: GfidSettings, device, what: str) -> Features:
    """Inception features of every image of the set, with a progress bar (images/s, ETA)."""
    check_count(len(images), settings, what)
    bar = tqdm(total=len(images), unit="img", desc=f"Inception: {what}", dynamic_ncols=True)

    def counted():
        for batch in images.batches(settings.batch_size):
            yield batch
            bar.update(len(batch))

    try:
        features = extract(net, counted(), device)
    finally:
        bar.close()
    check_count(len(features), settings, what, len(images.skipped))
    return features


def cache_key(kind: str, content_sha256: str, side: Optional[int], weights_sha256: str) -> str:
    """The statistics' identity: the reference's content, the crop side (folders, tar), the network, and what the
    cache file holds (STATISTICS_VERSION)."""
    record = {"kind": kind, "sha256": content_sha256, "side": side, "inception_sha256": weights_sha256,
              "evaluator": EVALUATOR, "statistics": STATISTICS_VERSION}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def compute_reference(
    reference: Reference, side: Optional[int], net, settings: GfidSettings, device
) -> ReferenceStatistics:
    """Pool features and spatial moments of the reference's images; an ADM batch's own mu / sigma and
    mu_s / sigma_s where it has them."""
    images = reference.images(side, settings.num_workers)
    given = spatial = None
    if reference.kind == "adm-npz":  # checked before the images go through the network
        given = file_moments(images, "mu", "sigma", 2048)
        spatial = file_moments(images, "mu_s", "sigma_s", SPATIAL_DIM)
    features = features_of(images, net, settings, device, f"reference {reference.path}")
    own = spatial or statistics_of(features.spatial)
    return ReferenceStatistics(features.pool, own, given, spatial is not None)


def reference_statistics(reference: Reference, side: Optional[int], net, settings: GfidSettings, device,
                         key: str) -> tuple[ReferenceStatistics, str]:
    """The reference's statistics from the cache file named `key`, else computed and cached there;
    -> (statistics, cache file)."""
    path = os.path.join(settings.cache_folder(), key + ".npz")
    if os.path.isfile(path):
        with np.load(path) as z:
            given = (z["mu"], z["sigma"]) if "mu" in z.files else None
            spatial = (z["mu_s"], z["sigma_s"])
            return ReferenceStatistics(torch.from_numpy(z["pool"]), spatial, given, bool(z["spatial_given"])), path
    stats = compute_reference(reference, side, net, settings, device)
    given = dict(zip(("mu", "sigma"), stats.given)) if stats.given else {}
    mu_s, sigma_s = stats.spatial
    atomic_write(path, lambda f: np.savez(f, pool=stats.pool.numpy(), mu_s=mu_s, sigma_s=sigma_s,
                                          spatial_given=stats.spatial_given, **given))
    return stats, path


def evaluate(settings: GfidSettings) -> dict:
    start = time.perf_counter()
    s = settings
    samples = open_samples(s.samples, s.num_workers)
    check_count(len(samples), s, f"samples {s.samples}")  # before any work
    reference = Reference.from_path(s.reference, s.reference_index)
    weights_path = weights.locate(weights.INCEPTION, s.inception_weights)
    weights_sha256 = file_sha256(weights_path)
    device = pick_device(s.device)
    net = FidelityInception(weights_path).to(device)
    side = None if reference.kind == "adm-npz" else samples.side  # a folder's or the tar's images: cropped to it
    reference_sha256 = reference.content_sha256()
    key = cache_key(reference.kind, reference_sha256, side, weights_sha256)
    ref, cache_file = reference_statistics(reference, side, net, s, device, key)
    features = features_of(samples, net, s, device, f"samples {s.samples}")
    score = inception_score(features.logits)
    pr = precision_recall(ref.pool, features.pool, s.neighbours, device=str(device))
    return {
        "metrics": {"fid": ref.fid(features.pool), "sfid": ref.sfid(features.spatial), "inception_score": score.mean,
                    "inception_score_std": score.std, "precision": pr.precision, "recall": pr.recall},
        "num_samples": len(features),
        "skipped_samples": {"count": len(samples.skipped), "names": samples.skipped[:20]},
        "samples": {"path": os.path.abspath(s.samples), "source": samples.describe()},
        "reference": {
            "kind": reference.kind, "path": os.path.abspath(reference.path),
            "index": os.path.abspath(reference.index) if reference.index else None,
            "sha256": reference_sha256, "num_images": len(ref.pool), "fid_statistics": ref.describe(reference.path),
            "sfid_statistics": ref.describe_spatial(reference.path), "side": side, "cache": cache_file,
        },
        "evaluator": {"name": "torch-fidelity", "version": torch_fidelity.__version__, "network": EVALUATOR,
                      "weights": os.path.abspath(weights_path), "weights_sha256": weights_sha256},
        "settings": {"neighbours": pr.k, "inception_score_splits": score.splits, "batch_size": s.batch_size},
        "device": str(device),
        "wall_time_s": time.perf_counter() - start,
    }


def summary_line(result: dict, out: str) -> str:
    m, ref, ev = result["metrics"], result["reference"], result["evaluator"]
    return (f"gFID {m['fid']:.4f}  sFID {m['sfid']:.4f}  "
            f"IS {m['inception_score']:.2f} ± {m['inception_score_std']:.2f}  "
            f"precision {m['precision']:.4f}  recall {m['recall']:.4f} | {result['num_samples']} samples vs "
            f"{ref['kind']} {os.path.basename(ref['path'])} (sha256 {ref['sha256'][:12]}, {ref['num_images']} images), "
            f"{ev['name']} {ev['version']} -> {out}")


def parse_args(argv: Optional[Sequence[str]] = None) -> GfidSettings:
    p = argparse.ArgumentParser(prog="python -m eval.gfid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", required=True, metavar="DIR_OR_NPZ",
                   help="folder of generated images, or an npz with arr_0 uint8 [N, H, W, 3] "
                   "(eval.generate's samples.npz)")
    p.add_argument("--reference", required=True, metavar="REF",
                   help="ADM reference batch (.npz), a folder of images, or the ImageNet tar (with --reference-index)")
    p.add_argument("--reference-index", metavar="J", help="upstream's JSON index of the ImageNet tar")
    p.add_argument("--out", metavar="JSON", help="result file (default: gfid.json beside the samples)")
    p.add_argument("--cache-dir", metavar="DIR", help="reference statistics (default: ~/.cache/flowmo_fast/gfid)")
    p.add_argument("--batch-size", type=flags.positive_int, default=50, help="images per Inception call (default 50)")
    p.add_argument("--num-workers", type=flags.non_negative_int, default=flags.default_workers(),
                   help="image decoding processes (default: the CPUs beside this one, at most 8)")
    p.add_argument("--neighbours", type=flags.positive_int, default=NEIGHBOURS,
                   help="k of precision / recall (default 3)")
    p.add_argument(weights.INCEPTION.flag, metavar="PATH",
                   help=f"pt_inception-2015-12-05-6726825d.pth (or ${weights.INCEPTION.env}; default: torch hub cache)")
    flags.add_device_flag(p)
    a = p.parse_args(argv)
    return GfidSettings(a.samples, a.reference, a.reference_index, a.out, a.cache_dir, a.batch_size, a.num_workers,
                        a.device, a.inception_weights, a.neighbours)


def measure(settings: GfidSettings) -> dict:
    """`evaluate`, its result written to `settings.out_path()` and its summary line printed."""
    result = evaluate(settings)
    out = settings.out_path()
    atomic_write(out, lambda f: f.write(json.dumps(result, indent=2).encode()))
    print(summary_line(result, out), flush=True)
    return result


def main(argv: Optional[Sequence[str]] = None) -> dict:
    settings = parse_args(argv)
    with flags.one_line_errors("eval.gfid", also=(weights.WeightsUnavailable,)):
        return measure(settings)


if __name__ == "__main__":
    main()
