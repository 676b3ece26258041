"""QK RMSNorm fused with 3-axis rotary position embedding (RoPE), as in FLUX / FlowMo.

Input q, k in the layout [B, H, L, D] that scaled_dot_product_attention takes; the rotation is given as
cos, sin [L, D/2] (the same for every sample and head).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowmo_kernels.precision import upcast

RMS_EPS = 1e-6


def rope_tables(ids: Tensor, axes: tuple[int, ...], theta: float = 10_000.0) -> tuple[Tensor, Tensor]:
    """Position ids [L, n_axes] -> (cos, sin), each [L, sum(axes) / 2] float32 (angles in float64)."""
    angles = []
    for i, dim in enumerate(axes):
        omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim)
        angles.append(ids[:, i].to(torch.float64)[:, None] * omega[None])
    angle = torch.cat(angles, dim=-1)
    return torch.cos(angle).float(), torch.sin(angle).float()


def rms_norm_torch(x: Tensor, weight: Tensor) -> Tensor:
    """RMSNorm over the last dim in float32, cast back to x's dtype, then times weight."""
    xf = upcast(x)
    y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(x.dtype)
    return y * weight


def apply_rope_torch(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[2j], x[2j+1]) by the angle of pair j. x [B, H, L, D]; cos, sin [L, D/2]."""
    xf = upcast(x).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack([cos * x0 - sin * x1, sin * x0 + cos * x1], dim=-1)
    return out.flatten(-2).to(x.dtype)


def qk_norm_rope_torch(
    q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """RMSNorm q and k (separate weights [D]), cast to out_dtype, then RoPE. q, k [B, H, L, D]."""
    q = rms_norm_torch(q, q_weight).to(out_dtype)
    k = rms_norm_torch(k, k_weight).to(out_dtype)
    return apply_rope_torch(q, cos, sin), apply_rope_torch(k, cos, sin)
