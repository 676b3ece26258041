"""Token generator checkpoints for the eval tests (eval.generate, eval.sweep) in train.generator's layout: tiny
generators for the tiny FlowMo's tokens, with whatever weights a test gives them."""

from __future__ import annotations

from pathlib import Path

import torch

import flowmo_fast
from flowmo_fast.formats.checkpoint import atomic_save, file_sha256
from flowmo_fast.formats.token_shards import TokenSpec
from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator

CLASSES = ["cat", "dog"]


def save_generator(model: TokenGenerator, tokenizer_path: Path, path: Path, classes=CLASSES) -> Path:
    """`model` saved in train.generator's layout (what flowmo_fast.maskgit.model.load_generator reads), its tokens
    made by the FlowMo checkpoint `tokenizer_path`."""
    tokenizer = flowmo_fast.load_checkpoint(tokenizer_path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    tokens = {"checkpoint": {"path": str(tokenizer_path), "sha256": file_sha256(tokenizer_path), "which": "ema"},
              "config": tokenizer.config.to_dict(), "tokens": TokenSpec.for_model(tokenizer).to_dict(),
              "class_names": classes}
    atomic_save({"total_steps": 150, "model_ema_state_dict": state, "model_state_dict": state,
                 "config": {"model": model.config.to_dict()}, "tokens": tokens}, path)
    return path


def tiny_generator() -> TokenGenerator:
    """For the tiny FlowMo's tokens: 16 positions x 2 groups of 9 bits, 2 classes."""
    torch.manual_seed(0)
    return TokenGenerator(GeneratorConfig(16, 2, 9, num_classes=2, label_smoothing=0.0))
