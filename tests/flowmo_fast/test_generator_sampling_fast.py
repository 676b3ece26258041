"""The token generator's sampler, fast parts (flowmo_fast/maskgit/sampling.py): uniforms that never reach 1, the
CUDA-graph path moving labels and keys to the model's device itself, and the compiled sampling step against the
eager one."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from flowmo_fast.fastpath import Capture
from flowmo_fast.maskgit import sampling
from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator

M32 = 2**32
MULTIPLIER = 0x45D9F3B  # _mix32's


def unmix32(y: int) -> int:
    """The inverse of sampling's 32-bit hash: x -> ((x >> 16) ^ x) * m, twice, then (x >> 16) ^ x."""
    inverse = pow(MULTIPLIER, -1, M32)
    y ^= y >> 16
    y = y * inverse % M32
    y ^= y >> 16
    y = y * inverse % M32
    return y ^ (y >> 16)


def key_whose_first_uniform_is_the_largest(step: int, stream: int) -> int:
    """A sample key whose element 0 of (step, stream) hashes to 2^32 - 1, the largest: x = 2^24 - 1 after >> 8."""
    salt = int(sampling._mix32(torch.tensor(step * 8 + stream + 1)))
    base = unmix32(M32 - 1)  # element 0: mix32(base + 0), so base must hash to the largest value
    return unmix32(base) ^ salt


def test_the_largest_hash_gives_a_uniform_below_one():
    """(2^24 - 1 + 0.5) / 2^24 rounds to 1.0 in float32: -log(-log(u)) was an infinite Gumbel term (NaN times a
    temperature of 0). The largest hash now gives the float just below 1; the others are unchanged."""
    step, stream = 3, 1
    key = key_whose_first_uniform_is_the_largest(step, stream)
    u = sampling.counter_uniform(torch.tensor([key, 12345]), step, stream, 4)
    assert u[0, 0] == 1 - 2**-24 and bool((u < 1).all() & (u > 0).all())
    gumbel = -torch.log(-torch.log(u))
    assert math.isfinite(float(gumbel.max())) and math.isfinite(float(0.0 * gumbel.max()))  # temperature 0
    x = sampling._mix32((sampling._mix32((torch.tensor(12345) ^ sampling._mix32(torch.tensor(step * 8 + stream + 1)))
                                         & 0xFFFFFFFF) + torch.arange(4) * 0x9E3779B9) & 0xFFFFFFFF)
    assert torch.equal(u[1], ((x >> 8).float() + 0.5) / 2**24)  # every other value as before


def tiny_generator(**changes) -> TokenGenerator:
    torch.manual_seed(0)
    return TokenGenerator(GeneratorConfig(8, 2, 9, num_classes=2, **changes)).eval()


def test_the_graphed_generator_moves_labels_and_keys_to_the_models_device(monkeypatch):
    """Labels and keys on the CPU, the model elsewhere (the meta device, standing in for a GPU): both are moved
    before the capture, whose static buffers and loop see them on the model's device (a CPU label tensor made a
    host-to-device copy inside the capture)."""
    monkeypatch.setenv("FLOWMO_CHECK_FAST_PATHS", "0")  # meta tensors hold no values to check the replay against
    seen = []

    def fake_capture(run, device, autocast):
        seen.append(device)
        out = run()
        return Capture(SimpleNamespace(replay=lambda: None), out, None)

    monkeypatch.setattr(sampling, "capture_graph", fake_capture)
    with torch.device("meta"):
        model = tiny_generator()
    graphed = sampling.GraphedGenerator(model, compile=False)
    labels = torch.tensor([0, 1, 1])
    out = graphed(labels, sampling.sample_keys(0, labels.tolist(), [0, 1, 2]), sampling.GenerationOptions(steps=3))
    [entry] = graphed.captured.values()
    assert seen == [torch.device("meta")] and out.device.type == "meta"
    assert entry.labels.device.type == entry.keys.device.type == "meta" and entry.labels.dtype == torch.long


def test_the_compiled_step_draws_what_the_eager_step_draws():
    """The step's guidance mix, softmax, cumsum and draw compiled as one function (aot_eager here: dynamo and AOT
    autograd's decompositions, not Inductor's kernels) against the eager `generate`: the same ids, guided and
    unguided; the scale enters as a tensor, so a ramp of 6 different scales compiles 2 graphs (guided or not),
    not one per step."""
    from torch._dynamo.utils import counters

    model = tiny_generator()
    labels = torch.tensor([0, 1, 1])
    keys = sampling.sample_keys(0, labels.tolist(), [0, 1, 2])
    options = sampling.GenerationOptions(steps=6, cfg=3.0, cfg_schedule="linear")
    assert len(set(options.plan(model.config.tokens_per_image).cfg)) == 6
    torch._dynamo.reset()
    start = counters["stats"]["unique_graphs"]
    step = sampling.CompiledStep(model.fast_checks, backend="aot_eager")
    for given in (labels, None):
        assert torch.equal(sampling.generate(model, given, keys, options, step),
                           sampling.generate(model, given, keys, options))
    assert counters["stats"]["unique_graphs"] - start == 2 and all(model.fast_checks.verdicts.values())
