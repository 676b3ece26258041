"""SamplingOptions: upstream's defaults from the config's one copy, flags over a checkpoint's settings, the plan
of a sampling run (times, step sizes, guided steps), the solver as a setting stored in checkpoints, and clear
errors for impossible settings. (The solvers themselves: test_solvers.py.)"""

import argparse

import pytest
import torch

import flowmo_fast
from flowmo_fast.flags import add_sampler_flags, sampling_overrides
from flowmo_fast.flowmo.flops import decoder_passes
from flowmo_fast.sampler_settings import UPSTREAM, SamplingConfig, SamplingOptions


def test_upstream_defaults_come_from_the_config():
    assert UPSTREAM == SamplingOptions(25, 1.5, "pow_0.25", (0.17, 1.02))
    assert SamplingOptions.from_config(SamplingConfig(cfg_interval=None)).cfg_interval is None
    tiny = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny"))
    assert tiny.sampling() == UPSTREAM.replace(steps=tiny.config.eval.sampling.sample_steps)


def test_schedules_match_upstream_definition():
    ts, dts = SamplingOptions(4, 1.5, "linear", None).schedule_tensors()
    assert torch.allclose(ts, torch.tensor([1.0, 0.75, 0.5, 0.25])) and torch.allclose(dts, torch.full((4,), 0.25))
    ts, dts = UPSTREAM.schedule_tensors()
    assert ts[0] == 1 and len(ts) == 25 and torch.all(dts > 0)
    assert torch.isclose(dts.sum(), torch.tensor(1.0))  # integrates from t = 1 to exactly 0
    assert torch.isclose(ts[-1], torch.tensor((1 / 25) ** 4))
    plan = UPSTREAM.plan()
    assert plan.times == tuple(ts.tolist()) and plan.step_sizes == tuple(dts.tolist())


def test_guidance_interval_is_in_edm_sigmas():
    # (.17, 1.02) -> t in [0.1453, 0.5050]
    ts = [1.0, 0.6, 0.5, 0.2, 0.1]
    assert [UPSTREAM.in_interval(t) for t in ts] == [False, False, True, True, False]
    assert SamplingOptions(5, 1.5, "linear", ".17,1.02") == SamplingOptions(5, 1.5, "linear", (0.17, 1.02))
    assert all(UPSTREAM.replace(cfg_interval=None).in_interval(t) for t in ts)
    assert sum(UPSTREAM.plan().guided) == 6  # 6 of the 25 upstream steps run the unconditional pass too
    assert not any(UPSTREAM.replace(cfg=1.0).plan().guided)  # cfg 1: guidance is a no-op, never run


def test_flags_override_only_what_is_given():
    parser = argparse.ArgumentParser()
    add_sampler_flags(parser)
    base = UPSTREAM.replace(steps=10)
    assert sampling_overrides(parser.parse_args([])).over(base) == base
    args = parser.parse_args(["--steps", "3", "--cfg-interval", "none", "--schedule", "linear"])
    assert sampling_overrides(args).over(base) == SamplingOptions(3, 1.5, "linear", None)
    args = parser.parse_args(["--solver", "ab2"])
    assert sampling_overrides(args).over(base) == base.replace(solver="ab2")
    assert sampling_overrides(args).over(base.replace(solver="heun")).solver == "ab2"
    bad_flags = (["--steps", "0"], ["--schedule", "cosine"], ["--cfg-interval", "1,0"], ["--seed", "-1"],
                 ["--solver", "rk4"], ["--sampler", "faster"])
    for bad in bad_flags:
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "positive integer"),
    (dict(schedule="cosine"), "pow_P"),
    (dict(cfg_interval=(1.0, 0.5)), "lo must not exceed hi"),
])
def test_impossible_settings_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UPSTREAM.replace(**kwargs)


def test_options_are_hashable_keys():
    assert len({UPSTREAM, UPSTREAM.replace(cfg_interval=".17,1.02"), UPSTREAM.replace(steps=3)}) == 2


def test_a_named_sampler_lies_under_the_flags():
    """--sampler fast: Adams-Bashforth 2 in 12 steps, 15 decoder passes with upstream's guidance interval (the
    README's measured setting); flags given beside it override its settings."""
    parser = argparse.ArgumentParser()
    add_sampler_flags(parser)
    fast = sampling_overrides(parser.parse_args(["--sampler", "fast"])).over(UPSTREAM)
    assert fast == UPSTREAM.replace(steps=12, solver="ab2") and decoder_passes(fast) == 15 < decoder_passes(UPSTREAM)
    args = parser.parse_args(["--sampler", "fast", "--steps", "16", "--cfg", "2"])
    assert sampling_overrides(args).over(UPSTREAM) == UPSTREAM.replace(steps=16, solver="ab2", cfg=2.0)


def test_the_solver_is_stored_in_checkpoints_and_read_back(tmp_path, tiny_model):
    """eval.sampling.solver (ours) travels in a checkpoint's config: the model samples with it unless told
    otherwise; a file written before the key existed (no solver in its config) samples with Euler."""
    config = flowmo_fast.load_config(["eval.sampling.solver=midpoint"], preset="tiny")
    model = flowmo_fast.FlowMo(config)
    model.load_state_dict(tiny_model.state_dict())
    flowmo_fast.save_checkpoint(tmp_path / "mid.pth", model)
    loaded = flowmo_fast.load_checkpoint(tmp_path / "mid.pth")
    assert loaded.sampling().solver == "midpoint" and loaded.sampling() == UPSTREAM.replace(steps=10, solver="midpoint")
    ckpt = torch.load(tmp_path / "mid.pth", weights_only=True)
    del ckpt["config"]["eval"]["sampling"]["solver"]
    torch.save(ckpt, tmp_path / "old.pth")
    assert flowmo_fast.load_checkpoint(tmp_path / "old.pth").sampling().solver == "euler"
    with pytest.raises(ValueError, match="eval.sampling.solver='rk4'; allowed: euler, heun, midpoint, ab2"):
        flowmo_fast.load_config(["eval.sampling.solver=rk4"], preset="tiny")
