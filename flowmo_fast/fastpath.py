"""The fast paths both models share: dynamo's recompile limit raised for regional compiles, compiled callables
(blocks, the generator's sampling step) that check themselves against their eager code, and one CUDA-graph capture
(warm-up on a side stream, then capture under cache-free autocast) for FlowMo's sampler
(`flowmo_fast.flowmo.graphed_sampler`) and the token generator's (`flowmo_fast.maskgit.sampling`), whose first replay
is checked against its warm-up.

Every check goes through one owner's `FastPathChecks` registry (`flowmo_kernels.selfcheck`, re-exported here): the
first call per key is compared with the plain path, a mismatch warns once in one line and the plain path runs for
that key from then on; `FLOWMO_CHECK_FAST_PATHS=0` turns the checks off. What a check costs: one eager pass of a
compiled callable per compiled variant (small beside compiling it), one comparison per captured graph (its
warm-up already ran the loop eagerly)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from flowmo_kernels.selfcheck import (
    Difference,
    FastPathChecks,
    FastPathWarning,
    Tolerance,
    compute_dtype,
    difference,
    in_trace_or_capture,
    tensors_of,
    tolerance,
)

__all__ = ["Difference", "FastPathChecks", "FastPathWarning", "Tolerance", "CheckedCall", "Capture", "capture_graph",
           "check_replay", "compile_checked", "difference", "raise_recompile_limit", "tolerance"]

# Every compiled block variant (encoder/decoder, last block or not, batch size, grad or not) is one dynamo
# cache entry of the same code: dynamo's default of 8 is reached by a tiny model at two batch sizes, after
# which it silently runs the block uncompiled.
RECOMPILE_LIMIT = 64


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    """Let dynamo keep at least `limit` compiled variants per function (`cache_size_limit` before torch 2.6).

    Process-wide on purpose, and only ever raised: dynamo reads the limit when a compiled function meets new
    shapes, at any later call, not while `compile_blocks` runs. Scoped to the compile call (a
    `torch._dynamo.config.patch` around it), a block called at 13 batch sizes still stops at 8 graphs and
    falls back to eager (checked on torch 2.14); scoped to each call, it would have to wrap every forward."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), limit))


def signature(value: Any) -> Any:
    """What selects a compiled variant, hashable: each tensor's dtype, shape and device; other values by kind."""
    if isinstance(value, Tensor):
        return (str(value.dtype), tuple(value.shape), str(value.device))
    if isinstance(value, (tuple, list)):
        return tuple(signature(v) for v in value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return f"{type(value).__name__}:{getattr(value, 'name', '')}"


@dataclass
class RngStreams:
    """The global RNG streams a call on `tensors` may draw from: the CPU's, and the CUDA generator of their device."""

    cpu: Tensor
    cuda: Optional[tuple[torch.device, Tensor]]

    @classmethod
    def of(cls, tensors: list[Tensor]) -> "RngStreams":
        device = next((t.device for t in tensors if t.device.type == "cuda"), None)
        return cls(torch.get_rng_state(), (device, torch.cuda.get_rng_state(device)) if device is not None else None)

    def moved(self) -> bool:
        cuda_moved = self.cuda is not None and not torch.equal(torch.cuda.get_rng_state(self.cuda[0]), self.cuda[1])
        return cuda_moved or not torch.equal(torch.get_rng_state(), self.cpu)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])


