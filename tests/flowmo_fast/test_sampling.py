"""SamplingOptions: upstream's defaults from the config's one copy, flags over a checkpoint's settings, the plan
of a sampling run (times, step sizes, guided steps) and clear errors for impossible settings."""

import argparse

import pytest
import torch

import flowmo_fast
from flowmo_fast.flags import add_sampler_flags, sampling_overrides
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
    for bad in (["--steps", "0"], ["--schedule", "cosine"], ["--cfg-interval", "1,0"], ["--seed", "-1"]):
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
