"""The picture of progress: a PNG grid of fixed validation images (top row) and their reconstructions by
the model being trained (bottom row), with the evaluation sampler of `eval.sampling` and fixed per-image noise."""

from __future__ import annotations

import math
import os

import torch
from PIL import Image

from flowmo_fast.distributed import Processes
from flowmo_fast.flowmo.model import FlowMo
from flowmo_fast.formats.images import image_grid

GRID_MIN_SIDE = 128  # each image's side on screen, at least: smaller images are scaled up (nearest neighbour)
GRID_SEED = 1234  # the grid's own noise streams (flowmo_fast.noise): the training RNG streams are never touched


@torch.no_grad()
def reconstruction_grid(model: FlowMo, images: torch.Tensor) -> Image.Image:
    """images [N, 3, H, W] in [-1, 1] (already on the model's device) -> grid image, scaled up (`scaled_up`)."""
    was_training = model.training
    model.eval()
    recon = model.reconstruct_rows(images, range(len(images)), GRID_SEED)
    model.train(was_training)
    return scaled_up(image_grid([images, recon]), min(images.shape[-2:]))


def scaled_up(grid: Image.Image, image_side: int) -> Image.Image:
    """The grid enlarged by the smallest whole factor that shows each image at least GRID_MIN_SIDE pixels wide
    (nearest neighbour: every model pixel stays a sharp square)."""
    factor = math.ceil(GRID_MIN_SIDE / image_side)
    if factor <= 1:
        return grid
    return grid.resize((grid.width * factor, grid.height * factor), Image.Resampling.NEAREST)


def grid_path(log_dir: str, step: int) -> str:
    return os.path.join(log_dir, "samples", "%08d.png" % step)


def save_grid(model: FlowMo, images: torch.Tensor, log_dir: str, step: int, procs: Processes, metrics) -> None:
    """Every rank reconstructs (FSDP needs all); rank 0 writes the PNG and logs it to TensorBoard."""
    grid = reconstruction_grid(model, images)
    if procs.is_main:
        path = grid_path(log_dir, step)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        metrics.add_image("reconstructions", grid, step)
        metrics.write(f"wrote {path} (top: inputs, bottom: reconstructions)")
