"""Sample-quality metrics of generated images, as papers report them with the ADM evaluator suite: FID against
a reference's Inception statistics, Inception Score, and k-NN precision and recall (Kynkaenniemi et al. 2019).

- The network is torch-fidelity's `inception-v3-compat` (the port of the TF Inception the ADM evaluator runs),
  fed 8-bit images through torch-fidelity's own forward: TF1-style bilinear resize to 299x299, then
  (x - 128) / 128. So its features compare with the `mu` / `sigma` of ADM's reference batches. (eval.metrics'
  `InceptionPool3` instead feeds float images resized as pytorch-fid does: rFID as upstream measures it.)
  The weight file is pytorch-fid's, located as eval.rfid does (`eval.weights.INCEPTION`).
- FID: `eval.metrics.frechet_distance` of the 2048-d pool features' mean and covariance.
- sFID (Nash et al. 2021, as ADM's evaluator computes it): the same distance on spatial features, the output of
  the TF graph's node `mixed_6/conv` (the 1x1 branch of the fourth 17x17 block, torch-fidelity's
  `Mixed_6d.branch1x1`: convolution, batch norm, ReLU) at 17 x 17, its first 7 of 192 channels, flattened in TF's
  channels-last order (height, width, channel): 2023 numbers per image, the layout of a reference batch's
  `mu_s` / `sigma_s`.
- Inception Score: torch-fidelity's (`isc_features_to_metric`: the unbiased logits, samples shuffled with its
  fixed seed, mean and standard deviation over splits).
- Precision: the fraction of samples that lie inside the reference manifold, the union of balls around each
  reference feature reaching its k-th nearest other reference feature; recall: the fraction of reference
  features inside the samples' manifold, built the same way. k = 3 as the paper and the ADM suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch_fidelity
from torch import Tensor, nn
from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

from eval.metrics import feature_statistics, fid_inception

EVALUATOR = f"torch-fidelity {torch_fidelity.__version__} inception-v3-compat"
IS_SPLITS = 10  # as torch-fidelity and the ADM suite (50,000 samples: 10 splits of 5,000)
SPATIAL_LAYER = "Mixed_6d.branch1x1"  # the TF graph's mixed_6/conv, ADM's FID_SPATIAL_NAME
SPATIAL_CHANNELS = 7  # ADM's evaluator keeps spatial[..., :7]
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NEIGHBOURS = 3  # k of the k-NN manifolds
DISTANCE_BLOCK = 1024  # rows of a distance block: 1024 x 50,000 float32 = 200 MB


class FidelityInception(nn.Module):
    """uint8 images [B, 3, H, W] -> (pool features [B, 2048], unbiased logits [B, 1008], spatial features
    [B, 2023]), float32; the spatial ones are read from the forward pass on the way (a hook on SPATIAL_LAYER)."""

    def __init__(self, weights_path: str):
        super().__init__()
        self.net = fid_inception(weights_path, ("2048", "logits_unbiased"))
        self.seen: list[Tensor] = []
        self.net.get_submodule(SPATIAL_LAYER).register_forward_hook(lambda module, args, out: self.seen.append(out))

    @torch.no_grad()
    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
        self.seen.clear()
        pool, logits = self.net(images)
        (spatial,) = self.seen  # [B, 192, 17, 17]
        self.seen.clear()
        spatial = spatial[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1).float()  # [B, 17 * 17 * 7], TF's order
        return pool, logits, spatial


@dataclass(frozen=True)
class Features:
    """Inception outputs of a set of images: pool [N, 2048], unbiased logits [N, 1008] and spatial [N, 2023],
    float32 on the CPU."""

    pool: Tensor
    logits: Tensor
    spatial: Tensor

    def __len__(self) -> int:
        return len(self.pool)


def extract(net: FidelityInception, batches: Iterable[Tensor], device: torch.device) -> Features:
    """Features of every uint8 batch [B, 3, H, W], in order."""
    parts: list[tuple[Tensor, ...]] = []
    for images in batches:
        parts.append(tuple(t.cpu() for t in net(images.to(device, non_blocking=True))))
    if not parts:
        return Features(torch.zeros(0, 2048), torch.zeros(0, 1008), torch.zeros(0, SPATIAL_DIM))
    return Features(*(torch.cat(column) for column in zip(*parts)))


@dataclass(frozen=True)
class InceptionScore:
    mean: float
    std: float
    splits: int


def inception_score(logits: Tensor, splits: int = IS_SPLITS) -> InceptionScore:
    """torch-fidelity's Inception Score of unbiased logits [N, C]; fewer splits when N < splits."""
    if len(logits) < 1:
        raise ValueError("the Inception Score needs at least one image")
    splits = min(splits, len(logits))
    out = isc_features_to_metric(logits, splits=splits, shuffle=True, rng_seed=2020)
    return InceptionScore(out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD], splits)


def squared_distances(a: Tensor, b: Tensor) -> Tensor:
    """[n, D], [m, D] -> [n, m] squared Euclidean distances (clamped at 0; float32 through one matrix product)."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T
    return d.clamp_min_(0)


def manifold_radii(features: Tensor, k: int = NEIGHBOURS, block: int = DISTANCE_BLOCK) -> Tensor:
    """Squared distance from each of N features [N, D] to its k-th nearest other one -> [N] (needs N > k).

    The k + 1-th smallest distance of a row counts the feature itself (distance 0) first."""
    if len(features) <= k:
        raise ValueError(f"a k-NN manifold with k={k} needs more than {k} images, got {len(features)}")
    parts = [squared_distances(features[i : i + block], features).kthvalue(k + 1, dim=1).values
             for i in range(0, len(features), block)]
    return torch.cat(parts)


def inside(points: Tensor, centres: Tensor, radii: Tensor, block: int = DISTANCE_BLOCK) -> Tensor:
    """Whether each point [n, D] lies within some ball (centre [m, D], squared radius [m]) -> bool [n]."""
    parts = [(squared_distances(points[i : i + block], centres) <= radii[None]).any(dim=1)
             for i in range(0, len(points), block)]
    return torch.cat(parts)


@dataclass(frozen=True)
class PrecisionRecall:
    precision: float
    recall: float
    k: int


def precision_recall(reference: Tensor, samples: Tensor, k: int = NEIGHBOURS, device: str = "cpu") -> PrecisionRecall:
    """k-NN precision and recall of sample features [n, D] against reference features [m, D] (module doc)."""
    ref, gen = reference.to(device, torch.float32), samples.to(device, torch.float32)
    precision = inside(gen, ref, manifold_radii(ref, k)).double().mean().item()
    recall = inside(ref, gen, manifold_radii(gen, k)).double().mean().item()
    return PrecisionRecall(precision, recall, k)


def statistics_of(features: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (float64) of features [N, D] (pool: FID; spatial: sFID)."""
    return feature_statistics(features.double().numpy())
