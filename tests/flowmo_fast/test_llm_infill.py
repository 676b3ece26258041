"""flowmo_fast.flowmo.llm_infill with a tiny random Qwen2 saved to a temporary folder (never a download)."""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from llm_helpers import WIDTH, tiny_qwen2_config
from torch import nn

from flowmo_fast import load_config
from flowmo_fast.flowmo.llm_infill import (
    LLMInfiller,
    LLMNotFoundError,
    fim_ids_for,
    gather_span,
    llm_config_hash,
    resolve_llm_path,
    span_starts,
    span_starts_per_image,
)
from flowmo_fast.llm_settings import QWEN_CODER_FIM_IDS, FimIds, parse_llm_quantization

transformers = pytest.importorskip("transformers")

CODE_LENGTH = 10  # span 3 at P = 0.3


@pytest.fixture(scope="module")
def llm_folder(tiny_llm_folder) -> Path:
    """A Qwen2ForCausalLM as the hub has it (config.json + model.safetensors), without tokenizer."""
    return tiny_llm_folder


def model_config(folder, *overrides):
    settings = [
        "model.quantization_type=qwen2.5-coder-0.5b", f"model.context_dim={WIDTH}",
        f"model.code_length={CODE_LENGTH}", f"model.llm_path={folder}", *overrides,
    ]
    return load_config(settings, preset="tiny").model


@pytest.fixture(scope="module")
def infiller(llm_folder) -> LLMInfiller:
    return LLMInfiller.from_config(model_config(llm_folder))


def reference_span(llm, fim: FimIds, code, s, n):
    """One sample, built token by token: [prefix] code[:s] [suffix] code[s+n:] [middle] code[s:s+n]."""
    embed = llm.get_input_embeddings()
    marker = {name: embed(torch.tensor([getattr(fim, name)])) for name in ("prefix", "middle", "suffix")}
    sequence = torch.cat([marker["prefix"], code[:s], marker["suffix"], code[s + n:], marker["middle"], code[s:s + n]])
    hidden = llm(inputs_embeds=sequence[None]).last_hidden_state[0]
    return hidden[-n:]  # slot j: the position of code token s + j


def test_infill_replaces_the_span_by_the_llms_hidden_states_and_nothing_else(infiller):
    torch.manual_seed(1)
    code = torch.randn(4, CODE_LENGTH, WIDTH)
    starts = torch.tensor([0, 3, 7, 5])  # 7 = T - n: the span ends the code
    n = infiller.span_length(CODE_LENGTH)
    with torch.no_grad():
        out = infiller.infill(code, starts)
    assert n == 3 and out.code.shape == code.shape and out.span.shape == (4, n, WIDTH)
    for i, s in enumerate(starts.tolist()):
        outside = [j for j in range(CODE_LENGTH) if not s <= j < s + n]
        assert torch.equal(out.code[i, outside], code[i, outside])
        assert torch.equal(out.code[i, s:s + n], out.span[i])
        assert torch.equal(gather_span(code, starts, n)[i], code[i, s:s + n])
        with torch.no_grad():
            expected = reference_span(infiller.llm, infiller.fim_ids, code[i], s, n)
        torch.testing.assert_close(out.span[i], expected, rtol=1e-5, atol=1e-5)
        assert (out.span[i] - code[i, s:s + n]).norm(dim=-1).min() > 0.1  # each span token really changed


def test_gradients_reach_the_code_through_the_llm_and_no_llm_parameter_gets_one(infiller):
    code = torch.randn(2, CODE_LENGTH, WIDTH, requires_grad=True)
    starts = torch.tensor([2, 6])
    infiller.infill(code, starts).code.square().sum().backward()
    for i, s in enumerate(starts.tolist()):  # the span's own code tokens reach the output only through the LLM
        assert code.grad[i, s:s + 3].abs().sum(-1).min() > 0
    assert all(not p.requires_grad and p.grad is None for p in infiller.llm.parameters())
    assert not infiller.llm.training


def test_the_llm_is_out_of_the_module_tree_but_moves_with_it(infiller):
    holder = nn.Module()
    holder.quantizer = infiller
    holder.head = nn.Linear(WIDTH, WIDTH)
    assert set(holder.state_dict()) == {"head.weight", "head.bias"}
    assert len(list(holder.parameters())) == 2
    holder.train()
    assert not infiller.llm.training
    try:
        holder.double()
        assert all(p.dtype == torch.float64 for p in infiller.llm.parameters())
        out = infiller.infill(torch.randn(1, CODE_LENGTH, WIDTH, dtype=torch.float64), torch.tensor([1]))
        assert out.code.dtype == torch.float64
    finally:
        holder.float()


