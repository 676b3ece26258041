"""Training checkpoints whose EMA and raw weights differ, for the sharing tests (save_pretrained, from_pretrained by
folder and by Hugging Face repository id): a tiny FlowMo and a tiny token generator, in their trainers' layouts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import flowmo_fast
from flowmo_fast.formats.checkpoint import atomic_save, checkpoint_path, file_sha256
from flowmo_fast.formats.token_shards import TokenSpec
from flowmo_fast.maskgit.model import GeneratorConfig, TokenGenerator

CLASSES = ["cat", "dog"]
REPO = Path(__file__).resolve().parents[1]


def run_offline_user(script: str, hf_home: Path, *args: str) -> dict:
    """`script` run as a user would: a fresh process whose only Hugging Face settings are HF_HOME=`hf_home` and
    HF_HUB_OFFLINE=1 (one thread); returns the JSON object its last line prints."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


def perturbed(state: dict, seed: int, scale: float = 0.05) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}


def tokenizer_run(run: Path, weights: dict, step: int = 7) -> Path:
    """run/checkpoints/<step>.pth of the tiny preset: EMA = `weights`, raw = `weights` perturbed (outputs differ)."""
    config = flowmo_fast.load_config(preset="tiny")
    ema, raw = flowmo_fast.FlowMo(config), flowmo_fast.FlowMo(config)
    ema.load_state_dict(weights)
    raw.load_state_dict(perturbed(weights, seed=1))
    path = Path(checkpoint_path(str(run), step))
    flowmo_fast.save_checkpoint(path, raw, ema_model=ema, total_steps=step, extra={"world_size": 2})
    return path


def tiny_generator(seed: int) -> TokenGenerator:
    """For the tiny FlowMo's tokens: 16 positions x 2 groups of 9 bits, 2 classes; random weights."""
    torch.manual_seed(seed)
    return TokenGenerator(GeneratorConfig(16, 2, 9, num_classes=2))


def generator_run(run: Path, tokenizer_path: Path, step: int = 150) -> Path:
    """run/checkpoints/<step>.pth in train.generator's layout (EMA and raw weights differ), its tokens made by the
    FlowMo checkpoint `tokenizer_path`."""
    ema, raw = tiny_generator(0), tiny_generator(1)
    tokenizer = flowmo_fast.load_checkpoint(tokenizer_path)
    tokens = {"checkpoint": {"path": str(tokenizer_path), "sha256": file_sha256(tokenizer_path), "which": "ema"},
              "config": tokenizer.config.to_dict(), "tokens": TokenSpec.for_model(tokenizer).to_dict(),
              "class_names": CLASSES}
    sections = {"model": ema.config.to_dict(), "data": {"batch_size": 32},
                "opt": {"lr": 1e-4, "n_grad_acc": 1, "beta1": 0.9, "beta2": 0.96, "weight_decay": 0.045,
                        "warmup_steps": 5000, "lr_decay": "cosine"},
                "trainer": {"max_steps": 1500000, "ema_decay": 0.9999, "enable_bfloat16": True}}
    path = Path(checkpoint_path(str(run), step))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"total_steps": step, "model_ema_state_dict": ema.state_dict(), "model_state_dict": raw.state_dict(),
                 "config": sections, "tokens": tokens, "world_size": 8}, str(path))
    return path


def generator_logits(model: TokenGenerator) -> torch.Tensor:
    """Logits [4, 16, 2, 512] of fixed inputs: half the groups masked, classes 0, 1, null, 1."""
    g = torch.Generator().manual_seed(5)
    bits = torch.randint(0, 2, (4, 16, 2, 9), generator=g).float() * 2 - 1
    bits = bits * (torch.rand(4, 16, 2, 1, generator=g) < 0.5)
    with torch.no_grad():
        return model(bits, torch.tensor([0, 1, 2, 1]))


def tokenizer_outputs(model) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [2, 32], a decode of them with fixed noise [2, 3, 32, 32]) of two fixed images."""
    tokenizer = flowmo_fast.Tokenizer(model)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    ids = tokenizer.encode(images)
    return ids, tokenizer.decode(ids, generator=torch.Generator().manual_seed(0))
