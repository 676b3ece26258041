"""The picture of progress: a PNG grid of fixed validation images (top row) and their reconstructions by
the model being trained (bottom row), with the evaluation sampler of `eval.sampling` and fixed noise."""

from __future__ import annotations

import os

import torch
from PIL import Image

from flowmo_fast.images import image_grid
from flowmo_fast.model import FlowMo

GRID_IMAGES = 8
GRID_SEED = 1234  # the grid's own noise: the training RNG streams are never touched


@torch.no_grad()
def reconstruction_grid(model: FlowMo, images: torch.Tensor) -> Image.Image:
    """images [N, 3, H, W] in [-1, 1] (already on the model's device) -> grid image."""
    sampling = model.config.eval.sampling
    was_training = model.training
    model.eval()
    generator = torch.Generator(images.device).manual_seed(GRID_SEED)
    recon = model.reconstruct(
        images,
        steps=sampling.sample_steps,
        cfg=sampling.cfg,
        schedule=sampling.schedule,
        cfg_interval=sampling.cfg_interval,
        generator=generator,
    )
    model.train(was_training)
    return image_grid([images, recon])


def grid_path(log_dir: str, step: int) -> str:
    return os.path.join(log_dir, "samples", "%08d.png" % step)