def test_the_loaded_llm_is_the_saved_one(infiller, llm_folder):
    saved = transformers.Qwen2ForCausalLM.from_pretrained(llm_folder).model.state_dict()
    loaded = infiller.llm.state_dict()
    assert set(loaded) == set(saved)
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_span_form_sets_the_fraction(llm_folder):
    assert parse_llm_quantization("qwen2.5-coder-0.5b").span_fraction == 0.3
    m = model_config(llm_folder, "model.quantization_type=qwen2.5-coder-0.5b_span_0.6")
    infiller = LLMInfiller.from_config(m)
    assert infiller.span_length(CODE_LENGTH) == 6
    with torch.no_grad():
        out = infiller.infill(torch.randn(2, CODE_LENGTH, WIDTH), torch.tensor([0, 4]))
    assert out.span.shape == (2, 6, WIDTH)


@pytest.mark.parametrize("form", ["qwen2.5-coder-0.5b_span_0", "qwen2.5-coder-0.5b_span_1.5", "qwen2.5-coder-0.5b_x"])
def test_bad_forms_name_the_allowed_ones(form):
    with pytest.raises(ValueError, match=r"allowed LLM forms: qwen2.5-coder-0.5b .* qwen2.5-coder-0.5b_span_P"):
        load_config([f"model.quantization_type={form}"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.context_dim=18"], r"model.context_dim=18 but .* hidden size 16: set model.context_dim=16"),
        (["model.code_length=30"], r"model.code_length=30: .* max_position_embeddings=32: set model.code_length <= 29"),
        (["model.llm_fim_ids=1,2,999999"], r"outside the vocabulary .* set model.llm_fim_ids"),
    ],
)
def test_settings_the_llm_cannot_take_name_the_key(llm_folder, overrides, message):
    with pytest.raises(ValueError, match=message):
        LLMInfiller.from_config(model_config(llm_folder, *overrides))


def test_fim_ids_from_the_tokenizer_else_qwens_unless_given(llm_folder, tmp_path):
    assert fim_ids_for(llm_folder) == QWEN_CODER_FIM_IDS
    assert fim_ids_for(llm_folder, FimIds(1, 2, 3)) == FimIds(1, 2, 3)
    tokenizers = pytest.importorskip("tokenizers")
    words = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    words.add_special_tokens(["<|fim_suffix|>", "<|fim_prefix|>", "<|fim_middle|>"])  # ids 3, 4, 5
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>").save_pretrained(tmp_path)
    assert fim_ids_for(tmp_path) == FimIds(prefix=4, middle=5, suffix=3)


def test_missing_local_folder_is_named(tmp_path):
    for path in (str(tmp_path / "no_such_model"), str(tmp_path)):  # absent; a folder without config.json
        message = f"model.llm_path={re.escape(repr(path))}.*hf download Qwen/Qwen2.5-Coder-0.5B"
        with pytest.raises(LLMNotFoundError, match=message):
            resolve_llm_path(path)


def test_a_hub_id_missing_from_the_cache_is_named_before_transformers_loads(tmp_path):
    """An empty offline cache: the error names the id, the cache and how to get it, and comes before
    transformers is even imported (no model load, no network: within seconds)."""
    script = textwrap.dedent("""
        import sys
        from flowmo_fast import load_config
        from flowmo_fast.flowmo.llm_infill import LLMInfiller, LLMNotFoundError
        config = load_config(["model.quantization_type=qwen2.5-coder-0.5b", "model.context_dim=896",
                              "model.code_length=128"])
        try:
            LLMInfiller.from_config(config.model)
        except LLMNotFoundError as e:
            print(e)
            print("transformers imported:", "transformers" in sys.modules)
    """)
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "model.llm_path='Qwen/Qwen2.5-Coder-0.5B'" in result.stdout
    assert str(tmp_path / "hub") in result.stdout and "hf download Qwen/Qwen2.5-Coder-0.5B" in result.stdout
    assert "transformers imported: False" in result.stdout


def test_span_starts_come_from_the_generator():
    def draw(seed, batch=2000):
        return span_starts(batch, CODE_LENGTH, 3, torch.Generator().manual_seed(seed))

    assert torch.equal(draw(5), draw(5)) and not torch.equal(draw(5), draw(6))
    assert draw(5).dtype == torch.int64 and set(draw(5).tolist()) == set(range(CODE_LENGTH - 3 + 1))
    rows = [span_starts_per_image([torch.Generator().manual_seed(r)], CODE_LENGTH, 3) for r in range(4)]
    batched = span_starts_per_image([torch.Generator().manual_seed(r) for r in range(4)], CODE_LENGTH, 3)
    assert torch.equal(batched, torch.cat(rows))


def test_config_hash_identifies_the_architecture_not_the_path(infiller):
    assert infiller.config_hash == llm_config_hash(tiny_qwen2_config())  # loaded from a folder vs. in memory
    assert llm_config_hash(tiny_qwen2_config(hidden_size=32)) != infiller.config_hash
    assert llm_config_hash(tiny_qwen2_config(num_hidden_layers=3)) != infiller.config_hash
