"""The compute dtype of the plain PyTorch kernels."""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(x: Tensor) -> Tensor:
    """bfloat16/float16/float32 -> float32; float64 stays float64 (so the twins run and gradcheck in float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
