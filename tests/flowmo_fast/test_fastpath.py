"""Fast paths that check themselves (flowmo_kernels.selfcheck, flowmo_fast.fastpath), on the CPU: a wrong fused op,
a wrong compiler and a wrong CUDA-graph replay are each caught on first use, warned about once in one line and
replaced by the plain path; right ones stay on the fast path, silently; FLOWMO_CHECK_FAST_PATHS=0 turns it off."""

from __future__ import annotations

import copy
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from flowmo_fast.fastpath import Capture, FastPathChecks, FastPathWarning
from flowmo_fast.flowmo import graphed_sampler
from flowmo_fast.flowmo.graphed_sampler import GraphedSampler, compile_blocks
from flowmo_fast.maskgit import sampling
from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator
from flowmo_fast.sampler_settings import UPSTREAM
from flowmo_kernels import TORCH_OPS, KernelOps
from flowmo_kernels.adaln import gated_residual_torch, modulate_torch
from flowmo_kernels.selfcheck import checked_ops


def no_scale_modulate(x, shift, scale, out_dtype=None):
    """A plausible kernel bug: the modulation without its `1 +`."""
    return modulate_torch(x, shift, scale - 1 if scale is not None else None, out_dtype)


class _DoubledGradient(torch.autograd.Function):
    """Identity forward, twice the gradient backward: a kernel whose backward alone is wrong."""

    @staticmethod
    def forward(ctx, y):
        return y.clone()

    @staticmethod
    def backward(ctx, grad):
        return 2 * grad


def wrong_backward_gated_residual(x, gate, y):
    return gated_residual_torch(x, gate, _DoubledGradient.apply(y))


def fast_set(**ops) -> KernelOps:
    """The plain set with some ops replaced, named like the Triton set."""
    return replace(TORCH_OPS, name="triton", **ops)


def modulate_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(*shape, generator=g).to(dtype) for shape in ((2, 40, 64), (2, 1, 64), (2, 1, 64)))
    return x, shift, scale


def fast_path_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, FastPathWarning)]


def test_a_wrong_op_is_caught_once_per_dtype_and_shape_class_and_falls_back():
    """The wrong modulation: the first call warns in one line naming the op, its shape class, the error and the
    fallback, and returns the plain op's result; a second call of that key is silent and plain; another dtype is a
    key of its own (checked and warned again); the other ops (the twins themselves) are never wrapped."""
    checks = FastPathChecks()
    ops = checked_ops(checks, fast_set(modulate=no_scale_modulate), TORCH_OPS)
    assert ops.gated_residual is gated_residual_torch and checked_ops(checks, fast_set(modulate=no_scale_modulate),
                                                                      TORCH_OPS) is ops
    x, shift, scale = modulate_args()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        first = ops.modulate(x, shift, scale, out_dtype=torch.float32)
        again = ops.modulate(x[:1], shift[:1], scale[:1], torch.float32)
        other_dtype = ops.modulate(*(t.double() for t in (x, shift, scale)))
    [message, message64] = fast_path_warnings(record)
    assert "\n" not in message and "modulate" in message and "D=64" in message and "float32" in message
    assert "differs from the plain path: relative L2" in message and "using the plain path" in message
    assert "FLOWMO_CHECK_FAST_PATHS=0" in message and "float64" in message64
    assert torch.equal(first, modulate_torch(x, shift, scale, torch.float32))
    assert torch.equal(again, modulate_torch(x[:1], shift[:1], scale[:1]))
    assert torch.equal(other_dtype, modulate_torch(*(t.double() for t in (x, shift, scale))))
    assert len(checks.failed()) == 2


def test_a_right_op_stays_on_the_fast_path_silently():
    """A fused op that agrees with its twin (up to rounding far below the tolerance) is what runs, every call."""
    calls = []

    def right(x, shift, scale, out_dtype=None):
        calls.append(x.shape)
        return modulate_torch(x, shift, scale, out_dtype) * (1 + 1e-7)

    checks = FastPathChecks()
    ops = checked_ops(checks, fast_set(modulate=right), TORCH_OPS)
    x, shift, scale = modulate_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        outs = [ops.modulate(x, shift, scale) for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs) and not torch.equal(outs[0], modulate_torch(x, shift, scale))
    assert calls == [(1, 16, 64), (2, 40, 64), (2, 40, 64), (2, 40, 64)]  # the probe (1 sample, 16 tokens), then 3
    assert list(checks.verdicts.values()) == [True]


