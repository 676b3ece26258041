"""Mixed precision in one place: bf16 autocast on CUDA, float32 elsewhere; the dtype it runs matrix products in
decides the dtype inference keeps weights in (FlowMo's matrices, the frozen LLM)."""

from __future__ import annotations

import contextlib
from typing import Optional, Union

import torch


def autocast_dtype(device: Union[torch.device, str]) -> Optional[torch.dtype]:
    """The dtype `autocast_for` runs matrix products in on `device`: bf16 on CUDA, None (float32) elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else None


def autocast_for(device: Union[torch.device, str], enabled: bool = True):
    """bf16 autocast on CUDA; nothing elsewhere (CPU runs float32).

    Without autocast's weight-cast cache: a CUDA-graph capture cannot use it (flowmo_fast.flowmo.graphed_sampler), and compiled
    code guards on the flag, so one setting everywhere lets training, evaluation and the captured sampler
    share the compiled blocks. A cast gives the same values either way; each weight is cast once per pass
    (inference casts them once for good: `FlowMo.cast_for_inference`)."""
    dtype = autocast_dtype(device)
    if enabled and dtype is not None:
        return torch.autocast("cuda", dtype=dtype, cache_enabled=False)
    return contextlib.nullcontext()