class CheckedCall:
    """A fast callable (compiled code) that checks itself against `plain` (the same code eagerly) the first time
    each key meets it: its inputs' dtypes and shapes, and whether gradients are on (each a compiled variant of
    its own). The plain pass runs without gradients; the fast call is the real one (with gradients when on).
    `compare` (default `difference`) and `share` (integer outputs that may differ) for outputs that are draws."""

    def __init__(self, label: str, fast: Callable, plain: Callable, checks: FastPathChecks,
                 compare: Callable[[Any, Any], Difference] = difference, share: float = 0.0):
        self.label, self.fast, self.plain, self.checks = label, fast, plain, checks
        self.compare, self.share = compare, share

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() or not self.checks.enabled():
            return self.fast(*args, **kwargs)
        key = self.key(args, kwargs)
        passed = self.checks.verdict(key)
        if passed is None and not in_trace_or_capture():
            return self.first_call(key, args, kwargs)
        return (self.plain if passed is False else self.fast)(*args, **kwargs)

    def first_call(self, key: tuple, args: tuple, kwargs: dict):
        """The plain pass, then the fast one (the call's result where they agree, else the plain result). A call
        that draws random numbers (dropout in training) cannot agree with another: its plain pass is undone (the RNG
        streams put back, so an exact resume still holds) and the key runs the fast path unchecked."""
        inputs = tensors_of(list(args)) + tensors_of(list(kwargs.values()))
        streams = RngStreams.of(inputs)
        with torch.no_grad():
            want = self.plain(*args, **kwargs)
        if streams.moved():
            streams.restore()
            self.checks.accept(key)
            return self.fast(*args, **kwargs)
        got = []

        def error() -> Difference:
            got.append(self.fast(*args, **kwargs))
            return self.compare(got[0], want)

        what = f"{self.label} ({key[1]}; first input {key[2][0] if key[2] else '-'})"
        if self.checks.check(key, what, error, tolerance(compute_dtype(inputs), self.share)):
            return got[0]
        return self.plain(*args, **kwargs) if torch.is_grad_enabled() else want

    def key(self, args: tuple, kwargs: dict) -> tuple:
        grad = "with gradients" if torch.is_grad_enabled() else "no gradients"
        return (self.label, grad, signature(args), signature(sorted(kwargs.items())))


def compile_checked(module: nn.Module, label: str, checks: FastPathChecks, **compile_kwargs) -> None:
    """`module.compile(**compile_kwargs)` (in place, lazily), the compiled call checked against the module's
    eager call (`CheckedCall`). Not checked while the module has hooks of its own (FSDP's: an extra eager pass
    would gather and free its weights twice)."""
    module.compile(**compile_kwargs)
    compiled, eager = module._compiled_call_impl, module._call_impl
    checked = CheckedCall(label, compiled, eager, checks)

    def call(*args, **kwargs):
        hooked = module._forward_pre_hooks or module._forward_hooks
        return (compiled if hooked else checked)(*args, **kwargs)

    module._compiled_call_impl = call


@dataclass
class Capture:
    graph: torch.cuda.CUDAGraph
    out: Tensor  # what each replay writes
    warm_up: Optional[Tensor]  # the warm-up's output on the captured inputs: what the first replay must give


def check_replay(checks: FastPathChecks, key: tuple, what: str, replayed: Tensor, warm_up: Tensor,
                 autocast: bool, share: float = 0.0) -> bool:
    """After the first replay of a capture (on the inputs it was captured with): whether it gave its warm-up's
    output, within the tolerance of the dtype it computed in (recorded in `checks`; a failed one warns once).
    `share`: of integer outputs (draws) that may differ."""
    dtype = torch.get_autocast_dtype("cuda") if autocast else compute_dtype([warm_up])
    return checks.check(key, what, lambda: difference(replayed, warm_up), tolerance(dtype, share))


def capture_graph(run: Callable[[], Tensor], device: torch.device, autocast: bool) -> Capture:
    """`run` (reading only static tensors) warmed up once on a side stream of `device`, then captured there into
    a CUDA graph; returns the graph, the output tensor its replays write and the warm-up's output. With
    `autocast`, both run under bf16 autocast without its weight-cast cache (cached casts would escape the graph)."""
    amp = (
        torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False)
        if autocast
        else contextlib.nullcontext()
    )
    # Streams, the capture and its memory pool belong to the current device, not the tensors': make it current.
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), amp:  # warm-up: compile, autotune, pick attention backends
            warm_up = run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a pin-memory DataLoader's cudaHostAlloc and
        # cudaEventQuery) during the capture neither fail it nor are captured
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"), amp:
            out = run()
    return Capture(graph, out, warm_up)