def test_a_wrong_backward_alone_is_caught():
    """The check runs the op forward and backward: a fused op whose forward is right and whose gradient is not
    is replaced too, even when called without gradients (inference)."""
    ops = checked_ops(FastPathChecks(), fast_set(gated_residual=wrong_backward_gated_residual), TORCH_OPS)
    x, gate, y = torch.randn(2, 20, 32), torch.randn(2, 1, 32), torch.randn(2, 20, 32)
    with pytest.warns(FastPathWarning, match="gated_residual.*relative L2"), torch.no_grad():
        ops.gated_residual(x, gate, y)
    y = y.requires_grad_()
    ops.gated_residual(x, gate, y).sum().backward()
    assert torch.equal(y.grad, gate.expand_as(y))  # the twin's gradient, not twice it


def test_a_fast_op_that_raises_falls_back_with_its_error_in_the_warning():
    def broken(x, shift, scale, out_dtype=None):
        raise RuntimeError("PTX for sm_90 failed\nsecond line")

    ops = checked_ops(FastPathChecks(), fast_set(modulate=broken), TORCH_OPS)
    x, shift, scale = modulate_args()
    with pytest.warns(FastPathWarning, match=r"failed: RuntimeError: PTX for sm_90 failed; using the plain path"):
        out = ops.modulate(x, shift, scale)
    assert torch.equal(out, modulate_torch(x, shift, scale))


def test_the_switch_turns_the_checks_off(monkeypatch):
    monkeypatch.setenv("FLOWMO_CHECK_FAST_PATHS", "0")
    checks = FastPathChecks()
    ops = checked_ops(checks, fast_set(modulate=no_scale_modulate), TORCH_OPS)
    x, shift, scale = modulate_args()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        assert torch.equal(ops.modulate(x, shift, scale), no_scale_modulate(x, shift, scale))
    assert checks.verdicts == {}


def test_compiled_code_follows_a_failed_verdict():
    """Inside torch.compile no check can run: there the fused op runs until any key of it failed, then the twin
    (dynamo guards on the verdict: the failure recompiles)."""
    ops = checked_ops(FastPathChecks(), fast_set(modulate=no_scale_modulate), TORCH_OPS)
    x, shift, scale = modulate_args()
    compiled = torch.compile(lambda x, ops: ops.modulate(x, shift, scale), backend="eager", dynamic=False)
    assert torch.equal(compiled(x, ops), no_scale_modulate(x, shift, scale))  # unchecked yet: the fused op
    with pytest.warns(FastPathWarning):
        ops.modulate(x, shift, scale)  # an eager call checks it
    assert torch.equal(compiled(x, ops), modulate_torch(x, shift, scale))


def wrong_compiler(gm, example_inputs):
    """A torch.compile backend whose code is off by 1 in every output: a miscompiled block."""

    def run(*args):
        return [out + 1 for out in gm(*args)]

    return run


def counting_compiler(calls: list):
    def backend(gm, example_inputs):
        def run(*args):
            calls.append(1)
            return gm(*args)
        return run
    return backend


def sample(model, noise, code):
    with torch.no_grad():
        return model.sample_images(code, (32, 32), UPSTREAM.replace(steps=2), noise=noise)


def tiny_code(model):
    g = torch.Generator().manual_seed(1)
    code = torch.randn(2, model.code_length, model.config.model.context_dim, generator=g).sign()
    return torch.randn(2, 3, 32, 32, generator=g), code


def test_a_miscompiled_flowmo_block_is_caught_and_runs_eagerly(tiny_model):
    """Blocks compiled by a wrong compiler: the first call of each block variant warns and the sampler's images
    equal the eager model's; blocks compiled right stay compiled (their compiled code runs), silently."""
    noise, code = tiny_code(tiny_model)
    want = sample(tiny_model, noise, code)
    wrong = copy.deepcopy(tiny_model)
    wrong.fast_checks = FastPathChecks()
    compile_blocks(wrong, backend=wrong_compiler, dynamic=False)
    with pytest.warns(FastPathWarning, match=r"compiled block decoder.double_blocks.\d \(no gradients") as record:
        got = sample(wrong, noise, code)
    # each block once, though every step calls it: 2 steps, unguided (the guidance interval leaves both out)
    assert torch.equal(got, want) and len(record) == len(wrong.fast_checks.failed()) == len(wrong.decoder.double_blocks)
    calls, right = [], copy.deepcopy(tiny_model)
    right.fast_checks = FastPathChecks()
    compile_blocks(right, backend=counting_compiler(calls), dynamic=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FastPathWarning)
        assert torch.allclose(sample(right, noise, code), want, atol=1e-6)
    assert calls and all(right.fast_checks.verdicts.values())


