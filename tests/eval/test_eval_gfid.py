"""eval.gfid: FID / sFID / IS / precision / recall of generated images against a reference (random-weight
Inception, no download): a set against itself, a shifted set, an ADM reference batch, the statistics cache, the metrics'
known answers, and one-line errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.metric_prc import calculate_precision_recall_full

from eval import gfid
from eval.fidelity import FidelityInception, inception_score, precision_recall, statistics_of
from eval.image_sets import NpzImages
from eval.metrics import feature_statistics

N = 5  # images per set: enough for k = 3 neighbours, few Inception passes on a CPU


@pytest.fixture(scope="module")
def pictures() -> np.ndarray:
    """N smooth random 32x32 pictures, uint8 [N, 32, 32, 3]."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (N, 4, 4, 3)).astype(np.uint8)
    return np.stack([np.asarray(Image.fromarray(c).resize((32, 32), Image.BILINEAR)) for c in coarse])


@pytest.fixture(scope="module")
def reference_folder(pictures, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reference")
    for i, p in enumerate(pictures):
        Image.fromarray(p).save(root / f"{i:02d}.png")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """One statistics cache for the module: each reference goes through the network once."""
    return tmp_path_factory.mktemp("gfid_cache")


def run(samples, reference, tmp_path, weights, cache, *extra) -> dict:
    return gfid.main(["--samples", str(samples), "--reference", str(reference), "--inception-weights", str(weights),
                      "--cache-dir", str(cache), "--out", str(tmp_path / "gfid.json"),
                      "--num-workers", "0", "--device", "cpu", *map(str, extra)])


def test_a_set_against_itself_scores_zero_and_a_shifted_set_clearly_more(
    pictures, reference_folder, inception_weights, cache, tmp_path, capsys
):
    np.savez(tmp_path / "same.npz", arr_0=pictures)
    same = run(tmp_path / "same.npz", reference_folder, tmp_path, inception_weights, cache)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    shifted_pixels = np.clip(pictures.astype(int) + 40, 0, 255).astype(np.uint8)  # brighter
    np.savez(tmp_path / "shifted.npz", arr_0=shifted_pixels)
    shifted = run(tmp_path / "shifted.npz", reference_folder, tmp_path, inception_weights, cache)
    m, s = same["metrics"], shifted["metrics"]
    assert abs(m["fid"]) < 1e-6 and m["precision"] == 1.0 and m["recall"] == 1.0
    assert s["fid"] > 0.1 and s["fid"] > 1e5 * abs(m["fid"])
    assert abs(m["sfid"]) < 1e-4 and s["sfid"] > 1.0 and s["sfid"] > 1e4 * abs(m["sfid"])  # a folder: computed
    assert s["precision"] < 1.0 and s["recall"] < 1.0
    assert m["inception_score"] >= 1.0 and np.isfinite(m["inception_score_std"])
    written = json.loads((tmp_path / "gfid.json").read_text())
    assert written["metrics"] == s  # the last run's result
    assert same["num_samples"] == N and same["reference"]["num_images"] == N and same["reference"]["kind"] == "folder"
    assert same["evaluator"]["name"] == "torch-fidelity" and same["evaluator"]["version"]
    assert len(same["reference"]["sha256"]) == 64 and same["reference"]["side"] == 32
    assert same["reference"]["sfid_statistics"] == f"{N} images of the reference"
    assert line.startswith("gFID ") and f"{N} samples vs folder" in line and "torch-fidelity" in line
    assert f"sFID {m['sfid']:.4f}" in line


def test_reference_statistics_are_cached_by_content(
    pictures, reference_folder, inception_weights, cache, tmp_path, monkeypatch
):
    np.savez(tmp_path / "samples.npz", arr_0=pictures[::-1])
    first = run(tmp_path / "samples.npz", reference_folder, tmp_path, inception_weights, cache)
    assert Path(first["reference"]["cache"]).is_file()

    def no_recompute(*args, **kwargs):
        raise AssertionError("the reference was run through the network again")

    monkeypatch.setattr(gfid, "compute_reference", no_recompute)
    again = run(tmp_path / "samples.npz", reference_folder, tmp_path, inception_weights, cache)
    assert again["metrics"] == first["metrics"] and again["reference"]["cache"] == first["reference"]["cache"]
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in reference_folder.iterdir():
        (changed / f.name).write_bytes(f.read_bytes())
    Image.fromarray(255 - pictures[0]).save(changed / "00.png")  # one image differs: other statistics
    with pytest.raises(AssertionError, match="through the network again"):
        run(tmp_path / "samples.npz", changed, tmp_path, inception_weights, cache)


def test_statistics_are_cached_per_side(pictures, inception_weights, cache, tmp_path):
    """One folder of 64-px images as the reference of 32-px samples, then of 64-px samples (the folder's own
    images): the second must not reuse the statistics of the images cropped to 32 px. Against its own images at
    64 px FID is 0 and precision and recall are 1."""
    folder = tmp_path / "reference64"
    folder.mkdir()
    large = np.stack([np.asarray(Image.fromarray(p).resize((64, 64), Image.BILINEAR)) for p in pictures])
    for i, p in enumerate(large):
        Image.fromarray(p).save(folder / f"{i:02d}.png")
    np.savez(tmp_path / "small.npz", arr_0=pictures)
    np.savez(tmp_path / "large.npz", arr_0=large)
    small = run(tmp_path / "small.npz", folder, tmp_path, inception_weights, cache)
    result = run(tmp_path / "large.npz", folder, tmp_path, inception_weights, cache)
    m = result["metrics"]
    assert abs(m["fid"]) < 1e-6 and m["precision"] == 1.0 and m["recall"] == 1.0, m
    assert (small["reference"]["side"], result["reference"]["side"]) == (32, 64)
    assert result["reference"]["cache"] != small["reference"]["cache"]


def test_fid_against_given_statistics_uses_the_references_mean_and_covariance():
    """FID of features with mean mu and covariance S against given (mu, 4 S): tr(S) + tr(4 S) - 2 tr(2 S) = tr(S);
    against (mu + d, S): |d|^2. (The samples' own S in place of the reference's would give 0 and |d|^2.)"""
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(64, 6, generator=g) @ torch.randn(6, 6, generator=g)  # [64, 6], correlated
    mu, sigma = statistics_of(samples)
    images = torch.zeros(4, 6)  # the batch's image features: not what FID uses when it has mu / sigma
    spatial = statistics_of(samples)  # (sFID's; not used by fid)
    given = gfid.ReferenceStatistics(images, spatial, given=(mu, 4 * sigma))
    assert given.fid(samples) == pytest.approx(np.trace(sigma), rel=1e-6)
    d = np.arange(6.0)
    assert gfid.ReferenceStatistics(images, spatial, given=(mu + d, sigma)).fid(samples) == pytest.approx(d @ d, rel=1e-6)


def test_an_adm_reference_batch_gives_fid_and_sfid_from_its_moments_and_precision_recall_from_its_images(
    pictures, inception_weights, cache, tmp_path
):
    net = FidelityInception(str(inception_weights))
    pool, _, spatial = net(torch.from_numpy(pictures).permute(0, 3, 1, 2))
    mu, sigma = feature_statistics(pool.double().numpy())  # the samples' own statistics ...
    mu_s, sigma_s = feature_statistics(spatial.double().numpy())
    other = np.clip(pictures.astype(int) + 40, 0, 255).astype(np.uint8)
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=other, mu=mu, sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
    np.savez(tmp_path / "samples.npz", arr_0=pictures)
    result = run(tmp_path / "samples.npz", tmp_path / "VIRTUAL_ref.npz", tmp_path, inception_weights, cache)
    assert abs(result["metrics"]["fid"]) < 1e-3 and abs(result["metrics"]["sfid"]) < 1e-3  # ... so both are ~0
    assert result["metrics"]["precision"] < 1.0  # while the images (brighter) are elsewhere
    assert result["reference"]["kind"] == "adm-npz" and result["reference"]["side"] is None
    assert result["reference"]["fid_statistics"] == "mu / sigma of VIRTUAL_ref.npz"
    assert result["reference"]["sfid_statistics"] == "mu_s / sigma_s of VIRTUAL_ref.npz"
    np.savez(tmp_path / "no_spatial.npz", arr_0=other, mu=mu, sigma=sigma)  # sFID from its (brighter) images
    without = run(tmp_path / "samples.npz", tmp_path / "no_spatial.npz", tmp_path, inception_weights, cache)
    assert without["metrics"]["sfid"] > 1e-3
    assert without["reference"]["sfid_statistics"] == f"{N} images of the reference"
    np.savez(tmp_path / "bad.npz", arr_0=other, mu=mu, sigma=sigma, mu_s=mu_s[:8], sigma_s=sigma_s[:8, :8])
    with pytest.raises(SystemExit, match=r"mu_s / sigma_s have shapes \(8,\) / \(8, 8\), expected \(2023,\)"):
        run(tmp_path / "samples.npz", tmp_path / "bad.npz", tmp_path, inception_weights, cache)


def test_an_imagenet_tar_with_its_index_is_a_reference(pictures, inception_weights, cache, tmp_path, make_image_tar):
    members = {}
    for i, p in enumerate(pictures):
        png = tmp_path / f"{i}.png"
        Image.fromarray(p).save(png)
        members[f"n0144076{i % 2}/n0144076{i % 2}_{i}.JPEG"] = png.read_bytes()
    tar, index = make_image_tar(tmp_path, members)
    np.savez(tmp_path / "samples.npz", arr_0=pictures)
    result = run(tmp_path / "samples.npz", tar, tmp_path, inception_weights, cache, "--reference-index", index)
    assert abs(result["metrics"]["fid"]) < 1e-6 and result["metrics"]["precision"] == 1.0  # the same pictures
    assert result["reference"]["kind"] == "imagenet-tar" and result["reference"]["num_images"] == N
    assert result["reference"]["index"] == str(Path(index).resolve())


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_an_adm_npz_is_read_in_batches(save, tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    save(tmp_path / "s.npz", arr_0=images, mu=np.zeros(3))
    npz = NpzImages(str(tmp_path / "s.npz"))
    batches = list(npz.batches(3))
    assert [b.shape for b in batches] == [(3, 3, 5, 6), (3, 3, 5, 6), (1, 3, 5, 6)] and batches[0].dtype == torch.uint8
    assert np.array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), images)
    assert len(npz) == 7 and npz.side == 5 and npz.array("mu").shape == (3,) and npz.array("sigma") is None


