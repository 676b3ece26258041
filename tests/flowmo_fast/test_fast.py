"""The fast path: compiled blocks give the eager results; the checkpointed chain keeps activations flat in k."""

import copy
from types import SimpleNamespace

import pytest
import torch

from flowmo_fast import flow
from flowmo_fast.fast import GraphedSampler, blocks_compiled, compile_blocks


@pytest.mark.compile
def test_compiled_blocks_sample_like_eager(parity, parity_model):
    model = copy.deepcopy(parity_model)
    compile_blocks(model, dynamic=False)
    code = parity["code_with_mask"]
    with torch.no_grad():
        out = flow.sample(model, parity["sampler_noise"], code, code * 0, steps=4, cfg=1.5, cfg_interval=None)
        ref = flow.sample(parity_model, parity["sampler_noise"], code, code * 0, steps=4, cfg=1.5, cfg_interval=None)
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
        graph = SimpleNamespace(replay=lambda: None)
        return SimpleNamespace(graph=graph, z=z.clone(), code=code.clone(), null_code=None, out=torch.zeros_like(z))

    monkeypatch.setattr(GraphedSampler, "_capture", fake_capture)
    model = copy.deepcopy(tiny_model)
    sampler = GraphedSampler(model, compile=False)
    z, code = torch.randn(2, 3, 32, 32), torch.randn(2, model.code_length, 9)

    def run(batch=2, **settings):
        return sampler(z[:batch], code[:batch], None, steps=2, **settings)

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
