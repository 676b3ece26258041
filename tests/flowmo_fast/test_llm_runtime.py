"""The LLM type's per-call costs: the FIM marker ids live on the model's device (no tensor built from host data
at each call: on CUDA a blocking copy), and the frozen LLM is stored in the dtype autocast runs it in (bf16 on
CUDA: no recast of its weights per forward, no bf16 copies kept for backward; float32 on the CPU)."""

import pytest
import torch
from llm_helpers import WIDTH, llm_overrides

import flowmo_fast
import flowmo_fast.flowmo.llm_infill
from flowmo_fast import load_config
from flowmo_fast.flowmo.llm_infill import LLMInfiller, load_llm, resolve_llm_path

pytest.importorskip("transformers")


def llm_config(folder):
    return load_config([*llm_overrides(folder), "model.code_length=10"], preset="tiny")


def test_marker_ids_are_built_once_and_kept_out_of_the_state_dict(tiny_llm_folder, monkeypatch):
    model = flowmo_fast.FlowMo(llm_config(tiny_llm_folder))
    infiller = model.quantizer.infiller
    fim = infiller.fim_ids
    assert infiller.marker_ids.tolist() == [fim.prefix, fim.suffix, fim.middle]
    assert not any("marker_ids" in key for key in model.state_dict())  # checkpoints unchanged
    code, starts, made = torch.randn(2, 10, WIDTH), torch.tensor([0, 5]), []
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: made.append(a) or real_tensor(*a, **k))
    with torch.no_grad():
        infiller.infill(code, starts)
    assert made == []


def test_the_frozen_llm_is_kept_in_autocasts_dtype(tiny_llm_folder, monkeypatch):
    config = llm_config(tiny_llm_folder).model
    on_cpu = LLMInfiller.from_config(config)
    assert {p.dtype for p in on_cpu.llm.parameters()} == {torch.float32}  # the CPU runs float32
    monkeypatch.setattr(flowmo_fast.flowmo.llm_infill, "autocast_dtype", lambda device: torch.bfloat16)  # as on CUDA
    infiller = LLMInfiller(load_llm(resolve_llm_path(config.llm_path)), on_cpu.fim_ids, on_cpu.spec)
    assert {p.dtype for p in infiller.llm.parameters()} == {torch.bfloat16}  # stored, not recast per forward
    infiller.float()  # a move (FlowMo's load_checkpoint: .to(device, float32)) keeps it
    assert {p.dtype for p in infiller.llm.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        out = infiller.infill(torch.randn(2, 10, WIDTH), torch.tensor([0, 5]))
    assert out.code.dtype == torch.float32 and torch.isfinite(out.span).all()