def test_precision_recall_known_answer():
    """Reference: points 0, 1, ..., 9 on a line, k = 1: every ball has radius 1. Samples 0.5 (inside) and 100
    (outside): precision 1/2. The samples' own balls reach each other (radius 99.5): all of the reference is
    inside, recall 1."""
    line = torch.zeros(10, 4)
    line[:, 0] = torch.arange(10.0)
    samples = torch.zeros(2, 4)
    samples[:, 0] = torch.tensor([0.5, 100.0])
    pr = precision_recall(line, samples, k=1)
    assert (pr.precision, pr.recall) == (0.5, 1.0)
    swapped = precision_recall(samples, line, k=1)  # the roles are not symmetric
    assert (swapped.precision, swapped.recall) == (1.0, 0.5)


def test_precision_recall_agree_with_torch_fidelity():
    g = torch.Generator().manual_seed(0)
    reference, samples = torch.randn(300, 16, generator=g), 0.8 * torch.randn(200, 16, generator=g) + 0.7
    ours = precision_recall(reference, samples, k=3)
    precision, recall = calculate_precision_recall_full(samples, reference, neighborhood=3)  # generated first
    assert 0.05 < ours.precision < 0.95 and 0.05 < ours.recall < 0.95  # a case where both are informative
    assert ours.precision == pytest.approx(float(precision), abs=1e-6)  # theirs: a float32 mean
    assert ours.recall == pytest.approx(float(recall), abs=1e-6)


