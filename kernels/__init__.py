"""Fused kernels for FlowMo, each beside a plain PyTorch version of the same function.

`get_ops(name, device)` picks one implementation set: "torch" (plain PyTorch, any device), "triton"
(CUDA; on the CPU only under the Triton interpreter, TRITON_INTERPRET=1, for tests), or "auto" (Triton
on CUDA when Triton is installed, PyTorch elsewhere). The Triton kernels are `torch.library` custom ops
with fake implementations, so `torch.compile(fullgraph=True)` traces through them. The Triton modules
are imported on first use: Triton may be missing (non-Linux), and the interpreter switch is read when
they are imported. This package imports nothing of ours.
"""

from __future__ import annotations

import importlib.util
import os
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


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def get_ops(name: str, device: torch.device) -> KernelOps:
    if name not in BACKENDS:
        raise ValueError(f"kernels={name!r}; allowed: {', '.join(BACKENDS)}")
    on_cuda = torch.device(device).type == "cuda"
    if name == "torch" or (name == "auto" and not (on_cuda and triton_available())):
        return TORCH_OPS
    if not triton_available():
        raise RuntimeError("kernels='triton' needs the `triton` package (pip install triton); or use kernels='torch'")
    if not (on_cuda or triton_interpreting()):
        raise RuntimeError(
            f"kernels='triton' runs on CUDA devices, got {torch.device(device)}; use kernels='auto' or 'torch' "
            "(or set TRITON_INTERPRET=1 before importing the kernels to run them in the slow CPU interpreter)"
        )
    # Every op Triton on CUDA for now: whether each beats torch.compile of its plain twin inside the
    # model (a custom op blocks Inductor's own fusion) is still to be measured on a GPU (bench/).
    from kernels.triton_ops import TRITON_OPS

    return TRITON_OPS
