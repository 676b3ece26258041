"""Reconstruction metrics as upstream's `evaluate.py` measures them: rFID, PSNR, SSIM, LPIPS (AlexNet, VGG).

- rFID: Frechet distance between the 2048-d pool features of the FID Inception network (pytorch-fid's
  weights `pt_inception-2015-12-05-6726825d.pth`) on originals and on reconstructions, both fed as float
  images (not 8-bit), resized as pytorch-fid does. The network is torch-fidelity's `FeatureExtractorInceptionV3`
  (same layers, same TF patches, same state-dict keys: with one weight file both give the same features to
  float rounding, see tests/eval/test_eval_metrics.py); its own forward is bypassed because it takes uint8
  and resizes like TF1 with (x - 128) / 128 scaling, which changes the features and so the rFID. We run it
  channels-last (about 2x faster convolutions on CPU; features differ from NCHW by ~1e-6).
- PSNR and SSIM: per image, on the 8-bit pixel values a PNG of the image holds (rounded, as
  `flowmo_fast.formats.images.to_uint8`), scaled to [0, 1]. Upstream truncates instead of rounding (`.to(uint8)`);
  and its PSNR line passes the whole batch to `peak_signal_noise_ratio`, so every image of a batch counts
  the batch's PSNR (PSNR of the pooled MSE). We report the mean over images of each image's PSNR.
- SSIM: scikit-image's `structural_similarity(x, y, data_range=1.0, channel_axis=-1)` with its defaults,
  as upstream calls it: 7x7 uniform window, K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1)), mean
  over the window positions that fit inside the image, then over channels. Computed here in float64 (upstream:
  float32 inside scikit-image) on batches, on any device.
- LPIPS: the lpips package (v0.1 linear heads) on [-1, 1] float images; mean over images, as upstream.
"""

from __future__ import annotations

import warnings
from typing import Mapping, NamedTuple, Optional, Sequence

import lpips
import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from eval.weights import WeightsUnavailable

INCEPTION_SIZE = 299
FEATURE_DIM = 2048
LPIPS_NETS = ("alex", "vgg")
# torch-fidelity's InceptionV3 layers, input to the 2048-d average pool (pytorch-fid's blocks 0..3).
INCEPTION_LAYERS = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1",
    "Conv2d_3b_1x1", "Conv2d_4a_3x3", "MaxPool_2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool",
)  # fmt: skip


# ---- Frechet distance ------------------------------------------------------------------------------------


def as_features(features) -> np.ndarray:
    """-> float64 [N, D], N >= 2 (a covariance needs two samples)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N, D] with N >= 2 to estimate a covariance, got shape {x.shape}")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """[N, D] features -> mean [D] and covariance [D, D] (ddof 1), float64."""
    x = as_features(features)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), in float64.

    tr((S1 S2)^(1/2)) is the sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), which is
    symmetric positive semi-definite: two `eigh` calls, real and stable even for the singular covariances of
    a few thousand 2048-d samples. Upstream uses `scipy.linalg.sqrtm(S1 @ S2)`; on well-conditioned
    covariances both agree to rounding (tests).
    """
    w, v = scipy.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root1 @ sigma2 @ root1
    eigenvalues = scipy.linalg.eigvalsh((middle + middle.T) / 2)
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid(features1, features2) -> float:
    """Frechet distance between two feature sets [N1, D], [N2, D] (float64).

    With no more samples than dimensions (small evaluations) the covariances are singular and of low rank:
    with A_i the centred features over sqrt(N_i - 1) (so S_i = A_i^T A_i), tr((S1 S2)^(1/2)) is the sum of
    the singular values of the small N1 x N2 matrix A1 A2^T. Otherwise `frechet_distance` on D x D statistics.
    """
    x1, x2 = as_features(features1), as_features(features2)
    if x1.shape[1] != x2.shape[1]:
        raise ValueError(f"feature sets differ in dimension: {x1.shape[1]} vs {x2.shape[1]}")
    if max(len(x1), len(x2)) > x1.shape[1]:
        return frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    a1 = (x1 - mu1) / np.sqrt(len(x1) - 1)
    a2 = (x2 - mu2) / np.sqrt(len(x2) - 1)
    tr_covmean = scipy.linalg.svdvals(a1 @ a2.T).sum()
    diff = mu1 - mu2
    return float(diff @ diff + (a1 * a1).sum() + (a2 * a2).sum() - 2 * tr_covmean)