def tiny_generator() -> TokenGenerator:
    torch.manual_seed(0)
    return TokenGenerator(GeneratorConfig(8, 2, 9, num_classes=2)).eval()


def test_a_miscompiled_generator_block_is_caught():
    model, labels = tiny_generator(), torch.tensor([0, 1, 1])
    keys, options = sampling.sample_keys(0, labels.tolist(), [0, 1, 2]), sampling.GenerationOptions(steps=4, cfg=2.0)
    want = sampling.generate(model, labels, keys, options)
    model.compile_blocks(backend=wrong_compiler, dynamic=False)
    with pytest.warns(FastPathWarning, match=r"compiled generator block \d"):
        assert torch.equal(sampling.generate(model, labels, keys, options), want)


def test_compiled_blocks_with_dropout_in_training_run_unchecked_and_leave_the_rng_alone(monkeypatch):
    """A block that draws random numbers (dropout 0.1 in training) cannot agree with a second pass of itself: its
    compiled variant runs unchecked (no false warning, no fallback to eager for the run), and the check's plain pass
    leaves the RNG streams where a run without checks has them (what an exact resume replays)."""
    ids, labels = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(3)), torch.tensor([0, 1, 1, 0])

    def one_step(checks_on: bool):
        monkeypatch.setenv("FLOWMO_CHECK_FAST_PATHS", "1" if checks_on else "0")
        torch.manual_seed(0)
        model = TokenGenerator(GeneratorConfig(8, 2, 9, num_classes=2, dropout=0.1, attention_dropout=0.1)).train()
        calls = []
        model.compile_blocks(backend=counting_compiler(calls), dynamic=False)
        torch.manual_seed(1)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FastPathWarning)
            loss = model.loss(ids, labels).loss
        return loss, torch.get_rng_state(), calls, model.fast_checks

    loss, rng, calls, checks = one_step(True)
    plain_loss, plain_rng, _, _ = one_step(False)
    assert calls and not checks.failed() and len(checks.verdicts) == 2  # both blocks' variant: accepted, compiled
    assert torch.equal(rng, plain_rng) and torch.equal(loss, plain_loss)


class FakeGraphs:
    """`capture_graph` without CUDA: the warm-up runs `run` for real; a replay writes into the output either a
    fresh run (a right graph) or zeros (a wrong one: e.g. stale buffers)."""

    def __init__(self, right: bool):
        self.right, self.captures = right, 0

    def __call__(self, run, device, autocast) -> Capture:
        self.captures += 1
        warm_up = run()
        out = torch.empty_like(warm_up)
        replay = (lambda: out.copy_(run())) if self.right else (lambda: out.zero_())
        return Capture(SimpleNamespace(replay=replay), out, warm_up)


@pytest.mark.parametrize("right", [True, False])
def test_a_wrong_cuda_graph_replay_of_the_sampler_is_caught(monkeypatch, tiny_model, right):
    """The first replay is compared with its warm-up: a right graph is replayed from then on, silently; a wrong one
    warns once, that call returns the warm-up's (eager) images, and later calls run the eager loop, uncaptured."""
    graphs = FakeGraphs(right)
    monkeypatch.setattr(graphed_sampler, "capture_graph", graphs)
    noise, code = tiny_code(tiny_model)
    want = sample(tiny_model, noise, code)
    graphed = GraphedSampler(tiny_model, compile=False)
    code = tiny_model.with_mask(code)
    run = lambda: graphed(noise, code, code * 0.0, UPSTREAM.replace(steps=2))  # noqa: E731
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [run().clamp(-1, 1) for _ in range(3)]
    assert [bool(w) for w in [fast_path_warnings(record)]] == [not right]
    assert all(torch.allclose(o, want, atol=1e-6) for o in outs)
    assert graphs.captures == 1 and len(graphed.captured) == (1 if right else 0)


@pytest.mark.parametrize("right", [True, False])
def test_a_wrong_cuda_graph_replay_of_the_generator_is_caught(monkeypatch, right):
    graphs = FakeGraphs(right)
    monkeypatch.setattr(sampling, "capture_graph", graphs)
    model, labels = tiny_generator(), torch.tensor([0, 1, 1])
    keys, options = sampling.sample_keys(0, labels.tolist(), [0, 1, 2]), sampling.GenerationOptions(steps=4, cfg=2.0)
    want = sampling.generate(model, labels, keys, options)
    graphed = sampling.GraphedGenerator(model, compile=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        outs = [graphed(labels, keys, options) for _ in range(3)]
    assert len(fast_path_warnings(record)) == (0 if right else 1)
    assert all(torch.equal(o, want) for o in outs) and len(graphed.captured) == (1 if right else 0)
