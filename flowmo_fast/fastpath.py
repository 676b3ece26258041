"""The fast paths both models share: dynamo's recompile limit raised for regional compiles, and one CUDA-graph
capture (warm-up on a side stream, then capture under cache-free autocast) for FlowMo's sampler
(`flowmo_fast.flowmo.graphed_sampler`) and the token generator's (`flowmo_fast.maskgit.sampling`)."""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor

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


def capture_graph(
    run: Callable[[], Tensor], device: torch.device, autocast: bool
) -> tuple[torch.cuda.CUDAGraph, Tensor]:
    """`run` (reading only static tensors) warmed up once on a side stream of `device`, then captured there into
    a CUDA graph; returns the graph and the output tensor its replays write. With `autocast`, both run under
    bf16 autocast without its weight-cast cache (cached casts would escape the graph)."""
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
            run()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a pin-memory DataLoader's cudaHostAlloc and
        # cudaEventQuery) during the capture neither fail it nor are captured
        with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"), amp:
            out = run()
    return graph, out
