"""The fast path: compiled blocks give the eager results; the checkpointed chain keeps activations flat in k."""

import copy

import pytest
import torch

from flowmo_fast import flow
from flowmo_fast.fast import compile_blocks


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
