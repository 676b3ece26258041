"""The eval.rfid command: end to end on the bundled photos with the tiny checkpoint and random-weight metric
networks, its failure without weight files, its batching and noise, and 2 processes vs 1."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import flowmo_fast
from eval import rfid, weights
from flowmo_fast import noise
from flowmo_fast.distributed import Processes
from flowmo_fast.formats.data import SamplePhotosDataset
from flowmo_fast.formats.images import to_uint8
from flowmo_fast.sampler_settings import SamplingOptions

REPO = Path(__file__).resolve().parents[2]
NUM_IMAGES = 3


def command_args(checkpoint, out, inception_weights, lpips_backbones) -> list[str]:
    """Few, small images and two sampler steps: the whole command in seconds on a CPU."""
    return [
        "--ckpt", str(checkpoint), "--out", str(out), "--steps", "2", "--batch-size", "2",
        "--max-images", str(NUM_IMAGES), "--workers", "0", "--device", "cpu", "--save-reconstructions",
        "--inception-weights", str(inception_weights),
        "--lpips-alex-weights", str(lpips_backbones["alex"]), "--lpips-vgg-weights", str(lpips_backbones["vgg"]),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def single_run(tiny_checkpoint, inception_weights, lpips_backbones, tmp_path_factory):
    """One in-process run: (result dict, output folder, stdout). One thread, as each torchrun worker below:
    with the same thread count and the same batches, 1 and 2 processes compute bitwise the same."""
    out = tmp_path_factory.mktemp("rfid-1proc")
    stdout = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with contextlib.redirect_stdout(stdout):
            result = rfid.main(command_args(tiny_checkpoint, out, inception_weights, lpips_backbones))
    finally:
        torch.set_num_threads(threads)
    return result, out, stdout.getvalue()


def test_command_writes_metrics_json_grid_and_reconstructions(single_run, tiny_checkpoint, inception_weights):
    result, out, stdout = single_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["num_images"] == NUM_IMAGES and saved["skipped_images"]["count"] == 0
    assert saved["checkpoint"]["sha256"] == hashlib.sha256(Path(tiny_checkpoint).read_bytes()).hexdigest()
    assert saved["inception_weights_sha256"] == hashlib.sha256(Path(inception_weights).read_bytes()).hexdigest()
    assert saved["checkpoint"]["total_steps"] == 7 and saved["checkpoint"]["which"] == "ema"
    assert saved["config"]["model"]["mup_width"] == 2 and saved["config"]["data"]["image_size"] == 32
    # sampler: --steps from the command line, the rest from the checkpoint config
    assert saved["sampler"] == {"steps": 2, "cfg": 1.5, "schedule": "pow_0.25", "cfg_interval": [0.17, 1.02],
                                "solver": "euler", "seed": 0}
    assert saved["images_per_second"] > 0 and saved["wall_time_s"] >= saved["loop_time_s"] > 0
    m = saved["metrics"]
    assert set(m) == {"rfid", "psnr", "ssim", "lpips_alex", "lpips_vgg"}
    assert all(np.isfinite(v) for v in m.values()) and m["rfid"] > 0 and m["lpips_vgg"] > 0
    assert m == result["metrics"]
    assert "rFID" in stdout and f"{NUM_IMAGES} images" in stdout and "metrics.json" in stdout
    with Image.open(out / "grid.png") as grid:  # originals above reconstructions, 32 px + 2 px padding
        assert grid.size == (NUM_IMAGES * 34 + 2, 2 * 34 + 2)


def test_psnr_and_ssim_are_those_of_the_saved_reconstructions(single_run):
    """Recomputed with scikit-image from the PNG files and the original photos: the per-image mean."""
    result, out, _ = single_run
    photos = SamplePhotosDataset(32)
    psnrs, ssims = [], []
    for row in range(NUM_IMAGES):
        stem = os.path.splitext(photos.names[row])[0]
        rec = np.asarray(Image.open(out / "reconstructions" / f"{row:06d}_{stem}.png"), dtype=np.float64) / 255
        ref = to_uint8(photos[row]["image"][None])[0].astype(np.float64) / 255
        psnrs.append(peak_signal_noise_ratio(ref, rec, data_range=1.0))
        ssims.append(structural_similarity(rec, ref, data_range=1.0, channel_axis=-1))
    assert result["metrics"]["psnr"] == pytest.approx(np.mean(psnrs), rel=1e-9)
    assert result["metrics"]["ssim"] == pytest.approx(np.mean(ssims), rel=1e-7, abs=1e-9)


def offline(url, dst, *args, **kwargs):
    raise urllib.error.URLError("no network")


def test_missing_weights_fail_before_any_model_work(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty-torch-home"))
    for spec in (weights.INCEPTION, weights.LPIPS_ALEX, weights.LPIPS_VGG):
        monkeypatch.delenv(spec.env, raising=False)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the weight files were checked")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(rfid, "load_checkpoint", must_not_run)
    with pytest.raises(SystemExit) as info:
        rfid.main(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--device", "cpu"])
    message = str(info.value.code)
    assert "pt_inception-2015-12-05-6726825d.pth" in message and weights.INCEPTION.cache_path() in message
    assert "--inception-weights" in message and "FLOWMO_INCEPTION_WEIGHTS" in message


def test_no_lpips_needs_only_the_inception_file(inception_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    args = rfid.parse_args(["--ckpt", "c", "--no-lpips", "--inception-weights", str(inception_weights)])
    assert rfid.locate_weights(rfid.evaluation_settings(args).weights) == {"inception": str(inception_weights)}


def test_bad_arguments_are_refused(tiny_checkpoint, capsys):
    for argv in (
        ["--data", "x", "--imagenet-tar", "t", "--imagenet-index", "j"],
        ["--imagenet-tar", "t"],
        ["--batch-size", "0"],
        ["--schedule", "cosine"],
        ["--cfg-interval", "1,0.5"],
        ["--seed", "-1"],
    ):
        with pytest.raises(SystemExit):
            rfid.parse_args(["--ckpt", str(tiny_checkpoint), *argv])
        assert "error:" in capsys.readouterr().err


def rfid_error(argv: list, inception_weights) -> str:
    """eval.rfid's exit message for `argv` (a user's mistake: one line, exit status non-zero)."""
    with pytest.raises(SystemExit) as stop:
        rfid.main([*argv, "--no-lpips", "--inception-weights", str(inception_weights), "--device", "cpu", "--workers", "0"])
    message = str(stop.value.code)
    assert stop.value.code not in (0, None) and "\n" not in message
    return message


def test_data_that_never_decodes_ends_in_one_line(tiny_checkpoint, inception_weights, undecodable_folder, tmp_path):
    argv = ["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "out")]
    message = rfid_error([*argv, "--data", str(undecodable_folder)], inception_weights)
    assert message.startswith("eval.rfid: error: none of the 3 images tried of 3 images under ")
    assert str(undecodable_folder) in message and "another folder" in message
    (tmp_path / "empty").mkdir()
    message = rfid_error([*argv, "--data", str(tmp_path / "empty")], inception_weights)
    assert f"no image files under {tmp_path / 'empty'}" in message and "give a folder that holds images" in message
    (tmp_path / "out-file").write_text("")
    message = rfid_error(["--ckpt", str(tiny_checkpoint), "--out", str(tmp_path / "out-file")], inception_weights)
    assert "out-file" in message


def test_ckpt_takes_the_published_names(published_cache, inception_weights, tmp_path):
    message = rfid_error(["--ckpt", "flowmo_hi", "--out", str(tmp_path / "out")], inception_weights)
    assert "flowmo_hi.pth" in message and "hf download ksarge/FlowMo flowmo_hi.pth" in message


def test_batches_cover_every_kept_row_once_across_processes():
    args = rfid.parse_args(["--ckpt", "c", "--subsample", "3", "--max-images", "10", "--batch-size", "4"])
    for world in (1, 2, 3, 5):
        shards = [rfid.batches_of_rank(40, args, Processes(r, world, r, torch.device("cpu"))) for r in range(world)]
        dealt = sorted(sum(shards, []))
        assert dealt == [[0, 3, 6, 9], [12, 15, 18, 21], [24, 27]]  # the same batches whatever the world size


def test_noise_depends_only_on_seed_and_row():
    together = noise.image_noise([5, 9, 11], seed=3, shape=(3, 4, 4))
    alone = noise.image_noise([9], seed=3, shape=(3, 4, 4))
    torch.testing.assert_close(together[1], alone[0], rtol=0, atol=0)
    assert not torch.equal(together[0], together[1])
    assert not torch.equal(alone, noise.image_noise([9], seed=4, shape=(3, 4, 4)))


def test_eval_noise_for_seed_0_is_pinned():
    """eval.rfid's published numbers stay reproducible: the per-image noise of --seed 0 is what it has always been
    (values recorded from eval.rfid before the noise moved to flowmo_fast.noise)."""
    x = noise.image_noise([0, 7], seed=0, shape=(3, 2, 2))
    expected_row0 = [0.5458651781082153, -0.3587554693222046, -0.7178654670715332, 0.7713175415992737]
    expected_row7 = [-0.539074182510376, 1.385712742805481, -0.9189987778663635, 0.7816505432128906]
    assert x[0, 0].flatten().tolist() == expected_row0
    assert x[1, 2].flatten().tolist() == expected_row7
    assert noise.row_seed(0, 0) == 2968811710 and noise.row_seed(0, 7, noise.POSTERIOR_NOISE) == 663341227


def test_kl_reconstruction_depends_only_on_seed_and_row():
    """The KL posterior sample is per image: an image reconstructs the same alone or in a batch."""
    torch.manual_seed(0)
    model = flowmo_fast.FlowMo(flowmo_fast.load_config(["model.quantization_type=kl"], preset="tiny")).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    sampling = SamplingOptions(steps=2, cfg=1.0, schedule="linear", cfg_interval=None)
    together = model.reconstruct_rows(images, [4, 7, 9], 5, sampling)
    alone = model.reconstruct_rows(images[1:2], [7], 5, sampling)
    torch.testing.assert_close(together[1:2], alone, rtol=1e-5, atol=1e-6)
    other_row = model.reconstruct_rows(images[1:2], [8], 5, sampling)  # the posterior is sampled, not its mean
    assert (other_row - alone).abs().max() > 1e-3


@pytest.mark.distributed
def test_two_processes_give_the_metrics_of_one(single_run, tiny_checkpoint, inception_weights, lpips_backbones, tmp_path):
    result, out1, _ = single_run
    out2 = tmp_path / "rfid-2proc"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "eval.rfid",
           *command_args(tiny_checkpoint, out2, inception_weights, lpips_backbones)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    two = json.loads((out2 / "metrics.json").read_text())
    assert two["processes"] == 2 and two["num_images"] == result["num_images"]
    assert two["metrics"] == result["metrics"]
    pngs = sorted(p.name for p in (out1 / "reconstructions").iterdir())
    assert len(pngs) == NUM_IMAGES and sorted(p.name for p in (out2 / "reconstructions").iterdir()) == pngs
    for name in pngs:
        assert (out1 / "reconstructions" / name).read_bytes() == (out2 / "reconstructions" / name).read_bytes(), name
