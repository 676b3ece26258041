"""A tiny random Qwen2 for the tests of `model.quantization_type=qwen2.5-coder-0.5b[_span_P]`: saved to a
temporary folder as the hub has it (config.json + model.safetensors, no tokenizer), never downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from flowmo_fast.llm_settings import QWEN_CODER_FIM_IDS

WIDTH = 16  # model.context_dim = the tiny LLM's hidden size (2 heads of 8: RoPE needs an even head size)
MAX_POSITIONS = 32  # the `tiny` preset's code_length 16 + 3 markers fits
VOCAB = QWEN_CODER_FIM_IDS.suffix + 8  # Qwen2.5-Coder's marker ids fit: a folder without tokenizer uses them


def tiny_qwen2_config(**changes):
    import transformers

    settings = dict(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
    )
    return transformers.Qwen2Config(**{**settings, **changes})


def save_tiny_qwen2(folder: Path, seed: int = 0, **changes) -> Path:
    """A random Qwen2ForCausalLM (`tiny_qwen2_config(**changes)`) saved to `folder`; the global RNG is left as
    it was."""
    import transformers

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformers.Qwen2ForCausalLM(tiny_qwen2_config(**changes)).save_pretrained(folder)
    return folder


def llm_overrides(folder, quantization_type: str = "qwen2.5-coder-0.5b") -> list[str]:
    """Config overrides of the LLM type with the tiny LLM in `folder` (on top of the `tiny` preset)."""
    return [f"model.quantization_type={quantization_type}", f"model.context_dim={WIDTH}", f"model.llm_path={folder}"]
