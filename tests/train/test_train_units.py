"""Pieces of the training commands, in process: command line, config, retention, RNG, EMA, weight norms,
unreached parameters, the ResNet perceptual loss."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import flowmo_fast
from flowmo_fast.config import load_config
from train import cli, posttrain, train_state
from train.ema import EMA
from train.metrics import flowmo_flops_per_step
from train.norms import WeightNormFixer, weights_to_fix
from train.perceptual import ResNetLogitLoss
from train.step import build_optimizer


def test_upstream_command_line_parses():
    parser = cli.build_parser("t", "t")
    args, overrides = cli.parse(parser, [
        "--experiment-name", "flowmo_lo_pretrain", "model.context_dim=18", "model.codebook_size_for_entropy=9",
        "trainer.max_steps=1300000", "--nodes", "2", "--slurm-partition", "p",
    ])
    config = cli.make_config([], overrides, args.preset)
    assert args.experiment_name == "flowmo_lo_pretrain" and args.results_dir == "results"
    assert (config.model.context_dim, config.model.codebook_size_for_entropy, config.trainer.max_steps) == (18, 9, 1300000)


def test_command_line_errors_say_what_is_accepted(capsys):
    parser = cli.build_parser("t", "t")
    with pytest.raises(SystemExit) as e:
        cli.parse(parser, ["--max-steps", "3"])
    assert e.value.code == 2 and "section.key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="model.nope"):
        cli.make_config([], ["model.nope=1"], None)


def test_posttrain_starts_from_the_checkpoint_config(tiny_checkpoint, tmp_path, capsys):
    config = posttrain.config_from_checkpoint(str(tiny_checkpoint), ["data.batch_size=4"])
    assert config.model.posttrain_sample and config.opt.lpips_mode == "resnet" and config.opt.lpips_weight == 0.01
    assert config.opt.lr == 5e-5 and config.data.batch_size == 4
    assert config.model.mup_width == 2 and config.data.image_size == 32  # the tiny preset, from the file
    with pytest.raises(SystemExit):
        posttrain.main(["--results-dir", str(tmp_path), "--experiment-name", "x"])
    assert "--resume-from-ckpt" in capsys.readouterr().err


def test_retention_keeps_newest_two_and_multiples(tmp_path):
    for step in (5, 10, 15, 20, 25, 30, 35):
        path = train_state.checkpoint_path(str(tmp_path), step)
        (tmp_path / "checkpoints").mkdir(exist_ok=True)
        open(path, "wb").close()
    train_state.prune(str(tmp_path), keep_every=10)
    assert [train_state.step_of(p) for p in train_state.list_checkpoints(str(tmp_path))] == [10, 20, 30, 35]


def test_rng_states_round_trip():
    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    state = train_state.capture_rng()
    first = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    train_state.restore_rng(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def test_ema_updates_every_ten_steps_with_decay_power_ten():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, step=3)  # not a multiple of 10: no change
    assert torch.equal(ema.tensors["weight"], start["weight"])
    ema.update(model, step=10)
    keep = 0.9**10
    assert torch.allclose(ema.tensors["weight"], start["weight"] * keep + model.weight * (1 - keep))


@pytest.mark.parametrize("mode", ["l2", "channel"])
def test_trained_weight_norms_return_to_their_initial_values_and_frozen_ones_stay(tiny_model, mode):
    """Frozen: the weights no output depends on (FlowMo freezes them) and here a whole encoder block."""
    tiny_model.encoder.double_blocks[0].requires_grad_(False)
    fixer = WeightNormFixer(tiny_model, mode)
    names = [n for n, _ in weights_to_fix(tiny_model)]
    assert names and all("double_blocks" in n for n in names)
    untouched = tiny_model.encoder.img_in.weight.clone()
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.mul_(1.7)
    frozen = {n: w.clone() for n, w in weights_to_fix(tiny_model) if not w.requires_grad}
    assert any(n.startswith("encoder.double_blocks.0.") for n in frozen) and len(frozen) < len(names)
    fixer.apply(tiny_model)
    for name, w in weights_to_fix(tiny_model):
        if name in frozen:
            assert torch.equal(w, frozen[name]), name
        else:
            assert torch.allclose(fixer.norm(w), fixer.initial[name], rtol=1e-5), name
    assert torch.allclose(tiny_model.encoder.img_in.weight, untouched * 1.7)  # outside double_blocks: as trained


def test_optimizer_takes_only_trained_parameters():
    config = load_config(["data.image_size=16"], preset="tiny")
    model = flowmo_fast.FlowMo(config).train()
    # FlowMo freezes its dead parameters itself; the optimizer takes only what trains: encoder group first, then decoder, as upstream.
    groups = build_optimizer(model, config).param_groups
    assert len(groups) == 2 and groups[0]["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in groups) == sum(1 for p in model.parameters() if p.requires_grad)


def test_resnet_logit_loss_loads_torchvision_weights(resnet50_weights):
    loss = ResNetLogitLoss().eval()
    stored = torch.load(resnet50_weights, weights_only=True)
    assert torch.equal(loss.net.fc.weight, stored["fc.weight"])
    torch.manual_seed(0)
    target = torch.rand(1, 3, 16, 16) * 2 - 1
    images = (target + 0.1 * torch.randn_like(target)).clamp(-1, 1).requires_grad_(True)
    value = loss(images, target)
    value.backward()
    assert value.item() > 0 and images.grad.abs().sum() > 0


def test_flops_per_step_match_the_transformer_estimate():
    """Counted FLOPs ~ 3 x (2 x token-wise weights x tokens) + attention, for encoder and decoder."""
    config = load_config(["data.image_size=16", "opt.n_grad_acc=2"], preset="tiny")
    counted = flowmo_flops_per_step(config, micro_batch=2)
    h, images, length = 384, 2, 16 + (16 // 4) ** 2  # hidden size; per micro-batch: images, code + patch tokens
    per_block = 2 * 12 * h * h * images * length + 4 * length * length * h * images  # two streams' weights + attention
    estimate = 3 * per_block * 4 * config.opt.n_grad_acc  # forward + backward, 4 blocks, 2 micro-batches
    assert 0.7 * estimate < counted < 1.1 * estimate, (counted, estimate)
