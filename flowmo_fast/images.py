"""Image conversions between what users hand us (uint8 HWC arrays, PIL images, tensors) and model input."""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch import Tensor

ImageLike = Union[Tensor, np.ndarray, Image.Image, Sequence[Image.Image], Sequence[np.ndarray]]
RANGE_TOLERANCE = 1e-3


def to_model_input(images: ImageLike) -> Tensor:
    """-> float32 [B, 3, H, W] in [-1, 1].

    Accepts uint8 arrays [H, W, 3] or [B, H, W, 3], PIL images (any mode; converted to RGB) or a list of
    either with one size, and float tensors [3, H, W] or [B, 3, H, W] already in [-1, 1].
    """
    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        arrays = [_pil_or_array(im, i) for i, im in enumerate(images)]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images in one batch must share a size; got shapes {sorted(shapes)}: resize or crop first")
        images = np.stack(arrays)
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise ValueError(
                f"numpy images must be uint8 [H, W, 3] or [B, H, W, 3] in 0..255, got dtype {images.dtype}; "
                "for float data pass a torch tensor [B, 3, H, W] in [-1, 1]"
            )
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"numpy images must be [H, W, 3] or [B, H, W, 3] (RGB, channels last), got {images.shape}")
        return uint8_to_model_range(images)
    if isinstance(images, Tensor):
        if not images.is_floating_point():
            raise ValueError(
                f"tensor images must be floating point [B, 3, H, W] in [-1, 1], got dtype {images.dtype}; "
                "for uint8 data pass a numpy array [B, H, W, 3]"
            )
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"tensor images must be [B, 3, H, W] or [3, H, W] (RGB, channels first), got {tuple(images.shape)}")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1 - RANGE_TOLERANCE or hi > 1 + RANGE_TOLERANCE:
            raise ValueError(
                f"tensor images must lie in [-1, 1], got values in [{lo:.3g}, {hi:.3g}]; "
                "map [0, 1] data with x * 2 - 1 (or [0, 255] with x / 127.5 - 1)"
            )
        return images.float()
    raise ValueError(
        f"unsupported image type {type(images).__name__}: pass uint8 numpy arrays [B, H, W, 3], PIL images, "
        "or float tensors [B, 3, H, W] in [-1, 1]"
    )


def uint8_to_model_range(array: np.ndarray) -> Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]: x / 127.5 - 1 in float64, then rounded to
    float32, as upstream's data loader (one conversion for the data sets and the tokenizer)."""
    scaled = (np.asarray(array, dtype=np.float64) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(scaled).movedim(-1, -3).contiguous()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale, RGBA/LA (alpha dropped, as upstream), CMYK, palette, 16-bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit PNG/TIFF: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def _pil_or_array(im, i: int) -> np.ndarray:
    if isinstance(im, Image.Image):
        return np.asarray(to_rgb(im))
    if isinstance(im, np.ndarray):
        return im
    raise ValueError(f"image {i} is a {type(im).__name__}; a list may hold PIL images or uint8 numpy arrays")


def to_uint8(images: Tensor) -> np.ndarray:
    """[B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


GRID_IMAGES = 8  # images per row of the grids that commands write (training progress, evaluation)


def image_grid(rows: Sequence[Tensor], pad: int = 2) -> Image.Image:
    """Rows of images (each [B, 3, H, W] in [-1, 1], same shapes) -> one PIL image, a row each."""
    arrays = [to_uint8(r) for r in rows]
    b, h, w, _ = arrays[0].shape
    grid = np.full((len(arrays) * (h + pad) + pad, b * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for r, row in enumerate(arrays):
        for c in range(b):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            grid[y : y + h, x : x + w] = row[c]
    return Image.fromarray(grid)
