"""Upstream's training loss (`rf_loss`) as one module, so DDP sees the whole loss in one forward:
rectified-flow loss + quantizer loss + `opt.lpips_weight` x perceptual loss, the latter on the one-step
estimate of x (pre-training) or on post-training's differentiable k-step sample (`model.posttrain_sample`)."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from flowmo_fast import flow
from flowmo_fast.model import FlowMo


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
        loss, aux = flow.rectified_flow_loss(self.model, images, schedule=config.opt.schedule)
        terms = {"diffusion_loss": aux["diffusion_loss"], "quantizer_loss": aux["quantizer_loss"]}
        terms.update({f"quantizer/{k}": v for k, v in aux["quantizer_breakdown"].items()})
        if self.perceptual is not None:
            if config.model.posttrain_sample:
                prediction = flow.posttrain_chain(
                    self.model,
                    aux["code"],  # before guidance dropout, as upstream
                    images.shape[-2:],
                    k=config.model.posttrain_sample_k,
                    enable_cfg=config.model.posttrain_sample_enable_cfg,
                )
            else:
                prediction = aux["x_pred"]
            perceptual = config.opt.lpips_weight * self.perceptual(images, prediction)
            terms["lpips_loss"] = perceptual
            loss = loss + perceptual
        terms["total_loss"] = loss
        return loss, {k: v.detach().float() for k, v in terms.items()}
