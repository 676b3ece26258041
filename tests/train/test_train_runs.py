"""The training commands end to end on the CPU (Gloo): the `tiny` preset at 16 px on the bundled photos.

One uninterrupted 2-process run (30 steps) is shared: its loss must fall, its checkpoints must load, and a
run stopped by SIGTERM part way and resumed must reach its step-10 weights exactly. Single-process runs
go through the command's `main` inside the test process (same code, no interpreter start-up)."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import assert_same_training_state, check, log_lines, run_command, stop_with_sigterm

import flowmo_fast
from flowmo_fast.config import config_from_dict
from flowmo_fast.formats.checkpoint import read_checkpoint
from train import posttrain, pretrain, train_state

TINY = ["--preset", "tiny", "data.image_size=16", "data.batch_size=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2 processes, 30 steps, checkpoints every 10."""
    results = tmp_path_factory.mktemp("results")
    result = run_command(
        ["train.pretrain", *TINY, "--results-dir", results, "--experiment-name", "a", "trainer.max_steps=30",
         "trainer.log_every=5", "trainer.checkpoint_every=10", "trainer.keep_every=10", "trainer.sample_every=30"],
        nproc=2,
    )
    return results / "a", check(result)


@pytest.mark.distributed
def test_loss_falls_and_checkpoints_load(uninterrupted):
    log_dir, stdout = uninterrupted
    logs = log_lines(stdout)
    assert sorted(logs) == [5, 10, 15, 20, 25, 30]
    losses = [logs[s]["total_loss"] for s in sorted(logs)]
    assert all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
    assert all(logs[s]["skipped_images"] == 0 for s in logs)
    assert [train_state.step_of(p) for p in train_state.list_checkpoints(str(log_dir))] == [10, 20, 30]
    model = flowmo_fast.load_checkpoint(log_dir / "checkpoints" / "00000030.pth", which="model")
    assert model.config.data.image_size == 16 and not model.training
    ckpt = read_checkpoint(log_dir / "checkpoints" / "00000030.pth")
    assert ckpt["total_steps"] == 30 and len(ckpt["rng_state_per_rank"]) == 2 and ckpt["world_size"] == 2
    assert ckpt["data_position"] == 30 * 2  # samples drawn per rank
    grid = Image.open(log_dir / "samples" / "00000030.png")
    # 8 photos of 16 px, inputs over reconstructions, 2 px padding; scaled up 8x so each shows at 128 px
    assert grid.size == (8 * (8 * 18 + 2), 8 * (2 * 18 + 2))
    assert (log_dir / "config.json").exists() and list(log_dir.glob("events.out.tfevents.*"))


@pytest.mark.distributed
def test_sigterm_then_resume_gives_the_uninterrupted_weights(uninterrupted, tmp_path):
    reference_dir, _ = uninterrupted
    args = ["train.pretrain", *TINY, "--results-dir", tmp_path, "--experiment-name", "b", "trainer.max_steps=10",
            "trainer.log_every=1", "trainer.checkpoint_every=1000", "trainer.sample_every=1000"]
    step = stop_with_sigterm(args, nproc=2)
    assert 3 <= step < 10 and [train_state.step_of(p) for p in train_state.list_checkpoints(str(tmp_path / "b"))] == [step]

    stdout = check(run_command(args, nproc=2))
    assert f"resuming from {tmp_path / 'b' / 'checkpoints' / ('%08d.pth' % step)}" in stdout
    assert_same_training_state(tmp_path / "b" / "checkpoints" / "00000010.pth", reference_dir / "checkpoints" / "00000010.pth")


def run_in_process(main, args: list, capsys) -> tuple[int, str]:
    """A command's main() in this process (one-process group): (exit code, stdout)."""
    code = main([str(a) for a in args])
    return code, capsys.readouterr().out


def test_posttrain_runs_two_steps_from_the_checkpoint(uninterrupted, resnet50_weights, lone_process, tmp_path, capsys):
    log_dir, _ = uninterrupted
    start = log_dir / "checkpoints" / "00000020.pth"
    code, stdout = run_in_process(posttrain.main, [
        "--resume-from-ckpt", start, "--results-dir", tmp_path, "--experiment-name", "post", "data.batch_size=2",
        "trainer.max_steps=22", "trainer.log_every=1", "trainer.sample_every=1000", "opt.freeze_encoder_after=21",
    ], capsys)
    assert code == 0, stdout[-3000:]
    logs = log_lines(stdout)
    assert sorted(logs) == [21, 22] and all(np.isfinite(logs[s]["lpips_loss"]) and logs[s]["lpips_loss"] > 0 for s in logs)
    # The encoder trains in step 21, then freezes (upstream: encoder frozen, optimizer rebuilt).
    assert "freezing the encoder and rebuilding the optimizer at step 21" in stdout
    assert logs[21]["encoder_checksum"] == logs[22]["encoder_checksum"]
    after = read_checkpoint(tmp_path / "post" / "checkpoints" / "00000022.pth")
    before = read_checkpoint(start)
    assert after["config"]["model"]["posttrain_sample"] and after["config"]["opt"]["lpips_mode"] == "resnet"
    assert after["encoder_frozen"]
    assert all(k.startswith("decoder.") for k in after["optimizer_state_dict"]["state"])
    name = "decoder.double_blocks.0.img_mlp.0.weight"
    assert not torch.equal(after["model_state_dict"][name], before["model_state_dict"][name])
    flowmo_fast.load_checkpoint(tmp_path / "post" / "checkpoints" / "00000022.pth")


