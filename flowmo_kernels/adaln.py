"""adaLN modulation and the gated residual of the modulated (MMDiT) block.

modulate: LayerNorm (no affine, eps 1e-6) then (1 + scale) * x + shift, per-sample scale/shift.
gated_residual: x + gate * y.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from flowmo_kernels.precision import upcast

LN_EPS = 1e-6


def modulate_torch(
    x: Tensor, shift: Optional[Tensor], scale: Optional[Tensor], out_dtype: Optional[torch.dtype] = None
) -> Tensor:
    """x [B, L, D]; shift, scale [B, 1, D] or None (identity modulation). Computed in float32 (float64
    for float64 input) and returned in that dtype, or in `out_dtype` when given."""
    y = F.layer_norm(upcast(x), (x.shape[-1],), eps=LN_EPS)
    if scale is not None:
        y = (1 + upcast(scale)) * y + upcast(shift)
    return y if out_dtype is None else y.to(out_dtype)


def gated_residual_torch(x: Tensor, gate: Optional[Tensor], y: Tensor) -> Tensor:
    """x + gate * y; gate [B, 1, D] or None (gate 1)."""
    return x + y if gate is None else x + gate * y
