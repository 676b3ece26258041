"""Perceptual losses of upstream (`opt.lpips_mode`): `vgg` = LPIPS (the lpips package, VGG-16) for
pre-training; `resnet` = MSE between ResNet-50 ImageNet logits for post-training. Both are frozen, take
images in [-1, 1] and return one number per call (a mean), and load their weights through the normal
torchvision / lpips code (downloaded once into $TORCH_HOME/hub/checkpoints)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance (VGG-16 features) between images and targets."""

    def __init__(self):
        super().__init__()
        import lpips

        self.net = lpips.LPIPS(net="vgg", verbose=False)

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        return self.net(images, targets).mean()


class ResNetLogitLoss(nn.Module):
    """MSE between ResNet-50 (ImageNet weights) logits of images and targets, both resized to 224 as upstream.
    The targets' logits need no gradient, so they are computed without one."""

    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet50(weights=torchvision.models.ResNet50_Weights.IMAGENET1K_V1)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN)[None, :, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD)[None, :, None, None], persistent=False)

    def logits(self, images: Tensor) -> Tensor:
        x = F.interpolate(images / 2 + 0.5, size=224, mode="bilinear", antialias=True, align_corners=False)
        return self.net((x - self.mean) / self.std)

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        with torch.no_grad():
            target_logits = self.logits(targets)
        return F.mse_loss(self.logits(images), target_logits)


def build_perceptual_loss(opt_config, device: torch.device) -> Optional[nn.Module]:
    """The frozen perceptual loss `opt.lpips_mode` names, or None when `opt.lpips_weight` is 0."""
    if opt_config.lpips_weight == 0.0:
        return None
    losses = {"vgg": LPIPSLoss, "resnet": ResNetLogitLoss}
    if opt_config.lpips_mode not in losses:
        raise ValueError(f"opt.lpips_mode={opt_config.lpips_mode!r}; allowed: {', '.join(losses)}")
    return losses[opt_config.lpips_mode]().to(device).eval().requires_grad_(False)