def fid_to_moments(features, mu: np.ndarray, sigma: np.ndarray) -> float:
    """Frechet distance between a feature set [N, D] and given moments (mean [D], covariance [D, D]), float64.

    With no more samples than dimensions, A = the centred features over sqrt(N - 1) (their covariance is A^T A):
    the non-zero eigenvalues of sigma A^T A are those of the small, symmetric positive semi-definite N x N matrix
    A sigma A^T, so tr((sigma S)^(1/2)) costs one N x D x D product instead of two D x D eigendecompositions
    (sFID's 2023-d moments against a few hundred samples: milliseconds, not seconds). Otherwise
    `frechet_distance` of the features' statistics."""
    x = as_features(features)
    if x.shape[1] != len(mu) or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"features of dimension {x.shape[1]} against moments of shapes {mu.shape}, {sigma.shape}")
    if len(x) > x.shape[1]:
        return frechet_distance(*feature_statistics(x), mu, sigma)
    mean = x.mean(axis=0)
    a = (x - mean) / np.sqrt(len(x) - 1)
    middle = a @ sigma @ a.T
    tr_covmean = np.sqrt(np.clip(scipy.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mean - mu
    return float(diff @ diff + (a * a).sum() + np.trace(sigma) - 2 * tr_covmean)


# ---- PSNR, SSIM ------------------------------------------------------------------------------------------


def to_levels(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> float64 in [0, 1] on the 8-bit levels (k / 255) that `to_uint8` gives."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().double() / 255


def psnr(reference: Tensor, test: Tensor) -> Tensor:
    """Per-image PSNR in dB of images [B, C, H, W] in [0, 1] -> float64 [B] (inf where identical)."""
    mse = (reference.double() - test.double()).pow(2).flatten(1).mean(dim=1)
    return 10 * torch.log10(1.0 / mse)


def ssim(reference: Tensor, test: Tensor, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Per-image SSIM of images [B, C, H, W] in [0, 1] -> float64 [B], scikit-image's settings (module doc)."""
    if min(reference.shape[-2:]) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {tuple(reference.shape[-2:])}")
    x, y = reference.double(), test.double()

    def mean(t: Tensor) -> Tensor:  # window means at every position where the window fits ("valid")
        return F.avg_pool2d(t, win_size, stride=1)

    n = win_size * win_size
    ux, uy = mean(x), mean(y)
    vx = n / (n - 1) * (mean(x * x) - ux * ux)
    vy = n / (n - 1) * (mean(y * y) - uy * uy)
    vxy = n / (n - 1) * (mean(x * y) - ux * uy)
    c1, c2 = k1**2, k2**2  # data range 1
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.mean(dim=(2, 3)).mean(dim=1)


# ---- Networks --------------------------------------------------------------------------------------------


def fid_inception(weights_path: str, features: tuple[str, ...]) -> nn.Module:
    """torch-fidelity's `inception-v3-compat` (the FID Inception) with its weights read from `weights_path`, giving
    `features`; a file it cannot load raises WeightsUnavailable naming the file and what was expected."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        return FeatureExtractorInceptionV3(
            "inception-v3-compat", list(features), feature_extractor_weights_path=weights_path
        )
    except Exception as e:
        raise WeightsUnavailable(
            f"cannot load the FID Inception weights from {weights_path} ({type(e).__name__}: {str(e)[:200]}); "
            "expected pytorch-fid's pt_inception-2015-12-05-6726825d.pth"
        ) from e


class InceptionPool3(nn.Module):
    """images [B, 3, H, W] in [-1, 1] -> the FID Inception's 2048-d average-pool features [B, 2048], float32.

    Preprocessing as pytorch-fid (and so upstream): x -> (x + 1) / 2, bilinear resize to 299x299
    (align_corners=False), then 2x - 1.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        net = fid_inception(weights_path, ("2048",))
        self.layers = nn.Sequential(*(getattr(net, name) for name in INCEPTION_LAYERS))
        self.layers.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        x = (images.float() + 1) / 2
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        return self.layers((2 * x - 1).contiguous(memory_format=torch.channels_last)).flatten(1)


def build_lpips(net: str, backbone_path: str) -> nn.Module:
    """lpips.LPIPS(net) with its torchvision backbone read from `backbone_path` (never downloaded here).

    The file is torchvision's ImageNet checkpoint (alexnet-owt-7be5be79.pth / vgg16-397923af.pth); only its
    `features.*` tensors are used, so a file holding just those works too.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net {net!r}; allowed: {', '.join(LPIPS_NETS)}")
    with warnings.catch_warnings():  # lpips passes torchvision's deprecated `pretrained=` argument
        warnings.simplefilter("ignore")
        model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # linear heads: from the package
    try:
        state = torch.load(backbone_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise WeightsUnavailable(f"cannot read the LPIPS {net} backbone {backbone_path}: {type(e).__name__}: {e}") from e
    features = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    # lpips splits torchvision's `features` into slices that keep the layer numbers: slice1.0.weight <- features.0.weight
    wanted = {name: name.split(".", 1)[1] for name in model.net.state_dict()}
    missing = [f"features.{k}" for k in wanted.values() if k not in features]
    if missing:
        raise WeightsUnavailable(
            f"{backbone_path} is not torchvision's {net} checkpoint: it lacks {', '.join(missing[:4])}"
        )
    try:
        model.net.load_state_dict({name: features[k] for name, k in wanted.items()})
    except RuntimeError as e:  # shape mismatches
        raise WeightsUnavailable(f"{backbone_path} does not fit LPIPS {net}: {str(e)[:300]}") from e
    return model.eval().requires_grad_(False)


class ReconstructionMetrics(nn.Module):
    """Per-image metrics and Inception features of originals and their reconstructions (no features without
    an `inception`: eval.decode_curve where its weights are missing)."""

    def __init__(self, inception: Optional[InceptionPool3], lpips_nets: Mapping[str, nn.Module]):
        super().__init__()
        self.inception = inception
        self.lpips_nets = nn.ModuleDict(dict(lpips_nets))

    @property
    def names(self) -> Sequence[str]:
        return ("psnr", "ssim", *(f"lpips_{n}" for n in self.lpips_nets))

    @torch.no_grad()
    def forward(self, originals: Tensor, reconstructions: Tensor) -> "Measurement":
        """[B, 3, H, W] in [-1, 1] each -> per-image metrics and both Inception features, on the CPU."""
        reconstructions = reconstructions.clamp(-1, 1)
        ref, rec = to_levels(originals), to_levels(reconstructions)
        per_image = {"psnr": psnr(ref, rec), "ssim": ssim(ref, rec)}
        for name, net in self.lpips_nets.items():
            per_image[f"lpips_{name}"] = net(originals.float(), reconstructions.float()).flatten().double()
        per_image = {k: v.cpu() for k, v in per_image.items()}
        if self.inception is None:
            return Measurement(per_image, None, None)
        return Measurement(per_image, self.inception(originals).cpu(), self.inception(reconstructions).cpu())


class Measurement(NamedTuple):
    """One batch measured by `ReconstructionMetrics`."""

    per_image: dict[str, Tensor]  # metric name -> float64 [B]
    features_originals: Optional[Tensor]  # [B, FEATURE_DIM] Inception pool features (None: no Inception)
    features_reconstructions: Optional[Tensor]  # [B, FEATURE_DIM]
