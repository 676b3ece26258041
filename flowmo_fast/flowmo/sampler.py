"""FlowMo's evaluation sampler: the steps of the rectified-flow ODE from noise (t = 1) to the image (t = 0) with
the solver its settings name (upstream's Euler by default; `flowmo_fast.sampler_settings` has the solvers and
their plan), with classifier-free guidance on the velocities the settings say.

Convention (upstream): z_t = (1 - t) x + t z1 with data x at t = 0 and noise z1 at t = 1; the decoder
predicts v = z1 - x. The loop takes any model with `decode(z, code_with_mask, t) -> v`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from flowmo_fast.sampler_settings import SamplingOptions

Velocity = Callable[[Tensor, float, bool], Tensor]  # (z, t, guided) -> v, same shape as z


def sample(model, z: Tensor, code_with_mask: Tensor, null_code: Optional[Tensor], options: SamplingOptions) -> Tensor:
    """The sampler from noise z [B, 3, H, W]; returns the final sample (not clipped).

    The plan (times, step sizes, guidance, the solver's coefficients) is computed once, on the host, so the loop
    never waits on the device: every branch below is on host values. Times, step sizes and coefficients enter
    as Python floats: no host-to-device copy (a CUDA-graph capture forbids one), and a step size stays exact
    float32 against a bf16 velocity (as upstream's host scalars do; a device tensor would be rounded). Euler's
    step is upstream's arithmetic, operation for operation.
    """
    velocity = guided_velocity(model, code_with_mask, null_code, options.cfg)
    previous = None  # the multistep solver's k_(i-1)
    for step in options.plan().steps:
        k = velocity(z, step.time, step.guided)
        v = k
        if step.stage is not None:  # Heun, midpoint: a second velocity inside the step
            k2 = velocity(z - step.stage.lead * k, step.stage.time, step.stage.guided)
            v = k2 if step.stage.weight == 1.0 else k + step.stage.weight * (k2 - k)
        if step.history:  # Adams-Bashforth 2: extrapolated from this step's velocity and the previous one
            v = k + step.history * (previous - k)
        previous = k
        z = z - step.size * v
    return z


def guided_velocity(model, code_with_mask: Tensor, null_code: Optional[Tensor], cfg: float) -> Velocity:
    """v(z, t, guided): the conditional velocity, or with a `null_code` and `guided`, v_u + cfg (v_c - v_u) from
    the conditional and unconditional passes run as one decoder call on a doubled batch."""
    both_codes = torch.cat([code_with_mask, null_code]) if null_code is not None else None

    def velocity(z: Tensor, t_i: float, guided: bool) -> Tensor:
        t = torch.full((z.shape[0],), t_i, dtype=torch.float32, device=z.device)
        if guided and both_codes is not None:
            v_c, v_u = model.decode(torch.cat([z, z]), both_codes, torch.cat([t, t])).chunk(2)
            return v_u + cfg * (v_c - v_u)
        return model.decode(z, code_with_mask, t)

    return velocity
