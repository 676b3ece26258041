"""Inference casts the matrix weights to bf16 once (instead of autocast recasting each at every pass): the outputs
under bf16 autocast equal the float32 model's under the same autocast bit for bit. On the CPU with CPU autocast,
whose F.linear casts its operands to bf16 as CUDA's does."""

import copy

import pytest
import torch

import flowmo_fast
import flowmo_fast.flowmo.model
from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.graphed_sampler import cast_matmul_weights
from flowmo_fast.flowmo.model import autocast_dtype
from flowmo_fast.sampler_settings import UPSTREAM


def cpu_bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)


@pytest.fixture(scope="module")
def cast_pair(parity_model):
    cast = copy.deepcopy(parity_model)
    cast_matmul_weights((cast.encoder, cast.decoder), torch.bfloat16)
    return parity_model, cast


def test_only_linear_weights_are_cast(cast_pair):
    _, cast = cast_pair
    dtypes = {name: p.dtype for name, p in cast.named_parameters()}
    assert dtypes["decoder.double_blocks.0.img_attn.qkv.weight"] == torch.bfloat16
    assert dtypes["decoder.double_blocks.0.img_mod.lin.bias"] == torch.bfloat16
    assert dtypes["encoder.img_in.weight"] == torch.bfloat16
    assert dtypes["decoder.double_blocks.0.img_attn.norm.query_norm.scale"] == torch.float32  # used in fp32 math
    assert {n for n, d in dtypes.items() if d == torch.float32} == {n for n in dtypes if n.endswith(".scale")}


@torch.no_grad()
def test_cast_model_equals_autocast_outputs_bit_for_bit(cast_pair, parity):
    reference, cast = cast_pair
    code = parity["code_with_mask"]
    options = UPSTREAM.replace(steps=3, cfg_interval=None)
    outputs = []
    for model in (reference, cast):
        with cpu_bf16_autocast():
            outputs.append((
                model.encode(parity["images"]),
                model.decode(parity["zt"], code, parity["t"]),
                flow.sample(model, parity["sampler_noise"], code, code * 0, options),
            ))
    for want, got in zip(*outputs):
        assert want.dtype == got.dtype and torch.equal(want, got)
    assert not torch.equal(outputs[0][1].float(), reference.decode(parity["zt"], code, parity["t"]))  # bf16 ran


def test_cast_for_inference_follows_autocast_for(monkeypatch, tiny_checkpoint):
    assert autocast_dtype(torch.device("cuda", 1)) == torch.bfloat16 and autocast_dtype("cpu") is None
    model = flowmo_fast.load_checkpoint(tiny_checkpoint)  # CPU: float32, as it runs without autocast
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    monkeypatch.setattr(flowmo_fast.flowmo.model, "autocast_dtype", lambda device: torch.bfloat16)  # as on CUDA
    model = flowmo_fast.load_checkpoint(tiny_checkpoint)
    assert model.decoder.final_layer_img.linear.weight.dtype == torch.bfloat16
    assert model.encoder.double_blocks[0].txt_attn.qkv.weight.dtype == torch.bfloat16
