"""Upstream's training loss (`rf_loss`) as one module, so DDP sees the whole loss in one forward:
rectified-flow loss + quantizer loss + `opt.lpips_weight` x perceptual loss, the latter on the one-step
estimate of x (pre-training) or on post-training's differentiable k-step sample (`model.posttrain_sample`)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from flowmo_fast.flowmo import flow
from flowmo_fast.flowmo.model import FlowMo


class FlowMoObjective(nn.Module):
    def __init__(self, model: FlowMo, perceptual: Optional[nn.Module]):
        super().__init__()
        self.model = model
        self.perceptual = perceptual  # frozen, always in eval mode

    def train(self, mode: bool = True) -> "FlowMoObjective":
        super().train(mode)
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """images [B, 3, H, W] in [-1, 1] -> (loss, named loss terms, all detached scalars)."""
        config = self.model.config
        out = flow.rectified_flow_loss(self.model, images, schedule=config.opt.schedule)
        loss, quantizer = out.loss, out.model.quantizer
        terms = {"diffusion_loss": out.diffusion_loss, "quantizer_loss": quantizer.loss}
        terms.update({f"quantizer/{k}": v for k, v in quantizer.breakdown.items()})
        if self.perceptual is not None:
            # (prediction, target): the loss's gradient flows through its first argument (ResNetLogitLoss: the target's
            # logits are computed without one)
            perceptual = config.opt.lpips_weight * self.perceptual(self.prediction(images, out), images)
            terms["lpips_loss"] = perceptual
            loss = loss + perceptual
        terms["total_loss"] = loss
        return loss, {k: v.detach().float() for k, v in terms.items()}

    def prediction(self, images: Tensor, out: flow.FlowLoss) -> Tensor:
        """What the perceptual loss sees: post-training's k-step sample, else the one-step estimate of x."""
        m = self.model.config.model
        if not m.posttrain_sample:
            return out.x_pred
        return flow.posttrain_chain(
            self.model,
            out.model.code_with_mask,  # before guidance dropout, as upstream
            images.shape[-2:],
            k=m.posttrain_sample_k,
            enable_cfg=m.posttrain_sample_enable_cfg,
        )
