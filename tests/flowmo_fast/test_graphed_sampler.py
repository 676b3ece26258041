"""The fast path: compiled blocks give the eager results; the checkpointed chain keeps activations flat in k."""

import contextlib
import copy
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Callable, Optional

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flowmo_fast.flowmo import flow, sampler
from flowmo_fast.flowmo.graphed_sampler import GraphedSampler, blocks_compiled, compile_blocks
from flowmo_fast.sampler_settings import SOLVERS, UPSTREAM

EAGER_SAMPLE = sampler.sample


@pytest.mark.compile
def test_compiled_blocks_sample_like_eager(parity, parity_model):
    model = copy.deepcopy(parity_model)
    compile_blocks(model, dynamic=False)
    code = parity["code_with_mask"]
    options = UPSTREAM.replace(steps=4, cfg_interval=None)
    with torch.no_grad():
        out = flow.sample(model, parity["sampler_noise"], code, code * 0, options)
        ref = flow.sample(parity_model, parity["sampler_noise"], code, code * 0, options)
    assert torch.allclose(out, ref, atol=1e-4)


def saved_activation_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while `fn` runs (parameters excluded)."""
    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def test_posttrain_chain_activation_memory_is_flat_in_k(parity, parity_model):
    code = parity["code_with_mask"].clone().requires_grad_(True)
    per_k = {}
    for k in (2, 4):
        g = torch.Generator().manual_seed(0)
        per_k[k] = saved_activation_bytes(lambda: flow.posttrain_chain(parity_model, code, (32, 32), k=k, generator=g))
    one_pass = saved_activation_bytes(lambda: parity_model.decode(parity["zt"], code, parity["t"]))
    # Checkpointing keeps only each step's inputs (a few image-sized tensors), not a decoder pass's activations.
    assert per_k[4] - per_k[2] < 0.1 * one_pass


def test_graphed_sampler_captures_per_key_and_again_when_weights_move(monkeypatch, tiny_model):
    """The capture bookkeeping, on the CPU with the capture itself faked: one capture per input key, reused;
    all dropped when a parameter moves or `kernels` changes (graphs read weights where they were captured)."""
    captures = []

    def fake_capture(self, z, code, null_code, autocast, settings):
        captures.append(tuple(z.shape))
        capture = SimpleNamespace(graph=SimpleNamespace(replay=lambda: None), out=torch.zeros_like(z), warm_up=None)
        return SimpleNamespace(capture=capture, z=z.clone(), code=code.clone(), null_code=None)

    monkeypatch.setattr(GraphedSampler, "_capture", fake_capture)
    model = copy.deepcopy(tiny_model)
    sampler = GraphedSampler(model, compile=False)
    z, code = torch.randn(2, 3, 32, 32), torch.randn(2, model.code_length, 9)

    def run(batch=2, **settings):
        return sampler(z[:batch], code[:batch], None, UPSTREAM.replace(steps=2, **settings))

    run(), run()
    assert len(captures) == 1
    run(batch=1)
    run(cfg=2.0)
    assert len(captures) == 3 and len(sampler.captured) == 3
    model.float()  # nothing moves
    run()
    assert len(captures) == 3
    model.kernels = "torch" if model.kernels != "torch" else "auto"
    run()
    assert len(captures) == 4 and len(sampler.captured) == 1
    model.double()
    run()
    assert len(captures) == 5 and len(sampler.captured) == 1


def test_blocks_compiled_after_compile_blocks(tiny_model):
    model = copy.deepcopy(tiny_model)
    assert not blocks_compiled(model)
    compile_blocks(model, dynamic=False)  # lazy: nothing compiles until a block runs
    assert blocks_compiled(model)


def fake_sample(z, code, null_code):
    """A stand-in for the sampler whose output depends on each of its inputs."""
    return 2 * z + code.mean() + (null_code.sum() if null_code is not None else 0)


@dataclass
class FakeGraph:
    """Records the sampler calls of its capture; replay reruns them on the tensors they were given (the
    capture's static buffers), writing into the outputs they returned, as a CUDA graph does."""

    calls: list[Callable[[], None]] = field(default_factory=list)

    def replay(self) -> None:
        for call in self.calls:
            call()


@dataclass(frozen=True)
class GraphRequest:
    device: torch.device  # current when the capture began
    stream: Optional[torch.device]  # the device of the stream it was asked to capture on
    capture_error_mode: str


class FakeCuda:
    """torch.cuda as GraphedSampler uses it, faked on the CPU: a current device (`torch.cuda.device`), streams
    that know their device, graphs that record and replay (FakeGraph); `sampler.sample` is `fake_sample`, or
    with `eager` the real sampler (on CPU tensors)."""

    def __init__(self, monkeypatch, current: str = "cuda:0", eager: bool = False):
        self.run = EAGER_SAMPLE if eager else lambda model, z, code, null_code, options: fake_sample(z, code, null_code)
        self.current = torch.device(current)
        self.streams: list[torch.device] = []  # the device of each stream created
        self.graphs: list[GraphRequest] = []
        self.samples: list[tuple[torch.device, bool]] = []  # per sampler call: current device, inside a capture
        self.capturing: Optional[FakeGraph] = None
        for name in ("device", "Stream", "current_stream", "stream", "graph"):
            monkeypatch.setattr(torch.cuda, name, getattr(self, name))
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(sampler, "sample", self.sample)

    @contextlib.contextmanager
    def device(self, device):
        previous, self.current = self.current, torch.device(device)
        try:
            yield
        finally:
            self.current = previous

    def Stream(self, device=None):  # noqa: N802 (torch's name)
        stream = self.current_stream(device)
        self.streams.append(stream.device)
        return stream

    def current_stream(self, device=None):
        return SimpleNamespace(device=torch.device(device) if device is not None else self.current,
                               wait_stream=lambda other: None)

    def stream(self, stream):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph, pool=None, stream=None, capture_error_mode: str = "global"):
        self.graphs.append(GraphRequest(self.current, stream.device if stream else None, capture_error_mode))
        self.capturing = graph
        try:
            yield
        finally:
            self.capturing = None

    def sample(self, model, z, code, null_code, options):
        self.samples.append((self.current, self.capturing is not None))
        out = self.run(model, z, code, null_code, options)
        if self.capturing is not None:
            self.capturing.calls.append(lambda: out.copy_(self.run(model, z, code, null_code, options)))
        return out


