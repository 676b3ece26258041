"""eval.metrics and eval.weights: FID, PSNR, SSIM against SciPy / scikit-image, the Inception network against
pytorch-fid's, LPIPS backbone loading, and weight files that are missing offline."""

from __future__ import annotations

import os
import shutil
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from eval import metrics, weights
from flowmo_fast.formats.images import to_uint8


def scipy_fid(x1: np.ndarray, x2: np.ndarray) -> float:
    """The textbook float64 computation (upstream's): means, covariances, scipy.linalg.sqrtm."""
    mu1, mu2 = x1.mean(0), x2.mean(0)
    s1, s2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def gaussian_features(rng, n: int, d: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.standard_normal((d, d)) / np.sqrt(d)
    return rng.standard_normal((n, d)) @ mixing + shift * rng.standard_normal(d)


@pytest.mark.parametrize("n, d", [(300, 32), (48, 2048)], ids=["full-rank", "fewer-samples-than-dims"])
def test_fid_of_a_feature_set_with_itself_is_zero(n, d):
    x = gaussian_features(np.random.default_rng(0), n, d)
    trace = np.trace(np.cov(x, rowvar=False))
    assert abs(metrics.fid(x, x)) < 1e-10 * trace
    assert abs(metrics.fid(x, x + 0.5) - 0.25 * d) < 1e-8 * trace  # a shift only adds ||shift||^2


@pytest.mark.parametrize("n1, n2, d, rtol", [(400, 350, 32, 1e-9), (40, 30, 64, 1e-6)], ids=["full-rank", "low-rank"])
def test_fid_equals_scipy_float64_on_gaussian_features(n1, n2, d, rtol):
    rng = np.random.default_rng(1)
    x1, x2 = gaussian_features(rng, n1, d), gaussian_features(rng, n2, d, shift=0.3)
    expected = scipy_fid(x1, x2)
    assert expected > 1.0
    np.testing.assert_allclose(metrics.fid(x1, x2), expected, rtol=rtol)
    np.testing.assert_allclose(metrics.fid(x1.astype(np.float32), x2), scipy_fid(x1.astype(np.float32), x2), rtol=rtol)
    if n1 > d:
        stats = metrics.feature_statistics(x1) + metrics.feature_statistics(x2)
        np.testing.assert_allclose(metrics.frechet_distance(*stats), expected, rtol=rtol)


@pytest.mark.parametrize("n", [40, 30], ids=["full-rank", "low-rank"])
def test_fid_to_given_moments_equals_the_distance_of_both_statistics(n):
    """Both paths (N > D: frechet_distance of the statistics; N <= D: the N x N matrix A sigma A^T) agree with
    scipy's sqrtm on the statistics of both sides."""
    rng = np.random.default_rng(2)
    reference, samples = gaussian_features(rng, 500, 32), gaussian_features(rng, n, 32, shift=0.3)
    mu, sigma = metrics.feature_statistics(reference)
    expected = scipy_fid(samples, reference)
    assert expected > 1.0
    np.testing.assert_allclose(metrics.fid_to_moments(samples, mu, sigma), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="dimension"):
        metrics.fid_to_moments(samples[:, :8], mu, sigma)


def test_fid_rejects_unusable_features():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.fid(np.zeros((1, 8)), np.zeros((5, 8)))
    with pytest.raises(ValueError, match="dimension"):
        metrics.fid(np.zeros((3, 8)), np.zeros((3, 9)))


def image_pairs():
    """uint8 HWC pairs: noise of several strengths, a shifted copy, an identical copy, a flat image."""
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (37, 45, 3), dtype=np.uint8)
    smooth = np.clip(base.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    pairs = [(base, np.clip(base + rng.normal(0, s, base.shape), 0, 255).astype(np.uint8)) for s in (2, 15, 60)]
    pairs += [(smooth, np.roll(smooth, 3, axis=1)), (base, base.copy()), (np.full_like(base, 128), smooth)]
    return pairs


def as_batch(arrays) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double() / 255


def test_psnr_and_ssim_equal_scikit_image_on_known_pairs():
    pairs = image_pairs()
    ref, test = as_batch([a for a, _ in pairs]), as_batch([b for _, b in pairs])
    ours_psnr, ours_ssim = metrics.psnr(ref, test), metrics.ssim(ref, test)
    for i, (a, b) in enumerate(pairs):
        a64, b64 = a.astype(np.float64) / 255, b.astype(np.float64) / 255
        with np.errstate(divide="ignore"):
            expected_psnr = peak_signal_noise_ratio(a64, b64, data_range=1.0)
        expected_ssim = structural_similarity(b64, a64, data_range=1.0, channel_axis=-1)
        assert ours_psnr[i].item() == pytest.approx(expected_psnr, rel=1e-12)
        assert ours_ssim[i].item() == pytest.approx(expected_ssim, rel=1e-9, abs=1e-12)
        # upstream hands scikit-image float32 images: same numbers to float32 precision
        upstream_ssim = structural_similarity(b64.astype(np.float32), a64.astype(np.float32), data_range=1.0, channel_axis=-1)
        assert ours_ssim[i].item() == pytest.approx(upstream_ssim, abs=1e-5)
    assert torch.isinf(ours_psnr[4]) and ours_ssim[4].item() == pytest.approx(1.0)
    assert len(set(np.round(ours_ssim.numpy(), 6))) == len(pairs)  # the pairs really differ


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 7x7"):
        metrics.ssim(torch.zeros(1, 3, 6, 32), torch.zeros(1, 3, 6, 32))


def test_to_levels_are_the_pixels_a_png_stores():
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.8
    levels = metrics.to_levels(x)
    np.testing.assert_array_equal((levels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy(), to_uint8(x))


def test_inception_features_equal_pytorch_fid(inception_weights, tmp_path, monkeypatch):
    """Same weight file -> the 2048-d features of pytorch-fid's InceptionV3 (upstream's network and preprocessing)
    to float rounding."""
    inception = pytest.importorskip("pytorch_fid.inception")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # pytorch-fid reads the file from torch hub's cache
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    os.symlink(inception_weights, cache / inception_weights.name)
    reference = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    ours = metrics.InceptionPool3(str(inception_weights)).eval()
    images = torch.rand(1, 3, 32, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1  # 299 px: slow on CPU
    with torch.no_grad():
        expected = reference((images + 1) / 2)[0].flatten(1)
        features = ours(images)
    assert features.shape == (1, metrics.FEATURE_DIM)
    assert features.std() > 1e-3  # random weights still give informative features
    torch.testing.assert_close(features, expected, rtol=0, atol=2e-5)


def test_lpips_backbone_comes_from_the_given_file(lpips_backbones):
    state = torch.load(lpips_backbones["alex"], weights_only=True)
    model = metrics.build_lpips("alex", str(lpips_backbones["alex"]))
    torch.testing.assert_close(model.net.slice1[0].weight, state["features.0.weight"], rtol=0, atol=0)
    torch.testing.assert_close(getattr(model.net.slice5, "10").bias, state["features.10.bias"], rtol=0, atol=0)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        assert model(x, x).abs().max() == 0
        assert (model(x, x.flip(-1)) > 0).all()
    with pytest.raises(weights.WeightsUnavailable, match="not torchvision's alex checkpoint"):
        metrics.build_lpips("alex", str(lpips_backbones["vgg"]))


def test_reconstruction_metrics_lpips_is_lpips_on_minus_one_to_one_images(lpips_backbones):
    """ReconstructionMetrics' LPIPS = the lpips package called directly, as upstream does, on [-1, 1] images (the
    reconstructions clamped): not on the [0, 1] levels of PSNR and SSIM, which makes LPIPS about 3x smaller. AlexNet
    only (every net goes through the same line; building the VGG takes seconds)."""
    nets = {"alex": metrics.build_lpips("alex", str(lpips_backbones["alex"]))}
    features = torch.nn.Flatten()  # stands in for the Inception (slow at 299 px), whose features are tested above
    measure = metrics.ReconstructionMetrics(features, nets).eval()
    g = torch.Generator().manual_seed(0)
    originals = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    reconstructions = originals + 0.3 * torch.randn(originals.shape, generator=g)  # partly outside [-1, 1]
    per_image, _, _ = measure(originals, reconstructions)
    clamped = reconstructions.clamp(-1, 1)
    net = nets["alex"]
    with torch.no_grad():
        expected = net(originals, clamped).flatten().double()
        from_unit_range = net((originals + 1) / 2, (clamped + 1) / 2, normalize=True).flatten().double()
    torch.testing.assert_close(from_unit_range, expected, rtol=1e-5, atol=0)  # lpips' own range convention
    assert expected.min() > 0
    torch.testing.assert_close(per_image["lpips_alex"], expected, rtol=1e-6, atol=0)


def test_a_file_that_is_not_the_inception_is_refused(lpips_backbones):
    with pytest.raises(weights.WeightsUnavailable, match="pt_inception-2015-12-05-6726825d.pth"):
        metrics.InceptionPool3(str(lpips_backbones["alex"]))


def test_weights_explicit_env_and_cached_paths(tmp_path, monkeypatch, inception_weights):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(weights.INCEPTION.env, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    assert weights.locate(weights.INCEPTION, str(inception_weights)) == str(inception_weights)
    with pytest.raises(weights.WeightsUnavailable, match="--inception-weights"):
        weights.locate(weights.INCEPTION, str(tmp_path / "nope.pth"))
    monkeypatch.setenv(weights.INCEPTION.env, str(inception_weights))
    assert weights.locate(weights.INCEPTION) == str(inception_weights)
    monkeypatch.delenv(weights.INCEPTION.env)
    cached = weights.INCEPTION.cache_path()
    assert cached == str(tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth")
    os.makedirs(os.path.dirname(cached))
    shutil.copy(inception_weights, cached)
    assert weights.locate(weights.INCEPTION) == cached


def no_network(url, dst, *args, **kwargs):
    raise urllib.error.URLError("network is unreachable")


@pytest.mark.parametrize("spec", [weights.INCEPTION, weights.LPIPS_ALEX, weights.LPIPS_VGG], ids=lambda s: s.filename)
def test_weights_missing_offline_name_the_file_and_where_to_put_it(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.delenv(spec.env, raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(weights.WeightsUnavailable) as info:
        weights.locate(spec)
    message = str(info.value)
    for part in (spec.filename, spec.url, spec.cache_path(), spec.flag, spec.env, "network is unreachable"):
        assert part in message
