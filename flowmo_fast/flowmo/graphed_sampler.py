"""The CUDA fast path of FlowMo's sampler: regional torch.compile of the transformer blocks, and the whole
sampling loop captured as one CUDA graph per input shape and sampler setting, then replayed. Both check themselves
(flowmo_fast.fastpath) through the model's `fast_checks` registry: each compiled block variant against the eager
block on its first call, each captured graph's first replay against its warm-up.

On the CPU none of this applies: `sampler.sample` runs eagerly (compile is optional there, via `compile_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from flowmo_fast.fastpath import (
    Capture,
    FastPathChecks,
    capture_graph,
    check_replay,
    compile_checked,
    raise_recompile_limit,
)
from flowmo_fast.flowmo import sampler
from flowmo_fast.flowmo.layers import DoubleStreamBlock
from flowmo_fast.sampler_settings import SamplingOptions


def compile_blocks(model: nn.Module, checks: Optional[FastPathChecks] = None, **compile_kwargs) -> None:
    """Compile each double-stream block in place (regional compile: one graph, reused by every block), each
    compiled variant checked against the eager block on its first call (`checks`: default the model's own)."""
    raise_recompile_limit()
    checks = checks if checks is not None else model.fast_checks
    for name, module in model.named_modules():
        if isinstance(module, DoubleStreamBlock):
            compile_checked(module, f"compiled block {name}", checks, **compile_kwargs)


def cast_matmul_weights(modules: Iterable[nn.Module], dtype: torch.dtype) -> None:
    """Every nn.Linear's weight and bias under `modules` cast to `dtype` in place: the values autocast to
    `dtype` casts them to at each call (its F.linear casts all three operands), cast once."""
    for module in modules:
        for m in module.modules():
            if isinstance(m, nn.Linear):
                m.to(dtype)


def blocks_compiled(model: nn.Module) -> bool:
    """Whether `compile_blocks` (or `module.compile`) has compiled the model's blocks already."""
    blocks = [m for m in model.modules() if isinstance(m, DoubleStreamBlock)]
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in blocks)


@dataclass
class _Captured:
    capture: Capture  # its warm-up output kept until the first replay is checked against it
    z: Tensor
    code: Tensor
    null_code: Optional[Tensor]


class GraphedSampler:
    """`sampler.sample` with the loop replayed from a CUDA graph.

    The first call for a key (device, shapes, dtypes, sampling options, autocast) warms up once on a side
    stream of the input's device (compiling the blocks first if asked and not done yet) and captures there,
    with that device current (a model on cuda:1 works while device 0 is current); later calls copy inputs
    into the static buffers and replay. Each key holds its own graph memory pool (a new batch size is a new
    capture). The graphs read the weights where they lay at capture: when any parameter moves (`.to()`,
    `.half()`, `load_state_dict(assign=True)`) or `model.kernels` changes, every capture is dropped and
    redone. Outputs equal eager `sampler.sample` up to the compiled kernels' rounding. The first replay of each
    capture is checked against its warm-up (`model.fast_checks`); a key whose replay differs runs eagerly.
    """

    def __init__(self, model: nn.Module, compile: bool = True):
        self.model = model
        self.compile = compile
        self.captured: dict[tuple, _Captured] = {}
        self.weights: tuple = ()

    def _weights(self) -> tuple:
        return (self.model.kernels, *(p.data_ptr() for p in self.model.parameters()))

    def __call__(self, z: Tensor, code: Tensor, null_code: Optional[Tensor], options: SamplingOptions) -> Tensor:
        weights = self._weights()
        if weights != self.weights:
            self.captured.clear()
            self.weights = weights
        autocast = torch.is_autocast_enabled("cuda")
        key = (
            z.device, tuple(z.shape), tuple(code.shape), z.dtype, code.dtype, null_code is not None, autocast, options,
        )
        checks = self.model.fast_checks
        if checks.verdict(("CUDA graph sampler", key)) is False:
            return sampler.sample(self.model, z, code, null_code, options)
        if key not in self.captured:
            self.captured[key] = self._capture(z, code, null_code, autocast, options)
        entry = self.captured[key]
        entry.z.copy_(z)
        entry.code.copy_(code)
        if null_code is not None:
            entry.null_code.copy_(null_code)
        entry.capture.graph.replay()
        warm_up, entry.capture.warm_up = entry.capture.warm_up, None
        if warm_up is not None and checks.enabled():  # the first replay: on the inputs the warm-up ran on
            what = f"CUDA graph of the sampler (batch {z.shape[0]}, {options.steps} steps)"
            if not check_replay(checks, ("CUDA graph sampler", key), what, entry.capture.out, warm_up, autocast):
                del self.captured[key]
                return warm_up
        return entry.capture.out.clone()

    def _capture(self, z, code, null_code, autocast: bool, options: SamplingOptions) -> _Captured:
        if self.compile and not blocks_compiled(self.model):
            compile_blocks(self.model, dynamic=False)
        static_z, static_code = z.clone(), code.clone()
        static_null = null_code.clone() if null_code is not None else None
        run = lambda: sampler.sample(self.model, static_z, static_code, static_null, options)  # noqa: E731
        return _Captured(capture_graph(run, z.device, autocast), static_z, static_code, static_null)
