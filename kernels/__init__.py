"""Fused kernels for FlowMo, each beside a plain PyTorch version of the same function.

`get_ops(name, device)` picks one implementation set: "torch" (plain PyTorch, any device), "triton"
(CUDA only), or "auto" (Triton on CUDA, PyTorch elsewhere). This package imports nothing of ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from kernels.adaln import gated_residual_torch, modulate_torch
from kernels.lfq import lfq_torch
from kernels.rope import qk_norm_rope_torch

BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class KernelOps:
    name: str
    modulate: Callable
    gated_residual: Callable
    qk_norm_rope: Callable
    lfq: Callable


TORCH_OPS = KernelOps("torch", modulate_torch, gated_residual_torch, qk_norm_rope_torch, lfq_torch)


def get_ops(name: str, device: torch.device) -> KernelOps:
    if name not in BACKENDS:
        raise ValueError(f"kernels={name!r}; allowed: {', '.join(BACKENDS)}")
    if name == "torch" or (name == "auto" and torch.device(device).type != "cuda"):
        return TORCH_OPS
    raise NotImplementedError("Triton kernels are not built yet; use kernels='torch'")