def test_graphed_sampler_replays_each_calls_inputs(monkeypatch, tiny_model):
    """Every call's z, code and null code reach the replay (copied into the captured buffers): two calls with
    different inputs, one capture, each output that of its own inputs."""
    FakeCuda(monkeypatch)
    sampler = GraphedSampler(tiny_model, compile=False)
    g = torch.Generator().manual_seed(0)
    calls = [
        (torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g))
        for _ in range(2)
    ]
    outs = [sampler(z, code, null, UPSTREAM.replace(steps=2)) for z, code, null in calls]
    assert len(sampler.captured) == 1
    for out, (z, code, null) in zip(outs, calls):
        torch.testing.assert_close(out, fake_sample(z, code, null), rtol=0, atol=1e-6)


def test_graphed_sampler_replays_each_solver_as_eager(monkeypatch, tiny_model):
    """The solver is part of a capture's key: each solver's graph replays that solver's loop (here the real
    sampler, recorded and rerun on the captured buffers), equal to eager sampling for new inputs too."""
    FakeCuda(monkeypatch, eager=True)
    graphed = GraphedSampler(tiny_model, compile=False)
    g = torch.Generator().manual_seed(0)
    code = torch.randn(1, tiny_model.code_length, 19, generator=g).sign()
    for solver in SOLVERS:
        options = UPSTREAM.replace(steps=2, solver=solver, cfg_interval=None)
        for _ in range(2):  # the capture, then a replay with new noise
            z = torch.randn(1, 3, 8, 8, generator=g)
            with torch.no_grad():
                out, want = graphed(z, code, code * 0, options), EAGER_SAMPLE(tiny_model, z, code, code * 0, options)
            torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    assert len(graphed.captured) == len(SOLVERS)


def test_graphed_sampler_captures_on_the_inputs_device_thread_local_after_one_warm_up(monkeypatch, tiny_model):
    """A model on cuda:1 with device 0 current: the side stream, the warm-up and the capture run on cuda:1
    (made current, and given as the capture stream); the capture is thread_local (another thread's CUDA calls,
    a pin-memory DataLoader's, cannot break it); one warm-up pass before it; device 0 current again after."""
    cuda = FakeCuda(monkeypatch, current="cuda:0")
    monkeypatch.setenv("FLOWMO_CHECK_FAST_PATHS", "0")  # fake tensors hold no values to check the replay against
    with FakeTensorMode():  # tensors that say cuda:1, on a machine without one
        z, code = torch.randn(2, 3, 8, 8, device="cuda:1"), torch.randn(2, 4, 9, device="cuda:1")
    GraphedSampler(tiny_model, compile=False)(z, code, code * 0, UPSTREAM.replace(steps=2))
    gpu1 = torch.device("cuda:1")
    assert cuda.samples == [(gpu1, False), (gpu1, True)]
    assert cuda.streams == [gpu1]
    assert cuda.graphs == [GraphRequest(gpu1, gpu1, "thread_local")]
    assert cuda.current == torch.device("cuda:0")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_graphed_sampler_on_the_second_gpu_replays_new_inputs(tiny_model):
    """On real hardware, a model on cuda:1 while device 0 is current: each replay follows its own noise
    (before the fix nothing was captured on cuda:1 and every replay returned the first batch's images)."""
    torch.cuda.set_device(0)
    model = copy.deepcopy(tiny_model).to("cuda:1")
    g = torch.Generator().manual_seed(0)
    quantized = torch.randn(2, model.code_length, model.config.model.context_dim, generator=g).sign().to("cuda:1")
    noises = [torch.randn(2, 3, 32, 32, generator=g).to("cuda:1") for _ in range(2)]
    model.cuda_graphs = False
    eager = [model.sample_images(quantized, (32, 32), noise=noise) for noise in noises]
    model.cuda_graphs = True
    graphed = [model.sample_images(quantized, (32, 32), noise=noise) for noise in noises]
    assert model._graphed_sampler.captured and torch.cuda.current_device() == 0
    assert (eager[0] - eager[1]).abs().max() > 0.5  # the two noises give different images
    for ours, want in zip(graphed, eager):  # bf16 autocast; compiled blocks against eager
        assert (ours - want).abs().max() < 0.1
