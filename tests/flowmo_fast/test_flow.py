"""Rectified-flow schedules, the batched-guidance sampler, and post-training's checkpointed chain."""

import pytest
import torch

import flowmo_fast
from flowmo_fast.flowmo import flow
from flowmo_fast.sampler_settings import UPSTREAM, SamplingOptions


def test_training_time_schedules_stay_in_unit_interval():
    for schedule in flow.TRAIN_SCHEDULES:
        t = flow.sample_times(schedule, 4096, generator=torch.Generator().manual_seed(0))
        assert t.shape == (4096,) and t.min() > 0 and t.max() < 1
    lognormal = flow.sample_times("lognormal", 20000, generator=torch.Generator().manual_seed(0))
    fat = flow.sample_times("fat_lognormal", 20000, generator=torch.Generator().manual_seed(0))
    # fat_lognormal puts ~10% of its mass uniform: more samples in the tails than the lognormal.
    tails = lambda t: ((t < 0.05) | (t > 0.95)).float().mean().item()
    assert tails(fat) > tails(lognormal) + 0.005
    with pytest.raises(ValueError, match="allowed"):
        flow.sample_times("cosine", 4)


@torch.no_grad()
def test_batched_guidance_equals_two_passes(parity, parity_model):
    code = parity["code_with_mask"]
    z = parity["sampler_noise"]
    null = code * 0
    options = SamplingOptions(steps=6, cfg=2.0, schedule="linear", cfg_interval=None)
    ts, dts = options.schedule_tensors()
    ref = z
    for t, dt in zip(ts, dts):
        tb = t.expand(z.shape[0])
        vc = parity_model.decode(ref, code, tb)
        vu = parity_model.decode(ref, null, tb)
        ref = ref - dt * (vu + 2.0 * (vc - vu))
    out = flow.sample(parity_model, z, code, null, options)
    assert torch.allclose(out, ref, atol=1e-5)


def test_posttrain_chain_checkpointed_gradients_equal_plain_chain(parity, parity_model):
    code = parity["code_with_mask"].clone().requires_grad_(True)

    def run(checkpointed):
        g = torch.Generator().manual_seed(5)
        if checkpointed:
            out = flow.posttrain_chain(parity_model, code, (32, 32), k=3, generator=g)
        else:  # the same chain written plainly
            b = code.shape[0]
            z = torch.randn((b, 3, 32, 32), generator=g)
            ts = torch.rand((b, 4), generator=g).cumsum(1)
            ts = ((ts - ts[:, :1]) / (ts - ts[:, :1])[:, -1:]).flip(1)
            for i in range(3):
                z = z - (ts[:, i] - ts[:, i + 1])[:, None, None, None] * parity_model.decode(z, code, ts[:, i])
            out = z
        loss = out.square().mean()
        grads = torch.autograd.grad(loss, [code, parity_model.decoder.img_in.weight])
        return out.detach(), grads

    out_c, grads_c = run(True)
    out_p, grads_p = run(False)
    assert torch.allclose(out_c, out_p, atol=1e-5)
    for gc, gp in zip(grads_c, grads_p):
        assert torch.allclose(gc, gp, atol=1e-6, rtol=1e-4)


def test_sampler_loop_takes_no_host_tensor():
    """Inside `flow.sample` no op moves or mixes a host tensor into the model's device (here `meta`): a
    host-to-device copy would break the CUDA-graph capture of the loop (flowmo_fast.flowmo.graphed_sampler). Host-only ops
    (the schedule) are fine."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    def devices(tree) -> set[str]:
        return {a.device.type for a in tree_leaves(tree) if isinstance(a, torch.Tensor)}

    class NoHostTensors(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            inputs = devices((args, kwargs))
            assert "cpu" not in inputs or inputs | devices(out) == {"cpu"}, f"{func} takes a host tensor to the device"
            return out

    with torch.device("meta"):
        model = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny")).eval()
        m = model.config.model
        z = torch.empty(2, 3, 32, 32)
        code = torch.empty(2, m.code_length, m.context_dim + 1)
    with torch.no_grad(), NoHostTensors():
        out = flow.sample(model, z, code, torch.zeros_like(code), UPSTREAM.replace(steps=3, cfg_interval=None))
    assert out.device.type == "meta" and out.shape == z.shape