def test_inception_score_known_answers():
    confident = torch.full((40, 1008), -30.0)
    confident[torch.arange(40), torch.arange(40) % 10] = 30.0  # ten classes, each seen equally, sure of each
    assert inception_score(confident, splits=1).mean == pytest.approx(10.0, rel=1e-6)
    assert inception_score(torch.zeros(40, 1008)).mean == pytest.approx(1.0)  # no idea: IS 1
    assert inception_score(confident[:3]).splits == 3  # fewer images than splits
    # 20 images of 20 classes, 10 splits (the ADM suite's) of 2: each split sees 2 classes once each, IS 2 (5: 4)
    distinct = torch.full((20, 1008), -30.0)
    distinct[torch.arange(20), torch.arange(20)] = 30.0
    score = inception_score(distinct)
    assert score.mean == pytest.approx(2.0, rel=1e-6) and score.splits == 10
    assert score.std == pytest.approx(0.0, abs=1e-6)  # every split alike


def test_gfid_mistakes_end_in_one_line(pictures, reference_folder, inception_weights, cache, tmp_path):
    np.savez(tmp_path / "no_images.npz", mu=np.zeros(3))
    np.savez(tmp_path / "float.npz", arr_0=pictures.astype(np.float32))
    np.savez(tmp_path / "few.npz", arr_0=pictures[:3])
    (tmp_path / "fake.tar").write_bytes(b"")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    cases = {
        (tmp_path / "missing.npz", reference_folder): "--samples .*missing.npz: not found",
        (tmp_path / "no_images.npz", reference_folder): "has no arr_0 .*its arrays: mu",
        (tmp_path / "float.npz", reference_folder): r"arr_0 is float32 .*expected uint8 \[N, H, W, 3\]",
        (tmp_path / "broken.npz", reference_folder): "is not an npz file",
        (tmp_path / "few.npz", reference_folder): "few.npz: 3 images; .*need at least 4: give more images",
        (reference_folder, tmp_path / "fake.tar"): "is a tar: give upstream's JSON index of it with --reference-index",
        (reference_folder, tmp_path / "nowhere"): "--reference .*nowhere: not found; give an ADM reference batch",
    }
    for (samples, reference), message in cases.items():  # SystemExit(text): Python prints text, exits with 1
        with pytest.raises(SystemExit) as e:
            run(samples, reference, tmp_path, inception_weights, cache)
        text = str(e.value.code)
        assert text.startswith("eval.gfid: error: ") and "\n" not in text, text
        assert __import__("re").search(message, text), text


def test_spatial_features_are_adms_mixed_6_conv_first_7_channels_channels_last(pictures, inception_weights):
    """ADM's spatial features: the TF node mixed_6/conv (torch-fidelity's Mixed_6d.branch1x1, after its ReLU) at
    17 x 17, channels [:7], flattened as TF's NHWC tensor: 17 * 17 * 7 = 2023 per image, the layout of mu_s."""
    net = FidelityInception(str(inception_weights))
    seen = []
    net.net.Mixed_6d.branch1x1.register_forward_hook(lambda module, args, out: seen.append(out.clone()))
    images = torch.from_numpy(pictures).permute(0, 3, 1, 2)
    pool, logits, spatial = net(images)
    (layer,) = seen  # [N, 192, 17, 17]
    assert layer.shape == (N, 192, 17, 17) and spatial.shape == (N, 2023) and spatial.dtype == torch.float32
    assert torch.equal(spatial.view(N, 17, 17, 7), layer[:, :7].permute(0, 2, 3, 1)) and spatial.min() >= 0
    assert torch.equal(pool, net(images)[0])  # the same pool features as before (one forward pass gives both)
