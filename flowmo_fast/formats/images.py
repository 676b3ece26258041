"""Image conversions between what users hand us (pictures: arrays, PIL images, files; or tensors already in the
model's range) and model input, and the one resize-and-crop (`fit_square`) that the data sets and the tokenizer
both apply."""

from __future__ import annotations

import os
import random
from typing import Optional, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch import Tensor

Picture = Union[np.ndarray, Image.Image, str, os.PathLike]
ImageLike = Union[Tensor, Picture, Sequence[Picture]]
RANGE_TOLERANCE = 1e-3
ARRAY_CHANNELS = (1, 3, 4)  # channels-last arrays: gray, RGB, RGBA


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Shorter side -> `size`, bilinear with antialiasing (upstream's `T.Resize(size)`); as is when it already is."""
    if min(image.size) == size:
        return image
    return TF.resize(image, size, interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def crop_square(image: Image.Image, size: int, rng: Optional[random.Random]) -> Image.Image:
    """A size x size crop: centred when `rng` is None, else at a uniformly random offset."""
    if rng is None:
        return TF.center_crop(image, [size, size])
    w, h = image.size
    top, left = rng.randint(0, h - size), rng.randint(0, w - size)
    return image.crop((left, top, left + size, top + size))


def shrink_to(image: Image.Image, size: int) -> Image.Image:
    """RGB with the shorter side `size` (an RGB image already that size is returned as is)."""
    return resize_shorter_side(to_rgb(image), size)


def fit_square(image: Image.Image, size: int, rng: Optional[random.Random] = None) -> Image.Image:
    """Any picture -> the size x size RGB image the model sees: RGB, shorter side resized to `size`, then a crop,
    centred (rng None: evaluation, the tokenizer) or at a random offset (training). The data sets' pipeline."""
    return crop_square(shrink_to(image, size), size, rng)


def to_model_input(images: ImageLike, size: Optional[int] = None, resize: bool = True) -> Tensor:
    """-> float32 [B, 3, H, W] in [-1, 1].

    Pictures: uint8 or 16-bit (uint16) arrays [H, W], [H, W, C] or [B, H, W, C] with C = 1, 3 or 4 (gray, RGB,
    RGBA; channels last); PIL images of any mode; paths of image files; or a list of these (sizes may differ).
    Each is converted to RGB (alpha dropped, 16-bit to its top 8 bits) and, given `size`, fitted to size x size
    as the data sets' evaluation crops are (`fit_square`); with resize=False it must already be size x size.
    Without `size`, pictures keep their size and must share it.
    Float tensors [3, H, W] or [B, 3, H, W] in [-1, 1] are model input already: returned as they are.
    """
    if isinstance(images, Tensor):
        return tensor_input(images)
    pictures = as_pictures(images)
    if size is not None:
        pictures = [fit_square(p, size) if resize else require_size(p, size, i) for i, p in enumerate(pictures)]
    arrays = [np.asarray(p) for p in pictures]  # each [H, W, 3] uint8
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise ValueError(
            f"images in one batch must share a size; got shapes {shapes}: give size= to resize and crop them "
            "(the Tokenizer does), or resize or crop them first"
        )
    return uint8_to_model_range(np.stack(arrays))


def tensor_input(images: Tensor) -> Tensor:
    """Float [3, H, W] or [B, 3, H, W] in [-1, 1] -> float32 [B, 3, H, W], checked."""
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


def as_pictures(images) -> list[Image.Image]:
    """One picture, a batch array or a list of pictures -> RGB PIL images."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        return [array_to_rgb(a) for a in images]
    if not isinstance(images, (list, tuple)):
        return [to_picture(images, 0)]
    if not images:
        raise ValueError("got an empty list of images")
    return [to_picture(im, i) for i, im in enumerate(images)]


def to_picture(item, i: int) -> Image.Image:
    """One picture (array, PIL image, file path) -> an RGB PIL image."""
    if isinstance(item, Image.Image):
        return to_rgb(item)
    if isinstance(item, np.ndarray):
        return array_to_rgb(item)
    if isinstance(item, (str, os.PathLike)):
        return open_picture(item)
    raise ValueError(
        f"image {i} is a {type(item).__name__}: pass uint8 numpy arrays [H, W, 3], PIL images, image file paths, "
        "or a list of these; or a float tensor [B, 3, H, W] in [-1, 1]"
    )


def array_to_rgb(array: np.ndarray) -> Image.Image:
    """uint8 / uint16 [H, W] or [H, W, 1 | 3 | 4] -> an RGB PIL image (uint16: its top 8 bits, as 16-bit files)."""
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(
            f"numpy images must be uint8 (0..255) or uint16 (16-bit), got dtype {array.dtype}; "
            "for float data pass a torch tensor [B, 3, H, W] in [-1, 1]"
        )
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in ARRAY_CHANNELS)):
        raise ValueError(
            f"numpy images must be [H, W], [H, W, C] or [B, H, W, C] with C = 1, 3 or 4 (channels last), "
            f"got {array.shape}"
        )
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    return to_rgb(Image.fromarray(np.ascontiguousarray(array)))  # mode L, RGB or RGBA from the shape


def open_picture(path: Union[str, os.PathLike]) -> Image.Image:
    """An image file -> an RGB PIL image; errors name the file."""
    try:
        with Image.open(path) as image:
            image.load()
            return to_rgb(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"image file not found: {os.fspath(path)}") from None
    except (IsADirectoryError, PermissionError):
        raise
    except Exception as e:  # PIL raises many types for files it cannot read (OSError, SyntaxError, ...)
        raise ValueError(f"{os.fspath(path)} is not an image file PIL can read ({type(e).__name__}: {e})") from None


def require_size(picture: Image.Image, size: int, i: int) -> Image.Image:
    if picture.size != (size, size):
        w, h = picture.size
        raise ValueError(
            f"image {i} is {w}x{h} (width x height), but resize=False needs {size}x{size}: leave resize on to "
            "resize and centre-crop it as the data sets do, or pass it at that size"
        )
    return picture


def uint8_to_model_range(array: np.ndarray) -> Tensor:
    """uint8 [..., H, W, 3] -> float32 [..., 3, H, W] in [-1, 1]: x / 127.5 - 1 in float64, then rounded to
    float32, as upstream's data loader (one conversion for the data sets and the tokenizer)."""
    scaled = (np.asarray(array, dtype=np.float64) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(scaled).movedim(-1, -3).contiguous()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grayscale, RGBA/LA (alpha dropped, as upstream), CMYK, palette, 16-bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):  # 16-bit PNG/TIFF: keep the top 8 bits
        image = Image.fromarray((np.asarray(image, dtype=np.uint16) >> 8).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


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
