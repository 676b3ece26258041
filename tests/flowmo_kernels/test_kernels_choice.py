"""Which LFQ `kernels` takes on CUDA for each code width: a pure function of the device and the config, so it is
checked on a CUDA device object without a GPU. The Triton LFQ takes at most 20 bits per code group; the config
accepts up to 30."""

import pytest
import torch

import flowmo_fast
from flowmo_kernels import TRITON_LFQ_MAX_BITS, get_ops
from flowmo_kernels.lfq import lfq_torch

pytest.importorskip("triton")
from flowmo_kernels.lfq_triton import lfq_triton  # noqa: E402
from flowmo_kernels.triton_ops import AUTO_OPS  # noqa: E402

CUDA = torch.device("cuda")
REFUSAL = (
    r"kernels='triton' with 24-bit LFQ code groups: the Triton LFQ takes at most 20 bits per group .*"
    r"set kernels='auto'"
)


def wide_lfq_config(kernels: str):
    return flowmo_fast.load_config(
        ["model.context_dim=48", "model.codebook_size_for_entropy=24", f"model.kernels={kernels}"], preset="tiny"
    )


def test_auto_takes_the_pytorch_lfq_past_the_triton_limit_on_cuda():
    assert TRITON_LFQ_MAX_BITS == 20
    assert get_ops("auto", CUDA, lfq_bits=20).lfq is lfq_triton
    wide = get_ops("auto", CUDA, lfq_bits=21)
    assert wide.lfq is lfq_torch and wide.modulate is AUTO_OPS.modulate and wide.name == "auto"
    assert get_ops("auto", CUDA, lfq_bits=21) is wide  # one object: compiled code guards on it
    assert get_ops("torch", CUDA, lfq_bits=30).lfq is lfq_torch


def test_model_with_24_bit_groups_runs_the_pytorch_lfq_under_auto():
    model = flowmo_fast.FlowMo(wide_lfq_config("auto"))
    assert model.lfq_bits == 24 and model.ops(CUDA).lfq is lfq_torch
    narrow = flowmo_fast.FlowMo(flowmo_fast.load_config(preset="tiny"))
    assert narrow.ops(CUDA).lfq.fused is lfq_triton  # checked against its twin on first use (selfcheck)
    assert narrow.ops(CUDA) is narrow.ops(CUDA)  # one object: compiled code guards on it


def test_explicit_triton_names_the_limit_and_the_fix():
    with pytest.raises(ValueError, match=REFUSAL):
        get_ops("triton", CUDA, lfq_bits=24)
    with pytest.raises(ValueError, match=REFUSAL):
        flowmo_fast.FlowMo(wide_lfq_config("triton"))  # at construction, not at the first forward
    with pytest.raises(ValueError, match=REFUSAL):
        lfq_triton(torch.randn(4, 24))
    model = flowmo_fast.FlowMo(wide_lfq_config("auto"))
    with pytest.raises(ValueError, match=REFUSAL):
        model.kernels = "triton"
    assert model.kernels == "auto"
