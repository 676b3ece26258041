"""Rectified flow: training time schedules, the loss, the evaluation sampler and post-training's chain.

Convention (upstream): z_t = (1 - t) x + t z1 with data x at t = 0 and noise z1 at t = 1; the decoder
predicts v = z1 - x, and sampling integrates from t = 1 down to 0.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.utils.checkpoint
from torch import Tensor

from flowmo_fast.config import parse_cfg_interval, parse_schedule

TRAIN_SCHEDULES = ("lognormal", "fat_lognormal", "uniform")


def sample_times(schedule: str, batch: int, device=None, generator: Optional[torch.Generator] = None) -> Tensor:
    """Training times t [batch] in (0, 1)."""
    if schedule == "uniform":
        return torch.rand((batch,), device=device, generator=generator)
    if schedule not in TRAIN_SCHEDULES:
        raise ValueError(f"time schedule {schedule!r}; allowed: {', '.join(TRAIN_SCHEDULES)}")
    t = torch.sigmoid(torch.randn((batch,), device=device, generator=generator))
    if schedule == "fat_lognormal":  # 10% of samples uniform instead
        use_lognormal = torch.rand((batch,), device=device, generator=generator) <= 0.9
        t = torch.where(use_lognormal, t, torch.rand((batch,), device=device, generator=generator))
    return t


def rectified_flow_loss(
    model,
    images: Tensor,
    schedule: str = "fat_lognormal",
    t: Optional[Tensor] = None,
    noise: Optional[Tensor] = None,
    generator: Optional[torch.Generator] = None,
    enable_cfg: bool = True,
) -> tuple[Tensor, dict]:
    """Diffusion loss mean((z1 - v - x)^2) plus the quantizer loss (`enable_cfg`: guidance dropout on).

    Returns (loss, aux) where aux holds `diffusion_loss`, `quantizer_loss`, `x_pred` (the one-step estimate
    of x, for perceptual losses), `t`, `noise` and the model's own aux entries.
    """
    b = images.shape[0]
    if t is None:
        t = sample_times(schedule, b, images.device, generator)
    if noise is None:
        noise = torch.randn(images.shape, device=images.device, generator=generator, dtype=images.dtype)
    tb = t.view(b, 1, 1, 1).to(images.dtype)
    zt = ((1 - tb) * images + tb * noise).to(images.dtype)
    v, aux = model(images, zt, t.to(images.dtype), enable_cfg=enable_cfg, generator=generator)
    diffusion_loss = (noise - v - images).float().pow(2).mean()
    aux.update(
        diffusion_loss=diffusion_loss,
        x_pred=zt - v * tb,
        t=t,
        noise=noise,
        velocity=v,
    )
    return diffusion_loss + aux["quantizer_loss"], aux


def sampler_schedule(steps: int, schedule: str = "pow_0.25") -> tuple[Tensor, Tensor]:
    """(times [steps], step sizes [steps]) on the CPU, from t = 1 towards 0, float32 as upstream."""
    if steps < 1:
        raise ValueError(f"steps={steps}: must be at least 1")
    p = parse_schedule(schedule)
    if p is None:
        ts = torch.arange(1, steps + 1).flip(0) / steps
        return ts, torch.ones_like(ts) * (1.0 / steps)
    ts = torch.arange(0, steps + 1).flip(0) ** (1 / p) / steps ** (1 / p)
    return ts[:-1], ts[:-1] - ts[1:]


def guided_steps(ts: Tensor, cfg_interval) -> list[bool]:
    """Which steps get guidance: t inside the interval, given as EDM sigmas and mapped to sigma / (1 + sigma)."""
    interval = parse_cfg_interval(cfg_interval)
    if interval is None:
        return [True] * len(ts)
    lo, hi = (s / (1 + s) for s in interval)
    return [lo <= t <= hi for t in ts.tolist()]


def sample(
    model,
    z: Tensor,
    code_with_mask: Tensor,
    null_code: Optional[Tensor] = None,
    steps: int = 25,
    cfg: float = 1.5,
    schedule: str = "pow_0.25",
    cfg_interval=(0.17, 1.02),
) -> Tensor:
    """Euler sampler from noise z [B, 3, H, W]; returns the final sample (not clipped).

    With a `null_code`, steps inside the guidance interval run the conditional and unconditional passes
    as one decoder call on a doubled batch, and use v = v_u + cfg (v_c - v_u). The schedule and the
    guidance mask are computed once, on the host, so the loop never waits on the device. Times and step sizes
    enter as Python floats: no host-to-device copy (a CUDA-graph capture forbids one), and a step size stays
    exact float32 against a bf16 velocity (as upstream's host scalars do; a device tensor would be rounded).
    """
    ts, dts = sampler_schedule(steps, schedule)
    guided = guided_steps(ts, cfg_interval) if null_code is not None else [False] * steps
    b = z.shape[0]
    both_codes = torch.cat([code_with_mask, null_code]) if null_code is not None else None
    for t_i, dt_i, guided_i in zip(ts.tolist(), dts.tolist(), guided):
        t = torch.full((b,), t_i, dtype=ts.dtype, device=z.device)
        if guided_i:
            v_c, v_u = model.decode(torch.cat([z, z]), both_codes, torch.cat([t, t])).chunk(2)
            v = v_u + cfg * (v_c - v_u)
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
    z = torch.randn((b, 3, *size), device=device, generator=generator)
    ts = torch.rand((b, k + 1), device=device, generator=generator).cumsum(dim=1)
    ts = ts - ts[:, :1]
    ts = (ts / ts[:, -1:]).flip(dims=(1,))
    dts = ts[:, :-1] - ts[:, 1:]
    for i in range(k):
        code = code_with_mask
        if enable_cfg:
            keep = torch.rand((b,), device=device, generator=generator) > 0.1
            code = code * keep[:, None, None].to(code.dtype)
        v = torch.utils.checkpoint.checkpoint(model.decode, z, code, ts[:, i], use_reentrant=False)
        z = z - dts[:, i, None, None, None] * v
    return z
