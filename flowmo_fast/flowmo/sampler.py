"""FlowMo's evaluation sampler: the Euler steps of the rectified-flow ODE from noise (t = 1) to the image (t = 0),
with classifier-free guidance on the steps its settings (`flowmo_fast.sampler_settings.SamplingOptions`) say.

Convention (upstream): z_t = (1 - t) x + t z1 with data x at t = 0 and noise z1 at t = 1; the decoder
predicts v = z1 - x. The loop takes any model with `decode(z, code_with_mask, t) -> v`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from flowmo_fast.sampler_settings import SamplingOptions


def sample(model, z: Tensor, code_with_mask: Tensor, null_code: Optional[Tensor], options: SamplingOptions) -> Tensor:
    """Euler sampler from noise z [B, 3, H, W]; returns the final sample (not clipped).

    With a `null_code`, steps inside the guidance interval run the conditional and unconditional passes
    as one decoder call on a doubled batch, and use v = v_u + cfg (v_c - v_u). The plan (times, step sizes,
    guided steps) is computed once, on the host, so the loop never waits on the device. Times and step sizes
    enter as Python floats: no host-to-device copy (a CUDA-graph capture forbids one), and a step size stays
    exact float32 against a bf16 velocity (as upstream's host scalars do; a device tensor would be rounded).
    """
    plan = options.plan()
    b = z.shape[0]
    both_codes = torch.cat([code_with_mask, null_code]) if null_code is not None else None
    for t_i, dt_i, guided_i in zip(plan.times, plan.step_sizes, plan.guided):
        t = torch.full((b,), t_i, dtype=torch.float32, device=z.device)
        if guided_i and null_code is not None:
            v_c, v_u = model.decode(torch.cat([z, z]), both_codes, torch.cat([t, t])).chunk(2)
            v = v_u + options.cfg * (v_c - v_u)
        else:
            v = model.decode(z, code_with_mask, t)
        z = z - dt_i * v
    return z