def photo_bytes(seed: int, fmt: str = "PNG") -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def test_corrupt_image_in_tar_is_skipped_and_counted(lone_process, tmp_path, capsys, make_image_tar):
    members = {f"n0000000{i}/img_{i}.JPEG": photo_bytes(i, "JPEG") for i in range(3)}
    members["n00000009/img_9.JPEG"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    tar_path, index_path = make_image_tar(tmp_path, members)
    code, stdout = run_in_process(pretrain.main, [
        "--preset", "tiny", "data.image_size=16", "data.batch_size=4",
        f"data.imagenet_train_tar={tar_path}", f"data.imagenet_train_index={index_path}",
        "--results-dir", tmp_path, "--experiment-name", "tar", "trainer.max_steps=2", "trainer.log_every=1",
        "trainer.sample_every=1000",
    ], capsys)
    assert code == 0, stdout[-3000:]
    assert "skipped an image that does not decode: n00000009/img_9.JPEG" in stdout
    logs = log_lines(stdout)
    assert logs[1]["skipped_images"] == 1 and logs[2]["skipped_images"] == 2  # each step draws all 4 rows


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(lone_process, tmp_path, capsys):
    code, stdout = run_in_process(pretrain.main, [
        *TINY, "--results-dir", tmp_path, "--experiment-name", "nan", "opt.lr=1.0e6",
        "trainer.max_steps=6", "trainer.log_every=1", "trainer.checkpoint_every=1", "trainer.sample_every=1000",
    ], capsys)
    assert code == 1
    match = re.search(r"the loss became NaN or inf at step (\d+).*Last good checkpoint: (\S+)\.", stdout)
    assert match, stdout[-3000:]
    bad_step, good = int(match.group(1)), match.group(2)
    steps = [train_state.step_of(p) for p in train_state.list_checkpoints(str(tmp_path / "nan"))]
    assert steps and max(steps) == bad_step - 1 and good.endswith("%08d.pth" % (bad_step - 1))
    model = flowmo_fast.load_checkpoint(good, which="model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def initial_weights(config) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The weights a run starts from (every rank: FlowMo(config) right after torch.manual_seed(global_seed)) and
    the names of those that train (FlowMo freezes the ones no output depends on)."""
    with torch.random.fork_rng():
        torch.manual_seed(config.global_seed)
        model = flowmo_fast.FlowMo(config)
    return model.state_dict(), {name for name, p in model.named_parameters() if p.requires_grad}


def relative(gap: float, size: float) -> float:
    return gap / size if size else (math.inf if gap else 0.0)


def update_gaps(ours: dict, reference: dict, start: dict, names: set) -> tuple[float, float, str]:
    """How far one run's updates (w - w_start) are from another's, relative to the other's: ||gap|| / ||update||
    over all `names` together, and the largest over single tensors with its name."""
    gaps, sizes = {}, {}
    for name in names:
        moved, expected = (ours[name] - start[name]).double(), (reference[name] - start[name]).double()
        gaps[name], sizes[name] = (moved - expected).norm().item(), expected.norm().item()
    worst = max(names, key=lambda n: relative(gaps[n], sizes[n]))
    whole = relative(math.hypot(*gaps.values()), math.hypot(*sizes.values()))
    return whole, relative(gaps[worst], sizes[worst]), worst


@pytest.mark.distributed
def test_fsdp_matches_ddp_and_writes_the_same_checkpoint_format(uninterrupted, tmp_path):
    reference_dir, reference_stdout = uninterrupted
    stdout = check(run_command(
        ["train.pretrain", *TINY, "--results-dir", tmp_path, "--experiment-name", "fsdp", "trainer.fsdp=true",
         "trainer.max_steps=10", "trainer.log_every=5", "trainer.sample_every=1000"],
        nproc=2,
    ))
    fsdp = read_checkpoint(tmp_path / "fsdp" / "checkpoints" / "00000010.pth")
    ddp = read_checkpoint(reference_dir / "checkpoints" / "00000010.pth")
    assert sorted(fsdp) == sorted(ddp)
    assert fsdp["optimizer_state_dict"]["state"].keys() == ddp["optimizer_state_dict"]["state"].keys()
    # Same data, seeds and algorithm: the same training up to reduction-order rounding (Adam amplifies it).
    for step in (5, 10):
        assert log_lines(stdout)[step]["diffusion_loss"] == pytest.approx(log_lines(reference_stdout)[step]["diffusion_loss"], rel=1e-2)
    # Compare what training changed: in 10 steps the weights move by <= 3e-3 and the EMA (one update, at step 0,
    # weight 1 - 0.99^10) by <= 3e-5, far below a tolerance on the weights themselves. FSDP's updates differ from
    # DDP's by ~1% of the update (up to ~3% for single tensors: reduction order, amplified by Adam), the EMA's
    # by ~0.03% (0.1%). The frozen weights are left out: FSDP's norm fixing moves them by rounding (~1e-7).
    start, trained = initial_weights(config_from_dict(ddp["config"]))
    ema_moved = max((ddp["model_ema_state_dict"][k] - w).abs().max().item() for k, w in start.items())
    assert 0 < ema_moved < 1e-3, f"DDP's EMA moved {ema_moved:.3g}: are these the weights the run starts from?"
    for key, rtol in (("model_state_dict", 0.03), ("model_ema_state_dict", 0.003)):
        assert fsdp[key].keys() == ddp[key].keys() == start.keys()
        whole, single, name = update_gaps(fsdp[key], ddp[key], start, trained)
        assert whole <= rtol and single <= 3 * rtol, (
            f"{key}: FSDP's update is {whole:.3g} of DDP's away from it (limit {rtol}), {single:.3g} for {name} "
            f"(limit {3 * rtol:.3g})"
        )
    assert flowmo_fast.load_checkpoint(tmp_path / "fsdp" / "checkpoints" / "00000010.pth").config.trainer.fsdp
