"""Rectified flow in training: time schedules, the loss, and post-training's differentiable chain (the
evaluation sampler is `flowmo_fast.flowmo.sampler`; `sample` and `guidance_dropout` are importable from here too).

Convention (upstream): z_t = (1 - t) x + t z1 with data x at t = 0 and noise z1 at t = 1; the decoder
predicts v = z1 - x, and sampling integrates from t = 1 down to 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.utils.checkpoint
from torch import Tensor

from flowmo_fast.flowmo.model import ModelOutput, guidance_dropout
from flowmo_fast.flowmo.sampler import sample
from flowmo_fast.noise import normal, uniform

__all__ = ["FlowLoss", "guidance_dropout", "posttrain_chain", "rectified_flow_loss", "sample", "sample_times"]

TRAIN_SCHEDULES = ("lognormal", "fat_lognormal", "uniform")


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
    model: ModelOutput  # the model's forward: velocity, code, quantizer output


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
