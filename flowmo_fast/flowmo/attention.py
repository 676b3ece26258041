"""Attention backends: PyTorch SDPA by default; flash-attn (FA3 on Hopper, FA2 elsewhere) or xformers when
installed, on CUDA, and faster for the shape. The choice is made once per (heads, lengths, head dim, dtype,
device) by timing each candidate, and logged. The batch size is not part of that key: compiled blocks look the
choice up, and a key with the batch size in it would make dynamo guard on it and recompile every block for each
new batch size.
"""

from __future__ import annotations

import importlib
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

log = logging.getLogger(__name__)
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Backend:
    name: str
    fn: Callable[[Tensor, Tensor, Tensor, float], Tensor]  # q, k, v [B, H, L, D], scale -> [B, H, L, D]
    half_only: bool = True  # flash-attn and xformers run fp16/bf16 on CUDA only


def sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _flash_attn_fn(module: str) -> Optional[Callable]:
    try:
        flash = importlib.import_module(module)
    except Exception:  # missing, or built for another torch / GPU
        return None

    def fn(q, k, v, scale):  # flash-attn wants [B, L, H, D]
        out = flash.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        out = out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
        return out.transpose(1, 2)

    return fn


def _xformers_fn() -> Optional[Callable]:
    try:
        ops = importlib.import_module("xformers.ops")
    except Exception:
        return None

    def fn(q, k, v, scale):  # xformers wants [B, L, H, D]
        out = ops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
        return out.transpose(1, 2)

    return fn


def installed_backends() -> list[Backend]:
    """SDPA, then whichever optional backends import here (FA3 before FA2)."""
    backends = [Backend("sdpa", sdpa, half_only=False)]
    for name, fn in (
        ("flash_attn_3", _flash_attn_fn("flash_attn_interface")),
        ("flash_attn_2", _flash_attn_fn("flash_attn")),
        ("xformers", _xformers_fn()),
    ):
        if fn is not None:
            backends.append(Backend(name, fn))
    return backends


def time_backend(backend: Backend, q: Tensor, k: Tensor, v: Tensor, scale: float, repeats: int = 5) -> float:
    """Mean seconds per call (after one warm-up call); inf if the backend fails on these inputs."""
    try:
        backend.fn(q, k, v, scale)
        torch.cuda.synchronize(q.device)
        start = time.perf_counter()
        for _ in range(repeats):
            backend.fn(q, k, v, scale)
        torch.cuda.synchronize(q.device)
        return (time.perf_counter() - start) / repeats
    except Exception as e:
        log.info("attention backend %s unavailable for %s: %s", backend.name, tuple(q.shape), e)
        return float("inf")


def choice_key(q: Tensor, k: Tensor) -> tuple:
    """What decides the fastest backend for q [B, H, L, D], k [B, H, L_k, D]: all but the batch size."""
    return (q.shape[1], q.shape[2], k.shape[2], q.shape[3], q.dtype, q.device)


class Attention:
    """Callable attention(q, k, v, scale) that routes each input shape to its fastest backend.

    `backend="sdpa"` (or any backend name) pins one; "auto" times the candidates on the first call of each
    shape (`choice_key`: any batch size) on CUDA. CPU inputs and float32 always use SDPA. The per-shape choices
    live on this object.
    """

    def __init__(self, backend: str = "auto", backends: Optional[list[Backend]] = None, timer=time_backend):
        self.backends = {b.name: b for b in (backends if backends is not None else installed_backends())}
        if backend != "auto" and backend not in self.backends:
            raise ValueError(f"attention backend {backend!r} is not available; available: auto, {', '.join(self.backends)}")
        self.backend = backend
        self.timer = timer
        self.choices: dict[tuple, Backend] = {}

    def candidates(self, q: Tensor) -> list[Backend]:
        ok = q.device.type == "cuda" and q.dtype in HALF
        return [b for b in self.backends.values() if ok or not b.half_only]

    def choose(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Backend:
        key = choice_key(q, k)
        if key not in self.choices:
            candidates = self.candidates(q)
            if self.backend != "auto":
                pinned = self.backends[self.backend]
                candidates = [pinned] if pinned in candidates else candidates[:1]
            if len(candidates) == 1:
                choice = candidates[0]
            else:
                times = {b.name: self.timer(b, q, k, v, scale) for b in candidates}
                choice = self.backends[min(times, key=times.get)]
                log.info("attention %s %s: using %s (seconds per call: %s)", tuple(q.shape), q.dtype, choice.name,
                         ", ".join(f"{n} {t:.2e}" for n, t in times.items()))
            self.choices[key] = choice
        return self.choices[key]

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        if torch.compiler.is_compiling() or len(self.backends) == 1:
            # inside torch.compile / CUDA-graph capture no timing runs: use a choice made eagerly, else SDPA
            return self.choices.get(choice_key(q, k), self.backends["sdpa"]).fn(q, k, v, scale)
        return self.choose(q, k, v, scale).fn(q, k, v, scale)
