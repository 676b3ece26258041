"""Fused kernels for FlowMo, each beside a plain PyTorch version of the same function.

`get_ops(name, device, lfq_bits)` picks one implementation set: "torch" (plain PyTorch, any device), "triton"
(CUDA; on the CPU only under the Triton interpreter, TRITON_INTERPRET=1, for tests), or "auto": PyTorch
off CUDA or without Triton; on CUDA the Triton kernel when running eagerly, and inside a torch.compile
region the implementation `AUTO_WHEN_COMPILED` names per op (and the PyTorch LFQ for code groups wider than
the Triton LFQ takes). The Triton kernels are `torch.library` custom ops with fake implementations, so
`torch.compile(fullgraph=True)` traces through them. The Triton modules are imported on first use: Triton may
be missing (non-Linux), and the interpreter switch is read when they are imported. Given a `FastPathChecks`
registry (`flowmo_kernels.selfcheck`), `get_ops` checks each fused op against its twin the first time it meets a
new dtype and shape class, and falls back to the twin where they differ. This package imports nothing of ours.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Optional

import torch
from torch import Tensor

from flowmo_kernels.adaln import gated_residual_torch, modulate_torch
from flowmo_kernels.lfq import lfq_torch
from flowmo_kernels.rope import qk_norm_rope_torch
from flowmo_kernels.selfcheck import FastPathChecks, checked_ops

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


def on_device_of(x: Tensor) -> contextlib.AbstractContextManager:
    """x's CUDA device made current for the block: Triton launches on the current device (and stream), not the
    tensors', so a kernel on cuda:1 with device 0 current would fail. Nothing for a CPU tensor (interpreter)."""
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


# Inside torch.compile, `auto` takes the plain op where Inductor's own fusion of it with its neighbours
# (which a custom op blocks: a gated residual and the next LayerNorm + modulation become one kernel) should
# match a hand-written kernel, and the Triton op where it avoids work Inductor cannot remove (LFQ's code
# probability tables). A hypothesis until bench/gpu_report.py's kernel rows measure it on a GPU.
# A constant (read-only): flowmo_kernels.triton_ops builds AUTO_OPS from it once, when it is first imported.
AUTO_WHEN_COMPILED = MappingProxyType(
    {"modulate": "torch", "gated_residual": "torch", "qk_norm_rope": "torch", "lfq": "triton"}
)
OP_NAMES = tuple(AUTO_WHEN_COMPILED)


def _compile_aware(name: str, plain: Callable, fused: Callable) -> Callable:
    """`fused` eagerly, and inside torch.compile `plain` (dynamo resolves the branch while tracing)."""

    def op(*args, **kwargs):
        return plain(*args, **kwargs) if torch.compiler.is_compiling() else fused(*args, **kwargs)

    op.__name__ = op.__qualname__ = f"auto_{name}"
    return op


def auto_ops(triton_ops: KernelOps) -> KernelOps:
    ops = {}
    for name in OP_NAMES:
        plain, fused = getattr(TORCH_OPS, name), getattr(triton_ops, name)
        ops[name] = fused if AUTO_WHEN_COMPILED[name] == "triton" else _compile_aware(name, plain, fused)
    return KernelOps("auto", **ops)


# The Triton LFQ's limit: a code group of d bits keeps 2^(d/2) codes per half in its tiles.
TRITON_LFQ_MAX_BITS = 20


def check_lfq_bits(name: str, lfq_bits: int) -> None:
    """Refuse kernels=`name` for LFQ codes of `lfq_bits` bits per group when it means the Triton LFQ past its limit."""
    if name == "triton" and lfq_bits > TRITON_LFQ_MAX_BITS:
        raise ValueError(
            f"kernels='triton' with {lfq_bits}-bit LFQ code groups: the Triton LFQ takes at most "
            f"{TRITON_LFQ_MAX_BITS} bits per group (model.codebook_size_for_entropy); set kernels='auto' (it takes "
            f"the PyTorch LFQ for these codes) or 'torch', or codebook_size_for_entropy <= {TRITON_LFQ_MAX_BITS}"
        )


def get_ops(name: str, device: torch.device, lfq_bits: int = 0, checks: Optional[FastPathChecks] = None) -> KernelOps:
    """The implementation set `name` on `device`, for LFQ code groups of `lfq_bits` bits (0: no LFQ); `auto`
    takes the PyTorch LFQ for groups wider than the Triton LFQ's `TRITON_LFQ_MAX_BITS`. With `checks`, each op
    that is not the plain twin checks itself against it (`flowmo_kernels.selfcheck`), its verdicts kept there."""
    ops = _get_ops(name, device, lfq_bits)
    return checked_ops(checks, ops, TORCH_OPS) if checks is not None else ops


def _get_ops(name: str, device: torch.device, lfq_bits: int) -> KernelOps:
    if name not in BACKENDS:
        raise ValueError(f"kernels={name!r}; allowed: {', '.join(BACKENDS)}")
    check_lfq_bits(name, lfq_bits)
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
    from flowmo_kernels.triton_ops import AUTO_OPS, AUTO_OPS_WIDE_LFQ, TRITON_OPS

    if name == "triton":
        return TRITON_OPS
    return AUTO_OPS_WIDE_LFQ if lfq_bits > TRITON_LFQ_MAX_BITS else AUTO_OPS
