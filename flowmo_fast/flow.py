"""Rectified flow: training time schedules, the loss, the evaluation sampler and post-training's chain.

Convention (upstream): z_t = (1 - t) x + t z1 with data x at t = 0 and noise z1 at t = 1; the decoder
predicts v = z1 - x, and sampling integrates from t = 1 down to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.utils.checkpoint
from torch import Tensor

from flowmo_fast.noise import normal, uniform
from flowmo_fast.sampling import SamplingOptions

if TYPE_CHECKING:
    from flowmo_fast.model import ModelOutput

TRAIN_SCHEDULES = ("lognormal", "fat_lognormal", "uniform")
GUIDANCE_DROPOUT = 0.1  # upstream: the fraction of training samples whose code is dropped


def sample_times(schedule: str, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Training times t [batch] in (0, 1)."""
    if schedule == "uniform":
        return uniform((batch,), generator, device)
    if schedule not in TRAIN_SCHEDULES:
        raise ValueError(f"time schedule {schedule!r}; allowed: {', '.join(TRAIN_SCHEDULES)}")
    t = torch.sigmoid(normal((batch,), generator, device))
    if schedule == "fat_lognormal":  # 10% of samples uniform instead
        use_lognormal = uniform((batch,), generator, device) <= 0.9
        t = torch.where(use_lognormal, t, uniform((batch,), generator, device))
    return t


@dataclass
class FlowLoss:
    """The training loss and what perceptual losses and logs need of its forward pass."""

    loss: Tensor  # diffusion loss + quantizer loss, scalar
    diffusion_loss: Tensor  # mean((z1 - v - x)^2), float32 scalar
    x_pred: Tensor  # the one-step estimate of x, z_t - t v  [B, 3, H, W]
    t: Tensor  # [B]
    noise: Tensor  # z1 [B, 3, H, W]
    model: "ModelOutput"  # the model's forward: velocity, code, quantizer output


def rectified_flow_loss(
    model,
    images: Tensor,
    schedule: str = "fat_lognormal",
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    enable_cfg: bool = True,
) -> FlowLoss:
    """Diffusion loss mean((z1 - v - x)^2) plus the quantizer loss (`enable_cfg`: guidance dropout on)."""
    b = images.shape[0]
    if t is None:
        t = sample_times(schedule, b, images.device, generator)
    if noise is None:
        noise = normal(images.shape, generator, images.device, images.dtype)
    tb = t.view(b, 1, 1, 1).to(images.dtype)
    zt = ((1 - tb) * images + tb * noise).to(images.dtype)
    out = model(images, zt, t.to(images.dtype), enable_cfg=enable_cfg, generator=generator)
    diffusion_loss = (noise - out.velocity - images).float().pow(2).mean()
    return FlowLoss(
        loss=diffusion_loss + out.quantizer.loss,
        diffusion_loss=diffusion_loss,
        x_pred=zt - out.velocity * tb,
        t=t,
        noise=noise,
        model=out,
    )


def guidance_dropout(code_with_mask: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
    """Training's classifier-free guidance: the whole code (mask channel included) zeroed for a random
    GUIDANCE_DROPOUT fraction of the samples."""
    b = code_with_mask.shape[0]
    keep = uniform((b,), generator, code_with_mask.device) > GUIDANCE_DROPOUT
    return code_with_mask * keep[:, None, None].to(code_with_mask.dtype)


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


def posttrain_chain(
    model,
    code_with_mask: Tensor,
    size: tuple[int, int],
    k: int = 8,
    enable_cfg: bool = False,
    generator: Optional[torch.Generator] = None,
) -> Tensor:
    """Post-training's differentiable sample: k Euler steps at random sorted times from 1 to 0, each decoder
    pass checkpointed (non-reentrant, correct under torch.compile), so activation memory stays flat in k."""
    b, device = code_with_mask.shape[0], code_with_mask.device
    z = normal((b, 3, *size), generator, device)
    ts = uniform((b, k + 1), generator, device).cumsum(dim=1)
    ts = ts - ts[:, :1]
    ts = (ts / ts[:, -1:]).flip(dims=(1,))
    dts = ts[:, :-1] - ts[:, 1:]
    for i in range(k):
        code = guidance_dropout(code_with_mask, generator) if enable_cfg else code_with_mask
        v = torch.utils.checkpoint.checkpoint(model.decode, z, code, ts[:, i], use_reentrant=False)
        z = z - dts[:, i, None, None, None] * v
    return z
